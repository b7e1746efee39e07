#!/usr/bin/env python3
"""Do lora_kit.speed's optimizer levers change what bitsandbytes' paged AdamW computes, and what do they save?

Builds the 448 LoRA tensors of a Llama-2-7B with r=64 on all 7 projections (bf16, as TRL leaves them for QLoRA),
feeds copies the same random gradients for a few steps through the stock PagedAdamW32bit and through the same
optimizer with skip_optimizer_syncs, then also lean_update_step, applied, and checks the parameters are bit-for-bit
equal. Then it times the optimizer step each way (and, for scale only, without the paged-state prefetch hints).
Prints one JSON line. Needs CUDA and bitsandbytes.

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

    def variant(one_sync=False, lean=False, prefetch_always=False):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
        if one_sync:
            assert speed.skip_optimizer_syncs(opt)
        if lean:
            assert speed.lean_update_step(opt)
        if prefetch_always:  # as if the GPU had come near full: bnb's per-state prefetch hints stay on
            opt.prefetch_state = type(opt).prefetch_state.__get__(opt)
        return params, opt

    # stock bnb; one sync per step (skip_optimizer_syncs); + lean_update_step (what lora_kit runs on a GPU with
    # room); the same with bnb's prefetch hints kept (what it runs on a GPU that came near full)
    variants = {
        "stock": variant(),
        "one_sync": variant(one_sync=True),
        "one_sync_lean": variant(one_sync=True, lean=True),
        "one_sync_lean_prefetch": variant(one_sync=True, lean=True, prefetch_always=True),
    }
    for _ in range(args.steps):
        grads = [torch.randn_like(t) for t in base]
        for params, opt in variants.values():
            for prm, g in zip(params, grads):
                prm.grad = g.clone()
            opt.step()
    torch.cuda.synchronize()
    stock = variants["stock"][0]
    equal = {
        name: all(torch.equal(a, b) for a, b in zip(stock, params))
        for name, (params, _) in variants.items()
        if name != "stock"
    }
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

    step_ms = {name: round(timed(opt) * 1e3, 2) for name, (_, opt) in variants.items()}
    out = {
        "tensors": len(shapes),
        "params_m": round(sum(a.numel() for a in stock) / 1e6, 1),
        "bitwise_equal_to_stock_after_steps": equal,
        "steps_compared": args.steps,
        "max_param_change": moved,
        "step_ms": step_ms,
        "device": torch.cuda.get_device_name(0),
        "bitsandbytes": bnb.__version__,
    }
    print(json.dumps(out))
    return 0 if all(equal.values()) and moved > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
