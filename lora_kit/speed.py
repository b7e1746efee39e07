"""lora_kit's training speed levers: which ones a run uses, and the code of each.

`train.build_trainer` uses them in five calls (each a no-op where its levers are off)::

    from lora_kit import speed

    levers, notes = speed.Levers().decide(capability, precision, method, lengths, max_length)  # or Levers.off()
    extra = speed.sft_settings(levers)                          # extra trl.SFTConfig kwargs (packing, Liger)
    micro_batch, grad_accum = speed.batch_shape(micro_batch, grad_accum, levers)
    model = speed.prepare_model(model, levers)                  # attention kernel
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(..., **extra), ...)
    speed.after_trainer_built(trainer, levers)                  # adapter dtype, compiled blocks, optimizer

`Levers.off()` is the stock transformers + peft + trl recipe (`TrainSettings(fast=False)`). Each lever was measured
alone on an H100 with a Llama-2-7B-shaped QLoRA run: benchmarks/README.md has the numbers, and the levers that did not
help and stay out (activation offloading, no gradient checkpointing, whole-model torch.compile, selective
checkpointing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Any

# Liger's kernels, FlexAttention's and the compiled blocks' are Triton code, run by lora_kit only from sm_80 (a T4 is
# sm_75; no lever was run on a real one).
_MIN_CAPABILITY_FOR_TRITON = (8, 0)

VALID_PRECISIONS = ("bf16", "fp16", "fp32")
VALID_METHODS = ("lora", "lora8", "qlora", None)  # preset()'s names; None: not known

# Below this mean fill of max_length, packing removes enough padding (and fills micro-batches enough) to pay.
PACKING_MIN_SAVING = 0.10


@dataclass(frozen=True)
class Levers:
    """The speed levers of a training run, each True (on), False (off) or None (this machine and these data decide).

    `Levers()` lets the machine decide every lever (`TrainSettings(fast=True)`); `Levers.off()` is the stock recipe
    (`TrainSettings(fast=False)`); `Levers(compile_blocks=False)` is the first with one lever off. A lever forced on
    where it cannot run (Triton code on a CPU or below sm_80, bf16 adapters under fp16) steps aside: `decide` switches
    it off and returns the reason, which build_trainer prints. A recipe written for one machine then still trains on
    another, only without that lever.
    """

    packing: bool | None = None
    """Pack whole samples into max_length rows (TRL's best-fit decreasing), so no compute goes to pad tokens and each
    micro-batch carries more of QLoRA's fixed per-batch cost. None: on for a GPU where the samples fill less than 90%
    of max_length (packing_pays); off on CPU, where it was slower."""
    flex_attention: bool | None = None
    """FlexAttention: skips the masked-out blocks of a packed row, which sdpa computes in full. None: on with packing on
    CUDA sm_80+ in 16 bits (on unpacked rows sdpa's flash kernel is faster)."""
    liger: bool | None = None
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU: fewer, fused kernels. None: on for CUDA sm_80+ where
    liger-kernel is installed."""
    liger_rope: bool | None = None
    """Liger's RoPE among them. None: on, except where the blocks are compiled: it is wrapped in
    torch.compiler.disable, so it would split each compiled attention block in two, and Inductor's RoPE is faster."""
    compile_blocks: bool | None = None
    """torch.compile each decoder layer's attention and MLP blocks, fusing the elementwise work between the matrix
    products. None: on for CUDA sm_80+ in 16 bits, but not with packing (every new row length recompiles) nor on an
    8-bit base (never run compiled)."""
    autotune_pointwise: bool = False
    """Inductor's pointwise autotuning in the compiled blocks. Off: on a fresh machine its L2-flushing buffer lands on
    the training peak, and the launch configuration it picks is worth little for these kernels."""
    one_sync_optimizer: bool | None = None
    """A bitsandbytes optimizer waits for the GPU once per step instead of after every tensor (skip_optimizer_syncs).
    None: on for every GPU."""
    lean_update: bool | None = None
    """bitsandbytes' update op called straight from the parameter group, without its per-tensor Python
    (lean_update_step). None: on for every GPU."""
    bf16_adapters: bool | None = None
    """Keep the bf16 adapters TRL gives a quantized model instead of casting them to fp32: less memory, same speed, as
    in the QLoRA paper's code. None: on for bf16 QLoRA; fp16 runs (their grad scaler) and fp32 runs need fp32."""

    @classmethod
    def off(cls) -> Levers:
        """Every lever off: the stock transformers + peft + trl recipe."""
        return cls(**{f.name: False for f in fields(cls)})

    def on(self) -> list[str]:
        """The names of the levers that are on."""
        return [f.name for f in fields(self) if getattr(self, f.name) is True]

    def decide(
        self,
        hardware_capability,
        precision: str,
        method: str | None = None,
        lengths=None,
        max_length: int | None = None,
    ) -> tuple[Levers, list[str]]:
        """These levers with every None answered for this machine and these data, and one line per lever that was
        forced on but cannot run here (it is switched off).

        hardware_capability: a (major, minor) tuple such as (9, 0), None for CPU, or an object with a
                             `compute_capability` attribute (lora_kit.hardware.Hardware).
        precision:           "bf16" | "fp16" | "fp32", what the run computes in (a T4 is fp16).
        method:              "lora" | "lora8" | "qlora" | None (the adapter dtype and compilation depend on it).
        lengths, max_length: the training samples' token counts and their cut-off; without them packing is assumed
                             to pay (chat data).
        """
        cap = _capability(hardware_capability)
        if precision not in VALID_PRECISIONS:
            raise ValueError(f"precision must be one of {VALID_PRECISIONS}, got {precision!r}")
        if method not in VALID_METHODS:
            raise ValueError(f"method must be one of {VALID_METHODS}, got {method!r}")
        gpu = cap is not None
        triton = gpu and cap >= _MIN_CAPABILITY_FOR_TRITON
        sixteen_bit = precision in ("bf16", "fp16")
        no_triton = (
            None
            if triton
            else "it is Triton code, which lora_kit runs on CUDA sm_80 or newer only "
            f"(this machine: {'sm_%d%d' % cap if gpu else 'CPU'})"
        )
        notes = []

        def choose(name, auto, cannot=None):
            wanted = getattr(self, name)
            if wanted is None:
                return bool(auto) and not cannot
            if wanted and cannot:
                notes.append(f"{name}: asked for, but {cannot}: off")
                return False
            return wanted

        packing = choose("packing", gpu and (lengths is None or packing_pays(lengths, max_length)))
        flex = choose(
            "flex_attention",
            packing and sixteen_bit,
            no_triton or (None if _flex_available() else "this torch has no FlexAttention"),
        )
        eight_bit = "8-bit bases (bitsandbytes' Linear8bitLt) were never run compiled" if method == "lora8" else None
        compiled = choose("compile_blocks", sixteen_bit and not packing, no_triton or eight_bit)
        liger = choose(
            "liger", True, no_triton or (None if _importable("liger_kernel") else "liger-kernel is not installed")
        )
        # Liger's RoPE stays out of compiled blocks; an 8-bit base, whose blocks would compile but for the base, keeps
        # the torch RoPE it has been run with.
        rope = liger and choose("liger_rope", not (compiled or (eight_bit and triton and sixteen_bit and not packing)))
        not_bf16 = (
            None
            if precision == "bf16"
            else (
                "fp16's grad scaler cannot unscale bf16 gradients"
                if precision == "fp16"
                else "an fp32 run keeps fp32 adapters (bf16 ones made QLoRA diverge on CPU)"
            )
        )
        decided = replace(
            self,
            packing=packing,
            flex_attention=flex,
            liger=liger,
            liger_rope=rope,
            compile_blocks=compiled,
            one_sync_optimizer=choose("one_sync_optimizer", gpu),
            lean_update=choose("lean_update", gpu),
            bf16_adapters=choose("bf16_adapters", method == "qlora", not_bf16),
        )
        return decided, notes


def packing_pays(lengths, max_length: int | None) -> bool:
    """True when the samples, cut to max_length, fill less than 90% of it on average (so packing removes padding).

    Chat data fill ~20% of a 2048-token max_length; samples that all reach max_length leave nothing to pack, and the
    flattened rows are then slower than plain padded ones (benchmarks/README.md).
    """
    lengths = [int(n) for n in lengths]
    if not lengths:
        return False
    cap = max_length or max(lengths)
    fill = sum(min(n, cap) for n in lengths) / (len(lengths) * cap)
    return fill < 1.0 - PACKING_MIN_SAVING


def sft_settings(levers: Levers) -> dict[str, Any]:
    """The `trl.SFTConfig` keyword arguments of decided levers (a new dict; empty when packing and Liger are off).

    Packing: TRL's collator flattens a micro-batch into one row whose position_ids restart at 0 for each sample, and
    transformers (>= 5, sdpa / eager / flex_attention, no KV cache: SFTTrainer's case) builds the block-diagonal causal
    mask from them; tests/test_speed.py checks that the packed loss equals the padded one. Liger: TRL keeps its own
    chunked LM-head loss (it refuses Liger's fused cross-entropy), so only the layer kernels apply.
    """
    _check_decided(levers)
    settings: dict[str, Any] = {}
    if levers.packing:
        settings.update(packing=True, packing_strategy="bfd")
    if levers.liger:
        settings["use_liger_kernel"] = True
        if not levers.liger_rope:
            settings["liger_kernel_config"] = {"rope": False}
    return settings


def batch_shape(micro_batch: int, grad_accum: int, levers: Levers) -> tuple[int, int]:
    """Micro-batch size and gradient accumulation to use with decided `levers`.

    Packing: the micro-batch counts max_length rows, so its memory bound is the stock worst case (micro_batch samples
    of max_length) and it stays; accumulation drops to 1, since each row already holds several chat samples, so a step
    still sees more samples than the stock accumulated one. Otherwise unchanged.
    """
    _check_decided(levers)
    return (micro_batch, 1) if levers.packing else (micro_batch, grad_accum)


def prepare_model(model, levers: Levers):
    """Switch `model` (a PreTrainedModel, or a PeftModel around one) to FlexAttention where the lever is on; returns it.

    Call before SFTTrainer is built. With the lever off, a FlexAttention left by an earlier run goes back to sdpa and
    any other implementation stays as loaded.
    """
    _check_decided(levers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    wanted = "flex_attention" if levers.flex_attention else "sdpa" if current == "flex_attention" else current
    if current != wanted and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(wanted)
    return model


def after_trainer_built(trainer, levers: Levers) -> list[str]:
    """The levers that act on a built trainer; returns one line per action, for the log.

    Adapter dtype: fp32 (upcast_trainable_params) unless bf16_adapters. Compiled blocks: after the build, since PEFT
    has wrapped the projections by then. Optimizer levers: a callback, since the optimizer exists only at train().
    """
    _check_decided(levers)
    done = []
    if not levers.bf16_adapters:
        n = upcast_trainable_params(trainer.model)
        if n:
            done.append(f"adapters: {n} tensors cast to fp32")
    if levers.compile_blocks:
        n = compile_layers(trainer.model, autotune_pointwise=levers.autotune_pointwise)
        done.append(f"torch.compile: {n} attention/MLP blocks (first step compiles them)")
    if levers.one_sync_optimizer or levers.lean_update:
        trainer.add_callback(OptimizerLevers(levers.one_sync_optimizer, levers.lean_update))
        done.append(
            "bitsandbytes optimizer: "
            + ", ".join(
                ["one synchronisation per step instead of one per tensor"] * levers.one_sync_optimizer
                + ["update kernels called without bnb's per-tensor Python"] * levers.lean_update
            )
        )
    return done


def _check_decided(levers: Levers) -> None:
    undecided = [f.name for f in fields(levers) if getattr(levers, f.name) is None]
    if undecided:
        raise ValueError(f"levers {undecided} are undecided (None): pass the Levers that Levers.decide() returns")


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


def skip_optimizer_syncs(optimizer) -> bool:
    """Make a bitsandbytes optimizer synchronise the GPU once per step instead of after every tensor.

    bitsandbytes 0.50's Optimizer8bit.step (every paged/8-bit/32-bit AdamW) calls torch.cuda.synchronize() after
    each parameter's update: 448 times per step for a 7B with adapters on all 7 projections, each a round trip that
    leaves the GPU idle (benchmarks/README.md has the cost). The updates are issued on one stream in order, and the
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
        if (
            args.max_unorm > 0.0
            or state["state1"].dtype != torch.float32
            or state.get("state2") is None
            or not (p.is_contiguous() and grad.is_contiguous())
            or (gindex, pindex) in mng.index2config
            or id(p) in mng.pid2config
        ):
            return bnb_update_step(group, p, gindex, pindex)
        state["step"] += 1
        betas = group["betas"]
        update(
            name,
            grad,
            p,
            state["state1"],
            state["state2"],
            None,
            0.0,
            0.0,
            betas[0],
            betas[1],
            betas[2] if len(betas) >= 3 else 0.0,
            group.get("alpha", 0.0),
            group["eps"],
            group["weight_decay"],
            state["step"],
            group["lr"],
            1.0,
            args.skip_zeros,
        )

    bnb_prefetch_state, bnb_step = inner.prefetch_state, inner.step
    decided = {"prefetch": True, "paged_tensors": -1, "paged_bytes": 0}

    def step(_inner, *a, **k):
        # Paged states stay on the GPU until the driver evicts them, which it does only when the GPU runs short, so
        # prefetching resident pages is a driver call per state for nothing (benchmarks/README.md has the cost). Once
        # per step: prefetch as bnb does only once this process's peak reservation plus the paged states came within
        # 10% of the card.
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


class OptimizerLevers:
    """A transformers TrainerCallback that applies skip_optimizer_syncs (one_sync) and lean_update_step (lean) once the
    optimizer exists."""

    def __new__(cls, one_sync: bool = True, lean: bool = True):
        from transformers import TrainerCallback

        class _OptimizerLevers(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is not None and one_sync:
                    skip_optimizer_syncs(optimizer)
                if optimizer is not None and lean:
                    lean_update_step(optimizer)

        return _OptimizerLevers()


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


def compile_layers(model, autotune_pointwise: bool = False) -> int:
    """torch.compile each decoder layer's attention and MLP block in place; returns how many blocks were compiled.

    Regional compilation: the blocks are compiled, not the whole model, so gradient checkpointing (which wraps each
    layer's forward) stays outside the compiled code and keeps its memory savings, and the 32 identical layers of a
    7B share one compiled graph per block type instead of one whole-model graph. Inductor fuses what sits between
    the matrix products (the LoRA scale-and-add, RMSNorm, RoPE, SwiGLU, dtype casts). Call it after the trainer is
    built (PEFT has wrapped the projections by then). The first step pays the compilation (tens of seconds).
    autotune_pointwise: Inductor's pointwise autotuning (Levers.autotune_pointwise says why it is off by default).
    """
    import torch

    _allow_a_recompile_per_layer()
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            for child in ("self_attn", "mlp"):
                block = getattr(module, child, None)
                if isinstance(block, torch.nn.Module):
                    block.compile(options={"triton.autotune_pointwise": autotune_pointwise})
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


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception:  # noqa: BLE001 - an old torch without FlexAttention
        return False
    return True
