"""What 4-bit NormalFloat (NF4) does, measured; and the one home of bitsandbytes' quantized weights.

A 4-bit number takes only 16 values; the question is which. NF4 (QLoRA) puts them at quantiles of a normal
distribution with an exact zero, FP4 spaces them like a tiny float, int4 evenly. All three are blockwise absmax
quantizers: each block of ``blocksize`` values is divided by its largest absolute value (kept in higher precision)
and every value is replaced by the nearest level. NF4 and FP4 use bitsandbytes' own kernels (they run on CPU);
int4 is written here because nothing ships it.
"""

from __future__ import annotations

import copy
import logging
import types

import torch

from lora_kit.errors import LoraKitError

__all__ = [
    "nf4_levels",
    "fp4_levels",
    "int4_levels",
    "normal_quantile_levels",
    "quantize_to_levels",
    "quantization_error",
    "bits_per_parameter",
    "plot_nf4_levels",
]


def _bitsandbytes_functional():
    """Import ``bitsandbytes.functional`` quietly, or say how to get it."""
    import warnings

    # bitsandbytes logs a harmless note about the optional ``kernels`` package on import.
    logger = logging.getLogger("bitsandbytes")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as F
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LoraKitError(
            "quantization_error needs bitsandbytes (received: import failed with "
            f"{exc!r}); install it with `pip install bitsandbytes` (0.50 runs NF4 on CPU)."
        ) from exc
    finally:
        logger.setLevel(previous)
    return F


# --- The 16 levels --------------------------------------------------------------------------


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values bitsandbytes quantizes with, sorted, from -1 to 1 with an exact 0 (float32, on CPU).

    7 negative and 8 positive levels: with an even number of codes, an exact zero costs one level of symmetry.
    """
    F = _bitsandbytes_functional()
    return torch.sort(F.get_4bit_type("nf4", device="cpu").float().cpu()).values


def fp4_levels() -> torch.Tensor:
    """The 16 FP4 values bitsandbytes uses (1 sign, 2 exponent, 1 mantissa bit), sorted.

    Normalised to [-1, 1]. FP4 has both +0 and -0, so only 15 distinct values are usable; two
    more (±0.0052, subnormals) sit next to zero, and the rest are spaced like a float.
    """
    F = _bitsandbytes_functional()
    return torch.sort(F.get_4bit_type("fp4", device="cpu").float().cpu()).values


def int4_levels() -> torch.Tensor:
    """16 evenly spaced levels from -1 to 1: the plain uniform ("integer") 4-bit grid.

    Symmetric and using all 16 codes, so the step is 2/15. It has no exact zero. (The common
    integer recipe ``round(7 * x / absmax)`` uses only the 15 codes -7..7; this grid is a
    slightly stronger baseline than that, which keeps the comparison with NF4 fair.)
    """
    return torch.linspace(-1.0, 1.0, 16)


def normal_quantile_levels(n: int = 16) -> torch.Tensor:
    """Build NF4-style levels from scratch, as the QLoRA paper (and bitsandbytes' ``create_normal_map``) does.

    ``n/2`` positive and ``n/2 - 1`` negative normal quantiles of evenly spaced probabilities between 0.5 and
    ``offset``, an exact 0, all divided by the largest. The quantile of probability 1 is infinite, so ``offset`` is
    the mean of ``1 - 1/(2(n-1))`` and ``1 - 1/(2n)`` (0.9677 for n = 16). For n = 16 this is :func:`nf4_levels`.
    """
    if n < 4 or n % 2:
        raise LoraKitError(
            f"normal_quantile_levels needs an even number of levels >= 4 (received n={n}); use n=16 for 4 bits."
        )
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    half = n // 2
    positive = normal.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    levels = levels / levels.abs().max()
    return torch.sort(levels).values.float()


# --- Quantizing and measuring the error -----------------------------------------------------


def quantize_to_levels(weight: torch.Tensor, levels: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Blockwise absmax quantization to the nearest of ``levels``; returns the dequantized tensor.

    Every step written out: flatten, cut into blocks (the last zero-padded), divide by each block's absmax, snap
    to the nearest level, multiply back. With ``levels=nf4_levels()`` this is bitsandbytes' NF4 round trip.
    """
    if blocksize < 1:
        raise LoraKitError(f"blocksize must be a positive integer (received {blocksize}); 64 is QLoRA's.")
    w = weight.detach().float().reshape(-1)
    n = w.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(w, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # one constant per block
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # now in [-1, 1]
    levels = levels.float().to(w.device).sort().values
    # The nearest level: the one whose interval between midpoints holds the value (a tie goes to the lower
    # level). One search per value, where comparing with all 16 levels at once took 16 copies of a 7B layer.
    nearest = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2)  # the 4-bit codes
    dequantized = levels[nearest] * absmax  # an all-zero block stays zero
    return dequantized.reshape(-1)[:n].reshape(weight.shape)


def _bnb_round_trip(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> torch.Tensor:
    """Quantize and dequantize with bitsandbytes, through a flat view of the weight (see dequantize_4bit_weight)."""
    F = _bitsandbytes_functional()
    packed, state = F.quantize_4bit(
        w.reshape(-1), blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    return F.dequantize_4bit(packed, state).reshape(w.shape).float()


def dequantize_4bit_weight(weight) -> torch.Tensor:
    """The dense weight of a bitsandbytes ``Params4bit`` (NF4 or FP4, with or without double quant).

    Through a flat view: bitsandbytes cuts blocks from the flattened tensor anyway, and 0.50.2's CPU
    ``dequantize_4bit`` applies the wrong block constants to a 2-D output whose last dimension is not a
    multiple of the blocksize.
    """
    F = _bitsandbytes_functional()
    shape = weight.quant_state.shape
    flat_state = copy.copy(weight.quant_state)
    flat_state.shape = torch.Size([shape.numel()])
    return F.dequantize_4bit(weight.data.reshape(-1), flat_state).reshape(shape)


def dequantize_int8_weight(module) -> torch.Tensor:
    """The fp32 weight of a bitsandbytes ``Linear8bitLt``: each row's int8 codes times its absmax / 127."""
    codes = module.weight.data
    if codes.dtype != torch.int8:  # not quantized yet (still on its way to the device)
        return codes
    scale = getattr(module.weight, "SCB", None)
    return _bitsandbytes_functional().int8_vectorwise_dequant(codes, module.state.SCB if scale is None else scale)


def quantization_error(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> dict:
    """Quantize ``weight`` with NF4, FP4 and int4 and measure how far each lands from it.

    Returns ``{"nf4": {...}, "fp4": {...}, "int4": {...}}``, each with ``mean_abs_error`` (mean ``|W - Q(W)|``)
    and ``relative_rms_error`` (``||W - Q(W)||_F / ||W||_F``: 0.1 means the error is a tenth of the weights).
    All three use the same blocksize; ``double_quant=True`` quantizes bitsandbytes' block constants to 8 bits as
    QLoRA does.
    """
    if not isinstance(weight, torch.Tensor):
        raise LoraKitError(
            f"quantization_error needs a torch.Tensor (received {type(weight).__name__}); "
            "pass e.g. model.model.layers[0].mlp.down_proj.weight."
        )
    if not weight.is_floating_point():
        raise LoraKitError(
            f"quantization_error needs a 16- or 32-bit float weight (received dtype {weight.dtype}, "
            "which looks already quantized); load the model without quantization and pass its weight."
        )
    w = weight.detach().float().cpu().contiguous()
    norm = w.norm()
    if norm == 0:
        raise LoraKitError("quantization_error received an all-zero weight; there is nothing to measure.")

    reconstructions = {
        "nf4": _bnb_round_trip(w, "nf4", blocksize, double_quant),
        "fp4": _bnb_round_trip(w, "fp4", blocksize, double_quant),
        "int4": quantize_to_levels(w, int4_levels(), blocksize),
    }
    return {
        name: {
            "mean_abs_error": (w - q).abs().mean().item(),
            "relative_rms_error": ((w - q).norm() / norm).item(),
        }
        for name, q in reconstructions.items()
    }


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> float:
    """Storage cost of a 4-bit blockwise-quantized weight, in bits per parameter.

    The 4-bit code plus each block's absmax: a 32-bit float (``4 + 32/64 = 4.5``), or with double quantization
    8 bits plus one 32-bit constant per ``dq_blocksize`` constants (``4 + 8/64 + 32/(64*256) = 4.127``).
    """
    if blocksize < 1 or dq_blocksize < 1:
        raise LoraKitError(
            f"blocksizes must be positive (received blocksize={blocksize}, dq_blocksize={dq_blocksize})."
        )
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 4 + 32 / blocksize


# --- A picture ------------------------------------------------------------------------------


def plot_nf4_levels(title: str = "Where the 16 four-bit levels sit"):
    """Plot NF4's levels against the normal-quantile construction, FP4 and the uniform int4 grid.

    One point per 4-bit code; NF4 lies on the normal-quantile curve, dense near 0 where most weights are.
    Returns a matplotlib Figure (nothing is shown; notebooks display it).
    """
    from matplotlib.figure import Figure

    codes = list(range(16))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    construction = normal_quantile_levels(16).tolist()
    ax.plot(codes, construction, "-", color="0.6", lw=2, label="normal quantiles, rescaled (construction)")
    ax.plot(codes, nf4_levels().tolist(), "o", color="C0", label="NF4 (bitsandbytes)")
    ax.plot(codes, fp4_levels().tolist(), "s", color="C1", mfc="none", label="FP4 (bitsandbytes)")
    ax.plot(codes, int4_levels().tolist(), "x", color="C2", label="int4 uniform grid")
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("4-bit code (sorted)")
    ax.set_ylabel("value / block absmax")
    ax.set_xticks(codes)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


# --- 8-bit bases in training ------------------------------------------------------------------

# The bitsandbytes releases whose internals lean_int8_backward and torch_4bit_matmul were checked against (the int8
# layer's state, the 4-bit layout and arithmetic); on others both step aside.
_BNB_CHECKED = ("0.50",)


def _checked_bitsandbytes(what: str) -> bool:
    import importlib.metadata

    version = importlib.metadata.version("bitsandbytes")
    if version.startswith(_BNB_CHECKED):
        return True
    logging.getLogger(__name__).warning(
        "bitsandbytes %s: %s was checked on %s only; leaving its own matmul in place.",
        version,
        what,
        ", ".join(_BNB_CHECKED),
    )
    return False


class _QuietInt8Cast(logging.Filter):
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" line, logged on every 8-bit matmul
    of a bf16 or fp32 model (thousands per answer) for bitsandbytes' normal path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QuietInt8Cast())


class _FrozenInt8Matmul(torch.autograd.Function):
    """``y = x W^T`` through a frozen LLM.int8 layer, keeping nothing of ``x`` for the backward pass.

    bitsandbytes' own int8 matmul keeps its input as plain attributes of the autograd context, which gradient
    checkpointing cannot drop; for a frozen weight the backward needs only the weight, dequantized.
    """

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.x_dtype = module, x.dtype
        return _int8_forward(module, x)

    @staticmethod
    def backward(ctx, grad_out):
        state = ctx.module.state  # bitsandbytes' own backward for the input, step for step
        weight = state.CB.to(ctx.x_dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad_out.to(ctx.x_dtype), weight), None


def _int8_forward(module, x):
    import bitsandbytes as bnb

    # bitsandbytes quantizes activations from fp16 on the GPU and logs a warning per call for any
    # other dtype; cast here (the same numbers) and hand back the caller's dtype.
    if x.is_cuda and x.dtype != torch.float16:
        return bnb.nn.Linear8bitLt.forward(module, x.to(torch.float16)).to(x.dtype)
    return bnb.nn.Linear8bitLt.forward(module, x)


def lean_int8_backward(model) -> int:
    """Route every frozen bitsandbytes ``Linear8bitLt`` of ``model`` through ``_FrozenInt8Matmul``; return how many.

    The inputs bitsandbytes keeps would run a 7B on a 15 GB T4 out of memory; the gradients stay its own.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt) and not m.weight.requires_grad]
    if layers and not _checked_bitsandbytes("the lean 8-bit backward"):
        return 0
    for module in layers:
        module.forward = _lean_forward(module)
    return len(layers)


def _lean_forward(module):
    def forward(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenInt8Matmul.apply(x, module)
        return _int8_forward(module, x)

    return forward


# --- 4-bit bases in compiled training ----------------------------------------------------------


def _dequantize_4bit(
    packed, code, absmax, absmax_code, absmax_scale, offset, blocksize, absmax_blocksize, shape, dtype
):
    """bitsandbytes' 4-bit dequantization in torch operations, the kernel's arithmetic step for step: each level times
    its block's absmax in fp32 (a double-quantized absmax decoded first, as its own 8-bit code times the scale of
    its block of ``absmax_blocksize``, plus the offset), then one rounding to ``dtype``."""
    if absmax_code is not None:
        block = torch.arange(absmax.numel(), device=absmax.device) // absmax_blocksize
        absmax = absmax_code[absmax.long()] * absmax_scale[block] + offset
    byte = packed.view(torch.uint8).reshape(-1)
    levels = torch.stack((byte >> 4, byte & 15), dim=-1).reshape(-1)  # the high half-byte holds the earlier value
    values = code[levels.long()].view(-1, blocksize) * absmax.float().view(-1, 1)
    return values.reshape(shape).to(dtype)


def _4bit_parts(weight):
    """A ``Params4bit``'s packed values and quantization tensors, then its block sizes, as ``_dequantize_4bit`` takes
    them (no second-level tensors, and a second block size of 0, without double quantization)."""
    state = weight.quant_state
    inner = state.state2 if state.nested else None
    second = (inner.code, inner.absmax, state.offset) if inner else (None,) * 3
    return (weight, state.code, state.absmax, *second), (state.blocksize, inner.blocksize if inner else 0)


class _FrozenTorch4bitMatmul(torch.autograd.Function):
    """``y = x W^T`` through a frozen 4-bit weight dequantized by ``_dequantize_4bit`` in the forward and again in the
    backward: only the packed weight is kept between them, as bitsandbytes' own matmul keeps it."""

    @staticmethod
    def forward(ctx, x, packed, code, absmax, absmax_code, absmax_scale, offset, sizes, shape):
        ctx.save_for_backward(packed, code, absmax, absmax_code, absmax_scale, offset)
        ctx.sizes, ctx.shape = sizes, shape
        weight = _dequantize_4bit(packed, code, absmax, absmax_code, absmax_scale, offset, *sizes, shape, x.dtype)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        weight = _dequantize_4bit(*ctx.saved_tensors, *ctx.sizes, ctx.shape, grad_out.dtype)
        return (grad_out @ weight,) + (None,) * 8


def torch_4bit_matmul(model) -> int:
    """Route every frozen bitsandbytes ``Linear4bit`` of ``model`` through ``_FrozenTorch4bitMatmul``; return how many.

    Inside compiled code only: torch.compile fuses these torch operations into one kernel per weight, where
    bitsandbytes' opaque op launches three and runs its Python for each projection, twice a step under gradient
    checkpointing. Eager calls keep bitsandbytes' own path (its kernels are faster there, its gemv for one token
    especially), as do weights whose size is not a whole number of blocks.
    """
    import bitsandbytes as bnb

    layers = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and not m.weight.requires_grad
        and m.weight.quant_state is not None
        and m.weight.quant_state.shape.numel() % m.weight.quant_state.blocksize == 0
    ]
    if layers and not _checked_bitsandbytes("the torch 4-bit matmul"):
        return 0
    for module in layers:
        module.forward = types.MethodType(_torch_4bit_forward, module)  # a copy of the model rebinds it to the copy
    return len(layers)


def _torch_4bit_forward(self, x, *args, **kwargs):
    """A frozen ``Linear4bit``'s forward: bitsandbytes' own when eager, ``_FrozenTorch4bitMatmul`` when compiled."""
    if not torch.compiler.is_compiling():  # eager (generation, evaluation): bitsandbytes' kernels are faster
        return type(self).forward(self, x, *args, **kwargs)
    tensors, sizes = _4bit_parts(self.weight)
    dtype = self.compute_dtype or x.dtype  # bitsandbytes computes in compute_dtype and hands back x's dtype
    out = _FrozenTorch4bitMatmul.apply(x.to(dtype), *tensors, sizes, self.weight.quant_state.shape)
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.to(x.dtype)


def round_trip(weight: torch.Tensor, quantization: str, dtype: torch.dtype) -> torch.Tensor:
    """What a bitsandbytes layer holds for ``weight`` once loaded in ``dtype`` and quantized, in fp32.

    "nf4": NF4 with double quantization in blocks of 64 (what ``load_model(..., "nf4")`` stores);
    "8bit": LLM.int8's int8 codes with one absmax scale per output row.
    """
    F = _bitsandbytes_functional()
    if quantization == "nf4":
        return _bnb_round_trip(weight.to(dtype), "nf4", 64, double_quant=True).float()
    if quantization == "8bit":
        codes, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
        return F.int8_vectorwise_dequant(codes, scales).float()
    raise LoraKitError(f"round_trip: quantization={quantization!r} is not 'nf4' or '8bit'.")


def quantization_of(model) -> str:
    """How the frozen base of ``model`` (a plain or PEFT model) is stored: "nf4", "8bit" or "none"."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    recorded = getattr(base, "lora_kit_quantization", None)  # set by load_model and dequantize_model
    if recorded:
        return recorded
    if getattr(base, "is_loaded_in_4bit", False):
        return "nf4"
    return "8bit" if getattr(base, "is_loaded_in_8bit", False) else "none"


METHODS = {"nf4": "qlora", "8bit": "lora8", "none": "lora"}  # the fine-tuning method each base storage calls for


def method_of(model) -> str:
    """The fine-tuning method a model's base calls for: "qlora" (NF4), "lora8" (8-bit) or "lora" (16-bit)."""
    return METHODS[quantization_of(model)]
