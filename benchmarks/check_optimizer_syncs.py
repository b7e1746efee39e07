#!/usr/bin/env python3
"""Does lora_kit.speed.skip_optimizer_syncs change what bitsandbytes' paged AdamW computes, and what does it save?

Builds the 448 LoRA tensors of a Llama-2-7B with r=64 on all 7 projections (bf16, as TRL leaves them for QLoRA),
feeds two copies the same random gradients for a few steps, one through the stock PagedAdamW32bit and one through
the same optimizer with skip_optimizer_syncs applied, and checks the parameters are bit-for-bit equal. Then it times
the optimizer step both ways. Prints one JSON line. Needs CUDA and bitsandbytes.

    python benchmarks/check_optimizer_syncs.py --steps 5 --timed 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def lora_shapes(layers=32, hidden=4096, inter=11008, r=64):
    # (in, out) of q, k, v, o, gate, up, down; A is r x in, B is out x r
    projections = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]
    shapes = []
    for _ in range(layers):
        for d_in, d_out in projections:
            shapes += [(r, d_in), (d_out, r)]
    return shapes


def main(argv=None):
    import bitsandbytes as bnb
    import torch

    from lora_kit import speed

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5, help="steps compared bit for bit")
    p.add_argument("--timed", type=int, default=20, help="steps timed each way")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    shapes = lora_shapes()
    base = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes]
    stock = [torch.nn.Parameter(t.clone()) for t in base]
    fast = [torch.nn.Parameter(t.clone()) for t in base]
    opt_stock = bnb.optim.PagedAdamW32bit(stock, lr=2e-4)
    opt_fast = bnb.optim.PagedAdamW32bit(fast, lr=2e-4)
    assert speed.skip_optimizer_syncs(opt_fast)
    for _ in range(args.steps):
        for a, b in zip(stock, fast):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        opt_stock.step()
        opt_fast.step()
    torch.cuda.synchronize()
    equal = all(torch.equal(a, b) for a, b in zip(stock, fast))
    moved = max(float((a.detach().float() - t.float()).abs().max()) for a, t in zip(stock, base))

    def timed(opt):
        times = []
        for _ in range(args.timed):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_stock, t_fast = timed(opt_stock), timed(opt_fast)
    out = {"tensors": len(shapes), "params_m": round(sum(a.numel() for a in stock) / 1e6, 1),
           "bitwise_equal_after_steps": equal, "steps_compared": args.steps, "max_param_change": moved,
           "stock_step_ms": round(t_stock * 1e3, 2), "one_sync_step_ms": round(t_fast * 1e3, 2),
           "device": torch.cuda.get_device_name(0), "bitsandbytes": bnb.__version__}
    print(json.dumps(out))
    return 0 if equal and moved > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
