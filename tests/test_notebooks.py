"""The two notebooks: their shape (prose first, short cells) and a full smoke execution of each.

The execution tests run every cell with LORA_KIT_SMOKE=1 (embedded model, demo task, a few
steps) in a copy of the notebook, so the committed file is left as it is. Same check as
``LORA_KIT_SMOKE=1 pytest --nbmake notebooks/``.
"""

import ast
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "notebooks" / "lora_finetune.ipynb", ROOT / "notebooks" / "qlora_finetune.ipynb"]
MAX_CODE_LINES = 20
SMOKE_LIMIT_S = 8 * 60


def _cells(path, kind):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_more_prose_than_code(path):
    assert len(_cells(path, "markdown")) > len(_cells(path, "code"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_are_short_and_live(path):
    for cell in _cells(path, "code"):
        lines = [line for line in cell.source.splitlines() if line.strip()]
        assert len(lines) <= MAX_CODE_LINES, f"a code cell of {len(lines)} lines:\n{cell.source}"
        assert not re.search(r"\bif\s+(False|0)\s*:", cell.source), cell.source
        ast.parse(cell.source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_sections_name_the_variables_they_use(path):
    """A section may only use names defined in itself, in the set-up, or in a section its intro names."""
    sections, current = {}, None
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            match = re.match(r"## (\d+)\.", cell.source)
            if match:
                current = int(match.group(1))
                sections[current] = {"intro": cell.source, "code": []}
        elif current is not None:
            sections[current]["code"].append(cell.source)
    defined_in = {}
    for number, section in sections.items():
        for source in section["code"]:
            for node in ast.walk(ast.parse(source)):
                names = []
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names += [(a.asname or a.name).split(".")[0] for a in node.names]
                for name in names:
                    defined_in.setdefault(name, number)
    for number, section in sections.items():
        uses = next((p for p in section["intro"].split("\n\n") if p.startswith("*Uses")), "").replace("\n", " ")
        named, numbers = set(re.findall(r"`(\w+)`", uses)), set(map(int, re.findall(r"\d+", uses)))
        for source in section["code"]:
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    origin = defined_in.get(node.id)
                    if origin is None or origin in (1, number):
                        continue
                    assert node.id in named and origin in numbers, (
                        f"section {number} uses `{node.id}` from section {origin} without naming it: {uses!r}"
                    )


def _execute(path, workdir):
    from nbclient import NotebookClient

    copy = workdir / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    NotebookClient(
        nb, timeout=SMOKE_LIMIT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KIT_SMOKE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    start = time.time()
    nb = _execute(path, tmp_path)  # raises CellExecutionError, with the failing cell, on any error
    elapsed = time.time() - start
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
    assert (
        "Failed to load CPU gemm_4bit_forward" not in outputs
    )  # harmless bitsandbytes log: notebook_defaults mutes it
    assert "Skipping the upload" in outputs  # the Hub step skipped by its real condition, with the reason
    assert (tmp_path / "outputs").is_dir()
    print(f"{path.name}: {elapsed:.0f} s")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_committed_notebooks_equal_what_build_py_writes(method):
    """The notebooks are generated: an edit made to the .ipynb alone would be lost at the next build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", ROOT / "notebooks" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    committed = nbformat.read(ROOT / "notebooks" / build.NOTEBOOKS[method], as_version=4)
    built = build.build(method)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        "the notebook differs from notebooks/build.py's output: edit build.py, then run `make notebooks`"
    )
