"""lora_kit's faster default training path, as plain functions (issue 7).

How `train.build_trainer(..., fast=True)` uses it (four calls, all cheap, all no-ops where a lever is off)::

    from lora_kit import speed

    cap = hardware.compute_capability                  # (9, 0) on an H100, (7, 5) on a T4, None on CPU
    extra = speed.fast_path_settings(cap, precision, method, lengths, max_length)  # extra trl.SFTConfig kwargs
    micro_batch, grad_accum = speed.batch_shape(micro_batch, grad_accum, extra)
    model = speed.prepare_model(model, cap, precision, packing=extra.get("packing", False))  # attention kernel
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(..., **extra), ...)
    speed.after_trainer_built(trainer, cap, precision, method)  # adapter dtype, compiled blocks, optimizer syncs

    hardware_capability: a (major, minor) tuple, None for CPU, or any object with a `compute_capability`
                         attribute (lora_kit.hardware.Hardware is accepted as is).
    precision:           "bf16" | "fp16" | "fp32" (what the run computes in; a T4 is fp16).
    method:              "lora" | "qlora" | None (only the adapter dtype depends on it).
    lengths, max_length: the training samples' token counts and the cut-off (packing is on only where it pays).

With fast=False the caller skips this module and the stock recipe is what remains. Every lever was measured alone
on an H100 with a Llama-2-7B-shaped QLoRA run (benchmarks/README.md has the table, including the ones that did not
help and stay off: activation offloading, skipping gradient checkpointing, whole-model torch.compile, selective
checkpointing).
Each lever switches itself off where it is not correct or not supported, and says why beside it.
"""

from __future__ import annotations

import contextlib
from typing import Any

# Levers that are Triton code (Liger's kernels, FlexAttention's generated kernels) stay off below sm_80. A T4 is
# sm_75 with fp16 only; nothing here was run on a real sm_75 chip, and the fp16 proxy run on an H100 is no proof of
# sm_75 code generation.
_MIN_CAPABILITY_FOR_TRITON = (8, 0)

VALID_PRECISIONS = ("bf16", "fp16", "fp32")
VALID_METHODS = ("lora", "qlora", None)


def fast_path_settings(hardware_capability, precision: str, method: str | None = None,
                       lengths=None, max_length: int | None = None) -> dict[str, Any]:
    """Extra `trl.SFTConfig` keyword arguments for the fast path on this machine (a new dict each call).

    lengths / max_length: the training samples' token counts and the length they are cut to. When given, packing is
    switched on only where it removes padding (see packing_pays); without them it is assumed to (chat data).
    """
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
    #    Data that already fill max_length (fixed 2048-token samples) have no padding to remove: packing them only
    #    costs (0.89x on the H100), so packing_pays() keeps it off there.
    if cap is not None and (lengths is None or packing_pays(lengths, max_length)):
        settings["packing"] = True
        settings["packing_strategy"] = "bfd"

    # 2. Liger kernels: RMSNorm, RoPE and SwiGLU in Triton (H100 7B QLoRA: 1.14x tokens/s, -3% peak on 2048-token
    #    samples; 1.13x on padding-free chat batches). TRL keeps its own chunked LM-head loss (Liger's fused cross-entropy is
    #    refused by TRL 1.16), so only the layer kernels apply. CUDA only, and only from sm_80 (see above). Runs on
    #    fp16 too (checked on the H100 fp16 proxy), but a T4 is below sm_80, so it stays off there.
    if cap is not None and cap >= _MIN_CAPABILITY_FOR_TRITON and _importable("liger_kernel"):
        settings["use_liger_kernel"] = True
        # Where after_trainer_built compiles the attention blocks, Liger's RoPE is left out: it is wrapped in
        # torch.compiler.disable, so inside a compiled block it splits the graph in two (a second compiled region and
        # guard check per layer and pass, RoPE in its own kernels). Without it Inductor computes RoPE inside the
        # block's graph. H100, 7B QLoRA, 2048-token samples, two runs: 1.70x and 1.58x the stock tokens/s instead of
        # 1.45x and 1.35x, the same peak memory (benchmarks/README.md: lora_kit against lora_kit_ligerrope). An 8-bit
        # base is not compiled (after_trainer_built); there RoPE then runs as plain torch ops.
        if compiles_blocks(cap, precision, bool(settings.get("packing"))):
            settings["liger_kernel_config"] = {"rope": False}

    return settings


# Below this mean fill of max_length, packing removes enough padding (and fills micro-batches enough) to pay.
PACKING_MIN_SAVING = 0.10


def packing_pays(lengths, max_length: int | None) -> bool:
    """True when the samples, cut to max_length, fill less than 90% of it on average (so packing removes padding).

    Chat data (median ~250 tokens, max_length 2048) fill ~20%: packing pays 2.7-4.4x. Samples that all reach
    max_length fill 100%: there is nothing to pack, and the flattened rows are ~11% slower than plain padded ones.
    """
    lengths = [int(n) for n in lengths]
    if not lengths:
        return False
    cap = max_length or max(lengths)
    fill = sum(min(n, cap) for n in lengths) / (len(lengths) * cap)
    return fill < 1.0 - PACKING_MIN_SAVING


def attention_implementation(hardware_capability, precision: str, packing: bool = True) -> str:
    """The attention kernel for the fast path: "flex_attention" on CUDA sm_80+, else "sdpa" (the stock one).

    With packing, sdpa gets a dense block-diagonal mask and falls back to the memory-efficient kernel, which computes
    every masked-out block of the flattened row (a 8192-token row costs 16x one 2048-token sample). FlexAttention
    turns the same mask into a block-sparse BlockMask and skips them: 7,186 vs 4,543 real tokens/s on chat-like data
    (H100, 7B QLoRA). It compiles its kernel once per run (about a minute), and on plain fixed-length data it is ~13%
    slower than sdpa's flash kernel. Triton-generated, so off below sm_80 and on CPU (slow to compile there).
    Without packing there is no block mask to exploit: sdpa stays.
    """
    cap = _capability(hardware_capability)
    if precision not in VALID_PRECISIONS:
        raise ValueError(f"precision must be one of {VALID_PRECISIONS}, got {precision!r}")
    if packing and cap is not None and cap >= _MIN_CAPABILITY_FOR_TRITON and precision in ("bf16", "fp16"):
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception:  # noqa: BLE001 - an old torch without FlexAttention: keep sdpa
            return "sdpa"
        return "flex_attention"
    return "sdpa"


def prepare_model(model, hardware_capability, precision: str, packing: bool = True):
    """Switch `model` (a PreTrainedModel, or a PeftModel around one) to attention_implementation(); returns it.

    Call before SFTTrainer is built. A no-op where the answer is the model's current implementation.
    """
    wanted = attention_implementation(hardware_capability, precision, packing)
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


def after_trainer_built(trainer, hardware_capability, precision: str, method: str | None = None) -> list[str]:
    """The levers that act on a built trainer; returns one line per lever saying what it did (for the log).

    * adapter dtype: fp32 for fp16 and fp32 runs (upcast_trainable_params). On bf16 a QLoRA model keeps the bf16
      adapters TRL gives it, as in the QLoRA paper's own code (0.3 GiB less for a 7B at r=64, same speed; fp32 ones
      measured 1.05x the peak memory); a 16-bit LoRA model keeps PEFT's fp32 adapters.
    * compile_layers: sm_80+ CUDA in bf16/fp16, when not packing and not on an 8-bit base (H100 7B QLoRA at 2048 tokens, quiet machine:
      1.21x, 0.98x memory with Liger). Packed rows change length every step: each new length recompiles the blocks
      (steps of 1.36 and 1.49 s in the middle of a run), and the packed run was no faster overall, so compile stays off there.
    * skip_optimizer_syncs + lean_update_step: any CUDA run with a bitsandbytes optimizer (paged AdamW): one GPU
      wait per step and bnb's update op called straight from the parameter group (bit for bit bnb's update; 448
      adapter tensors of a 7B: 33 -> 9 ms per optimizer step on the H100).
    """
    cap = _capability(hardware_capability)
    done = []
    if precision in ("fp16", "fp32") or method != "qlora":
        n = upcast_trainable_params(trainer.model)
        if n:
            done.append(f"adapters: {n} tensors cast to fp32")
    packing = bool(getattr(trainer.args, "packing", False))
    # 8-bit bases (bitsandbytes' Linear8bitLt and its Python matmul state) were never run compiled: left eager.
    int8 = any(type(m).__name__ == "Linear8bitLt" for m in trainer.model.modules())
    if compiles_blocks(cap, precision, packing) and not int8:
        done.append(f"torch.compile: {compile_layers(trainer.model)} attention/MLP blocks (first step compiles them)")
    if cap is not None:
        trainer.add_callback(_OptimizerLevers())
        done.append("bitsandbytes optimizer: one synchronisation per step instead of one per tensor, "
                    "update kernels called without bnb's per-tensor Python")
    return done


@contextlib.contextmanager
def eager_inference(model):
    """Inside the block, training's attention kernel and compiled blocks are off: generation and evaluation run eager.

    FlexAttention without a packed training batch falls back to an unfused kernel that materialises the full score
    matrix, and compiled blocks recompile for every new generation length (and say so, once per shape). sdpa and
    the eager blocks are what inference wants; both are put back on exit, for a later training run.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch = attention == "flex_attention" and hasattr(base, "set_attn_implementation")
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    if switch:
        base.set_attn_implementation("sdpa")
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield model
    finally:
        for module, impl in compiled:
            module._compiled_call_impl = impl
        if switch:
            base.set_attn_implementation(attention)


def compiles_blocks(hardware_capability, precision: str, packing: bool) -> bool:
    """Whether after_trainer_built compiles the attention and MLP blocks (8-bit bases aside): sm_80+ CUDA, 16-bit
    compute, no packing (see after_trainer_built for why each)."""
    cap = _capability(hardware_capability)
    return not packing and cap is not None and cap >= _MIN_CAPABILITY_FOR_TRITON and precision in ("bf16", "fp16")


def skip_optimizer_syncs(optimizer) -> bool:
    """Make a bitsandbytes optimizer synchronise the GPU once per step instead of after every tensor.

    bitsandbytes 0.50's Optimizer8bit.step (every paged/8-bit/32-bit AdamW) calls torch.cuda.synchronize() after
    each parameter's update: 448 times per step for a 7B with adapters on all 7 projections, each a round trip that
    leaves the GPU idle (~45 ms of a ~0.5 s step on the H100). The updates are issued on one stream in order, and the
    paged state prefetches are asynchronous hints on that same order, so the result does not depend on those
    waits (benchmarks/check_optimizer_syncs.py compares the parameters bit for bit). The last wait of the step stays.
    Returns False (and changes nothing) for any other optimizer. `optimizer` may be accelerate's wrapper.
    """
    inner, bnb_optimizer = _untouched_bnb_optimizer(optimizer, "Optimizer8bit", "_lora_kit_one_sync")
    if inner is None:
        return False
    original_step = inner.step  # may already be wrapped by an LR scheduler: keep that wrapper in the chain
    per_tensor_sync = bnb_optimizer.sync_gpu

    def step(_inner, *args, **kwargs):
        bnb_optimizer.sync_gpu = _no_sync
        try:
            result = original_step(*args, **kwargs)
        finally:
            bnb_optimizer.sync_gpu = per_tensor_sync
        first = _first_param(inner)
        if first is not None:
            per_tensor_sync(first)  # one wait for the whole step (a no-op on CPU)
        return result

    _install_step(optimizer, inner, step)
    inner._lora_kit_one_sync = True
    return True


def _install_step(optimizer, inner, step) -> None:
    """Make `step(inner, *args, **kwargs)` the bitsandbytes optimizer's step; `step` calls the one it replaces.

    Bound, because torch's LR schedulers wrap `optimizer.step.__func__`; marked as the scheduler's if the step it
    replaces was (it still runs inside, so the scheduler's step counting holds). And accelerate's fp16 wrapper (a
    GradScaler: every T4 run) swaps in, on every step, the step it saw when it was built: tell it about this one.
    """
    import types

    if getattr(inner.step, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True
    inner.step = types.MethodType(step, inner)
    if getattr(optimizer, "scaler", None) is not None and hasattr(optimizer, "_optimizer_original_step_method"):
        from accelerate.optimizer import patch_optimizer_step

        optimizer._optimizer_original_step_method = inner.step
        optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, inner.step)


def _no_sync(tensor) -> None:
    return None


def _first_param(optimizer):
    return next((p for group in optimizer.param_groups for p in group["params"]), None)


def _untouched_bnb_optimizer(optimizer, class_name: str, done_flag: str):
    """(the bitsandbytes optimizer inside `optimizer`, bnb's optimizer module), or (None, None) when it is not a
    bnb `class_name`, bitsandbytes is missing, or `done_flag` says this lever was applied already."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except Exception:  # noqa: BLE001 - no bitsandbytes: nothing to do
        return None, None
    if not isinstance(inner, getattr(bnb_optimizer, class_name)) or getattr(inner, done_flag, False):
        return None, None
    return inner, bnb_optimizer


def lean_update_step(optimizer) -> bool:
    """Run a bitsandbytes 32-bit-state optimizer's per-tensor update without the Python around its kernel.

    For each tensor bnb 0.50's Optimizer2State.update_step re-assigns p.data and p.grad to contiguous copies (a no-op
    for adapters, but the .data setter is not free), builds an 11-key config dict (get_config), checks devices
    (is_on_gpu) and only then calls its update op, torch.ops.bitsandbytes.optimizer_update_32bit. With 448 adapter
    tensors that Python, not the ~8 us kernels, is most of the optimizer's time while the GPU waits. This calls the
    same op with the same arguments straight from the parameter group, so the update is bit for bit bnb's
    (tests/test_speed.py on CPU, benchmarks/check_optimizer_syncs.py on the GPU). Anything the short path does not
    cover goes through bnb's own update_step: 8-bit states, one-state optimizers, max_unorm, per-parameter overrides
    (GlobalOptimManager), non-contiguous tensors; optimizers with their own update_step (AdEMAMix) are left alone.
    bnb's step() still creates the states; paged states are prefetched only when the GPU has come near full (see
    step below).
    Returns False (and changes nothing) for any other optimizer. `optimizer` may be accelerate's wrapper.
    """
    import torch

    inner, bnb_optimizer = _untouched_bnb_optimizer(optimizer, "Optimizer2State", "_lora_kit_lean_update")
    # Subclasses with their own update_step (AdEMAMix schedules alpha and beta3 per step) keep bnb's.
    if inner is None or type(inner).update_step is not bnb_optimizer.Optimizer2State.update_step:
        return False
    update = torch.ops.bitsandbytes.optimizer_update_32bit
    bnb_update_step = inner.update_step  # the bound method of the class: the fallback
    name, args, mng = inner.optimizer_name, inner.args, inner.mng

    def update_step(group, p, gindex, pindex):
        state, grad = inner.state[p], p.grad
        if (args.max_unorm > 0.0 or state["state1"].dtype != torch.float32 or state.get("state2") is None
                or not (p.is_contiguous() and grad.is_contiguous())
                or (gindex, pindex) in mng.index2config or id(p) in mng.pid2config):
            return bnb_update_step(group, p, gindex, pindex)
        state["step"] += 1
        betas = group["betas"]
        update(name, grad, p, state["state1"], state["state2"], None, 0.0, 0.0, betas[0], betas[1],
               betas[2] if len(betas) >= 3 else 0.0, group.get("alpha", 0.0), group["eps"], group["weight_decay"],
               state["step"], group["lr"], 1.0, args.skip_zeros)

    bnb_prefetch_state, bnb_step = inner.prefetch_state, inner.step
    decided = {"prefetch": True, "paged_tensors": -1, "paged_bytes": 0}

    def step(_inner, *a, **k):
        # Paged states are filled on the GPU and stay there until the driver evicts them, which it only does when the
        # GPU runs out of room. Prefetching resident pages is a driver call per state for nothing (12 of the 28 ms of
        # a 448-tensor step on the H100, benchmarks/check_optimizer_syncs.py). So, once per step: prefetch as bnb
        # does only once this process's peak reservation plus the paged states came within 10% of the card.
        first = _first_param(inner)
        if first is not None and first.is_cuda:
            paged = inner.page_mng.paged_tensors
            if len(paged) != decided["paged_tensors"]:
                decided["paged_tensors"], decided["paged_bytes"] = len(paged), sum(t.nbytes for t in paged)
            total = torch.cuda.get_device_properties(first.device).total_memory
            decided["prefetch"] = torch.cuda.max_memory_reserved(first.device) + decided["paged_bytes"] > 0.9 * total
        else:
            decided["prefetch"] = True  # CPU: bnb's prefetch_state does nothing there anyway
        return bnb_step(*a, **k)

    def prefetch_state(p):
        if decided["prefetch"]:
            bnb_prefetch_state(p)

    inner.update_step = update_step
    inner.prefetch_state = prefetch_state
    _install_step(optimizer, inner, step)  # skip_optimizer_syncs' step or a scheduler's wrapper stays in the chain
    inner._lora_kit_lean_update = True
    return True


class _OptimizerLevers:
    """A transformers TrainerCallback that applies skip_optimizer_syncs and lean_update_step once the optimizer exists."""

    def __new__(cls):
        from transformers import TrainerCallback

        class OptimizerLevers(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is not None:
                    skip_optimizer_syncs(optimizer)
                    lean_update_step(optimizer)

        return OptimizerLevers()


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


# Inductor's defaults, except one. Pointwise autotuning times each new elementwise kernel in two launch configurations
# the first time it runs, and to time it fairly it first allocates a buffer the size of the GPU's L2 cache (50 MiB on
# an H100) to flush the cache. The first backward runs those kernels at the training peak (the last layer being
# recomputed), so on a fresh machine (every Colab runtime) the autotuning buffer lands on top of the peak. The two
# configurations differ by how many elements a warp handles; for the LoRA scale-and-add, SwiGLU and RoPE kernels here
# the choice is worth little (benchmarks/README.md has the measurement).
COMPILE_OPTIONS = {"triton.autotune_pointwise": False}


def compile_layers(model) -> int:
    """torch.compile each decoder layer's attention and MLP block in place; returns how many blocks were compiled.

    Regional compilation: the blocks are compiled, not the whole model, so gradient checkpointing (which wraps each
    layer's forward) stays outside the compiled code and keeps its memory savings, and the 32 identical layers of a
    7B share one compiled graph per block type instead of one whole-model graph. Inductor fuses what sits between
    the matrix products (the LoRA scale-and-add, RMSNorm, RoPE, SwiGLU, dtype casts). Call it after the trainer is
    built (PEFT has wrapped the projections by then). The first step pays the compilation (tens of seconds).
    """
    import torch

    _allow_a_recompile_per_layer()
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            for child in ("self_attn", "mlp"):
                block = getattr(module, child, None)
                if isinstance(block, torch.nn.Module):
                    block.compile(options=dict(COMPILE_OPTIONS))
                    n += 1
    return n


def _allow_a_recompile_per_layer() -> None:
    import torch

    config = torch._dynamo.config
    # Each layer's block is a different module object; dynamo may specialise on some of them, so allow a recompile
    # per layer rather than falling back to eager after the default 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


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
