"""The shipped T4 configs through ``lora-kit train`` on a GPU told it is a T4: train, evaluate, save, merge, export.

For each of ``configs/{qlora,lora8,lora}-t4.yaml``, a process of its own applies the T4 proxy of
``notebooks_on_gpu.py`` (compute capability 7.5, 15 GiB, the allocator capped at 14.5 GiB) and runs the command a
user would, on a random-weight fp16 checkpoint of the default model's shape and a 400-row chat file::

    lora-kit train configs/qlora-t4.yaml --set model=CHECKPOINT --set data.dataset=CHATS.jsonl \\
        --set train.max_steps=10 --set eval.eval_samples=8 --set output_dir=RUN/outputs

Recorded per run: the command's result line, its seconds, peak GPU memory (from the training's start, as
``lora_kit.train.train`` resets the count) and peak resident / anonymous memory. The runs go one after another and
each run's merged model and GGUF file are deleted once measured, so three 7B-sized outputs never share the disk.

    python3 benchmarks/configs_on_gpu.py --tokenizer .whl/tokenizer --llama-cpp .whl/llama-cpp --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from notebooks_on_gpu import (  # noqa: E402  (after the path above)
    GIB,
    MODEL_FOR,
    _anon_rss_bytes,
    _rss_bytes,
    apply_t4_proxy,
    build_checkpoint,
    environment_info,
    folder_gib,
    write_chat_file,
)


def child(args) -> int:
    """One config's run under the T4 proxy; peaks written to ``RUN/peaks.json``."""
    import torch

    from lora_kit.cli import main

    if torch.cuda.is_available():
        apply_t4_proxy()
    peaks = {"rss": 0, "anon": 0}

    def sample():
        while True:
            peaks["rss"], peaks["anon"] = max(peaks["rss"], _rss_bytes()), max(peaks["anon"], _anon_rss_bytes())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    run_dir = Path(args.run_dir)
    sets = [
        f"model={args.model}",
        f"data.dataset={args.data}",
        f"train.max_steps={args.max_steps}",
        f"eval.eval_samples={args.eval_samples}",
        f"output_dir={run_dir / 'outputs'}",
    ]
    rc = main(["train", str(ROOT / "configs" / f"{args.child}-t4.yaml"), *(f"--set={s}" for s in sets)])
    cuda = torch.cuda.is_available()
    record = {
        "returncode": rc,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
        "peak_rss_gib": round(peaks["rss"] / GIB, 2),
        "peak_rss_anon_gib": round(peaks["anon"] / GIB, 2),
    }
    (run_dir / "peaks.json").write_text(json.dumps(record))
    return rc or 0


def _result(line: str) -> dict | None:
    """The command's result line (one JSON object with the run's numbers), or None for any other line."""
    try:
        found = json.loads(line) if line.startswith("{") else None
    except json.JSONDecodeError:  # the trainer's log lines are Python dicts, not JSON
        return None
    return found if isinstance(found, dict) and "steps" in found else None


def one_run(method: str, checkpoint: Path, chats: Path, work: Path, args) -> dict:
    run_dir = work / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch folder of an earlier call
    run_dir.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", method, "--model", str(checkpoint), "--data", str(chats)]
    command += ["--run-dir", str(run_dir), "--max-steps", str(args.max_steps), "--eval-samples", str(args.eval_samples)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.llama_cpp:
        env["LORA_KIT_LLAMA_CPP"] = str(Path(args.llama_cpp).resolve())
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:  # its output comes as bytes whatever text= said
        output = b"".join(part or b"" for part in (err.stdout, err.stderr)).decode(errors="replace")
        output, rc = f"{output}\nstopped after {args.timeout} s", None
    wall = time.time() - start
    (Path(args.out) / f"{method}_t4.log").write_text(output)
    results = [found for line in output.splitlines() if (found := _result(line))]
    peaks_file = run_dir / "peaks.json"
    record = {"config": f"configs/{method}-t4.yaml", "returncode": rc, "wall_s": round(wall, 1)}
    record.update(json.loads(peaks_file.read_text()) if peaks_file.is_file() else {})
    record["result"] = results[-1] if results else None
    outputs = run_dir / "outputs"
    record["outputs_gib"] = round(folder_gib(outputs), 2) if outputs.is_dir() else 0.0
    for name in ("merged", "model-f16.gguf"):  # measured; drop the large ones before the next run
        target = outputs / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.is_file():
            target.unlink()
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="qlora,lora8,lora", help="methods whose configs/METHOD-t4.yaml run")
    p.add_argument("--out", default=os.environ.get("OUT") or "configs_on_gpu_out")
    p.add_argument("--work", default="/tmp/configs_on_gpu", help="checkpoints, chat file, run folders")
    p.add_argument("--tokenizer", default="embedded", help="'embedded' or a folder saved by notebooks_on_gpu --prepare")
    p.add_argument("--llama-cpp", help="a folder with llama.cpp's converter, for a machine with no package index")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--timeout", type=int, default=500, help="seconds per run")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama for every run (CPU dry runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--model", "--data", "--run-dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = environment_info()
    print("environment:", json.dumps(info), flush=True)
    chats = write_chat_file(work / "chat.jsonl")
    records = []
    for method in args.runs.split(","):
        shape = "tiny-llama-random" if args.tiny else MODEL_FOR[method]
        checkpoint = build_checkpoint(work / "models" / shape, shape, args.tokenizer)
        record = one_run(method, checkpoint, chats, work, args)
        records.append(record)
        result = record["result"] or {}
        print(
            f"{record['config']}: rc {record['returncode']}, {record['wall_s']:.0f} s, "
            f"peak {record.get('peak_allocated_gib')} / {record.get('peak_reserved_gib')} GiB, "
            f"anonymous RSS {record.get('peak_rss_anon_gib')} GiB; steps {result.get('steps')}, "
            f"perplexity {result.get('before_perplexity')} -> {result.get('after_perplexity')}, "
            f"merged matches adapter {result.get('merged_matches_adapter')}, gguf {bool(result.get('gguf'))}",
            flush=True,
        )
        (out / "configs_t4proxy.json").write_text(json.dumps({"info": info, "runs": records}, indent=1) + "\n")
    return 0 if all(r["returncode"] == 0 and r["result"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
