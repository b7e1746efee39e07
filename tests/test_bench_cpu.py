"""The GPU benchmark script must not rot: its tiny CPU mode runs end to end and prints its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_train_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--model-size", "tiny", "--steps", "1",
           "--warmup", "1", "--shapes", "fixed,mixed", "--recipes", "stock,lora_kit", "--mixed-grad-accum", "1",
           "--ckpt-dir", str(tmp_path / "ckpt"), "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    data = json.loads(last)
    assert data == json.loads(out.read_text())
    assert {"device", "precision", "versions", "results", "ratios"} <= set(data)
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert {"shape", "recipe", "tokens_per_s", "median_step_s", "peak_gib", "losses", "micro_batch",
                "grad_accum"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["loss_finite"]
    assert {"fixed/lora_kit", "mixed/lora_kit"} <= set(data["ratios"])
