"""lora_kit's training speed levers: which ones a run uses, and the code of each.

`train.build_trainer` uses them in five calls (each a no-op where its levers are off)::

    levers, notes = speed.Levers().decide(capability, precision, method, lengths, max_length)  # or Levers.off()
    extra = speed.sft_settings(levers)                          # extra trl.SFTConfig kwargs (packing, Liger)
    micro_batch, grad_accum = speed.batch_shape(micro_batch, grad_accum, levers)
    model = speed.prepare_model(model, levers)                  # attention kernel
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(..., **extra), ...)
    speed.after_trainer_built(trainer, levers)                  # adapter dtype, compiled blocks, optimizer

`Levers.off()` is the stock transformers + peft + trl recipe (`TrainSettings(fast=False)`). benchmarks/README.md
has each lever's measurements, and the levers that did not help and stay out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass, fields, replace
from typing import Any

logger = logging.getLogger(__name__)

# Liger's kernels, FlexAttention's and the compiled blocks' are Triton code, run by lora_kit only from sm_80.
_MIN_CAPABILITY_FOR_TRITON = (8, 0)
# The optimizer levers call bitsandbytes' private step internals, as written in this version; another steps aside.
_BNB_TESTED = "0.50."

VALID_PRECISIONS = ("bf16", "fp16", "fp32")
VALID_METHODS = ("lora", "lora8", "qlora", None)  # preset()'s names; None: not known

# Below this mean fill of max_length, packing removes enough padding (and fills micro-batches enough) to pay.
PACKING_MIN_SAVING = 0.10


@dataclass(frozen=True)
class Levers:
    """The speed levers of a training run, each True (on), False (off) or None (this machine and these data decide).

    `Levers()` lets the machine decide every lever; `Levers.off()` is the stock recipe. A lever forced on where it
    cannot run steps aside: `decide` switches it off and returns the reason, so a recipe still trains elsewhere.
    """

    packing: bool | None = None
    """Pack whole samples into max_length rows (TRL's best-fit decreasing): no compute on pad tokens. None: on for a
    GPU where packing_pays; off on CPU, where it was slower."""
    flex_attention: bool | None = None
    """FlexAttention skips the masked-out blocks of a packed row, which sdpa computes. None: on with packing on sm_80+
    in 16 bits (on unpacked rows sdpa's flash kernel is faster)."""
    liger: bool | None = None
    """Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU. None: on for sm_80+ where liger-kernel is
    installed."""
    liger_rope: bool | None = None
    """Liger's RoPE among them. None: on, except in compiled blocks: it is torch.compiler.disable'd, so it would split
    each compiled block in two, and Inductor's RoPE is faster."""
    compile_blocks: bool | None = None
    """torch.compile each decoder layer's attention and MLP blocks, fusing the elementwise work between matrix
    products. None: on for sm_80+ in 16 bits, but not with packing (each row length recompiles) nor on an 8-bit base
    (never run compiled)."""
    autotune_pointwise: bool = False
    """Inductor's pointwise autotuning in the compiled blocks. Off: its L2-flushing buffer lands on the training peak
    for little gain."""
    one_sync_optimizer: bool | None = None
    """A bitsandbytes optimizer waits for the GPU once per step, not after every tensor (skip_optimizer_syncs). None:
    on for every GPU."""
    lean_update: bool | None = None
    """bitsandbytes' update op called straight from the parameter group (lean_update_step). None: on for every GPU."""
    bf16_adapters: bool | None = None
    """Keep the bf16 adapters TRL gives a quantized model (less memory, same speed, as in the QLoRA paper's code).
    None: on for bf16 QLoRA; fp16 runs (their grad scaler) and fp32 runs need fp32."""
    fused_norms: bool | None = None
    """torch's fused RMSNorm kernel (``F.rms_norm``: one pass, fp32 inside) for the Llama-family norms, whose own code
    writes fp32 copies of the hidden states in six passes; the output differs by at most a 16-bit rounding. None: on
    for a GPU in 16 bits where Liger's RMSNorm is off (it fuses them already)."""
    uncast_adapter_inputs: bool | None = None
    """Under mixed precision, fp32 adapters take their 16-bit input as it is: PEFT casts it to fp32 and autocast casts
    it straight back before the matrix product, a round trip of every projection's input (and of its gradient) that
    changes no value. Without autocast (evaluation outside the trainer) PEFT's cast stays. None: on for a GPU in 16
    bits whose adapters are fp32, outside compiled blocks (Inductor fuses the casts there)."""
    fused_lora_add: bool | None = None
    """Under mixed precision, a LoRA layer without dropout adds its update to the base output inside the second
    adapter product (``addmm`` with the scaling as its alpha) instead of scaling and adding in two more passes over
    the output (and PEFT's defensive copy of a 4-bit base's output, a third); the sum differs by a 16-bit rounding.
    None: on for a GPU in 16 bits, outside compiled blocks (Inductor fuses them there)."""
    lean_rope: bool | None = None
    """Rotary position embeddings in four half-width passes each way (``_RoPE``), where transformers' code makes
    five full-width ones (a negation, a concatenation, two products and a sum) and autograd as many back; same values
    up to a 16-bit rounding. None: on for a GPU where neither Liger's RoPE nor compiled blocks (which fuse it) run."""

    torch_4bit_matmul: bool | None = None
    """Inside compiled blocks, each frozen 4-bit projection dequantizes its weight in torch operations that the
    compiler fuses into one kernel, and again in the backward (quant.torch_4bit_matmul): bitsandbytes' opaque op
    launches three kernels and runs its Python per projection, which left the GPU waiting. The same values as
    bitsandbytes' dequantization, bit for bit. None: off (an opt-in lever until measured on a GPU); it can run only
    where blocks are compiled."""

    kept_attention: bool | None = None
    """Under gradient checkpointing, each attention layer's output (and its log-sum-exp) waits in CPU RAM from the
    forward pass to the layer's recompute, which then skips the attention kernel: one attention forward per step
    instead of two, the largest share of a long sample's step. None: on for a GPU where the block inputs already wait
    in CPU RAM (TrainSettings.offload_activations, the long-context setting), outside compiled blocks."""

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
        tiled: bool = False,
        sharded: bool = False,
        offloaded: bool = False,
    ) -> tuple[Levers, list[str]]:
        """These levers with every None answered, and one note per lever forced on that cannot run here (now off).

        hardware_capability: (major, minor) such as (9, 0), None for CPU, or an object with `compute_capability`.
        precision: "bf16" | "fp16" | "fp32". method: "lora" | "lora8" | "qlora" | None.
        lengths, max_length: the samples' token counts and cut-off; without them packing is assumed to pay.
        tiled: TrainSettings.tile_layers, which wraps each MLP and norm in tiles of its own, so blocks stay eager.
        sharded: the run is launched with FSDP, which swaps the model's parameters for flat shards; the levers that
        patch layers or the optimizer were never run on those, and stay off.
        offloaded: TrainSettings.offload_activations (with gradient checkpointing): block inputs wait in CPU RAM.
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
        fsdp = (
            "FSDP replaces the parameters it patches by flat shards, and it was never run on those" if sharded else None
        )

        def choose(name, auto, cannot=None):
            wanted = getattr(self, name)
            if wanted is None:
                return bool(auto) and not cannot
            if wanted and cannot:
                notes.append(f"{name}: asked for, but {cannot}: off")
                return False
            return wanted

        packing = choose("packing", gpu and (lengths is None or packing_pays(lengths, max_length)))
        no_flex = None if _flex_available() else "this torch has no FlexAttention"
        flex = choose("flex_attention", packing and sixteen_bit, no_triton or no_flex)
        eight_bit = "8-bit bases (bitsandbytes' Linear8bitLt) were never run compiled" if method == "lora8" else None
        tiles = "tile_layers wraps each MLP and norm in tiles of its own" if tiled else None
        compiled = choose("compile_blocks", sixteen_bit and not packing, no_triton or eight_bit or tiles or fsdp)
        no_liger = None if _importable("liger_kernel") else "liger-kernel is not installed"
        liger = choose("liger", True, no_triton or no_liger)
        # An 8-bit base, whose blocks would compile but for the base, keeps the torch RoPE it has been run with.
        rope = liger and choose("liger_rope", not (compiled or (eight_bit and triton and sixteen_bit and not packing)))
        untested = _untested_bitsandbytes()
        not_bf16 = {
            "bf16": None,
            "fp16": "fp16's grad scaler cannot unscale bf16 gradients",
            "fp32": "an fp32 run keeps fp32 adapters (bf16 ones made QLoRA diverge on CPU)",
        }[precision]
        one_sync = choose("one_sync_optimizer", gpu, untested or fsdp)
        lean = choose("lean_update", gpu, untested or fsdp)
        bf16_adapters = choose("bf16_adapters", method == "qlora", not_bf16)
        decided = replace(
            self,
            packing=packing,
            flex_attention=flex,
            liger=liger,
            liger_rope=rope,
            compile_blocks=compiled,
            one_sync_optimizer=one_sync,
            lean_update=lean,
            bf16_adapters=bf16_adapters,
            fused_norms=choose("fused_norms", gpu and sixteen_bit and not liger, fsdp),
            uncast_adapter_inputs=choose(
                "uncast_adapter_inputs", gpu and sixteen_bit and not bf16_adapters and not compiled, fsdp
            ),
            fused_lora_add=choose("fused_lora_add", gpu and sixteen_bit and not compiled, fsdp),
            lean_rope=choose("lean_rope", gpu and not rope and not compiled, fsdp),
            torch_4bit_matmul=choose(
                "torch_4bit_matmul", False, fsdp or (None if compiled else "it acts inside compiled blocks only")
            ),
            kept_attention=choose("kept_attention", gpu and offloaded and not compiled, fsdp),
        )
        return decided, notes


def packing_pays(lengths, max_length: int | None) -> bool:
    """True when the samples, cut to max_length, fill less than 90% of it on average: packing then removes padding
    (full rows leave nothing to pack, and flattened rows are slower than padded ones)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        return False
    cap = max_length or max(lengths)
    return sum(min(n, cap) for n in lengths) / (len(lengths) * cap) < 1.0 - PACKING_MIN_SAVING


def sft_settings(levers: Levers) -> dict[str, Any]:
    """The `trl.SFTConfig` keyword arguments of decided levers (empty when packing and Liger are off).

    Packing: transformers builds the block-diagonal causal mask from position_ids that restart at each sample
    (tests/test_speed.py checks packed loss == padded loss). Liger: TRL keeps its own chunked LM-head loss, so only
    the layer kernels apply.
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
    """Micro-batch size and gradient accumulation under decided `levers`: with packing a row already holds several
    samples, so accumulation drops to 1 (the micro-batch of max_length rows keeps the stock memory bound)."""
    _check_decided(levers)
    return (micro_batch, 1) if levers.packing else (micro_batch, grad_accum)


def prepare_model(model, levers: Levers):
    """Switch `model` to FlexAttention where the lever is on (else a FlexAttention left by an earlier run goes back to
    sdpa); returns it. Call before SFTTrainer is built."""
    _check_decided(levers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    wanted = "flex_attention" if levers.flex_attention else "sdpa" if current == "flex_attention" else current
    if current != wanted and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(wanted)
    return model


def after_trainer_built(trainer, levers: Levers) -> list[str]:
    """Apply the levers that act on a built trainer (adapter dtype, compiled blocks once PEFT has wrapped the
    projections, optimizer levers as a callback since the optimizer exists only at train()); one log line each."""
    _check_decided(levers)
    done = []
    if not levers.bf16_adapters:
        n = upcast_trainable_params(trainer.model)
        if n:
            done.append(f"adapters: {n} tensors cast to fp32")
    if levers.fused_norms:
        n = fuse_norms(trainer.model)
        done.append(f"norms: {n} RMSNorms run torch's fused kernel")
    if levers.uncast_adapter_inputs:
        n = uncast_adapter_inputs(trainer.model)
        done.append(f"adapters: the inputs of {n} LoRA layers stay 16-bit under autocast")
    if levers.fused_lora_add:
        n = fuse_lora_add(trainer.model)
        done.append(
            f"adapters: {n} LoRA layers add their update inside the adapter's matrix product"
            if n
            else "adapters: LoRA dropout copies each input, so the update is added by PEFT (dropout 0 fuses it)"
        )
    if levers.lean_rope:
        n = lean_rope(trainer.model)
        done.append(f"RoPE: {n} attention layers rotate in half-width passes")
    if levers.kept_attention:
        n = keep_attention(trainer.model)
        done.append(f"attention: {n} layers keep their output in CPU RAM for the recompute")
    if levers.torch_4bit_matmul:
        from .quant import torch_4bit_matmul

        n = torch_4bit_matmul(trainer.model)
        if n:
            done.append(f"4-bit base: {n} projections dequantize in torch operations, fused in the compiled blocks")
    if levers.compile_blocks:
        n = compile_layers(trainer.model, autotune_pointwise=levers.autotune_pointwise)
        done.append(f"torch.compile: {n} attention/MLP blocks (first step compiles them)")
    if levers.one_sync_optimizer or levers.lean_update:
        trainer.add_callback(OptimizerLevers(levers.one_sync_optimizer, levers.lean_update))
        actions = ["one synchronisation per step instead of one per tensor"] * levers.one_sync_optimizer
        actions += ["update kernels called without bnb's per-tensor Python"] * levers.lean_update
        done.append("bitsandbytes optimizer: " + ", ".join(actions))
    return done


def _check_decided(levers: Levers) -> None:
    undecided = [f.name for f in fields(levers) if getattr(levers, f.name) is None]
    if undecided:
        raise ValueError(f"levers {undecided} are undecided (None): pass the Levers that Levers.decide() returns")


@contextlib.contextmanager
def eager_inference(model):
    """Inside the block generation and evaluation run with sdpa and eager blocks (FlexAttention without a packed batch
    runs unfused; compiled blocks recompile per generation length); both are put back on exit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
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

    Optimizer8bit.step calls torch.cuda.synchronize() after each parameter; its updates and paged prefetches are
    issued in order on one stream, so the result does not depend on those waits (benchmarks/check_optimizer_syncs.py
    compares bit for bit). Returns False, changing nothing, for another optimizer. Accepts accelerate's wrapper.
    """
    inner, bnb_optimizer = _untouched_bnb_optimizer(optimizer, "Optimizer8bit", "_lora_kit_one_sync")
    if inner is None:
        return False
    original_step = inner.step  # may already be an LR scheduler's wrapper: keep it in the chain
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
    """Make `step(inner, ...)` the bnb optimizer's bound step, marked as an LR scheduler's if the one it replaces was
    (schedulers wrap `step.__func__`), and tell accelerate's fp16 GradScaler wrapper, which re-installs the step it saw.
    """
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
    """(the bnb `class_name` optimizer inside `optimizer`, bnb's optimizer module), or (None, None) when it is not
    one, bitsandbytes is missing or untested, or `done_flag` says this lever was applied already."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except Exception:  # noqa: BLE001 - no bitsandbytes: nothing to do
        return None, None
    if not isinstance(inner, getattr(bnb_optimizer, class_name)) or getattr(inner, done_flag, False):
        return None, None
    untested = _untested_bitsandbytes()
    if untested:
        logger.warning(f"{done_flag} left off: {untested}")
        return None, None
    return inner, bnb_optimizer


def _untested_bitsandbytes() -> str | None:
    """Why the optimizer levers cannot run with the installed bitsandbytes, or None when it is the version they
    were written for (they call its private step internals)."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "bitsandbytes is not installed"
    if version.startswith(_BNB_TESTED):
        return None
    return f"it calls bitsandbytes {_BNB_TESTED}x internals, and {version} is installed"


def lean_update_step(optimizer) -> bool:
    """Run a bitsandbytes 32-bit two-state optimizer's per-tensor update without the Python around its kernel.

    Optimizer2State.update_step copies, builds a config dict and checks devices per tensor before calling
    torch.ops.bitsandbytes.optimizer_update_32bit; with hundreds of adapter tensors that Python, not the kernels, is
    most of the optimizer's time. This calls the same op with the same arguments, bit for bit bnb's
    (tests/test_speed.py, benchmarks/check_optimizer_syncs.py). 8-bit states, one-state optimizers, max_unorm,
    per-parameter overrides and non-contiguous tensors go through bnb's update_step; optimizers with their own
    (AdEMAMix) are left alone. Paged states are prefetched only once the GPU nears full (see step below).
    Returns False, changing nothing, for another optimizer. Accepts accelerate's wrapper.
    """
    import torch

    inner, bnb_optimizer = _untouched_bnb_optimizer(optimizer, "Optimizer2State", "_lora_kit_lean_update")
    if inner is None or type(inner).update_step is not bnb_optimizer.Optimizer2State.update_step:
        return False
    update = torch.ops.bitsandbytes.optimizer_update_32bit
    bnb_update_step = inner.update_step  # the fallback
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
        beta1, beta2, beta3 = (*group["betas"], 0.0)[:3]
        # fmt: off
        update(name, grad, p, state["state1"], state["state2"], None, 0.0, 0.0, beta1, beta2, beta3,
               group.get("alpha", 0.0), group["eps"], group["weight_decay"], state["step"], group["lr"], 1.0,
               args.skip_zeros)
        # fmt: on

    bnb_prefetch_state, bnb_step = inner.prefetch_state, inner.step
    decided = {"prefetch": True, "paged_tensors": -1, "paged_bytes": 0}

    def step(_inner, *a, **k):
        # Paged states stay on the GPU until the driver evicts them, when it runs short: prefetching resident pages is
        # a driver call per state for nothing. Prefetch as bnb does only once this process's peak reservation plus the
        # paged states come within 10% of the card (decided once per step).
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
    """A transformers TrainerCallback applying skip_optimizer_syncs and lean_update_step once the optimizer exists."""

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
    """Cast every trainable parameter (the adapters) to fp32 in place; returns how many were cast.

    Call after `trl.SFTTrainer(...)` is built, for fp16 and fp32 runs: TRL (1.15, 1.16) casts a quantized model's
    adapters to bf16, which fp16's grad scaler cannot unscale.
    """
    import torch

    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            n += 1
    return n


# The RMSNorms that compute weight * (x / rms(x) in fp32, cast back to x's dtype), which F.rms_norm computes in one.
_LLAMA_FORMULA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_norms(model) -> int:
    """Run each Llama-formula RMSNorm of ``model`` through ``F.rms_norm``; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in _LLAMA_FORMULA_NORMS]
    for norm in norms:
        if not getattr(norm, "_lora_kit_fused", False):
            norm.forward = types.MethodType(_fused_rms_norm, norm)
            norm._lora_kit_fused = True
    return len(norms)


def _fused_rms_norm(norm, x):
    import torch
    import torch.nn.functional as F

    # The model's output dtype (weight times x cast back); the fused kernel wants both in it, and no autocast.
    dtype = torch.promote_types(x.dtype, norm.weight.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x.to(dtype), norm.weight.shape, norm.weight.to(dtype), norm.variance_epsilon)


def uncast_adapter_inputs(model) -> int:
    """Let each LoRA layer skip PEFT's cast of its input to the adapters' dtype while autocast is on (which casts it
    back for the matrix product); returns how many layers. PEFT's own switch, ``cast_input_dtype_enabled``, is set
    before every call, so a forward without autocast still casts."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if not getattr(layer, "_lora_kit_uncast", False):
            layer.register_forward_pre_hook(_cast_only_without_autocast, with_kwargs=True)
            layer._lora_kit_uncast = True
    return len(layers)


def _cast_only_without_autocast(layer, args, kwargs) -> None:
    import torch

    x = args[0] if args else kwargs.get("x")
    layer.cast_input_dtype_enabled = not (isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type))


def fuse_lora_add(model) -> int:
    """Give each LoRA layer of ``model`` without dropout the one-product forward of the ``fused_lora_add`` lever;
    returns how many. A call it does not cover (no autocast, several adapters, DoRA, merged weights) runs PEFT's own.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [
        m
        for m in model.modules()
        if isinstance(m, LoraLayer) and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())
    ]
    for layer in layers:
        if not getattr(layer, "_lora_kit_fused_add", False):
            layer.forward = types.MethodType(_fused_lora_forward, layer)
            layer._lora_kit_fused_add = True
    return len(layers)


def _fused_lora_forward(layer, x, *args, **kwargs):
    import torch

    adapter = _plain_adapter(layer, x, args, kwargs)
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    hidden = layer.lora_A[adapter](x)
    if result.dtype != torch.get_autocast_dtype(x.device.type):  # a base output autocast would cast: PEFT's sum
        return result + layer.lora_B[adapter](hidden) * layer.scaling[adapter]
    # Out of place, so PEFT's copy of a 4-bit output (against in-place changes of a view) has nothing to guard.
    update = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        hidden.reshape(-1, hidden.shape[-1]),
        layer.lora_B[adapter].weight.t(),
        alpha=layer.scaling[adapter],
    )
    return update.view(result.shape)


def _plain_adapter(layer, x, args, kwargs) -> str | None:
    """The one active adapter a call adds as ``x A^T B^T * scaling`` under autocast, or None."""
    import torch

    if args or kwargs or not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity) or layer.lora_B[adapter].bias is not None:
        return None
    if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
        return None
    return adapter


def lean_rope(model) -> int:
    """Give each attention layer of ``model`` whose modeling file has transformers' standard RoPE (checked on a small
    input against its own ``apply_rotary_pos_emb``) the half-width ``_RoPE``; returns how many layers. The modeling
    file's function is swapped only during the layer's own call: other models in the process keep theirs."""
    layers = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and _standard_rope(sys.modules[type(m).__module__])
    ]
    for layer in layers:
        if not getattr(layer, "_lora_kit_rope", False):
            layer.forward = types.MethodType(_forward_with_lean_rope, layer)
            layer._lora_kit_rope = True
    return len(layers)


def _forward_with_lean_rope(layer, *args, **kwargs):
    module = sys.modules[type(layer).__module__]
    own = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = functools.partial(_apply_lean_rope, theirs=own)
    try:
        return type(layer).forward(layer, *args, **kwargs)
    finally:
        module.apply_rotary_pos_emb = own


@functools.cache
def _standard_rope(module) -> bool:
    """Whether ``module.apply_rotary_pos_emb`` is q * cos + rotate_half(q) * sin over the whole head, as ``_RoPE``."""
    import torch

    own = getattr(module, "apply_rotary_pos_emb", None)
    if own is None or not hasattr(module, "rotate_half"):
        return False
    q, k = torch.randn(2, 1, 2, 3, 8, dtype=torch.float64)  # (batch, heads, tokens, head_dim)
    freqs = torch.randn(1, 3, 4, dtype=torch.float64)
    angles = torch.cat([freqs, freqs], dim=-1)
    try:
        theirs = own(q, k, angles.cos(), angles.sin())
    except Exception:  # another signature: not the standard function
        return False
    ours = _apply_lean_rope(q, k, angles.cos(), angles.sin())
    return all(torch.allclose(a, b) for a, b in zip(theirs, ours))


def _apply_lean_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, theirs=None):
    """transformers' ``apply_rotary_pos_emb`` with the same arguments, through ``_RoPE``; a rotation of part of each
    head (Phi's partial rotary) goes to ``theirs``."""
    if theirs is not None and cos.shape[-1] != q.shape[-1]:
        return theirs(q, k, cos, sin, position_ids, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rope = _rope_function()
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin)


@functools.cache
def _rope_function():
    """The autograd Function of the ``lean_rope`` lever (built on first use: this module does not import torch)."""
    import torch

    class _RoPE(torch.autograd.Function):
        """x * cos + rotate_half(x) * sin, each output half one product and one fused multiply-add of half-width
        inputs; its gradient likewise (rotate_half's transpose is its negative)."""

        @staticmethod
        def forward(ctx, x, cos, sin):
            ctx.save_for_backward(cos, sin)
            ctx.x_dtype = x.dtype
            h = x.shape[-1] // 2
            out = torch.empty_like(x, dtype=torch.result_type(x, cos))  # x's strides: q is a transposed view
            torch.mul(x[..., :h], cos[..., :h], out=out[..., :h]).addcmul_(x[..., h:], sin[..., :h], value=-1)
            torch.mul(x[..., h:], cos[..., h:], out=out[..., h:]).addcmul_(x[..., :h], sin[..., h:])
            return out

        @staticmethod
        def backward(ctx, grad):
            cos, sin = ctx.saved_tensors
            h = grad.shape[-1] // 2
            out = torch.empty_like(grad, dtype=ctx.x_dtype)
            torch.mul(grad[..., :h], cos[..., :h], out=out[..., :h]).addcmul_(grad[..., h:], sin[..., h:])
            torch.mul(grad[..., h:], cos[..., h:], out=out[..., h:]).addcmul_(grad[..., :h], sin[..., :h], value=-1)
            return out, None, None

    return _RoPE


def keep_attention(model) -> int:
    """Make each attention layer of ``model`` keep its attention kernel's outputs (in CPU RAM, on a GPU) from a
    training forward pass to the same layer's recompute under gradient checkpointing, which takes them instead of
    running the kernel again; returns how many layers. The autograd node of the kernel is built as usual, from the
    recomputed query, key and value and the kept outputs, so gradients are those of a recompute. Only sdpa's fused
    kernels are kept (other attention recomputes as before); a layer run forward twice before one backward pass (which
    the Trainer's loop never does) cannot tell its outputs apart and recomputes both."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    for layer in layers:
        if not hasattr(layer, "_lora_kit_kept"):
            own = layer.forward  # the class's, or another lever's
            layer.forward = functools.partial(_forward_keeping_attention, layer, own)
        layer._lora_kit_kept = _Kept()  # a new run forgets what an interrupted one kept
    return len(layers)


def kept_attention_too_large(model, tokens: int, available_gib: float | None = None, element_bytes: int = 2):
    """Why ``keep_attention`` should stay off for ``tokens`` tokens per micro-batch, or None where it fits: every
    layer's attention output (``element_bytes`` per value) and fp32 log-sum-exp wait in CPU RAM between the forward
    pass and the recompute, beside the block inputs that activation offloading keeps there (about as much again), so
    they may take at most half of the RAM available (default: what this machine has free now)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    need = config.num_hidden_layers * tokens * heads * (element_bytes * head_dim + 4) / 2**30
    if available_gib is None:
        import psutil

        available_gib = psutil.virtual_memory().available / 2**30
    if need <= available_gib / 2:
        return None
    return (
        f"the attention outputs of {tokens} tokens would take {need:.1f} GiB of CPU RAM, more than half of the "
        f"{available_gib:.1f} GiB available, where the block inputs wait too"
    )


class _Kept:
    """One attention layer's forward passes not yet recomputed, and the kernel outputs of the only one (None where
    there are several: they cannot be told apart)."""

    def __init__(self) -> None:
        self.pending = 0
        self.outputs = None


def _forward_keeping_attention(layer, own, *args, **kwargs):
    import torch

    if not (layer.training and torch.is_grad_enabled()):
        return own(*args, **kwargs)
    recompute = torch._C._current_graph_task_id() != -1  # inside a backward pass: gradient checkpointing's recompute
    with _kept_attention_mode()(layer._lora_kit_kept, recompute):
        return own(*args, **kwargs)


@functools.cache
def _kept_attention_mode():
    """The TorchDispatchMode of ``keep_attention`` (built on first use: this module does not import torch). It sits
    below autograd, as selective activation checkpointing's caching modes do."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    aten = torch.ops.aten
    kernels = {
        getattr(aten, name).default
        for name in (
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        )
        if hasattr(aten, name)
    }
    streams = {}

    class OnHost:
        def __init__(self, host, copied):
            self.host, self.copied = host, copied

    def to_host(value):
        if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
            return value
        stream = streams.setdefault(value.device, torch.cuda.Stream(value.device))
        stream.wait_stream(torch.cuda.current_stream(value.device))
        with torch.cuda.stream(stream):
            host = torch.empty_like(value, device="cpu", pin_memory=True)  # same strides as the kernel's output
            host.copy_(value, non_blocking=True)
        value.record_stream(stream)  # not reused by the allocator before the copy ends
        return OnHost(host, stream.record_event())

    def to_device(value, device):
        if not isinstance(value, OnHost):
            return value
        torch.cuda.current_stream(device).wait_event(value.copied)
        return value.host.to(device, non_blocking=True)

    class KeptAttention(TorchDispatchMode):
        def __init__(self, kept: _Kept, recompute: bool):
            super().__init__()
            self.kept, self.recompute = kept, recompute

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kept = self.kept
            if func not in kernels:
                return func(*args, **kwargs)
            if not self.recompute:
                out = func(*args, **kwargs)
                kept.pending += 1
                kept.outputs = tree_map(to_host, out) if kept.pending == 1 else None
                return out
            outputs, kept.outputs = kept.outputs, None
            kept.pending = max(kept.pending - 1, 0)
            if outputs is None:
                return func(*args, **kwargs)
            return tree_map(lambda value: to_device(value, args[0].device), outputs)

    return KeptAttention


def compile_layers(model, autotune_pointwise: bool = False) -> int:
    """torch.compile each decoder layer's attention and MLP block in place; returns how many were compiled.

    Blocks, not the whole model: gradient checkpointing (around each layer) stays outside the compiled code and keeps
    its memory savings, and identical layers share one graph per block type. Call after the trainer is built.
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
    """Each layer's block is its own module object that dynamo may specialise on: allow a recompile per layer rather
    than falling back to eager after the default 8."""
    import torch

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


def _capability(hardware_capability) -> tuple[int, int] | None:
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
