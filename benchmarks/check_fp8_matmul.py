#!/usr/bin/env python3
"""How much of a QLoRA step's matrix products could FP8 tensor cores save, and at what error?

On a fixed 2 x 2048-token micro-batch of a Llama-2-7B, about two thirds of a QLoRA step's GPU time is the frozen base's
matrix products (forward, the checkpointed forward again, and the input gradient), already near the GPU's bf16 peak,
so host-time levers cannot make the step much faster. FP8 tensor cores (compute capability 8.9 and up) do the same
products at about twice the rate. This script measures, for the seven projections of one Llama-2-7B layer at M tokens:

- ``bf16``: what runs today: dequantize the NF4 weight to bf16 (bitsandbytes), then ``x @ W.T``; the backward
  dequantizes again and computes ``grad @ W``.
- ``bf16_matmul_only``: the bf16 products alone, the weight dequantized once outside the timing.
- ``fp8``: dequantize to bf16, scale and cast weight and activations to float8 (e4m3, per-tensor scales from the
  absolute maximum; gradients in e5m2), and multiply with ``torch._scaled_mm``, bf16 out.
- ``fp8_compiled_casts``: the same with the scaling and casting compiled by torch.compile.
- ``fp8_compiled_products``: each product compiled whole (dequantize, scale, cast, multiply; the weight's scale
  computed once, since the base is frozen; the backward's weight cast writes the transposed layout itself).
- ``fp8_matmul_only``: the FP8 products alone, the casts done once outside the timing (the bound a fused
  dequantize-and-cast kernel could approach).

and each one's relative error against an fp32 product of the same dequantized weight. Prints one JSON line with the
milliseconds per layer and, scaled to 32 layers and three products per projection, per step. Needs CUDA, compute
capability >= 8.9 and bitsandbytes.

    python benchmarks/check_fp8_matmul.py --tokens 4096 --repeats 20
"""

from __future__ import annotations

import argparse
import json

# (in, out) of q, k, v, o, gate, up, down in a Llama-2-7B layer
PROJECTIONS = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096)}
PROJECTIONS |= {"gate": (4096, 11008), "up": (4096, 11008), "down": (11008, 4096)}
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def to_fp8(t, dtype, limit):
    """Per-tensor scaled float8 copy and the scale that undoes it (what torch._scaled_mm takes)."""

    amax = t.abs().amax().float().clamp(min=1e-12)
    scale = limit / amax
    return (t.float() * scale).clamp(-limit, limit).to(dtype), (1.0 / scale).reshape(())


def main(argv=None):
    import bitsandbytes.functional as F
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096, help="rows of activations (micro-batch x length)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("check_fp8_matmul needs a GPU of compute capability 8.9 or higher (FP8 tensor cores).")
    torch.manual_seed(0)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    bf16 = torch.bfloat16

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.repeats

    torch._dynamo.config.recompile_limit = 64  # one compile per projection's shape and quantization state
    compiled_cast = torch.compile(to_fp8, dynamic=False)  # the absolute maximum, scale and cast in fewer kernels

    @torch.compile(dynamic=False)
    def compiled_forward(x, packed, state, w_scale):
        w8 = (F.dequantize_4bit(packed, state).float() * w_scale).clamp(-E4M3_MAX, E4M3_MAX).to(e4m3)
        x8, x_scale = to_fp8(x, e4m3, E4M3_MAX)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=(1.0 / w_scale).reshape(()), out_dtype=bf16)

    @torch.compile(dynamic=False)
    def compiled_input_grad(grad, packed, state, w_scale):
        w = (F.dequantize_4bit(packed, state).float() * w_scale).clamp(-E4M3_MAX, E4M3_MAX)
        w8_cols = w.t().contiguous().to(e4m3).t()  # one transposing cast: the column-major operand
        g8, g_scale = to_fp8(grad, e5m2, E5M2_MAX)
        return torch._scaled_mm(g8, w8_cols, scale_a=g_scale, scale_b=(1.0 / w_scale).reshape(()), out_dtype=bf16)

    rows = {}
    for name, (d_in, d_out) in PROJECTIONS.items():
        weight = torch.randn(d_out, d_in, device="cuda", dtype=bf16) * 0.02
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
        x = torch.randn(args.tokens, d_in, device="cuda", dtype=bf16)
        grad = torch.randn(args.tokens, d_out, device="cuda", dtype=bf16) * 1e-3
        w_ref = F.dequantize_4bit(packed, state).float()

        def bf16_path():
            w = F.dequantize_4bit(packed, state)  # forward
            y = x @ w.t()
            w = F.dequantize_4bit(packed, state)  # backward: the input gradient
            return y, grad @ w

        def fp8_path(cast=to_fp8):
            w = F.dequantize_4bit(packed, state)
            w8, w_scale = cast(w, e4m3, E4M3_MAX)
            x8, x_scale = cast(x, e4m3, E4M3_MAX)
            y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=bf16)
            w = F.dequantize_4bit(packed, state)
            w8, w_scale = cast(w, e4m3, E4M3_MAX)
            g8, g_scale = cast(grad, e5m2, E5M2_MAX)
            # the second operand must be column-major: W (out x in) transposed twice
            dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale, scale_b=w_scale, out_dtype=bf16)
            return y, dx

        def fp8_compiled_casts():
            return fp8_path(compiled_cast)

        w_scale_once = E4M3_MAX / w_ref.abs().amax()  # the weight is frozen: its scale is known once

        def fp8_compiled_products():
            y = compiled_forward(x, packed, state, w_scale_once)
            return y, compiled_input_grad(grad, packed, state, w_scale_once)

        w8, w_scale = to_fp8(F.dequantize_4bit(packed, state), e4m3, E4M3_MAX)
        w8_cols = w8.t().contiguous().t()
        x8, x_scale = to_fp8(x, e4m3, E4M3_MAX)
        g8, g_scale = to_fp8(grad, e5m2, E5M2_MAX)

        w_bf16 = F.dequantize_4bit(packed, state)

        def bf16_matmul_only():
            return x @ w_bf16.t(), grad @ w_bf16

        def fp8_matmul_only():
            y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=bf16)
            return y, torch._scaled_mm(g8, w8_cols, scale_a=g_scale, scale_b=w_scale, out_dtype=bf16)

        paths = (("bf16", bf16_path), ("bf16_matmul_only", bf16_matmul_only), ("fp8", fp8_path))
        paths += (("fp8_compiled_casts", fp8_compiled_casts), ("fp8_compiled_products", fp8_compiled_products))
        paths += (("fp8_matmul_only", fp8_matmul_only),)
        y_ref, dx_ref = x.float() @ w_ref.t(), grad.float() @ w_ref
        row = {}
        for label, fn in paths:
            y, dx = fn()
            row[label] = {
                "ms": round(timed(fn), 3),
                "rel_err_y": round(float((y.float() - y_ref).norm() / y_ref.norm()), 5),
                "rel_err_dx": round(float((dx.float() - dx_ref).norm() / dx_ref.norm()), 5),
            }
        rows[name] = row
    per_layer = {k: round(sum(r[k]["ms"] for r in rows.values()), 2) for k, _ in paths}
    # a checkpointed step runs each forward product twice and the input gradient once: 1.5x the timed pair, 32 layers
    per_step = {k: round(v * 1.5 * 32, 1) for k, v in per_layer.items()}
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(),
                "tokens": args.tokens,
                "per_projection": rows,
                "per_layer_ms": per_layer,
                "per_step_ms_32_layers": per_step,
                "fp8_saving_ms_per_step": round(per_step["bf16"] - per_step["fp8"], 1),
                "fp8_compiled_saving_ms_per_step": round(per_step["bf16"] - per_step["fp8_compiled_casts"], 1),
                "fp8_compiled_products_saving_ms_per_step": round(
                    per_step["bf16"] - per_step["fp8_compiled_products"], 1
                ),
                "fused_bound_saving_ms_per_step": round(per_step["bf16"] - per_step["fp8_matmul_only"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
