"""Does lora_kit's torch 4-bit matmul (quant.torch_4bit_matmul, the torch_4bit_matmul lever) compute what
bitsandbytes computes, and what does one projection cost each way?

For the seven projection shapes of a Llama-2-7B layer, NF4 with double quantization in bf16: the weight decoded by
torch operations against bitsandbytes' CUDA kernel (bit for bit), then forward + input gradient at 4,096 tokens,
bitsandbytes' Linear4bit against the same layer routed through the torch path, each compiled as lora_kit compiles
its blocks.

    python benchmarks/check_torch_4bit.py [--tokens 4096] [--json-out results/torch_4bit.json]
"""

import argparse
import copy
import json
import time

import torch

from lora_kit import quant

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}


def layer(out_features, in_features):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.load_state_dict({"weight": torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02})
    return lin.cuda().requires_grad_(False)


def timed(fn, x, grad, repeats=20):
    for _ in range(3):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).backward(grad)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json-out")
    args = p.parse_args()
    rows = {}
    for name, (out_features, in_features) in SHAPES.items():
        stock = layer(out_features, in_features)
        ours = copy.deepcopy(stock)
        quant.torch_4bit_matmul(torch.nn.Sequential(ours))
        tensors, sizes = quant._4bit_parts(stock.weight)
        decoded = quant._dequantize_4bit(*tensors, *sizes, stock.weight.quant_state.shape, torch.bfloat16)
        same_bits = torch.equal(decoded, quant.dequantize_4bit_weight(stock.weight).to(torch.bfloat16))
        x = torch.randn(args.tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(args.tokens, out_features, device="cuda", dtype=torch.bfloat16)
        compiled = [torch.compile(stock), torch.compile(ours)]
        outputs = []
        for module in compiled:
            x.grad = None
            y = module(x)
            y.backward(grad)
            outputs.append((y.detach(), x.grad.clone()))
        rows[name] = {
            "same_bits": same_bits,
            "max_output_difference": (outputs[0][0] - outputs[1][0]).abs().max().item(),
            "max_input_grad_difference": (outputs[0][1] - outputs[1][1]).abs().max().item(),
            "bitsandbytes_ms": timed(compiled[0], x, grad),
            "torch_ms": timed(compiled[1], x, grad),
        }
        print(name, json.dumps(rows[name]), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
