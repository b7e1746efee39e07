"""lora_kit's faster default training path, as plain functions (issue 7).

How `train.build_trainer(..., fast=True)` uses it (three calls, all cheap, all no-ops where a lever is off)::

    from lora_kit import speed

    cap = hardware.compute_capability                  # (9, 0) on an H100, (7, 5) on a T4, None on CPU
    extra = speed.fast_path_settings(cap, precision, method)      # dict of extra trl.SFTConfig kwargs
    micro_batch, grad_accum = speed.batch_shape(micro_batch, grad_accum, extra)
    model = speed.prepare_model(model, cap, precision)  # attention kernel; before SFTTrainer(...)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(..., **extra), ...)
    speed.upcast_trainable_params(trainer.model)         # fp16/fp32 only, AFTER the trainer is built

    hardware_capability: a (major, minor) tuple, None for CPU, or any object with a `compute_capability`
                         attribute (lora_kit.hardware.Hardware is accepted as is).
    precision:           "bf16" | "fp16" | "fp32" (what the run computes in; a T4 is fp16).
    method:              "lora" | "qlora" | None (the levers below do not depend on it today; other objects
                         are ignored).

With fast=False the caller skips this module and the stock recipe is what remains. Every lever was measured alone
on an H100 with a Llama-2-7B-shaped QLoRA run (benchmarks/README.md has the table, including the ones that did not
help and stay off: activation offloading, skipping gradient checkpointing, torch.compile, selective checkpointing).
Each lever switches itself off where it is not correct or not supported, and says why beside it.
"""

from __future__ import annotations

from typing import Any

# Levers that are Triton code (Liger's kernels, FlexAttention's generated kernels) stay off below sm_80. A T4 is
# sm_75 with fp16 only; nothing here was run on a real sm_75 chip, and the fp16 proxy run on an H100 is no proof of
# sm_75 code generation.
_MIN_CAPABILITY_FOR_TRITON = (8, 0)

VALID_PRECISIONS = ("bf16", "fp16", "fp32")
VALID_METHODS = ("lora", "qlora", None)


def fast_path_settings(hardware_capability, precision: str, method: str | None = None) -> dict[str, Any]:
    """Extra `trl.SFTConfig` keyword arguments for the fast path on this machine (a new dict each call)."""
    cap = _capability(hardware_capability)
    if precision not in VALID_PRECISIONS:
        raise ValueError(f"precision must be one of {VALID_PRECISIONS}, got {precision!r}")
    if isinstance(method, str) and method not in VALID_METHODS:
        raise ValueError(f"method must be one of {VALID_METHODS}, got {method!r}")
    settings: dict[str, Any] = {}

    # 1. Padding-free batches through TRL's best-fit-decreasing packing (H100, 7B QLoRA, chat-like lengths:
    #    2.75x the stock real tokens/s with sdpa, 4.4x with FlexAttention, see prepare_model).
    #    Chat data is mostly short with a long tail: padding each batch to its longest sample spends the GPU on pad
    #    tokens, and QLoRA pays a large fixed cost per micro-batch (dequantizing every weight, launching every
    #    kernel) whatever its length, so fuller micro-batches are faster. bfd packs whole samples into max_length
    #    bins (a sample longer than max_length is truncated, as in the stock path) and the collator flattens a
    #    micro-batch into one row whose position_ids restart at 0 for each sample.
    #    Correct boundaries: with attn_implementation "sdpa", "eager" or "flex_attention", transformers >= 5 builds
    #    a block-diagonal causal mask from those position_ids (masking_utils.find_packed_sequence_indices) when no
    #    attention_mask is passed and no KV cache is used, which is exactly what SFTTrainer does (use_cache=False);
    #    TRL masks the label of each sample's first token. tests/test_speed.py checks packed loss == padded loss.
    #    No kernel of its own, so correct on CPU and on a T4 too: on for every GPU.
    #    Trade-off: a step now holds micro_batch bins of max_length tokens, i.e. more samples than the stock step
    #    (its memory bound is the stock worst case: micro_batch samples of max_length); see batch_shape().
    #    On data that are all max_length long it costs ~10% (one flattened row, no plain causal fast path).
    #    CPU: off. Measured on the 2-core CPU (embedded 135M model, demo task, 4 steps each, quiet machine):
    #    4 packed rows of 256 tokens ran 96 tokens/s, 8 padded samples 108 tokens/s. The CPU has no fixed per-step
    #    cost to amortise, and one long flattened row makes attention (with an explicit block mask) dearer.
    if cap is not None:
        settings["packing"] = True
        settings["packing_strategy"] = "bfd"

    # 2. Liger kernels: RMSNorm, RoPE and SwiGLU in Triton (H100 7B QLoRA: 1.14x tokens/s, -3% peak on 2048-token
    #    samples; 1.13x on padding-free chat batches). TRL keeps its own chunked LM-head loss (Liger's fused cross-entropy is
    #    refused by TRL 1.16), so only the layer kernels apply. CUDA only, and only from sm_80 (see above). Runs on
    #    fp16 too (checked on the H100 fp16 proxy), but a T4 is below sm_80, so it stays off there.
    if cap is not None and cap >= _MIN_CAPABILITY_FOR_TRITON and _importable("liger_kernel"):
        settings["use_liger_kernel"] = True

    return settings


def attention_implementation(hardware_capability, precision: str) -> str:
    """The attention kernel for the fast path: "flex_attention" on CUDA sm_80+, else "sdpa" (the stock one).

    With packing, sdpa gets a dense block-diagonal mask and falls back to the memory-efficient kernel, which computes
    every masked-out block of the flattened row (a 8192-token row costs 16x one 2048-token sample). FlexAttention
    turns the same mask into a block-sparse BlockMask and skips them: 7,186 vs 4,543 real tokens/s on chat-like data
    (H100, 7B QLoRA). It compiles its kernel once per run (about a minute), and on plain fixed-length data it is ~13%
    slower than sdpa's flash kernel. Triton-generated, so off below sm_80 and on CPU (slow to compile there).
    """
    cap = _capability(hardware_capability)
    if precision not in VALID_PRECISIONS:
        raise ValueError(f"precision must be one of {VALID_PRECISIONS}, got {precision!r}")
    if cap is not None and cap >= _MIN_CAPABILITY_FOR_TRITON and precision in ("bf16", "fp16"):
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception:  # noqa: BLE001 - an old torch without FlexAttention: keep sdpa
            return "sdpa"
        return "flex_attention"
    return "sdpa"


def prepare_model(model, hardware_capability, precision: str):
    """Switch `model` (a PreTrainedModel, or a PeftModel around one) to attention_implementation(); returns it.

    Call before SFTTrainer is built. A no-op where the answer is the model's current implementation.
    """
    wanted = attention_implementation(hardware_capability, precision)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != wanted and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(wanted)
    return model


def batch_shape(micro_batch: int, grad_accum: int, settings: dict[str, Any]) -> tuple[int, int]:
    """Micro-batch size and gradient accumulation to use with `settings` (from fast_path_settings).

    Packing: the micro-batch counts max_length bins, so its memory bound is the stock worst case (micro_batch samples
    of max_length) and the micro-batch size stays; gradient accumulation drops to 1, since each bin already holds
    several chat samples (on median-250-token data a 2048 bin holds ~5), so a step still sees more samples than the
    stock accumulated step. Padding-free without packing: accumulation moves into the micro-batch (same samples per
    optimizer step; the trainer averages the loss over all tokens of the step either way), since padding-free memory
    follows the real tokens. Otherwise unchanged.
    """
    if settings.get("packing"):
        return micro_batch, 1
    if settings.get("padding_free") and grad_accum > 1:
        return micro_batch * grad_accum, 1
    return micro_batch, grad_accum


def upcast_trainable_params(model) -> int:
    """Cast every trainable parameter (the LoRA adapters) to fp32 in place; returns how many were cast.

    Call it AFTER `trl.SFTTrainer(...)` is built, for fp16 (every T4) and fp32 runs. TRL's SFTTrainer (1.15, 1.16)
    casts a quantized model's trainable adapter weights to bf16 while it is built; under fp16 mixed precision the
    first optimizer step then dies in the grad scaler ("_amp_foreach_non_finite_check_and_unscale_cuda" not
    implemented for 'BFloat16'), and on CPU bf16 adapters made QLoRA diverge. bf16 runs can skip it.
    """
    import torch

    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            n += 1
    return n


def _capability(hardware_capability) -> tuple[int, int] | None:
    if hardware_capability is None:
        return None
    cap = getattr(hardware_capability, "compute_capability", hardware_capability)
    if cap is None:
        return None
    try:
        major, minor = cap
        return int(major), int(minor)
    except (TypeError, ValueError):
        raise ValueError(
            f"hardware_capability must be a (major, minor) tuple such as (7, 5), None for CPU, or an object with a "
            f"compute_capability attribute; got {hardware_capability!r}"
        ) from None


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
