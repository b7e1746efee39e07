"""Several GPUs against one: data parallel and FSDP + QLoRA through accelerate, tokens/s and peak memory per GPU.

Each run launches ``lora-kit train`` the way a user would (``accelerate launch --config_file
configs/accelerate/{ddp,fsdp-qlora}.yaml --num_processes N``), on a random-weight fp16 checkpoint of a default
model's shape and a chat file whose every sample fills ``--length`` tokens, so each step trains
micro-batch x processes x accumulation x length tokens. Every process writes its peak GPU memory; the main
process's results give the steps, seconds and loss history. After an FSDP run the saved adapter is loaded on a
single process with ``peft.AutoPeftModelForCausalLM`` and run once.

    python3 benchmarks/bench_multi_gpu.py --runs ddp:1,ddp:2,fsdp:2 --shape llama2-7b --out $OUT

``ddp:1`` is one process without a launcher (the single-GPU baseline); ``ddp:N`` keeps its global batch (the
accumulation is divided among the processes), so the loss curves compare step for step. Results in
``--out/multi_gpu.json``: the runs, ``dp_speedup`` (ddp:N tokens/s over ddp:1) and ``fsdp_peak_ratio`` (the
largest per-GPU peak of fsdp:N over ddp:1's peak), where the runs exist.

FSDP's measure is a model one GPU barely holds, Llama-2-70B's shape. Its fp16 files (138 GB) do not fit the GPU
machine's disk, so they are written in float8 (69 GB; loading casts them to bf16 and quantizes them to NF4 as usual),
and a shorter length keeps the weights, which FSDP shards, the larger part of the peak:

    python3 benchmarks/bench_multi_gpu.py --runs ddp:1,fsdp:2 --shape llama2-70b --storage float8 \
        --length 1024 --micro-batch 1 --steps 6 --samples 64 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

GIB = 2**30
CONFIGS = {"ddp": ROOT / "configs/accelerate/ddp.yaml", "fsdp": ROOT / "configs/accelerate/fsdp-qlora.yaml"}


def chat_file(path: Path, n: int, words: int, vocab_size: int) -> Path:
    """``n`` conversations whose answer alone is ``words`` word-level tokens: every sample is cut at max_length."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            question = " ".join(f"t{rng.randrange(4, vocab_size)}" for _ in range(16))
            answer = " ".join(f"t{rng.randrange(4, vocab_size)}" for _ in range(words))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def config(args, checkpoint: Path, data: Path, run_dir: Path) -> Path:
    """The run's lora-kit config: QLoRA r=64 on all projections, the benchmark's batch and length."""
    path = run_dir / "config.yaml"
    path.write_text(
        f"""method: "qlora"
model: "{checkpoint}"
output_dir: "{run_dir / "out"}"
data:
  dataset: "{data}"
  n_train: {args.samples}
  n_eval: 4
lora:
  r: 64
  alpha: 16
  dropout: 0.0
  target_modules: "all-linear"
train:
  learning_rate: 0.0002
  max_steps: {args.steps}
  micro_batch_size: {args.micro_batch}
  gradient_accumulation_steps: {args.accumulation}
  max_length: {args.length}
  optim: "paged_adamw_32bit"
  gradient_checkpointing: true
  save_steps: {args.steps}
  resume: false
eval:
  eval_samples: 2
  max_new_tokens: 8
"""
    )
    return path


def worker(args) -> int:
    """One process of a launched run: train as ``lora-kit train`` does, then write this process's numbers."""
    import torch

    from lora_kit import demo
    from lora_kit.config import load_config

    result = demo.run(load_config(args.worker), merge=False)
    rank = int(os.environ.get("RANK", 0))
    gpu = torch.cuda.is_available()  # a CPU dry run (--shape tiny) has no GPU memory to report
    numbers = {
        "rank": rank,
        # training's peak: the main process evaluates (and under FSDP reloads the model whole) after it
        "peak_allocated_gib": result["train_peak_gib"] if result else _peak(gpu),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if gpu else 0.0,
        "result": result,
    }
    Path(args.worker).with_name(f"rank{rank}.json").write_text(json.dumps(numbers, indent=1))
    return 0


def _peak(gpu: bool) -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 3) if gpu else 0.0


def launch(kind: str, n: int, cfg: Path) -> list[str]:
    me = [str(Path(__file__).resolve()), "--worker", str(cfg)]
    if kind == "ddp" and n == 1:
        return [sys.executable, *me]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[kind])]
    return [*accelerate, f"--num_processes={n}", "--main_process_port=0", *me]


def loads_on_one_process(adapter_dir: str) -> dict:
    """The saved adapter, loaded the way a user would without lora_kit, answers one forward pass."""
    import torch
    from peft import AutoPeftModelForCausalLM

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.bfloat16, device_map={"": device})
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]], device=device)).logits
    ok = bool(torch.isfinite(logits).all())
    del model
    torch.cuda.empty_cache()
    return {"autopeft_loads": ok, "autopeft_seconds": round(time.time() - t0, 1)}


def run(args, kind: str, n: int, checkpoint: Path, data: Path) -> dict:
    run_dir = Path(args.work) / f"{kind}{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("rank*.json"):
        old.unlink()
    cfg = config(args, checkpoint, data, run_dir)
    command = launch(kind, n, cfg)
    print(f"== {kind}:{n}: {shlex.join(command)}", flush=True)
    t0 = time.time()
    done = subprocess.run(command, timeout=args.timeout)
    row = {"run": f"{kind}:{n}", "kind": kind, "processes": n, "returncode": done.returncode}
    row["wall_seconds"] = round(time.time() - t0, 1)
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if done.returncode != 0 or not ranks:
        return row
    main = next(r["result"] for r in ranks if r["rank"] == 0)
    tokens = main["steps"] * args.micro_batch * args.accumulation * args.length  # the global batch is kept
    last = next((run_dir / "out").glob(f"checkpoints-*/checkpoint-{main['steps']}/trainer_state.json"))
    state = json.loads(last.read_text())
    row.update(
        tokens_per_s=round(tokens / main["train_seconds"], 1),
        train_seconds=main["train_seconds"],
        peak_allocated_gib=[r["peak_allocated_gib"] for r in ranks],
        peak_reserved_gib=[r["peak_reserved_gib"] for r in ranks],
        losses=[round(e["loss"], 4) for e in state["log_history"] if "loss" in e],
        after_perplexity=main["after_perplexity"],
    )
    if kind == "fsdp":
        row.update(loads_on_one_process(main["adapter_dir"]))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="ddp:1,ddp:2,fsdp:2", help="KIND:PROCESSES, comma separated (ddp or fsdp)")
    p.add_argument("--shape", default="llama2-7b", help="a shape of bench_memory.SHAPES")
    p.add_argument("--storage", default="float16", choices=["float16", "float8"], help="dtype of the checkpoint files")
    p.add_argument("--length", type=int, default=2048, help="tokens per sample (every sample is cut to it)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=4, help="of one process; divided among N processes")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--timeout", type=int, default=540, help="seconds per run")
    p.add_argument("--work", default="/tmp/bench_multi_gpu")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_multi_gpu_out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    from bench_memory import SHAPES, build_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(work / args.shape, args.shape, args.storage)
    data = chat_file(work / "chats.jsonl", args.samples + 8, args.length, SHAPES[args.shape][1]["vocab_size"])
    rows = []
    for item in args.runs.split(","):
        kind, n = item.split(":")
        rows.append(run(args, kind, int(n), checkpoint, data))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"shape": args.shape, "length": args.length, "runs": rows}
    by = {r["run"]: r for r in rows if "tokens_per_s" in r}
    one = by.get("ddp:1")
    for r in by.values():
        if one and r["kind"] == "ddp" and r["processes"] > 1:
            summary["dp_speedup"] = round(r["tokens_per_s"] / one["tokens_per_s"], 3)
        if one and r["kind"] == "fsdp" and r["processes"] > 1:
            summary["fsdp_peak_ratio"] = round(max(r["peak_allocated_gib"]) / max(one["peak_allocated_gib"]), 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
