"""What 4-bit NormalFloat (NF4) does, measured.

QLoRA stores the frozen base model in 4 bits. A 4-bit number can take only 16 values, so the
whole question is *which* 16 values. This module lets a notebook look at three answers and
measure them on a real weight matrix:

* **NF4** (NormalFloat4, from the QLoRA paper): 16 levels placed at quantiles of a standard
  normal distribution, rescaled to [-1, 1], with an exact zero. Trained weights are roughly
  normal, so each level gets about the same share of weights.
* **FP4**: a tiny floating-point format (sign, exponent, mantissa); it spends three codes on
  zero or nearly zero (+0, -0 and a tiny subnormal pair) and spaces the rest like a float.
* **int4**: 16 evenly spaced levels, the plain "integer" choice.

All three are *blockwise absmax* quantizers: the weight is cut into blocks of ``blocksize``
values, each block is divided by its largest absolute value (the block's "quantization
constant", kept in higher precision) so that it lies in [-1, 1], and every value is replaced by
the nearest level. Dequantizing multiplies back by the constant.

NF4 and FP4 use bitsandbytes' own kernels (``quantize_4bit`` / ``dequantize_4bit``, which run on
CPU in bitsandbytes 0.50); int4 is implemented here in a few lines because nothing ships it.
bitsandbytes is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import logging

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

# The NF4 table as published in the QLoRA paper (Dettmers et al., 2023, appendix E). Used only if
# bitsandbytes is missing; the library's own table is preferred and agrees with this one.
_NF4_PAPER_TABLE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _bitsandbytes_functional():
    """Import ``bitsandbytes.functional`` quietly, or say how to get it."""
    import logging
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
    """The 16 NF4 values, sorted, from -1 to 1 with an exact 0 (float32, on CPU).

    Taken from bitsandbytes (``get_4bit_type("nf4")``), the table that actually quantizes
    QLoRA models; if bitsandbytes is not installed, the table published in the QLoRA paper.
    There are 7 negative and 8 positive levels: with an even number of codes, an exact zero
    (so that zero weights and padding stay exactly zero) costs one level of symmetry.
    """
    try:
        F = _bitsandbytes_functional()
        levels = F.get_4bit_type("nf4", device="cpu").float()
    except LoraKitError:  # pragma: no cover - depends on the environment
        levels = torch.tensor(_NF4_PAPER_TABLE)
    return torch.sort(levels.cpu()).values


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
    """Build NF4-style levels from scratch: quantiles of N(0, 1) scaled to [-1, 1], exact 0.

    This is the construction of the QLoRA paper (and of bitsandbytes' ``create_normal_map``):

    1. Take ``n/2`` positive levels at the normal quantiles of ``n/2 + 1`` evenly spaced
       probabilities from 0.5 to ``offset`` (dropping the 0.5 itself, whose quantile is 0),
       and ``n/2 - 1`` negative levels the same way from the other side.
    2. Add an exact 0, giving ``n`` levels.
    3. Divide by the largest, so the levels run from -1 to 1.

    The quantile of probability 1 is infinite, so the outermost probability ``offset`` is set
    to the mean of ``1 - 1/(2(n-1))`` and ``1 - 1/(2n)`` (0.9677 for n = 16, the paper's value).
    For ``n = 16`` the result matches :func:`nf4_levels` to about 1e-6.
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

    Written out so a reader can see every step (and so int4 can be measured the same way):
    flatten, cut into blocks of ``blocksize`` (the last block is zero-padded), divide each block
    by its absmax, snap each value to the nearest level, multiply back, reshape.
    With ``levels=nf4_levels()`` this reproduces bitsandbytes' NF4 round trip.
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
    """Quantize and dequantize with bitsandbytes, through a flat view of the weight.

    bitsandbytes cuts blocks from the flattened tensor anyway, so flattening changes nothing,
    except that it avoids a bitsandbytes 0.50.2 CPU bug: for a 2-D tensor whose last dimension
    is not a multiple of ``blocksize`` (e.g. 64 x 96), ``dequantize_4bit`` applies the wrong
    block constants (the packed codes themselves are right).
    """
    F = _bitsandbytes_functional()
    packed, state = F.quantize_4bit(
        w.reshape(-1), blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    return F.dequantize_4bit(packed, state).reshape(w.shape).float()


def quantization_error(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> dict:
    """Quantize ``weight`` with NF4, FP4 and int4 and measure how far each lands from it.

    Returns ``{"nf4": {...}, "fp4": {...}, "int4": {...}}``, each with

    * ``mean_abs_error``: mean of ``|W - Q(W)|``;
    * ``relative_rms_error``: ``||W - Q(W)||_F / ||W||_F`` (the same as RMS error over RMS weight),
      so 0.1 means the error is a tenth the size of the weights.

    NF4 and FP4 go through bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit``; int4 is
    :func:`quantize_to_levels` with :func:`int4_levels`. All use the same blocksize and fp32
    block constants (``double_quant=True`` quantizes bitsandbytes' constants to 8 bits as QLoRA
    does; it changes the errors very little). The weight is copied to CPU float32 first.
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

    Every parameter costs its 4-bit code. Each block of ``blocksize`` parameters also needs its
    quantization constant (the block's absmax):

    * without double quantization the constant is a 32-bit float:
      ``4 + 32/64 = 4.5`` bits per parameter;
    * with double quantization (QLoRA) the constants are themselves quantized to 8 bits, in
      blocks of ``dq_blocksize`` = 256 constants that each need one 32-bit constant of their own:
      ``4 + 8/64 + 32/(64*256) = 4.127`` bits per parameter.

    So double quantization saves about 0.373 bits per parameter, roughly 0.3 GB on a 7B model.
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

    One point per 4-bit code (x: code 0-15, y: the value it stands for after absmax scaling).
    NF4 lies on the normal-quantile curve: levels are dense near 0, where most weights are, and
    sparse in the tails. Returns a matplotlib Figure (nothing is shown; notebooks display it).
    """
    from matplotlib.figure import Figure

    codes = list(range(16))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(
        codes,
        normal_quantile_levels(16).tolist(),
        "-",
        color="0.6",
        lw=2,
        label="normal quantiles, rescaled (construction)",
    )
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

# The bitsandbytes releases this was checked against; on others lean_int8_backward steps aside.
_INT8_CHECKED = ("0.50",)


class _QuietInt8Cast(logging.Filter):
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" line.

    It is logged on every 8-bit matmul whose input is not fp16 (a bf16 or fp32 model): a 7B writes
    it thousands of times per answer. The cast is bitsandbytes' normal path, not a fault.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QuietInt8Cast())


class _FrozenInt8Matmul(torch.autograd.Function):
    """``y = x W^T`` through a frozen LLM.int8 layer, keeping nothing of ``x`` for the backward pass.

    bitsandbytes' own int8 matmul stores its input (and the input's outlier columns) as plain
    attributes of the autograd context, not through ``save_for_backward``, so gradient
    checkpointing cannot drop them: every 8-bit layer of the model keeps its input alive until the
    backward pass. For a frozen weight the backward needs only the weight, dequantized.
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
    """Route every frozen bitsandbytes ``Linear8bitLt`` of ``model`` through ``_FrozenInt8Matmul``.

    Returns how many layers were switched. On a Llama-2-7B with 2 x 1024 tokens the retained
    inputs came to several GiB, enough to run a 15 GB T4 out of memory at the first step.
    Gradients are bitsandbytes' own (the same dequantized weight, the same product).
    """
    import importlib.metadata
    import logging

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    version = importlib.metadata.version("bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt) and not m.weight.requires_grad]
    if layers and not version.startswith(_INT8_CHECKED):
        logging.getLogger(__name__).warning(
            "bitsandbytes %s: the lean 8-bit backward was checked on %s only; leaving its own matmul in place.",
            version,
            ", ".join(_INT8_CHECKED),
        )
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
