#!/usr/bin/env python3
"""Training memory, measured: lora_kit's own training path over a grid of settings, next to lora_kit.memory's estimate.

Each grid point is one subprocess (clean peak counters) that loads a random-weight checkpoint of a real model's shape
with ``lora_kit.load_model``, builds the trainer with ``lora_kit.train.build_trainer`` (whatever speed levers it turns
on for this machine) and trains a few optimizer steps on random tokens. It records

    weights_gib        allocated after loading (the quantized or 16-bit base)
    built_gib          allocated once the trainer is built (the base and the adapters)
    peak_allocated_gib torch.cuda.max_memory_allocated over training (what the estimate is compared with)
    peak_reserved_gib  torch.cuda.max_memory_reserved over training (allocated + the caching allocator's slack)
    paged_states_gib   optimizer states in CUDA managed memory (bitsandbytes' paged optimizers): the allocator does
                       not count them, and the driver can move them to CPU RAM when the GPU runs short

Points with ``precision: fp16`` run under the T4 proxy of notebooks_on_gpu.py (lora_kit is told it runs on a T4, so
it picks fp16 and a T4's levers) without its memory cap, so a point that would not fit a T4 is still measured.

Run on a GPU, from the repository root (the wheels as for notebooks_on_gpu.py):

    python3 benchmarks/bench_memory.py --out $OUT                 # the whole grid, several points at a time
    python3 benchmarks/bench_memory.py --out $OUT --points 0,3    # some points

CPU dry run of the plumbing (tiny model, no peaks): ``python3 benchmarks/bench_memory.py --tiny --points 0``.
Results: ``memory_points.jsonl`` (one line per point, as it finishes) and ``memory_grid.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
from lora_kit import memory  # noqa: E402  (after the path above)

GIB = 2**30
STEPS = 3  # the optimizer states exist from the first step, and the peak repeats every step after it

# The shapes measured: the notebooks' two default models and a GQA model with a large vocabulary (the logits matter).
SHAPES = {
    "llama2-7b": ("LlamaConfig", memory.LLAMA2_7B),
    "smollm2-1.7b": ("LlamaConfig", memory.SMOLLM2_1_7B),
    "qwen2.5-7b": ("Qwen2Config", memory.decoder_shape(3584, 18944, 28, 28, 4, 152064, False)),
    "tiny": ("LlamaConfig", memory.decoder_shape(64, 172, 2, 4, 4, 512, False, context=512)),
    # Llama-2-70B's shape (GQA, 8 key/value heads): FSDP + QLoRA across GPUs; build it with storage="float8".
    "llama2-70b": ("LlamaConfig", memory.decoder_shape(8192, 28672, 80, 64, 8, 32000, False)),
}
QUANTIZATION = {"qlora": "nf4", "lora8": "8bit", "lora": "none"}
# The notebooks' recipes: the QLoRA tutorial's paged optimizer and dropout for qlora, plain AdamW for the others.
OPTIM = {"qlora": "paged_adamw_32bit", "lora8": "adamw_torch", "lora": "adamw_torch"}
DROPOUT = {"qlora": 0.1, "lora8": 0.05, "lora": 0.05}


def _points() -> list[dict]:
    points = []

    def add(shape, method, precision, runs, r, gc=True, packing=False):
        for seq, mb in runs:
            points.append(
                dict(shape=shape, method=method, precision=precision, seq=seq, mb=mb, r=r, gc=gc, packing=packing)
            )

    add("llama2-7b", "qlora", "bf16", [(512, 1), (1024, 2), (2048, 1), (2048, 2), (2048, 4)], 64)
    add("llama2-7b", "qlora", "bf16", [(1024, 2)], 16)
    add("llama2-7b", "qlora", "bf16", [(512, 1), (1024, 2)], 64, gc=False)
    add("llama2-7b", "qlora", "bf16", [(1024, 2), (2048, 2)], 64, packing=True)
    add("llama2-7b", "qlora", "fp16", [(1024, 2), (2048, 2)], 64)
    add("llama2-7b", "qlora", "fp16", [(1024, 2)], 64, packing=True)
    add("llama2-7b", "lora8", "bf16", [(512, 1), (1024, 2), (2048, 2)], 16)
    add("llama2-7b", "lora8", "bf16", [(1024, 2)], 64)
    add("llama2-7b", "lora8", "bf16", [(512, 2)], 16, gc=False)
    add("llama2-7b", "lora8", "fp16", [(1024, 2)], 16)
    add("llama2-7b", "lora8", "fp16", [(1024, 2)], 16, packing=True)
    add("llama2-7b", "lora", "bf16", [(1024, 2)], 16)
    add("smollm2-1.7b", "lora", "bf16", [(512, 1), (1024, 2), (2048, 4)], 16)
    add("smollm2-1.7b", "lora", "bf16", [(1024, 2)], 16, gc=False)
    add("smollm2-1.7b", "lora", "bf16", [(2048, 2)], 64)
    add("smollm2-1.7b", "lora", "bf16", [(2048, 2)], 16, packing=True)
    add("smollm2-1.7b", "lora", "fp16", [(1024, 2)], 16)
    add("smollm2-1.7b", "lora", "fp16", [(1024, 2)], 16, packing=True)
    add("qwen2.5-7b", "qlora", "bf16", [(1024, 2), (2048, 2)], 16)
    add("qwen2.5-7b", "qlora", "fp16", [(1024, 2)], 16)
    add("qwen2.5-7b", "lora8", "bf16", [(1024, 2)], 16)
    return points


POINTS = _points()

# Auto-fit checks: each method on its notebook model, its notebook rank, under a memory cap.
AUTOFIT = (("llama2-7b", "qlora", 64), ("llama2-7b", "lora8", 16), ("smollm2-1.7b", "lora", 16))
AUTOFIT_STEPS = 20


def autofit_points(budgets: list[float], max_length: int) -> list[dict]:
    """One point per budget and AUTOFIT entry, with the settings lora_kit.memory.fit_settings chose for the budget."""
    from transformers import LlamaConfig

    points = []
    for budget in budgets:
        precision = "fp16" if budget <= 16 else "bf16"  # a T4-sized budget runs as a T4 would (the T4 proxy)
        for shape, method, r in AUTOFIT:
            choice = memory.fit_settings(
                LlamaConfig(**SHAPES[shape][1]),
                method,
                budget,
                max_length=max_length,
                r=r,
                optimizer=OPTIM[method],
                precision=precision,
            )
            points.append(
                dict(
                    shape=shape,
                    method=method,
                    precision=precision,
                    seq=choice.max_length,
                    mb=choice.micro_batch_size,
                    r=r,
                    gc=choice.gradient_checkpointing,
                    packing=False,
                    offload=choice.offload_activations,
                    budget_gib=budget,
                    steps=AUTOFIT_STEPS,
                    estimated_device_gib=round(choice.estimate.device_gib, 3),
                )
            )
    return points


# The longest context: 7B QLoRA at the notebook's rank, one sample per step, under a T4's memory cap, with and without
# the saved activations in CPU RAM, the 16-bit residual stream (load_model's fp32_norms=False) and LoRA dropout (whose
# copy of each adapted layer's input is a block's largest extra tensor at these lengths).
LONGEST = [(8192, False), (12288, False), (16384, False), (32768, True), (49152, True), (65536, True)]
LONGEST_16 = [(16384, False), (24576, True), (32768, True), (49152, True), (65536, True)]  # with stream16
LONGEST_16_NO_DROPOUT = [(32768, True), (49152, True), (65536, True)]  # with stream16 and dropout 0
# ... and the MLP and norms in tiles (TrainSettings.tile_layers): their intermediates dominate a layer's recompute.
LONGEST_TILED = [(32768, False), (32768, True), (49152, True), (65536, True), (81920, True)]
LONGEST_STEPS = 4


def longest_points(cap_gib: float) -> list[dict]:
    runs = (
        [(seq, offload, {}) for seq, offload in LONGEST]
        + [(seq, offload, {"stream16": True}) for seq, offload in LONGEST_16]
        + [(seq, offload, {"stream16": True, "dropout": 0.0}) for seq, offload in LONGEST_16_NO_DROPOUT]
        + [(seq, offload, {"stream16": True, "dropout": 0.0, "tile": True}) for seq, offload in LONGEST_TILED]
    )
    return [
        dict(shape="llama2-7b", method="qlora", precision="fp16", seq=seq, mb=1, r=64, gc=True, packing=False,
             offload=offload, **extra, budget_gib=cap_gib, steps=LONGEST_STEPS)
        for seq, offload, extra in runs
    ]  # fmt: skip


def estimate(point: dict) -> memory.MemoryBreakdown:
    """lora_kit.memory's estimate for one grid point."""
    from transformers import LlamaConfig

    return memory.memory_breakdown(
        LlamaConfig(**SHAPES[point["shape"]][1]),  # the counts need the shape only
        point["method"],
        r=point["r"],
        micro_batch=point["mb"],
        seq_len=point["seq"],
        gradient_checkpointing=point["gc"],
        optimizer=OPTIM[point["method"]],
        precision=point["precision"],
        fp32_norms=not point.get("stream16"),
        offload_activations=point.get("offload", False),
        tile_layers=point.get("tile", False),
    )


# ----------------------------------------------------------------------------------------------------- checkpoints
STORAGE = {"float16": "float16", "float8": "float8_e4m3fn"}  # --storage -> the torch dtype the files hold


def build_checkpoint(folder: Path, shape: str, storage: str = "float16") -> Path:
    """A random-weight checkpoint of ``shape`` with a word-level tokenizer of its vocabulary; reused if built.

    Written one tensor at a time into 2 GB shards (normal(0, 0.02) for the matrices, as transformers initialises
    them, ones for the norms), so that a 70B shape never has to fit the GPU or RAM at once. ``storage`` "float16" is
    what real checkpoints hold; "float8" halves the files (a 70B: 69 GB instead of 138) for a disk that cannot hold
    them, and transformers casts the values to the dtype it loads in. Speed and memory do not depend on the values.
    """
    import torch
    import transformers
    from bench_train import build_tokenizer
    from safetensors.torch import save_file

    config_class, dims = SHAPES[shape]
    recipe = dims if storage == "float16" else {**dims, "storage": storage}  # float16 folders built before stay valid
    marker = folder / "built.json"  # written last: a folder without it is an interrupted build
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted build of this script's own scratch folder
    folder.mkdir(parents=True)
    config = getattr(transformers, config_class)(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.AutoModelForCausalLM.from_config(config).named_parameters()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    dtype = getattr(torch, STORAGE[storage])
    weight_map, files, shard, total = {}, [], {}, 0

    def write():
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[-1]))
        shard.clear()

    for name, size in shapes.items():  # a tied head is one parameter, listed once
        tensor = torch.empty(size, device=device, dtype=torch.float16)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        shard[name] = tensor.to(dtype).cpu()
        total += shard[name].nbytes
        if sum(t.nbytes for t in shard.values()) >= 2 * 10**9:
            write()
    if shard:
        write()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = torch.float16  # what the weights stand for; loading casts them to the dtype asked for
    config.save_pretrained(folder)
    build_tokenizer(dims["vocab_size"]).save_pretrained(folder)
    marker.write_text(json.dumps(recipe))
    return folder


def training_rows(point: dict, vocab_size: int):
    """Random-token rows: ``mb`` full-length rows per step, or (packing) chat-like lengths that fill them."""
    from bench_train import make_dataset

    if not point["packing"]:
        return make_dataset("fixed", STEPS * point["mb"], point["seq"], vocab_size, seed=0)
    # Log-normal lengths with a median of ~250 tokens at 2048: about 400 tokens each on average.
    rows = 2 * STEPS * point["mb"] * point["seq"] // max(1, point["seq"] * 400 // 2048)
    return make_dataset("mixed", rows, point["seq"], vocab_size, seed=0)


# ----------------------------------------------------------------------------------------------------- one point
def run_point(point: dict, checkpoint: Path) -> dict:
    """Train one grid point in this process and return what it measured."""
    import torch

    cuda = torch.cuda.is_available()
    budget = point.get("budget_gib")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if point["precision"] == "fp16":
            from notebooks_on_gpu import apply_t4_proxy

            apply_t4_proxy(cap_gib=budget or total / GIB - 1)
        elif budget:
            torch.cuda.set_per_process_memory_fraction(budget * GIB / total, 0)
    from transformers import TrainerCallback

    from lora_kit import load_model
    from lora_kit.speed import Levers
    from lora_kit.train import LoraSettings, TrainSettings, build_trainer

    precision = point["precision"] if cuda else "fp32"
    # stream16: the embeddings, norms and head in 16-bit, so the hidden states between blocks are 16-bit too
    model, tokenizer = load_model(
        str(checkpoint), QUANTIZATION[point["method"]], precision=precision, fp32_norms=not point.get("stream16")
    )
    weights = torch.cuda.memory_allocated() if cuda else 0
    lora = LoraSettings(r=point["r"], alpha=point["r"] / 4, dropout=point.get("dropout", DROPOUT[point["method"]]))
    settings = TrainSettings(
        learning_rate=2e-4,
        micro_batch_size=point["mb"],
        gradient_accumulation_steps=1,
        max_steps=point.get("steps", STEPS),
        max_length=point["seq"],
        optim=OPTIM[point["method"]],
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        gradient_checkpointing=point["gc"],
        offload_activations=point.get("offload", False),
        tile_layers=point.get("tile", False),
        save_steps=10**9,
        output_dir=tempfile.mkdtemp(prefix="bench_memory_"),
        # everything else as lora_kit decides on this machine, but for levers switched by --lever
        levers=Levers(packing=point["packing"], **point.get("levers", {})),
        report_to="none",
    )
    rows = training_rows(point, model.config.vocab_size)
    trainer = build_trainer(model, tokenizer, rows, lora=lora, train=settings, precision=precision)
    step_ends = []  # synchronised clock at each optimizer step's end: the speed of the steps after the first
    trainer.add_callback(
        type("StepClock", (TrainerCallback,), {"on_step_end": lambda *a, **k: step_ends.append(_now())})
    )
    built = torch.cuda.memory_allocated() if cuda else 0  # weights + adapters (+ anything the build keeps)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    paged = memory.paged_state_bytes(trainer.optimizer)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return dict(
        tokens_per_s=round(point["mb"] * point["seq"] / statistics.median(steps))
        if steps and not point["packing"]
        else None,
        weights_gib=weights / GIB,
        built_gib=built / GIB,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None,
        paged_states_gib=paged / GIB,
        train_s=round(seconds, 1),
        last_loss=losses[-1] if losses else None,
    )


def _now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def worker(spec: str) -> int:
    job = json.loads(spec)
    result = run_point(job["point"], Path(job["checkpoint"]))
    print("BENCH_MEMORY " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------- the grid
def reservation_gib(point: dict) -> float:
    """GPU memory set aside for a running point: twice the estimate plus the context, so neighbours never collide."""
    return point.get("budget_gib") or 2 * estimate(point).total_gib + 2


def drive(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(p, index=i) for i, p in enumerate(selected(args))]
    if args.points:
        points = [points[int(i)] for i in args.points.split(",")]
    for lever in args.lever or ():  # one lever switched for every point: its effect alone, in the same call
        name, _, value = lever.partition("=")
        points = [dict(p, levers={**p.get("levers", {}), name: value.lower() == "true"}) for p in points]
    if args.tiny:
        points = [dict(p, shape="tiny", seq=64, mb=1) for p in points]
    work = Path(args.work)
    started = time.time()
    checkpoints = {}
    for shape in sorted({p["shape"] for p in points}):
        t0 = time.time()
        checkpoints[shape] = build_checkpoint(work / shape, shape)
        print(f"checkpoint {shape}: {time.time() - t0:.0f} s", flush=True)
    pending, running, results = list(points), [], []
    log = (out / "memory_points.jsonl").open("a")
    while pending or running:
        in_use = sum(reservation_gib(p) for p, _, _ in running)
        while (
            pending
            and len(running) < args.parallel
            and (not running or in_use + reservation_gib(pending[0]) <= args.budget_gib)
            and time.time() - started < args.deadline
        ):
            point = pending.pop(0)
            spec = json.dumps({"point": point, "checkpoint": str(checkpoints[point["shape"]])})
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", spec],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            running.append((point, proc, time.time()))
            in_use += reservation_gib(point)
        if pending and not running and time.time() - started >= args.deadline:
            print(f"deadline: {len(pending)} points not started", flush=True)
            break
        time.sleep(1)
        for item in list(running):
            point, proc, t0 = item
            if proc.poll() is None and time.time() - t0 < args.timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            text = proc.communicate()[0]
            running.remove(item)
            found = [line for line in text.splitlines() if line.startswith("BENCH_MEMORY ")]
            record = dict(point, estimated_gib=round(estimate(point).total_gib, 3), wall_s=round(time.time() - t0))
            levers = [line for line in text.splitlines() if line.startswith("Speed levers on:")]
            record["levers"] = levers[-1].split(":", 1)[1].split("(")[0].strip() if levers else "none"
            if found:
                record.update(json.loads(found[-1].split(" ", 1)[1]))
                if (
                    point.get("budget_gib") and record["peak_reserved_gib"] is not None
                ):  # what the run took of its budget: the allocator's and the paged states
                    used = record["peak_reserved_gib"] + record["paged_states_gib"]
                    record["used_fraction"] = round(used / point["budget_gib"], 3)
            else:
                # The last line that names an error (tqdm redraws its bar at exit, after any traceback).
                errors = [line for line in text.splitlines() if "Error" in line or "error:" in line]
                record["error"] = (errors or [f"exit {proc.returncode}"])[-1][:300]
                (out / f"point_{point['index']}.log").write_text(text[-20000:])
            results.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            measured = record.get("peak_allocated_gib")
            print(
                f"#{point['index']:2d} {point['shape']:13s} {point['method']:5s} {point['precision']} "
                f"{point['seq']:5d} x {point['mb']} r={point['r']:<3d} gc={point['gc']!s:5s} pack={point['packing']!s:5s}"
                + (" offload" if point.get("offload") else "")
                + (" stream16" if point.get("stream16") else "")
                + (" dropout0" if point.get("dropout") == 0 else "")
                + (" tiled" if point.get("tile") else "")
                + "".join(f" {name}={value}" for name, value in point.get("levers", {}).items())
                + (f" {record['tokens_per_s']} tokens/s" if record.get("tokens_per_s") else "")
                + f" estimated {record['estimated_gib']:6.2f}  measured "
                + (f"{measured:6.2f}" if measured is not None else record.get("error", "-"))
                + f"  ({record['wall_s']} s)",
                flush=True,
            )
    results.sort(key=lambda r: r["index"])
    name = "memory_autofit.json" if args.autofit else "memory_longest.json" if args.longest else "memory_grid.json"
    (out / name).write_text(json.dumps({"points": results}, indent=1))
    return results


def selected(args) -> list[dict]:
    """The points the options ask for: the auto-fit checks, the longest-context runs, or the grid."""
    if args.autofit:
        return autofit_points([float(b) for b in args.autofit.split(",")], args.autofit_length)
    return longest_points(args.longest) if args.longest else POINTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_memory_out")
    p.add_argument("--work", default="/tmp/bench_memory", help="where the checkpoints are built")
    p.add_argument("--points", help="comma list of grid indices (default: all)")
    p.add_argument("--parallel", type=int, default=6, help="points at once")
    p.add_argument("--budget-gib", type=float, default=120.0, help="GPU memory the running points may reserve")
    p.add_argument("--timeout", type=int, default=300, help="seconds per point")
    p.add_argument("--deadline", type=int, default=480, help="start no point after this many seconds")
    p.add_argument("--autofit", metavar="GIB,...", help="check fit_settings' choices under these memory caps instead")
    p.add_argument("--autofit-length", type=int, default=1024, help="the longest sample the auto-fit runs want")
    p.add_argument("--longest", type=float, metavar="GIB", help="the longest 7B QLoRA context under this memory cap")
    p.add_argument("--lever", action="append", metavar="NAME=BOOL", help="switch a speed lever for every point")
    p.add_argument("--tiny", action="store_true", help="a tiny model for every point (CPU dry run)")
    p.add_argument("--list", action="store_true", help="print the grid with the estimates and stop")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.list:
        listed = selected(args)
        for i, point in enumerate(listed):
            print(i, point, f"{estimate(point).total_gib:.2f} GiB")
        return 0
    drive(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
