"""An FSDP + QLoRA run killed after a checkpoint resumes from it, as a disconnected run would (GPU machine).

``lora-kit train`` under ``configs/accelerate/fsdp-qlora.yaml`` on a random-weight checkpoint of ``--shape``, 6
steps with a checkpoint every 2: the launch is killed (its whole process group) once checkpoint-2 is complete, then
started again with the same command, which must say it resumes from a checkpoint, train to step 6 and save one
adapter. Prints one JSON line and writes it to ``--out/fsdp_resume.json``.

    python3 benchmarks/check_fsdp_resume.py --shape smollm2-1.7b --processes 1 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-1.7b")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--kind", default="fsdp", help="fsdp, or ddp for a CPU dry run of the check (--shape tiny)")
    p.add_argument("--work", default="/tmp/check_fsdp_resume")
    p.add_argument("--out", default=os.environ.get("OUT") or "check_fsdp_resume_out")
    p.add_argument("--timeout", type=int, default=240, help="seconds for each launch")
    args = p.parse_args(argv)

    from bench_memory import SHAPES, build_checkpoint
    from bench_multi_gpu import CONFIGS, chat_file, config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(work / args.shape, args.shape)
    data = chat_file(work / "chats.jsonl", 72, 512, SHAPES[args.shape][1]["vocab_size"])
    run = argparse.Namespace(samples=64, steps=6, micro_batch=1, accumulation=2, length=512)
    cfg = config(run, checkpoint, data, work)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[args.kind])]
    launch += [f"--num_processes={args.processes}", "--main_process_port=0", "-m", "lora_kit", "train", str(cfg)]
    launch += ["--no-merge", "--set=train.save_steps=2", "--set=train.resume=true"]

    first = subprocess.Popen(launch, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, state = time.time() + args.timeout, None
    while time.time() < deadline and first.poll() is None and state is None:
        state = next((work / "out").glob("checkpoints-*/checkpoint-2/trainer_state.json"), None)
        time.sleep(0.05)
    # The launcher and every training process, mid-run: torch's launcher starts its workers in sessions of their
    # own, so killing the launcher's process group would leave them training.
    launcher = psutil.Process(first.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.kill()
    first.wait()
    left = sorted(p.name for p in state.parent.iterdir()) if state else []  # what the killed run's checkpoint holds
    second = subprocess.run(launch, capture_output=True, text=True, timeout=args.timeout)
    result = next((json.loads(line) for line in second.stdout.splitlines() if line.startswith('{"model"')), None)
    report = {
        "kind": args.kind,
        "shape": args.shape,
        "processes": args.processes,
        "killed_after": str(state.parent.name) if state else None,
        "resumed_from": next(iter(re.findall(r"Resuming from \S*/(checkpoint-\d+)", second.stdout)), None),
        "returncode": second.returncode,
        "steps": result and result["steps"],
        "adapter_saved": bool(result and Path(result["adapter_dir"], "adapter_model.safetensors").is_file()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if second.returncode != 0:
        report["stderr_tail"] = second.stderr[-1500:]
        (out / "fsdp_resume_stderr.log").write_text(second.stderr)  # the training process's own error
    report["checkpoint_files"] = left  # what the relaunch had to resume from, and what it said about it
    report["relaunch_said"] = [
        line for line in second.stdout.splitlines() if re.search(r"[Cc]heckpoint|[Rr]esum", line)
    ]
    (out / "fsdp_resume.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    ok = report["resumed_from"] is not None and report["steps"] == 6 and report["adapter_saved"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
