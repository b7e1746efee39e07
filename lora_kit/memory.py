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

Everything here is counted from the model's config (no weights are loaded). The weights, adapters
and optimizer states are exact byte counts; what training holds on top of them (activations, logits,
workspace) follows a model of lora_kit's own training path fitted to measurements:
``benchmarks/bench_memory.py`` trained 33 settings on a GPU (Llama-2-7B, SmolLM2-1.7B and Qwen2.5-7B
shapes; qlora, lora8 and lora; fp16 and bf16; 512 to 8,192 tokens per micro-batch; r 16 and 64;
checkpointing and packing on and off). The estimate of the peak allocated memory fell within -2% and
+7% of the measured one at every point (``benchmarks/results/memory_estimates.json``). The device
also holds the CUDA context, the caching allocator's slack and a paged optimizer's states, which
``MemoryBreakdown.device_gib`` adds.

Byte accounting per parameter (``c`` = ``compute_dtype_bytes``, 2 for fp16/bf16):

* ``"full"`` — mixed precision as in the ZeRO paper: 16-bit weights (c) + 16-bit gradients (c) +
  fp32 master weights (4) + AdamW moments m and v (4 + 4) = 16 bytes per parameter. (If
  ``compute_dtype_bytes=4``, plain fp32 training, the master copy is not needed: also 16 bytes.)
* ``"lora"`` — base weights in 16 bits (c bytes), frozen: no gradients, no optimizer states.
* ``"lora8"`` — LLM.int8: decoder linear weights 1 byte + one fp32 scale per output row.
* ``"qlora"`` — NF4 decoder linear weights at :func:`lora_kit.quant.bits_per_parameter` bits
  (4.127 with double quantization, 4.5 without).

In the quantized methods only the linear layers inside the decoder blocks are quantized, and
PEFT's ``prepare_model_for_kbit_training`` casts everything else (embeddings, lm_head, norms) to
fp32: 4 bytes each. LoRA adapters are fp32 (4 bytes for the weight and its gradient, 8 for AdamW's
two moments), except QLoRA in bf16, where lora_kit keeps the bf16 adapters TRL gives it (2 + 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

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
    "fit_settings",
    "FitChoice",
    "plot_memory_breakdown",
    "seed_claims",
]

GIB = 2**30  # bytes in a GiB (what PyTorch and nvidia-smi report as "GB")
GB = 10**9  # bytes in a decimal GB (what the seeds' claims most likely mean)

Method = Literal["full", "lora", "lora8", "qlora"]
METHODS = get_args(Method)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bytes of optimizer state per trainable parameter (not counting a master copy of the weights).
_OPTIMIZER_STATE_BYTES = {
    "adamw": 8,  # two fp32 moments, m and v
    "adamw_torch": 8,  # the same optimizer under the name the trainer (TrainSettings.optim) uses
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,  # same states; "paged" lets them spill to CPU under pressure
    "adamw_8bit": 2,  # two 8-bit moments (bitsandbytes), block constants ignored
    "paged_adamw_8bit": 2,
    "sgd": 0,  # plain SGD without momentum keeps nothing
}

_COMPONENTS = ("weights", "adapters", "gradients", "optimizer_states", "activations")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per value a run computes in

# What training holds beyond weights, adapters and optimizer states, fitted to lora_kit's own training path
# (benchmarks/bench_memory.py on an H200; the fit's error at every point is in benchmarks/results/memory_estimates.json).
RECOMPUTE_BYTES = {"qlora": 4.4, "lora8": 5.9, "lora": 4.8, "full": 4.8}
"""With gradient checkpointing: bytes per token per element of one block's activations while backward recomputes it
(the block's own activations plus the temporaries of its backward; the 8-bit base dequantizes in backward)."""
KEPT_BYTES = {"qlora": 3.7, "lora8": 4.1, "lora": 2.5, "full": 2.5}
"""Without checkpointing: bytes per token per element of every block's activations, all kept for backward."""
OFFLOADED_INPUTS_ON_GPU = 1  # offload_activations: block inputs on the GPU at once (the one backward is recomputing)
LOGIT_BYTES = 4  # the loss reads the logits in fp32: one float per vocabulary entry per token
INT8_WORKSPACE_COPIES = 2.7  # lora8's backward dequantizes frozen int8 weights: ~2.7 16-bit copies of the largest one
PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes pages an optimizer state only from this size; smaller ones stay in place
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and kernel images: on the device, outside PyTorch's count
# PyTorch's caching allocator reserved at most this much more than was allocated at the measured peaks (up to 18%
# for qlora, whose dequantized weights come and go in many sizes; up to 10% for the others).
ALLOCATOR_SLACK = {"qlora": 0.2, "lora8": 0.12, "lora": 0.12, "full": 0.12}


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


def _residual_bytes(method: str, c: int, fp32_norms: bool = True) -> int:
    # prepare_model_for_kbit_training keeps a quantized model's embeddings in fp32, so the residual stream is fp32
    # unless load_model(fp32_norms=False) casts them back.
    return 4 if method in ("qlora", "lora8") and fp32_norms else c


def _block_elements(config, seq_len: int, fused_attention: bool, tiled: bool = False) -> int:
    """Elements one token keeps in one decoder block: both norms' inputs, Q/K/V, attention output, the MLP's four.
    Tiled (TrainSettings.tile_layers): the attention's alone, as the norms and MLP hold only one tile at a time."""
    shapes = projection_shapes(config)
    h, i = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = shapes["q_proj"][1], shapes["k_proj"][1]
    per_token = (2 * h if tiled else 4 * h + 4 * i) + 2 * q_dim + 2 * kv_dim
    if not fused_attention:  # the s x s attention probabilities, which SDPA and FlashAttention recompute instead
        per_token += config.num_attention_heads * seq_len
    return per_token


def activation_bytes(
    config,
    *,
    method: str = "lora",
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    compute_dtype_bytes: int = 2,
    fused_attention: bool = True,
    gradient_bytes: int = 0,
    fp32_norms: bool = True,
    offload_activations: bool = False,
    tile_layers: bool = False,
) -> int:
    """Estimated bytes training holds at its peak beyond the weights, adapters and optimizer states (one micro-batch).

    Per token (h = hidden, L = layers, V = vocabulary, B = elements of one block's activations, see
    ``_block_elements``):

    * with gradient checkpointing, each block's input stays (``L*h`` values of the residual stream: fp32 in
      the quantized methods, whose embeddings PEFT keeps in fp32, unless ``fp32_norms=False``), and the peak is
      the larger of two moments: the loss (``V`` fp32 logits per token) and backward recomputing a block
      (``RECOMPUTE_BYTES * B`` per token, plus the adapters' gradients, all allocated by the time backward reaches
      the first block);
    * without it, every block keeps its activations (``L * KEPT_BYTES * B``) and the logits.

    With ``offload_activations`` the block inputs wait in CPU RAM (``OFFLOADED_INPUTS_ON_GPU`` of them on the GPU);
    with ``tile_layers`` a block's MLP and norms hold one tile of ``h`` tokens at a time (their part of ``B`` counts
    for one tile, not the whole sample). Both were fitted to 7B QLoRA runs with LoRA dropout 0.

    An 8-bit base adds its backward's dequantized weights (``INT8_WORKSPACE_COPIES`` of the largest projection).
    For Llama-2-7B QLoRA, 1 x 2048 tokens: about 1.7 GiB with checkpointing and 16.5 GiB without.
    """
    config = _as_config(config)
    tokens = micro_batch * seq_len
    block = _block_elements(config, seq_len, fused_attention, tiled=tile_layers)
    logits = tokens * config.vocab_size * LOGIT_BYTES
    if gradient_checkpointing:
        residual = _residual_bytes(method, compute_dtype_bytes, fp32_norms)
        kept = OFFLOADED_INPUTS_ON_GPU if offload_activations else config.num_hidden_layers
        inputs = tokens * kept * config.hidden_size * residual
        recompute = tokens * RECOMPUTE_BYTES[method] * block
        if tile_layers:  # one tile's worth of the MLP's four tensors and the norms' copies
            tile = micro_batch * min(seq_len, config.hidden_size)
            recompute += tile * RECOMPUTE_BYTES[method] * (4 * config.intermediate_size + 2 * config.hidden_size)
        held = inputs + max(logits, recompute + gradient_bytes)
    else:
        held = tokens * config.num_hidden_layers * KEPT_BYTES[method] * block + logits
    if method == "lora8":
        held += INT8_WORKSPACE_COPIES * max(d_in * d_out for d_in, d_out in projection_shapes(config).values()) * 2
    return int(held)


# --- The breakdown --------------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Estimated training memory of one method, in GiB per component (see the module docstring).

    The five components add up to the peak memory PyTorch allocates (``total_gib``). ``gradients`` is what the
    adapters' gradients hold at that peak: all of them when backward recomputing the first block is the peak,
    none when the loss is (the trainer frees them after each step). ``paged_optimizer_states`` live in CUDA
    managed memory, outside that count: the driver moves them to CPU RAM when the GPU runs short.
    """

    method: str
    weights: float
    adapters: float
    gradients: float
    optimizer_states: float
    activations: float
    parameters: int  # all parameters of the base model
    trainable_parameters: int
    settings: dict = field(default_factory=dict)
    paged_optimizer_states: float = 0.0

    @property
    def total_gib(self) -> float:
        """The estimated peak allocated memory: the sum of the five components, in GiB."""
        return sum(getattr(self, name) for name in _COMPONENTS)

    @property
    def total_gb(self) -> float:
        """The same total in decimal GB (10**9 bytes), for comparing with claims quoted in "GB"."""
        return self.total_gib * GIB / GB

    @property
    def device_gib(self) -> float:
        """What the GPU needs free for this run: the peak, the allocator's slack, paged states, the CUDA context."""
        return self.total_gib * (1 + ALLOCATOR_SLACK[self.method]) + self.paged_optimizer_states + CUDA_CONTEXT_GIB

    def components(self) -> dict[str, float]:
        """``{component: GiB}`` for the five components, in plotting order."""
        return {name: getattr(self, name) for name in _COMPONENTS}

    def as_dict(self) -> dict:
        """Every field plus ``total_gib`` and ``device_gib``, ready for a table."""
        return {**asdict(self), "total_gib": self.total_gib, "device_gib": self.device_gib}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise LoraKitError(f"{name} must be one of {list(allowed)} (received {value!r}).")


def _adapter_tensor_sizes(config, r: int, target_modules) -> list[int]:
    """Element counts of every LoRA matrix (A is r x d_in, B is d_out x r), for every block."""
    shapes = projection_shapes(config)
    per_block = [n for name in _resolve_targets(target_modules) for n in (r * shapes[name][0], shapes[name][1] * r)]
    return per_block * config.num_hidden_layers


def memory_breakdown(
    config,
    method: Method,
    *,
    r: int = 16,
    target_modules="all-linear",
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    compute_dtype_bytes: int = 2,
    precision: Literal["bf16", "fp16", "fp32"] | None = None,
    double_quant: bool = True,
    fused_attention: bool = True,
    fp32_norms: bool = True,
    offload_activations: bool = False,
    tile_layers: bool = False,
) -> MemoryBreakdown:
    """Estimate the training memory of ``method`` on the model described by ``config``.

    ``config``: a ``transformers.PretrainedConfig`` (e.g. :func:`llama2_7b_config`) or a model
    name/path whose config can be read. ``method``: ``"full"``, ``"lora"``, ``"lora8"`` or
    ``"qlora"``. ``optimizer``: ``"adamw"`` (or the trainer's ``"adamw_torch"``), ``"paged_adamw_32bit"``
    (same states, in managed memory that can spill to CPU), ``"adamw_8bit"``, ``"paged_adamw_8bit"`` or
    ``"sgd"``. ``precision``: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (default: bf16, or fp32 when
    ``compute_dtype_bytes=4``); QLoRA in bf16 keeps bf16 adapters. The other knobs mean what they mean in
    training. ``r`` and ``target_modules`` are ignored for ``"full"``. ``fp32_norms``: as in
    :func:`lora_kit.load_model` (False: a quantized model's embeddings, norms and head in 16-bit).
    ``offload_activations`` and ``tile_layers``: as in :class:`lora_kit.TrainSettings` (with checkpointing).

    Returns a :class:`MemoryBreakdown` in GiB; ``.total_gib`` is the estimated peak allocated memory.
    """
    _check_choice("method", method, METHODS)
    _check_choice("optimizer", optimizer, _OPTIMIZER_STATE_BYTES)
    _check_choice("compute_dtype_bytes", compute_dtype_bytes, (2, 4))
    precision = precision or ("fp32" if compute_dtype_bytes == 4 else "bf16")
    _check_choice("precision", precision, PRECISIONS)
    config = _as_config(config)
    groups = _parameter_groups(config)
    parameters = sum(groups.values())
    c = PRECISIONS[precision]
    state_bytes = _OPTIMIZER_STATE_BYTES[optimizer]
    paged_states = 0

    kept_unquantized = parameters - groups["decoder_linear_weights"]  # embeddings, lm_head, norms, biases
    if method == "full":
        trainable = parameters
        weights = parameters * c
        adapters = 0
        gradient_bytes = parameters * c
        master_copy = 4 if c < 4 else 0  # fp32 master weights for the optimizer to update
        optimizer_states = parameters * (state_bytes + master_copy)
    else:
        if method == "lora":
            weights = parameters * c
        else:
            if method == "lora8":
                rows = config.num_hidden_layers * sum(d_out for _, d_out in projection_shapes(config).values())
                base = groups["decoder_linear_weights"] * 1 + rows * 4  # int8 + one fp32 scale per row
            else:  # qlora
                base = groups["decoder_linear_weights"] * bits_per_parameter(double_quant=double_quant) / 8
            weights = base + kept_unquantized * (4 if fp32_norms else c)  # fp32 after PEFT's preparation
        sizes = _adapter_tensor_sizes(config, r, target_modules)
        trainable = sum(sizes)
        adapter_bytes = 2 if (method == "qlora" and precision == "bf16") else 4
        adapters = trainable * adapter_bytes
        gradient_bytes = trainable * adapter_bytes
        paged = optimizer.startswith("paged_")
        optimizer_states = sum(n for n in sizes if not (paged and n >= PAGED_MIN_ELEMENTS)) * state_bytes
        paged_states = trainable * state_bytes - optimizer_states

    shape = dict(
        method=method,
        micro_batch=micro_batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        compute_dtype_bytes=c,
        fused_attention=fused_attention,
        fp32_norms=fp32_norms,
        offload_activations=offload_activations,
        tile_layers=tile_layers,
    )
    activations = activation_bytes(config, **shape)
    if method == "full":
        gradients = gradient_bytes  # every weight's gradient lives until the optimizer step
    elif gradient_checkpointing:  # alive at the peak only when backward through the first block is the peak
        gradients = activation_bytes(config, **shape, gradient_bytes=gradient_bytes) - activations
    else:
        gradients = 0
    settings = dict(
        r=r if method != "full" else None,
        target_modules=target_modules if method != "full" else None,
        micro_batch=micro_batch,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        precision=precision,
        double_quant=double_quant if method == "qlora" else None,
        fused_attention=fused_attention,
        fp32_norms=fp32_norms if method in ("qlora", "lora8") else None,
        offload_activations=offload_activations,
        tile_layers=tile_layers,
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
        paged_optimizer_states=paged_states / GIB,
    )


def compare_methods(config, methods=METHODS, **settings) -> dict[str, MemoryBreakdown]:
    """:func:`memory_breakdown` for several methods with the same settings: ``{method: breakdown}``."""
    return {method: memory_breakdown(config, method, **settings) for method in methods}


def paged_state_bytes(optimizer) -> int:
    """Bytes of a (bitsandbytes) optimizer's states in CUDA managed memory, which max_memory_allocated does not count."""
    import torch

    states = optimizer.state.values() if optimizer is not None else ()
    return sum(
        t.numel() * t.element_size()
        for state in states
        for t in state.values()
        if torch.is_tensor(t) and getattr(t, "is_paged", False)
    )


# --- Settings that fit ----------------------------------------------------------------------

_SMALLER_METHOD = {"full": "lora", "lora": "lora8", "lora8": "qlora"}


@dataclass
class FitChoice:
    """Training settings chosen to fit a memory budget, with the estimate behind them and one reason per knob."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    gradient_checkpointing: bool
    estimate: MemoryBreakdown
    budget_gib: float
    reasons: dict[str, str]
    offload_activations: bool = False

    def __str__(self) -> str:
        lines = [f"Estimated {self.estimate.device_gib:.1f} GiB of {self.budget_gib:.1f} GiB:"]
        knobs = ("micro_batch_size", "gradient_accumulation_steps", "max_length", "gradient_checkpointing")
        for name in (*knobs, "offload_activations"):
            lines.append(f"  {name} = {getattr(self, name)!r}  # {self.reasons[name]}")
        return "\n".join(lines)


def fit_settings(
    config,
    method: Method,
    budget_gib: float,
    *,
    max_length: int = 2048,
    examples_per_step: int = 8,
    max_micro_batch: int = 64,
    margin: float = 0.1,
    gradient_checkpointing: bool | None = None,
    offload_activations: bool | None = None,
    **settings,
) -> FitChoice:
    """The largest micro-batch (then the longest max_length) whose estimate fits ``budget_gib`` with ``margin``.

    ``budget_gib``: the GPU memory training may use (a T4: 15). The estimate compared with it is
    :attr:`MemoryBreakdown.device_gib` (peak, allocator slack, paged states, CUDA context), and at most
    ``(1 - margin) * budget_gib`` is used. ``max_length`` is the longest sample wanted; it is halved only when a
    single sample of that length does not fit. Gradient checkpointing (None: decided here) goes off only where the
    same micro-batch fits without it. Offloading activations (None: decided here; it needs checkpointing) goes on only
    where it lets a longer sample fit: it keeps each block's input in CPU RAM, at a sixth or so of the speed. Gradient
    accumulation keeps ``examples_per_step`` examples per optimizer step where the micro-batch is smaller.
    ``settings`` go to :func:`memory_breakdown` (``r``, ``optimizer``, ``precision``...).

    Raises a LoraKitError naming the numbers when not even the weights fit.
    """
    usable = budget_gib * (1 - margin)
    if offload_activations and gradient_checkpointing is False:
        raise LoraKitError(
            "offload_activations=True with gradient_checkpointing=False: what goes to CPU RAM is each checkpointed "
            "layer's input, so offloading needs checkpointing. Leave gradient_checkpointing at None or True."
        )

    def need(micro_batch, length, checkpointing, offload=False):
        return memory_breakdown(
            config,
            method,
            micro_batch=micro_batch,
            seq_len=length,
            gradient_checkpointing=checkpointing,
            offload_activations=offload and checkpointing,
            **settings,
        )

    floor = need(1, 64, True)
    if floor.device_gib > usable:
        smaller = _SMALLER_METHOD.get(method)
        states = floor.adapters + floor.optimizer_states + floor.paged_optimizer_states
        raise LoraKitError(
            f"{method} on this model needs {floor.device_gib:.1f} GiB for a single sample of 64 tokens (weights "
            f"{floor.weights:.1f} GiB, adapters and optimizer states {states:.1f}, the rest CUDA context and "
            f"allocator slack); the budget is {budget_gib:.2f} GiB, of which {usable:.2f} with a {margin:.0%} "
            "margin. "
            + (f"Try method '{smaller}' (a smaller base), " if smaller else "Try ")
            + "a smaller model, or a GPU with more memory."
            + (
                " With several GPUs of compute capability 8.0 or newer, FSDP shares the training among them "
                "(configs/accelerate/fsdp-qlora.yaml); each GPU still loads the whole model first, and its "
                f"{floor.weights:.1f} GiB of NF4 weights fit one."
                if method == "qlora" and floor.weights < usable
                else ""
            )
        )

    def longest(offload):
        length = max_length
        while need(1, length, True, offload).device_gib > usable:
            length //= 2
        return length

    reasons = {}
    kept_on_gpu = longest(False)
    offloaded = longest(True) if offload_activations is not False and gradient_checkpointing is not False else 0
    offload = offload_activations is True or (offload_activations is None and offloaded > kept_on_gpu)
    length = offloaded if offload else kept_on_gpu
    if offload_activations is not None:
        reasons["offload_activations"] = "as asked"
    elif offload:
        reasons["offload_activations"] = (
            f"on: one sample of {length} tokens fits only with each block's input in CPU RAM (a sixth or so slower)"
        )
    elif length == max_length:
        reasons["offload_activations"] = "off: the longest sample fits with each block's input on the GPU (faster)"
    else:
        reasons["offload_activations"] = "off: keeping each block's input in CPU RAM would not fit a longer sample"
    reasons["max_length"] = (
        f"the longest sample wanted ({max_length} tokens)"
        if length == max_length
        else f"halved from {max_length}: one sample of {max_length} tokens does not fit"
        + ("" if settings.get("tile_layers") else " (tile_layers=True fits longer ones on a GPU)")
    )

    def largest(checkpointing):
        fits = [
            mb for mb in range(1, max_micro_batch + 1) if need(mb, length, checkpointing, offload).device_gib <= usable
        ]
        return max(fits, default=0)

    with_checkpoints = largest(True)
    without = largest(False) if gradient_checkpointing is not True and not offload else 0
    if gradient_checkpointing is None:
        checkpointing = without < with_checkpoints or without == 0
        reasons["gradient_checkpointing"] = (
            f"on: without it {without or 'no'} sample(s) of {length} tokens fit, with it {with_checkpoints}"
            if checkpointing
            else "off: the same micro-batch fits without recomputing the forward pass, which saves about a third"
        )
    else:
        checkpointing = gradient_checkpointing
        reasons["gradient_checkpointing"] = "as asked"
    micro_batch = with_checkpoints if checkpointing else without
    if micro_batch == 0:
        raise LoraKitError(
            f"{method} on this model without gradient checkpointing does not fit {budget_gib:.1f} GiB even with 1 "
            f"sample of {length} tokens: switch gradient checkpointing on."
        )
    chosen = need(micro_batch, length, checkpointing, offload)
    reasons["micro_batch_size"] = (
        f"the largest that fits: {micro_batch + 1} would need "
        f"{need(micro_batch + 1, length, checkpointing, offload).device_gib:.2f} GiB of the {usable:.2f} usable"
        if micro_batch < max_micro_batch
        else f"the most asked for (max_micro_batch={max_micro_batch})"
    )
    accumulation = max(1, round(examples_per_step / micro_batch))  # as close to the examples wanted as whole steps go
    reasons["gradient_accumulation_steps"] = (
        f"{micro_batch} x {accumulation} = {micro_batch * accumulation} examples per optimizer step "
        f"(wanted {examples_per_step})"
    )
    return FitChoice(micro_batch, accumulation, length, checkpointing, chosen, budget_gib, reasons, offload)


# --- A picture ------------------------------------------------------------------------------


def plot_memory_breakdown(
    breakdowns: dict[str, MemoryBreakdown],
    title: str = "Estimated training memory",
    gpu_gib: float | None = None,
    gpu_name: str = "GPU memory",
):
    """Stacked bars, one per method, split into the five components; the total on top (GiB).

    ``gpu_gib``: a GPU's memory, drawn as a horizontal line labelled ``gpu_name`` (a bar that reaches it does not fit;
    the GPU also needs the CUDA context and the allocator's slack, about a fifth more than the bar).

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
            bbox=dict(facecolor="white", edgecolor="none", pad=1),  # readable where the GPU's line crosses it
            zorder=3,
        )
    if gpu_gib:
        ax.axhline(gpu_gib, color="black", linestyle="--", linewidth=1, label=gpu_name, zorder=2)
    ax.set_xticks(positions, labels)
    ax.set_xlabel("method")
    ax.set_ylabel("memory (GiB)")
    ax.set_ylim(0, max(bottoms + [gpu_gib or 0]) * 1.12)
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
