"""How much GPU memory does fine-tuning need? An analytical breakdown.

Training memory has five parts, and each fine-tuning method shrinks different ones:

==================  ========================================================================
weights             the base model, in 16 bits (full, lora), 8 bits (lora8) or NF4 (qlora)
adapters            the LoRA matrices A and B (fp32; none for full fine-tuning)
gradients           one per *trainable* parameter: every weight (full) or only the adapters
optimizer states    AdamW keeps two numbers per trainable parameter (plus an fp32 master copy
                    of the weights in mixed-precision full fine-tuning)
activations         what the forward pass keeps for the backward pass; grows with batch and
                    sequence length, shrunk by gradient checkpointing
==================  ========================================================================

Everything here is counted from the model's config (no weights are loaded) and is an
*estimate*: real peaks add the CUDA context (about 0.3-0.5 GiB, outside PyTorch's own count),
allocator fragmentation, framework temporaries (for example RMSNorm's fp32 intermediates, LoRA
dropout copies, the dequantized copy of one 4-bit weight at a time) and whatever the kernels
choose. Trust the ranking of the methods and the order of magnitude, not the second digit.
As a check, our own run (DESIGN.md: Llama-2-7B shape, QLoRA r=64 on all 7 projections, seq 2048,
micro-batch 2, gradient checkpointing, bf16) peaked at 8.4 GiB allocated; this module estimates
about 8.3 GiB for the same settings.

Byte accounting per parameter (``c`` = ``compute_dtype_bytes``, 2 for fp16/bf16):

* ``"full"`` — mixed precision as in the ZeRO paper: 16-bit weights (c) + 16-bit gradients (c) +
  fp32 master weights (4) + AdamW moments m and v (4 + 4) = 16 bytes per parameter. (If
  ``compute_dtype_bytes=4``, plain fp32 training, the master copy is not needed: also 16 bytes.)
* ``"lora"`` — base weights in 16 bits (c bytes), frozen: no gradients, no optimizer states.
* ``"lora8"`` — LLM.int8: decoder linear weights 1 byte + one fp32 scale per output row.
* ``"qlora"`` — NF4 decoder linear weights at :func:`lora_kit.quant.bits_per_parameter` bits
  (4.127 with double quantization, 4.5 without).

In the quantized methods only the linear layers inside the decoder blocks are quantized:
transformers keeps the embeddings (not a Linear) and the lm_head (for accuracy) in 16 bits, and
so does this module. LoRA adapters are fp32 (PEFT's default when the base is 16-bit or
quantized): 4 bytes each for the weight and its gradient, 8 for AdamW's two moments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lora_kit.errors import LoraKitError
from lora_kit.quant import bits_per_parameter

__all__ = [
    "METHODS",
    "PROJECTIONS",
    "MemoryBreakdown",
    "llama2_7b_config",
    "llama_65b_config",
    "projection_shapes",
    "count_parameters",
    "lora_parameter_count",
    "activation_bytes",
    "memory_breakdown",
    "compare_methods",
    "format_breakdowns",
    "plot_memory_breakdown",
    "seed_claims",
]

GIB = 2**30  # bytes in a GiB (what PyTorch and nvidia-smi report as "GB")
GB = 10**9  # bytes in a decimal GB (what the seeds' claims most likely mean)

METHODS = ("full", "lora", "lora8", "qlora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bytes of optimizer state per trainable parameter (not counting a master copy of the weights).
_OPTIMIZER_STATE_BYTES = {
    "adamw": 8,  # two fp32 moments, m and v
    "paged_adamw_32bit": 8,  # same states; "paged" lets them spill to CPU under pressure
    "adamw_8bit": 2,  # two 8-bit moments (bitsandbytes), block constants ignored
    "paged_adamw_8bit": 2,
    "sgd": 0,  # plain SGD without momentum keeps nothing
}

_COMPONENTS = ("weights", "adapters", "gradients", "optimizer_states", "activations")


# --- Model shapes ---------------------------------------------------------------------------


def decoder_shape(hidden, mlp, layers, heads, kv_heads, vocabulary, tied, context=4096) -> dict:
    """A dense decoder's ``LlamaConfig`` keyword arguments, in the order a model card lists them."""
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocabulary, tie_word_embeddings=tied,
                max_position_embeddings=context)  # fmt: skip


# The default models' shapes, as their config.json files give them (no download needed to count them).
LLAMA2_7B = decoder_shape(4096, 11008, 32, 32, 32, 32000, tied=False)
SMOLLM2_1_7B = decoder_shape(2048, 8192, 24, 32, 32, 49152, tied=True, context=8192)


def llama2_7b_config():
    """A ``transformers.LlamaConfig`` with Llama-2-7B's shape, built from numbers (no download).

    hidden 4096, MLP 11008, 32 layers, 32 heads (no GQA), vocabulary 32000, context 4096,
    untied lm_head: 6,738,415,616 parameters.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA2_7B)


def llama_65b_config():
    """A ``LlamaConfig`` with LLaMA-65B's shape (hidden 8192, MLP 22016, 80 layers, 64 heads,
    vocabulary 32000, context 2048): 65,285,660,672 parameters. For the seeds' 65B claim."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _as_config(config):
    """Accept a ``PretrainedConfig`` or a model name/local path, and check it is one we can count."""
    if isinstance(config, str):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(config)
        except OSError as exc:
            raise LoraKitError(
                f"Could not load a model config from {config!r} ({exc}). Pass a local model folder, "
                "a name in the Hugging Face cache, or a config object such as llama2_7b_config()."
            ) from exc
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [name for name in required if getattr(config, name, None) is None]
    if missing:
        raise LoraKitError(
            f"memory estimates need a dense decoder config (Llama, Mistral, Qwen2, SmolLM...); the "
            f"{type(config).__name__} received has no {', '.join(missing)}. Pass the language model's "
            "config (for a multimodal model, its text_config)."
        )
    if (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0) > 1:
        raise LoraKitError(
            f"{type(config).__name__} is a mixture-of-experts model; memory_breakdown only counts "
            "dense decoder models. Use a dense config."
        )
    return config


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (d_in, d_out)}`` for the 7 linear layers of one decoder block.

    With grouped-query attention (GQA) k_proj and v_proj are narrower: their output is
    ``num_key_value_heads * head_dim`` instead of ``num_attention_heads * head_dim``.
    """
    config = _as_config(config)
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (h, q_dim),
        "k_proj": (h, kv_dim),
        "v_proj": (h, kv_dim),
        "o_proj": (q_dim, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _bias_sizes(config) -> dict[str, int]:
    """Bias lengths per projection: Llama's ``attention_bias``/``mlp_bias`` flags, Qwen2's q/k/v biases."""
    shapes = projection_shapes(config)
    with_bias = set()
    if getattr(config, "attention_bias", False):
        with_bias |= {"q_proj", "k_proj", "v_proj", "o_proj"}
    if getattr(config, "model_type", "") == "qwen2":
        with_bias |= {"q_proj", "k_proj", "v_proj"}
    if getattr(config, "mlp_bias", False):
        with_bias |= {"gate_proj", "up_proj", "down_proj"}
    return {name: shapes[name][1] for name in with_bias}


def _parameter_groups(config) -> dict[str, int]:
    """Parameters split into what quantization touches and what it leaves alone."""
    config = _as_config(config)
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    linear = sum(d_in * d_out for d_in, d_out in projection_shapes(config).values())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return {
        "decoder_linear_weights": layers * linear,  # quantized by lora8 / qlora
        "biases": layers * sum(_bias_sizes(config).values()),
        "norms": layers * 2 * h + h,  # two RMSNorms per block + the final norm
        "embeddings": vocab * h,
        "lm_head": 0 if tied else vocab * h,  # tied: shares the embedding matrix
    }


def count_parameters(config) -> int:
    """Number of parameters of a dense decoder, counted exactly from its config.

    embeddings (vocab x hidden) + per block [q, k, v, o (with GQA), gate, up, down, 2 norms,
    biases if the config has them] + final norm + lm_head (unless tied to the embeddings).
    Llama-2-7B: 6,738,415,616.
    """
    return sum(_parameter_groups(config).values())


def _resolve_targets(target_modules) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return PROJECTIONS  # as in PEFT: every linear layer except the lm_head
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = [name for name in names if name not in PROJECTIONS]
    if unknown or not names:
        raise LoraKitError(
            f"target_modules must be 'all-linear' or names from {list(PROJECTIONS)} "
            f"(received {target_modules!r}); e.g. ['q_proj', 'v_proj']."
        )
    return tuple(dict.fromkeys(names))


def lora_parameter_count(config, r: int = 16, target_modules="all-linear") -> int:
    """Trainable LoRA parameters: ``r * (d_in + d_out)`` per targeted layer, in every block.

    A is ``r x d_in`` and B is ``d_out x r``. Llama-2-7B: r=8 on q_proj, v_proj gives
    4,194,304 (0.06% of the model); r=64 on all 7 projections gives 159,907,840 (2.4%).
    """
    if r < 1:
        raise LoraKitError(f"LoRA rank r must be a positive integer (received r={r}); 8-64 is usual.")
    config = _as_config(config)
    shapes = projection_shapes(config)
    per_block = sum(r * sum(shapes[name]) for name in _resolve_targets(target_modules))
    return config.num_hidden_layers * per_block


# --- Activations ----------------------------------------------------------------------------


def activation_bytes(
    config,
    *,
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    compute_dtype_bytes: int = 2,
    fused_attention: bool = True,
) -> int:
    """Estimated bytes the forward pass keeps for the backward pass (one micro-batch).

    Per token, one decoder block keeps (in 16-bit, ``c`` bytes each; h = hidden,
    i = MLP width, q/kv = attention widths, a = heads, s = sequence length)

        2h   the inputs of the two RMSNorms (the residual stream)
        h    the normalised input of q/k/v        q + 2kv   Q, K, V for attention's backward
        q    the attention output (o_proj's input) h        the normalised input of gate/up
        4i   gate, up, SiLU(gate) and their product (down_proj's input)
        a*s  attention probabilities, only without a fused kernel (SDPA / FlashAttention
             recompute them instead of storing the s x s matrix)

    so ``per_block = b*s*c*(4h + 2q + 2kv + 4i [+ a*s])``. The logits for the loss add
    ``b*s*vocab*(c + 4)`` (16-bit logits and the fp32 copy the loss is computed in).

    * Without gradient checkpointing: ``layers * per_block + logits``.
    * With it, only each block's input is kept (``layers * b*s*h*c``), plus one block's full
      activations while that block is recomputed during backward, plus the logits.

    For Llama-2-7B, batch 1 x 2048 tokens: about 9.7 GiB without and 1.1 GiB with checkpointing.
    """
    config = _as_config(config)
    shapes = projection_shapes(config)
    h, i = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = shapes["q_proj"][1], shapes["k_proj"][1]
    tokens = micro_batch * seq_len
    c = compute_dtype_bytes

    per_token = 4 * h + 2 * q_dim + 2 * kv_dim + 4 * i
    if not fused_attention:
        per_token += config.num_attention_heads * seq_len
    per_block = tokens * c * per_token
    logits = tokens * config.vocab_size * (c + 4)

    if gradient_checkpointing:
        return config.num_hidden_layers * tokens * h * c + per_block + logits
    return config.num_hidden_layers * per_block + logits


# --- The breakdown --------------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Estimated training memory of one method, in GiB per component (see the module docstring)."""

    method: str
    weights: float
    adapters: float
    gradients: float
    optimizer_states: float
    activations: float
    parameters: int  # all parameters of the base model
    trainable_parameters: int
    settings: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        """The sum of the five components, in GiB."""
        return sum(getattr(self, name) for name in _COMPONENTS)

    @property
    def total_gb(self) -> float:
        """The same total in decimal GB (10**9 bytes), for comparing with claims quoted in "GB"."""
        return self.total_gib * GIB / GB

    def components(self) -> dict[str, float]:
        """``{component: GiB}`` for the five components, in plotting order."""
        return {name: getattr(self, name) for name in _COMPONENTS}

    def as_dict(self) -> dict:
        """Every field plus ``total_gib``, ready for a table."""
        return {**asdict(self), "total_gib": self.total_gib}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise LoraKitError(f"{name} must be one of {list(allowed)} (received {value!r}).")


def memory_breakdown(
    config,
    method: str,
    *,
    r: int = 16,
    target_modules="all-linear",
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    compute_dtype_bytes: int = 2,
    double_quant: bool = True,
    fused_attention: bool = True,
) -> MemoryBreakdown:
    """Estimate the training memory of ``method`` on the model described by ``config``.

    ``config``: a ``transformers.PretrainedConfig`` (e.g. :func:`llama2_7b_config`) or a model
    name/path whose config can be read. ``method``: ``"full"``, ``"lora"``, ``"lora8"`` or
    ``"qlora"``. ``optimizer``: ``"adamw"``, ``"paged_adamw_32bit"`` (same memory, can spill
    to CPU), ``"adamw_8bit"``, ``"paged_adamw_8bit"`` or ``"sgd"``. The other knobs mean what
    they mean in training. ``r`` and ``target_modules`` are ignored for ``"full"``.

    Returns a :class:`MemoryBreakdown` in GiB; ``.total_gib`` is the estimated peak.
    """
    _check_choice("method", method, METHODS)
    _check_choice("optimizer", optimizer, _OPTIMIZER_STATE_BYTES)
    _check_choice("compute_dtype_bytes", compute_dtype_bytes, (2, 4))
    config = _as_config(config)
    groups = _parameter_groups(config)
    parameters = sum(groups.values())
    c = compute_dtype_bytes
    state_bytes = _OPTIMIZER_STATE_BYTES[optimizer]

    kept_in_16bit = parameters - groups["decoder_linear_weights"]  # embeddings, lm_head, norms, biases
    if method == "full":
        trainable = parameters
        weights = parameters * c
        adapters = 0
        gradients = parameters * c
        master_copy = 4 if c < 4 else 0  # fp32 master weights for the optimizer to update
        optimizer_states = parameters * (state_bytes + master_copy)
    else:
        if method == "lora":
            base = groups["decoder_linear_weights"] * c
        elif method == "lora8":
            rows = config.num_hidden_layers * sum(d_out for _, d_out in projection_shapes(config).values())
            base = groups["decoder_linear_weights"] * 1 + rows * 4  # int8 + one fp32 scale per row
        else:  # qlora
            base = groups["decoder_linear_weights"] * bits_per_parameter(double_quant=double_quant) / 8
        weights = base + kept_in_16bit * c
        trainable = lora_parameter_count(config, r, target_modules)
        adapters = trainable * 4  # fp32 adapters
        gradients = trainable * 4
        optimizer_states = trainable * state_bytes

    activations = activation_bytes(
        config,
        micro_batch=micro_batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        compute_dtype_bytes=c,
        fused_attention=fused_attention,
    )
    settings = dict(
        r=r if method != "full" else None,
        target_modules=target_modules if method != "full" else None,
        micro_batch=micro_batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        compute_dtype_bytes=c,
        double_quant=double_quant if method == "qlora" else None,
        fused_attention=fused_attention,
    )
    return MemoryBreakdown(
        method=method,
        weights=weights / GIB,
        adapters=adapters / GIB,
        gradients=gradients / GIB,
        optimizer_states=optimizer_states / GIB,
        activations=activations / GIB,
        parameters=parameters,
        trainable_parameters=trainable,
        settings=settings,
    )


def compare_methods(config, methods=METHODS, **settings) -> dict[str, MemoryBreakdown]:
    """:func:`memory_breakdown` for several methods with the same settings: ``{method: breakdown}``."""
    return {method: memory_breakdown(config, method, **settings) for method in methods}


def format_breakdowns(breakdowns: dict[str, MemoryBreakdown]) -> str:
    """A plain-text table (GiB) of several breakdowns, for printing in a notebook."""
    header = ["method", *_COMPONENTS, "total", "trainable"]
    rows = [
        [
            label,
            *(f"{value:.2f}" for value in b.components().values()),
            f"{b.total_gib:.2f}",
            f"{b.trainable_parameters / b.parameters:.2%}",
        ]
        for label, b in breakdowns.items()
    ]
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]
    lines = ["  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# --- A picture ------------------------------------------------------------------------------


def plot_memory_breakdown(breakdowns: dict[str, MemoryBreakdown], title: str = "Estimated training memory"):
    """Stacked bars, one per method, split into the five components; the total on top (GiB).

    Returns a matplotlib Figure (built without pyplot, so it works on any backend; a notebook
    displays it when it is the cell's value).
    """
    from matplotlib.figure import Figure

    if not breakdowns:
        raise LoraKitError("plot_memory_breakdown received no breakdowns; pass compare_methods(config).")
    labels = list(breakdowns)
    positions = list(range(len(labels)))
    fig = Figure(figsize=(max(5.0, 1.6 * len(labels) + 2), 4.5))
    ax = fig.subplots()
    bottoms = [0.0] * len(labels)
    for name in _COMPONENTS:
        heights = [breakdowns[label].components()[name] for label in labels]
        ax.bar(positions, heights, bottom=bottoms, label=name.replace("_", " "), width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in zip(positions, bottoms):
        ax.annotate(
            f"{total:.1f} GiB",
            (x, total),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(positions, labels)
    ax.set_xlabel("method")
    ax.set_ylabel("memory (GiB)")
    ax.set_ylim(0, max(bottoms) * 1.12)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


# --- The seeds' claims, checked ------------------------------------------------------------


def _verdict(computed: float, low: float, high: float, tolerance: float, unit: str) -> str:
    """Compare a computed value with a claimed range [low, high], allowing ``tolerance`` (relative)."""
    if low * (1 - tolerance) <= computed <= high * (1 + tolerance):
        return f"consistent: we estimate {computed:.1f} {unit}"
    if computed > high:
        return f"claim too low: we estimate {computed:.1f} {unit}, {computed / high:.1f}x the claim"
    return f"claim too high: we estimate {computed:.1f} {unit}, {computed / low:.2f}x the claim"


def seed_claims(config_7b=None, config_65b=None, tolerance: float = 0.15) -> list[dict]:
    """Check the seeds' memory claims against this module's estimates.

    Each row: ``seed``, ``claim``, ``settings`` (the settings we computed with, the seed's own
    where it gave them), ``computed`` (a number), ``unit`` and ``verdict`` (computed by comparing
    with the claimed range, allowing ``tolerance``, 15% by default). Memory is compared in decimal
    GB, the likeliest meaning of the seeds' "GB". Rows for a total also give
    ``claim_bytes_per_param``: how many bytes per parameter the claim implies, which shows what
    accounting a claim assumed (16 is mixed-precision AdamW; 12 drops the fp32 master copy).
    """
    c7 = llama2_7b_config() if config_7b is None else _as_config(config_7b)
    c65 = llama_65b_config() if config_65b is None else _as_config(config_65b)
    p7, p65 = count_parameters(c7), count_parameters(c65)
    rows = []

    def add(seed, claim, settings, computed, low, high, unit="GB", params=None):
        row = dict(
            seed=seed,
            claim=claim,
            settings=settings,
            computed=round(computed, 2),
            unit=unit,
            verdict=_verdict(computed, low, high, tolerance, unit),
        )
        if params:
            row["claim_bytes_per_param"] = round((low + high) / 2 * GB / params, 1)
        rows.append(row)

    base = dict(micro_batch=1, seq_len=2048, gradient_checkpointing=True)
    full7 = memory_breakdown(c7, "full", **base)
    add(
        "000",
        "full fine-tuning of a 7B needs 40-60 GB",
        "AdamW, batch 1 x 2048, checkpointing",
        full7.total_gb,
        40,
        60,
        params=p7,
    )

    qlora7 = memory_breakdown(c7, "qlora", r=64, **base)
    add(
        "000",
        "QLoRA cuts memory by about 75% (vs full fine-tuning)",
        "r=64 all-linear vs full, batch 1 x 2048",
        100 * (1 - qlora7.total_gib / full7.total_gib),
        75,
        75,
        unit="%",
    )
    lora_7 = memory_breakdown(c7, "lora", r=64, **base)
    add(
        "000",
        "QLoRA cuts memory by about 75% (weights only, vs 16-bit)",
        "NF4 + double quant vs bf16",
        100 * (1 - qlora7.weights / lora_7.weights),
        75,
        75,
        unit="%",
    )

    for method, claim, low, high in (
        ("lora", "LoRA on a 16-bit 7B needs about 12-16 GB", 12, 16),
        ("lora8", "LoRA on an 8-bit 7B needs about 10 GB", 10, 10),
        ("qlora", "QLoRA on a 7B needs about 5-7 GB", 5, 7),
    ):
        b = memory_breakdown(c7, method, r=16, **base)
        add("001", claim, "r=16 all-linear, batch 1 x 2048, checkpointing", b.total_gb, low, high)

    lora_seed002 = memory_breakdown(c7, "lora", r=16, micro_batch=1, seq_len=2048)
    add(
        "002",
        "LoRA on a 16-bit 7B needs about 15 GB",
        "the seed's table: r=16, batch 1 x 2048",
        lora_seed002.total_gb,
        15,
        15,
    )
    qlora_seed002 = memory_breakdown(c7, "qlora", r=64, micro_batch=4, seq_len=2048)
    add("002", "7B QLoRA fits in about 6 GB", "the seed's table: r=64, batch 4 x 2048", qlora_seed002.total_gb, 6, 6)
    add(
        "002",
        "7B QLoRA fits in about 6 GB",
        "r=64, batch 1 x 2048 (the Llama-2 QLoRA Colab tutorial's recipe)",
        qlora7.total_gb,
        6,
        6,
    )

    full65 = memory_breakdown(c65, "full", **base)
    add(
        "004",
        "full fine-tuning of a 65B needs about 780 GB",
        "AdamW, batch 1 x 2048, checkpointing",
        full65.total_gb,
        780,
        780,
        params=p65,
    )
    return rows
