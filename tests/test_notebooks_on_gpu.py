"""benchmarks/notebooks_on_gpu.py, the parts that run without a GPU: inputs, knobs edit, probe, summary, wheels.

The course notebooks themselves are not executed here (CI runs them in smoke mode in test_notebooks.py); the probe
is checked on a three-cell notebook in a real kernel.
"""

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "notebooks_on_gpu.py"


@pytest.fixture(scope="module")
def nog():
    spec = importlib.util.spec_from_file_location("notebooks_on_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_checkpoint_loads_with_lora_kit_and_is_reused(nog, tmp_path):
    from lora_kit import load_model

    folder = nog.build_checkpoint(tmp_path / "tiny", "tiny-llama-random", device="cpu")
    model, tokenizer = load_model(str(folder))
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert (folder / "generation_config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    nog.build_checkpoint(folder, "tiny-llama-random", device="cpu")  # same recipe: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_shapes_match_the_models_the_gpu_recipe_names(nog):
    from transformers import LlamaConfig

    from lora_kit.memory import llama2_7b_config

    ref = llama2_7b_config()
    big = nog.SHAPES[nog.MODEL_FOR["qlora"]]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert big[key] == getattr(ref, key)
    config = LlamaConfig(**nog.SHAPES[nog.MODEL_FOR["lora"]])
    assert config.tie_word_embeddings and config.hidden_size == 2048 and config.num_hidden_layers == 24


def test_chat_file_loads_as_llama2_conversations_of_varied_length(nog, tmp_path):
    from lora_kit import load_data

    path = nog.write_chat_file(tmp_path / "chat.jsonl", rows=50)
    first = json.loads(path.read_text().splitlines()[0])["text"]
    assert first.startswith("<s>[INST] ") and " [/INST] " in first and first.endswith(" </s>")
    ds = load_data(str(path))
    assert len(ds) == 50
    assert [m["role"] for m in ds[0]["messages"]] == ["user", "assistant"]
    lengths = sorted(len(m[1]["content"].split()) for m in ds["messages"])
    assert lengths[0] < 60 < lengths[-1]


@pytest.mark.parametrize("name", ["lora_finetune.ipynb", "qlora_finetune.ipynb"])
def test_knobs_cell_is_edited_as_a_learner_would(nog, name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nog.set_knobs(nb, "lora8", dict(model="/m", dataset="/d.jsonl", max_steps=10, eval_samples=8))
    cell = next(c for c in nb.cells if "OVERRIDES = dict(" in c.source)
    lines = cell.source.splitlines()
    assert 'METHOD = "lora8"' in lines
    assert 'OVERRIDES = dict(model="/m", dataset="/d.jsonl", max_steps=10, eval_samples=8)' in lines
    assert "cfg = course.course_settings(METHOD" in cell.source  # the rest of the cell is untouched
    namespace = {}
    exec("\n".join(lines[:4]), namespace)  # the edited lines are valid Python with the values asked for
    assert namespace["OVERRIDES"]["max_steps"] == 10 and namespace["METHOD"] == "lora8"
    names = nog.sections(nb)
    assert names[nb.cells.index(cell)].startswith("2.")


def test_probe_writes_one_line_per_cell_in_a_real_kernel(nog, tmp_path, monkeypatch):
    """A three-cell notebook executed with nbclient under the startup file and kernelspec the script writes."""
    from nbclient import NotebookClient

    cells = ["x = 1", "import time\nblob = bytearray(200 * 2**20)\ntime.sleep(0.3)\ndel blob", "1 / 0"]
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("## 3. Memory")] + [nbformat.v4.new_code_cell(s) for s in cells]
    )
    probe = tmp_path / "probe.jsonl"
    env = nog.kernel_env(nog.prepare_kernel_dirs(tmp_path, probe, t4_proxy=False))
    for key in ("IPYTHONDIR", "JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "PYTHONPATH", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    NotebookClient(
        nb, kernel_name=nog.KERNEL_NAME, timeout=120, allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    records, pid = nog.read_probe(probe)
    assert isinstance(pid, int) and pid != os.getpid()
    assert [r["execution_count"] for r in records] == [1, 2, 3]
    assert records[1]["wall_s"] >= 0.3 and records[1]["peak_rss_gib"] >= records[0]["peak_rss_gib"] + 0.15
    assert records[0]["peak_allocated_gib"] is None  # no CUDA here: GPU fields are null
    assert records[2]["error"].startswith("ZeroDivisionError")
    rows = nog.cell_rows(nb, records)
    assert [r["index"] for r in rows] == [1, 2, 3]
    assert rows[1]["section"] == "3. Memory" and rows[1]["first_line"] == "import time"
    assert rows[2]["flags"].get("Traceback") or rows[2]["error"]


def test_summary_files_and_flags(nog, tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("## 7. Train"),
            nbformat.v4.new_code_cell(
                "train()",
                outputs=[
                    nbformat.v4.new_output(
                        "stream", name="stderr", text="W torch._dynamo hit config.recompile_limit (8)\nrecompiling\n"
                    )
                ],
            ),
            nbformat.v4.new_code_cell("merge()"),
        ]
    )
    probe = [
        {
            "source_key": nog.source_key("train()"),
            "execution_count": 1,
            "wall_s": 12.5,
            "peak_allocated_gib": 9.1,
            "peak_reserved_gib": 10.0,
            "allocated_end_gib": 6.0,
            "peak_rss_gib": 3.2,
            "error": None,
        },
        {
            "source_key": nog.source_key("merge()"),
            "execution_count": 2,
            "wall_s": 3.0,
            "peak_allocated_gib": 14.4,
            "peak_reserved_gib": 14.5,
            "allocated_end_gib": 8.4,
            "peak_rss_gib": 5.0,
            "error": "OutOfMemoryError: CUDA out of memory",
        },
    ]
    run = nog.run_record("qlora", "t4", nb, probe, {"completed": False, "error": None}, 60.0, "log\nTraceback")
    assert run["completed"] is False and run["error"].startswith("OutOfMemoryError")
    assert run["peak_allocated_gib"] == 14.4 and run["peak_rss_gib"] == 5.0 and run["t4_proxy"] is True
    assert run["cells"][0]["flags"] == {"recompil": 2} and run["flags"]["log: Traceback"] == 1
    assert [c["section"] for c in run["cells"]] == ["7. Train", "7. Train"]
    json_path, md_path = nog.write_summary([run], tmp_path, {"gpu": "test"})
    saved = json.loads(json_path.read_text())["runs"][0]
    for key in (
        "notebook",
        "method",
        "t4_proxy",
        "completed",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "peak_rss_gib",
        "wall_s",
        "error",
        "cells",
    ):
        assert key in saved
    for key in (
        "index",
        "section",
        "first_line",
        "wall_s",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "peak_rss_gib",
        "error",
    ):
        assert key in saved["cells"][0]
    md = md_path.read_text()
    assert "| qlora_finetune.ipynb | qlora | yes | **no** | 2/2 |" in md and "`merge()`" in md
    text = nog.summary_text([run])
    assert "NO" in text and "FLAG qlora:t4 cell 1 (7. Train): recompil x2" in text


def test_runs_are_parsed_and_checked(nog):
    assert nog.parse_runs("qlora:t4, lora:big") == [("qlora", "t4"), ("lora", "big")]
    assert len(nog.parse_runs(nog.ALL_RUNS)) == 6
    with pytest.raises(SystemExit):
        nog.parse_runs("qlora:h100")


def test_slim_wheel_drops_other_libraries_and_their_record_lines(nog, tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm72.so",
    ]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 10)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{n},sha256=a,10\n" for n in names))
    nog.slim_wheel(wheel, nog.SLIM["bitsandbytes"])
    with zipfile.ZipFile(wheel) as z:
        kept = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == {names[0], names[1], names[3], "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda128" not in record and "rocm" not in record and "cuda130" in record


def test_wheel_list_is_pinned_once_each():
    lines = [
        line.strip()
        for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert all("==" in line for line in lines) and len(names) == len(set(names))
    assert {"bitsandbytes", "trl", "datasets", "nbclient", "ipykernel", "transformers"} <= set(names)
    assert not {"torch", "numpy"} & set(names)


def test_a_line_repeated_many_times_is_flagged(nog):
    flood = "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16\n" * (nog.REPEATS_FLAGGED + 1)
    flags = nog.flags_in("loss 1.2\n" * 3 + flood)
    assert flags == {
        "repeated: MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16": nog.REPEATS_FLAGGED + 1
    }
    assert nog.flags_in("loss 1.2\n" * nog.REPEATS_FLAGGED) == {}
