"""What the two notebooks need and nothing else: knobs per environment, and small views of results.

The notebooks (``notebooks/lora_finetune.ipynb`` and ``notebooks/qlora_finetune.ipynb``) follow
one arc. Everything they would otherwise write twice lives here, where a test can reach it:

* :func:`course_settings` picks the knobs for this machine (the seeds' recipes on a CUDA GPU, the
  embedded model and demo task on a CPU or with ``LORA_KIT_SMOKE=1``) and keeps a reason beside
  every value; printing the result is the notebook's "resolved config".
* small "show me" helpers: the memory estimate for the chosen model, the seeds' claims checked,
  trainable parameters per rank on the live model, the zero-initialised B, quantization errors
  on a real weight, which tokens carry loss, before/after tables, decoding side by side.

Nothing here trains differently from ``lora_kit.train``: the settings it returns are ordinary
:class:`~lora_kit.train.LoraSettings` and :class:`~lora_kit.train.TrainSettings`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .errors import LoraKitError
from .hardware import Hardware, detect_hardware
from .train import LoraSettings, TrainSettings

METHODS = ("lora", "lora8", "qlora")
SMOKE_ENV = "LORA_KIT_SMOKE"
SEED_QLORA_MODEL = "NousResearch/Llama-2-7b-chat-hf"
SEED_DATASET = "mlabonne/guanaco-llama2-1k"
T4_LORA_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
DRIVE_ROOT = "/content/drive"
DRIVE_OUTPUTS = "/content/drive/MyDrive/lora_kit"
METHOD_LABELS = {"full": "full fine-tuning", "lora16": "LoRA, 16-bit base", "lora8": "LoRA, 8-bit base",
                 "qlora": "QLoRA, NF4 base"}


def in_colab() -> bool:
    return "google.colab" in sys.modules


def smoke_requested() -> bool:
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# The knobs
# ---------------------------------------------------------------------------------------------
@dataclass
class CourseSettings:
    """Every knob of a notebook run, with a reason for each value (``reasons[name]``)."""

    method: str
    profile: str  # "gpu" (the seeds' recipe), "cpu" (embedded model, fuller run) or "smoke" (tests)
    model: str
    dataset: str
    quantization: str
    r: int
    alpha: float
    dropout: float
    target_modules: str | list
    learning_rate: float
    max_steps: int
    num_epochs: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    optim: str
    lr_scheduler_type: str
    warmup_ratio: float
    max_grad_norm: float
    gradient_checkpointing: bool
    save_steps: int
    resume: bool
    n_train: int
    n_eval: int
    eval_samples: int
    max_new_tokens: int
    output_dir: str
    use_drive: bool
    reasons: dict = field(default_factory=dict, repr=False)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)

    @property
    def train(self) -> TrainSettings:
        return TrainSettings(
            learning_rate=self.learning_rate, micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, max_steps=self.max_steps,
            num_epochs=self.num_epochs, max_length=self.max_length, optim=self.optim,
            lr_scheduler_type=self.lr_scheduler_type, warmup_ratio=self.warmup_ratio, max_grad_norm=self.max_grad_norm,
            gradient_checkpointing=self.gradient_checkpointing, save_steps=self.save_steps,
            output_dir=str(Path(self.output_dir) / "checkpoints"), report_to="tensorboard",
        )

    @property
    def memory_method(self) -> str:
        """The name lora_kit.memory uses for this method."""
        return {"lora": "lora16", "lora8": "lora8", "qlora": "qlora"}[self.method]

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapter"

    @property
    def merged_dir(self) -> Path:
        return Path(self.output_dir) / "merged"

    def __str__(self) -> str:
        shown = [f.name for f in fields(self) if f.name != "reasons"]
        width = max(len(n) for n in shown)
        vwidth = min(24, max(len(repr(getattr(self, n))) for n in shown))
        lines = [f"Resolved knobs ({self.profile} profile):"]
        for name in shown:
            value = repr(getattr(self, name))
            lines.append(f"  {name.ljust(width)} = {value.ljust(vwidth)}  # {self.reasons.get(name, '')}")
        return "\n".join(lines)


def _gpu_recipe(method: str, hw: Hardware) -> dict:
    """The seeds' recipes for a CUDA GPU, sized by the GPU's memory."""
    big = (hw.vram_gib or 0) >= 40
    k: dict = {}
    if method == "qlora":
        k["model"] = (SEED_QLORA_MODEL, "seed 000's model: Llama-2-7B-chat, an ungated copy; 4-bit it fits a T4")
        k["r"] = (64, "seed 000 and the QLoRA paper: a high rank makes up for the 4-bit base")
        k["alpha"] = (16, "seed 000: update scale alpha/r = 0.25")
        k["dropout"] = (0.1, "seed 000: regularises a 1,000-example data set")
        k["learning_rate"] = (2e-4, "seed 000 and the QLoRA paper for 7B models")
        k["optim"] = ("paged_adamw_32bit", "seed 000: optimizer states can spill to CPU RAM instead of crashing")
        k["lr_scheduler_type"] = ("constant_with_warmup", "seed 000: constant rate after a short warm-up")
    else:
        model = SEED_QLORA_MODEL if method == "lora8" else T4_LORA_MODEL
        why = ("seed 001: the 7B on an 8-bit base (about 7 GB of weights) fits a T4" if method == "lora8" else
               "1.7B parameters in 16-bit is about 3.4 GB of weights: fits a T4 with room for activations")
        k["model"] = (model, why)
        k["r"] = (16, "seed 002's LoRA column: enough capacity for instruction tuning")
        k["alpha"] = (32, "seed 002: update scale alpha/r = 2")
        k["dropout"] = (0.05, "seed 002: light regularisation")
        k["learning_rate"] = (1e-4, "seed 002's LoRA column")
        k["optim"] = ("adamw_torch", "plain AdamW: the adapters' optimizer states are small")
        k["lr_scheduler_type"] = ("cosine", "decays smoothly to zero by the end of the epoch")
    k["dataset"] = (SEED_DATASET, "seed 000's data: 1,000 Guanaco chats in Llama-2 [INST] format")
    k["max_steps"] = (-1, "-1: one full pass over the data (num_epochs), as in seed 000")
    k["num_epochs"] = (1.0, "seed 000: one epoch")
    k["micro_batch_size"] = ((4, "a GPU with 40 GiB or more has room for 4 packed rows") if big else
                             (2, "2 packed rows of max_length keep a 15 GB T4 clear of out-of-memory"))
    k["gradient_accumulation_steps"] = (1, "packing fills each row with several chats already")
    k["max_length"] = ((2048, "the seeds' 2048 tokens") if big else
                       (1024, "most Guanaco chats are shorter; halves activation memory on a T4"))
    k["warmup_ratio"] = (0.03, "seed 000: 3% of the steps warm the learning rate up")
    k["max_grad_norm"] = (0.3, "seed 000 and the QLoRA paper: clip gradients at 0.3")
    k["gradient_checkpointing"] = (True, "recompute activations: ~30% slower, far less memory on a 7B")
    k["save_steps"] = (25, "a checkpoint every 25 steps: a Colab disconnect loses little")
    k["resume"] = (True, "continue from the last checkpoint in output_dir after a disconnect")
    k["n_train"] = (-1, "every example the data set has (minus the held-out part)")
    k["n_eval"] = (100, "10% of the 1,000 chats held out for perplexity")
    k["eval_samples"] = (20, "answers generated before and after; a 7B writes ~128 tokens each")
    k["max_new_tokens"] = (128, "room for a paragraph-long chat answer")
    return k


def _cpu_recipe(method: str, smoke: bool) -> dict:
    """The embedded model on the demo task: lora_kit.demo's tuned CPU recipe, shorter when smoke."""
    k: dict = {}
    k["model"] = ("embedded", "SmolLM2-135M-Instruct ships with lora_kit: runs offline on any CPU")
    k["dataset"] = ("demo", "lora_kit's sentence-to-JSON task: small, and exact match shows learning")
    k["r"] = (16, "lora_kit.demo's CPU recipe (r=64 is for a 7B; here it only slows the step)")
    k["alpha"] = (32, "update scale alpha/r = 2, as in the LoRA preset")
    k["dropout"] = (0.0, "0: the demo data are plentiful and dropout costs a copy of the activations")
    if method == "qlora":
        k["learning_rate"] = (1e-3, "lora_kit.demo: a 4-bit 135M model needs a bolder rate in few steps")
    else:
        k["learning_rate"] = (5e-4, "lora_kit.demo: few steps on a small model want a bold rate")
    k["optim"] = ("paged_adamw_32bit" if method == "qlora" else "adamw_torch",
                  "QLoRA's paged AdamW; with no CUDA lora_kit falls back to plain AdamW" if method == "qlora" else
                  "plain AdamW: the adapters' optimizer states are small")
    k["lr_scheduler_type"] = ("cosine", "decays to zero by the last step: a calm finish in few steps")
    k["num_epochs"] = (1.0, "ignored: max_steps is set")
    k["micro_batch_size"] = (4, "4 packed rows of max_length tokens per step (~14 demo examples each)")
    k["gradient_accumulation_steps"] = (1, "packing already fills each row")
    k["max_length"] = (256, "a demo example is ~70 tokens; a 256-token row packs several")
    k["warmup_ratio"] = (0.1, "10% of the steps warm the learning rate up")
    k["max_grad_norm"] = (1.0, "clip at 1.0: a small model with a bold rate, few steps")
    k["gradient_checkpointing"] = (False, "a 135M model's activations fit in RAM: skip the ~30% slowdown")
    k["save_steps"] = (10**6, "no intermediate checkpoints: a CPU run is short")
    k["resume"] = (not smoke, "smoke runs start fresh; a longer run resumes after an interruption")
    k["n_train"] = (240, "enough distinct examples that no step repeats one")
    if smoke:
        k["micro_batch_size"] = (2, f"{SMOKE_ENV}=1: 2 packed rows (~7 demo examples) keep each CPU step short")
        k["max_steps"] = (12, f"{SMOKE_ENV}=1: just enough steps to see the loss fall, within minutes")
        k["n_eval"] = (20, f"{SMOKE_ENV}=1: a small held-out set keeps evaluation quick")
        k["eval_samples"] = (12, f"{SMOKE_ENV}=1: 12 held-out sentences answered before and after (CPU generation is slow)")
    else:
        k["max_steps"] = (30, "lora_kit.demo's default: about 4 minutes of training on 2 CPU cores")
        k["n_eval"] = (40, "40 held-out sentences: each is 2.5% of the score")
        k["eval_samples"] = (40, "every held-out sentence is answered before and after")
    k["max_new_tokens"] = (48, "an answer is ~30 tokens; the base model rambles, so cap it")
    return k


def course_settings(method: str = "lora", smoke: bool | None = None, use_drive: bool = False,
                    hardware: Hardware | None = None, **overrides) -> CourseSettings:
    """The knobs for a notebook run of ``method`` ("lora", "lora8" or "qlora") on this machine.

    ``smoke``: None reads ``LORA_KIT_SMOKE``; True forces the small CPU-sized run. With no CUDA GPU
    the embedded model and demo task are used whatever ``smoke`` says (a 7B does not train on a
    CPU). ``overrides`` replace any knob by name; their reason says so.
    """
    if method not in METHODS:
        raise LoraKitError(f"method={method!r} is not one of {METHODS}: 'lora' (16-bit base), "
                           "'lora8' (8-bit base) or 'qlora' (NF4 base).")
    hw = hardware or detect_hardware()
    smoke = smoke_requested() if smoke is None else bool(smoke)
    profile = "smoke" if smoke else ("gpu" if hw.device == "cuda" else "cpu")
    knobs = _gpu_recipe(method, hw) if profile == "gpu" else _cpu_recipe(method, smoke)
    knobs["method"] = (method, {"lora": "LoRA on a 16-bit base", "lora8": "LoRA on an 8-bit base",
                                "qlora": "QLoRA: LoRA on an NF4 (4-bit) base, double quantization"}[method])
    knobs["profile"] = (profile, {"gpu": "a CUDA GPU: the seeds' recipe",
                                  "cpu": "no CUDA GPU: the embedded model and demo task",
                                  "smoke": f"{SMOKE_ENV}=1 or smoke=True: the shortest run that shows every step"}[profile])
    knobs["quantization"] = ({"lora": "none", "lora8": "8bit", "qlora": "nf4"}[method],
                             "what the frozen base is stored as; follows from the method")
    knobs["target_modules"] = ("all-linear", "every linear layer of the decoder (QLoRA paper: best for the count)")
    drive = use_drive and in_colab()
    out = f"{DRIVE_OUTPUTS}/{method}" if drive else f"outputs/{method}"
    knobs["output_dir"] = (out, "on Google Drive: survives a Colab disconnect" if drive else
                           "a local folder" + (" (use_drive works in Colab only)" if use_drive else ""))
    knobs["use_drive"] = (drive, "mount Google Drive for outputs" if drive else
                          "Drive is off" + (": not running in Colab" if use_drive else ""))
    unknown = set(overrides) - {f.name for f in fields(CourseSettings)} - {"reasons"}
    if unknown:
        raise LoraKitError(f"Unknown knob(s) {sorted(unknown)}. Knobs are: "
                           f"{[f.name for f in fields(CourseSettings) if f.name != 'reasons']}.")
    for name, value in overrides.items():
        knobs[name] = (value, "set by you in the knobs cell")
    values = {name: v for name, (v, _) in knobs.items()}
    reasons = {name: why for name, (_, why) in knobs.items()}
    return CourseSettings(**values, reasons=reasons)


def mount_drive(settings: CourseSettings) -> str:
    """Mount Google Drive in Colab when the knob asks for it; say what happened either way."""
    if not settings.use_drive:
        return f"Google Drive not mounted ({settings.reasons['use_drive']}); outputs go to {settings.output_dir}/"
    from google.colab import drive  # only reached inside Colab

    drive.mount(DRIVE_ROOT)
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    return f"Google Drive mounted: checkpoints, adapter and merged model go to {settings.output_dir}/"


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def notebook_defaults() -> None:
    """Readable tables and figures in a notebook; no loading bars in saved outputs."""
    import warnings

    import pandas as pd

    pd.set_option("display.max_colwidth", 160)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", "{:.4g}".format)
    try:
        import matplotlib
        from IPython import get_ipython

        matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100})
        shell = get_ipython()
        if shell is not None:  # show Figure objects returned by lora_kit as images, not as their repr
            shell.run_line_magic("matplotlib", "inline")
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    # Known and harmless here: a renamed TrainingArguments field inside TRL, and an optional bitsandbytes kernel.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def environment_report(hardware: Hardware | None = None) -> str:
    """The machine, what it implies for training, and the versions of the stack."""
    import importlib.metadata as md

    from .hardware import describe

    hw = hardware or detect_hardware()
    lines = [describe(hw)]
    lines.append(f"Training precision lora_kit will use: {hw.precision}; FlashAttention-2 available: "
                 f"{hw.supports_flash_attention_2}.")
    if hw.device == "cuda":
        lines.append("bitsandbytes uses its CUDA kernels for 8-bit and NF4.")
    else:
        lines.append("bitsandbytes runs 8-bit and NF4 on the CPU too (slower, same numbers).")
    versions = []
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    lines.append("Versions: " + ", ".join(versions))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def model_config(settings: CourseSettings):
    """The chosen model's config (a few kB; no weights are loaded)."""
    from transformers import AutoConfig

    from .models import resolve_model_name

    return AutoConfig.from_pretrained(resolve_model_name(settings.model))


def memory_estimates(config, r: int = 16, micro_batch: int = 1, seq_len: int = 2048) -> dict:
    """Estimated training memory of the four methods for ``config``, keyed by readable labels."""
    from .memory import compare_methods

    raw = compare_methods(config, r=r, micro_batch=micro_batch, seq_len=seq_len, gradient_checkpointing=True)
    return {METHOD_LABELS[m].replace(", ", "\n"): b for m, b in raw.items()}


def model_label(settings: CourseSettings) -> str:
    """A short readable name for the chosen model."""
    return "SmolLM2-135M-Instruct (embedded)" if settings.model == "embedded" else settings.model.split("/")[-1]


def memory_summary(breakdowns: dict) -> str:
    """One line per method: total GiB and its share of full fine-tuning."""
    full = next(iter(breakdowns.values())).total_gib
    lines = []
    for label, b in breakdowns.items():
        lines.append(f"{label.replace(chr(10), ', '):<22} {b.total_gib:7.2f} GiB  ({b.total_gib / full:6.1%} of full "
                     f"fine-tuning; {b.trainable_parameters:,} trainable of {b.parameters:,})")
    return "\n".join(lines)


def claims_table():
    """The seeds' memory claims next to lora_kit's estimate, as a DataFrame."""
    import pandas as pd

    from .memory import seed_claims

    rows = seed_claims()
    return pd.DataFrame([{k: r[k] for k in ("seed", "claim", "settings", "computed", "unit", "verdict")}
                         for r in rows])


# ---------------------------------------------------------------------------------------------
# LoRA on the live model
# ---------------------------------------------------------------------------------------------
def model_report(model, settings: CourseSettings) -> str:
    """What was loaded: class, parameters, how the linear weights are stored, memory, device."""
    from .memory import GIB
    from .train import _is_linear

    linear = next(m for n, m in model.named_modules() if _is_linear(m) and "lm_head" not in n)
    stored = {"Linear4bit": "NF4 codes (2 per byte)", "Linear8bitLt": "int8"}.get(type(linear).__name__,
                                                                                 str(linear.weight.dtype))
    count = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return (f"{model_label(settings)}: {type(model).__name__}, {count:,} parameters, "
            f"{model.config.num_hidden_layers} layers; linear weights stored as {stored}; "
            f"{model.get_memory_footprint() / GIB:.2f} GiB in memory, on {next(model.parameters()).device}")


def _linear_shapes(model, target_modules) -> list[tuple[str, int, int]]:
    from .train import _is_linear, find_target_modules

    targets = set(find_target_modules(model, target_modules))
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if _is_linear(m) and "lm_head" not in name and name.rsplit(".", 1)[-1] in targets]


def guard_cpu_nf4(model) -> str:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for fast CPU inference; returns what it did.

    On a CPU with AVX512-BF16, the first forward pass of a ``Linear4bit`` in eval mode without
    gradients rewrites its weight into a CPU-only packed layout, in place. The forward pass stays
    right, but the backward pass through the repacked weights is wrong (LoRA gradients measured at
    cosine ~0.05 against the unpacked model), so training after any evaluation would go astray.
    A no-op on a GPU and for 16-bit or 8-bit models.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    if not layers:
        return "No 4-bit layers that bitsandbytes would repack for the CPU: nothing to do."
    return f"{len(layers)} 4-bit layers keep their trainable layout (bitsandbytes' CPU repacking is off)."


def rank_table(model, ranks=(1, 4, 8, 16, 64, 256), target_modules="all-linear"):
    """Trainable LoRA parameters for each rank, counted from the live model's layer shapes.

    Every targeted layer W (d_out x d_in) gets A (r x d_in) and B (d_out x r): r * (d_in + d_out).
    """
    import pandas as pd

    shapes = _linear_shapes(model, target_modules)
    total = sum(p.numel() for p in model.parameters())
    if any(p.dtype == torch.uint8 for p in model.parameters()):  # NF4 packs two weights per byte
        total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    rows = []
    for r in ranks:
        n = sum(r * (d_in + d_out) for _, d_in, d_out in shapes)
        rows.append({"r": r, "adapted layers": len(shapes), "trainable (LoRA)": n, "base parameters": total,
                     "trainable share": f"{n / total:.3%}"})
    return pd.DataFrame(rows)


def first_lora_layer(model):
    """(name, module) of the first layer that carries a LoRA adapter."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            return name, module
    raise LoraKitError("No LoRA layer found: call lora_kit.add_lora(model, settings) first.")


def _prompt_inputs(model, tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return enc.to(next(model.parameters()).device)


@torch.no_grad()
def zero_init_check(model, tokenizer, prompt: str = "What is the capital of France?") -> str:
    """Show W, A, B of one adapted layer and that, with B = 0, adapter on == adapter off."""
    from .evaluate import adapter_disabled

    name, layer = first_lora_layer(model)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    enc = _prompt_inputs(model, tokenizer, prompt)
    model.eval()
    with adapter_disabled(model):
        base = model(**enc).logits.float()
    adapted = model(**enc).logits.float()
    return "\n".join([
        f"Layer {name}: W is {layer.out_features} x {layer.in_features} (frozen, {layer.base_layer.weight.dtype})",
        f"  A: {tuple(A.shape)}, random (std {A.float().std():.4f}); B: {tuple(B.shape)}, "
        f"all zeros: {bool((B == 0).all())}; scale alpha/r = {scale}",
        f"Logits for {enc['input_ids'].shape[1]} prompt tokens, adapter on vs off: "
        f"max |difference| = {(adapted - base).abs().max().item():.1e}",
    ])


@torch.no_grad()
def update_report(model) -> str:
    """After training: the size of (alpha/r)·B·A next to W, and W' = W + (alpha/r)·B·A checked on one layer."""
    from peft.utils.integrations import dequantize_bnb_weight

    name, layer = first_lora_layer(model)
    w = layer.base_layer.weight
    if w.dtype in (torch.uint8, torch.int8):  # NF4 codes or int8: back to real numbers first
        state = w.quant_state if w.dtype == torch.uint8 else layer.base_layer.state
        W = dequantize_bnb_weight(w, state)
    else:
        W = w
    W = W.float()
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    delta = layer.scaling["default"] * (B @ A)
    x = torch.randn(3, layer.in_features, device=W.device)
    layer.eval()
    out = layer(x.to(w.dtype if w.is_floating_point() else x.dtype)).float()
    by_formula = x @ (W + delta).T
    rel = (out - by_formula).abs().max().item() / out.abs().max().item()
    return "\n".join([
        f"Layer {name}: ||(alpha/r)·B·A|| / ||W|| = {delta.norm().item() / W.norm().item():.4f} "
        f"(rank of the update: {torch.linalg.matrix_rank(delta).item()} <= r = {A.shape[0]})",
        f"layer(x) vs x·(W + (alpha/r)·B·A)^T on random inputs: max relative difference {rel:.1e}",
    ])


# ---------------------------------------------------------------------------------------------
# QLoRA: a real weight, before quantization
# ---------------------------------------------------------------------------------------------
def original_weight(model_name: str, tensor_name: str = "model.layers.0.mlp.down_proj.weight") -> torch.Tensor:
    """One weight as stored in the checkpoint (16-bit, before quantization), read lazily from safetensors.

    Reads only that tensor from the already-downloaded shard, so it works after ``load_model`` offline,
    and costs no extra download or memory for a 7B model.
    """
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    from .models import resolve_model_name

    path = resolve_model_name(model_name)
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    shard = json.loads(Path(index).read_text())["weight_map"][tensor_name] if index else "model.safetensors"
    with safe_open(cached_file(path, shard), framework="pt") as f:
        return f.get_tensor(tensor_name)


def quantization_table(weight: torch.Tensor):
    """NF4, FP4 and int4 errors on ``weight`` (blocks of 64), as a DataFrame, best first."""
    import pandas as pd

    from .quant import quantization_error

    err = quantization_error(weight, blocksize=64)
    df = pd.DataFrame([{"format": k.upper(), "mean |W - Q(W)|": v["mean_abs_error"],
                        "relative RMS error": v["relative_rms_error"]} for k, v in err.items()])
    return df.sort_values("relative RMS error").reset_index(drop=True)


def bits_table(config):
    """Bits per parameter with and without double quantization, and what that means for ``config``'s weights."""
    import pandas as pd

    from .memory import GIB, _parameter_groups
    from .quant import bits_per_parameter

    n = _parameter_groups(config)["decoder_linear_weights"]
    rows = []
    for label, bits in (("16-bit (no quantization)", 16.0), ("NF4, fp32 block constants", bits_per_parameter(double_quant=False)),
                        ("NF4 + double quantization", bits_per_parameter(double_quant=True))):
        rows.append({"storage": label, "bits per parameter": round(bits, 3),
                     "quantized layers (GiB)": round(n * bits / 8 / GIB, 3)})
    return pd.DataFrame(rows)


def footprint_report(model, config) -> str:
    """The loaded model's real memory footprint, in bytes per parameter, next to the formats' costs."""
    from .memory import GIB, count_parameters

    real = model.get_memory_footprint()
    n = count_parameters(config)
    return (f"Loaded model: {real / GIB:.3f} GiB in memory for {n:,} parameters = {real / n:.2f} bytes per parameter "
            f"(fp32: 4, 16-bit: 2, int8: about 1, NF4: about 0.52, on the quantized layers only).")


def optimizer_report(settings: CourseSettings) -> str:
    """Which optimizer the trainer will really use here, and why."""
    from .train import sft_config

    resolved = sft_config(settings.train, "fp32", False).optim
    resolved = getattr(resolved, "value", resolved)
    note = "" if resolved == settings.optim else " (paged optimizers page through CUDA unified memory; no GPU here)"
    return f"Optimizer asked for: {settings.optim}; the trainer uses: {resolved}{note}"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_course_data(settings: CourseSettings):
    """(train, eval) ``messages`` datasets: the demo task, or a Hub/local data set split 90/10."""
    from .data import demo_task, split_train_eval
    from .formats import load_data

    if settings.dataset == "demo":
        return demo_task(settings.n_train, settings.n_eval, seed=0)
    ds = load_data(settings.dataset)
    train, held = split_train_eval(ds, eval_fraction=min(0.5, settings.n_eval / len(ds)), seed=0)
    if settings.n_train > 0:
        train = train.select(range(min(settings.n_train, len(train))))
    return train, held


def show_rows(dataset, n: int = 3, width: int = 90):
    """The first ``n`` conversations, one row each, one column per role."""
    import pandas as pd

    rows = []
    for messages in dataset["messages"][:n]:
        row = {}
        for m in messages:
            text = m["content"].replace("\n", " ")
            row[m["role"]] = text if len(text) <= width else text[: width - 3] + "..."
        rows.append(row)
    return pd.DataFrame(rows)


def show_loss_tokens(tokenizer, messages, max_length: int | None = None) -> str:
    """The rendered conversation token by token: loss-carrying tokens in [[ ]], the rest plain."""
    from .data import tokenize_conversation

    enc = tokenize_conversation(tokenizer, messages, max_length)
    pieces, in_loss = [], False
    for tid, label in zip(enc["input_ids"], enc["labels"]):
        text = tokenizer.decode([tid])
        if (label != -100) != in_loss:
            pieces.append("[[" if not in_loss else "]]")
            in_loss = not in_loss
        pieces.append(text)
    if in_loss:
        pieces.append("]]")
    n_loss = sum(label != -100 for label in enc["labels"])
    return ("".join(pieces) + f"\n\n{n_loss} of {len(enc['input_ids'])} tokens carry loss (inside [[ ]]): "
            "the answer and its end-of-turn token. The system prompt and the question are context only.")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def training_report(trainer, result) -> str:
    """Steps, time and the loss at the start and the end of training."""
    from .train import loss_history

    losses = loss_history(trainer)
    runtime = result.metrics.get("train_runtime", float("nan"))
    text = f"{result.global_step} optimizer steps in {runtime:.0f} s"
    if losses:
        first, last = losses[0], losses[-1]
        text += f"; loss {first[1]:.3f} at step {first[0]} -> {last[1]:.3f} at step {last[0]}"
    return text


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 between an answer and the reference answer: a rough score for open chat data."""
    from collections import Counter

    pred, ref = prediction.lower().split(), reference.lower().split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def scorer_for(settings: CourseSettings):
    """(name, function): exact match of the JSON for the demo task, word-overlap F1 for chat data."""
    from .data import json_exact_match

    if settings.dataset == "demo":
        return "JSON exact match", json_exact_match
    return "word-overlap F1 with the reference", token_f1


def before_after(model, tokenizer, eval_ds, settings: CourseSettings):
    """Perplexity and task score of the base (adapter off) and the fine-tuned model, as a DataFrame.

    Returns (table, predictions_after) so the side-by-side view reuses the answers.
    """
    import pandas as pd

    from .evaluate import GenerationSettings, adapter_disabled, perplexity, task_score

    name, scorer = scorer_for(settings)
    sample = eval_ds.select(range(min(settings.eval_samples, len(eval_ds))))
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    results = {}
    for label, disabled in (("base (adapter off)", True), ("fine-tuned (adapter on)", False)):
        ctx = adapter_disabled(model) if disabled else _nullcontext()
        with ctx:
            ppl = perplexity(model, eval_ds, tokenizer, max_length=settings.max_length)
            score = task_score(model, tokenizer, sample, scorer=scorer, settings=gen, batch_size=len(sample))
        results[label] = (ppl, score)
    table = pd.DataFrame({label: {f"perplexity ({len(eval_ds)} held-out answers)": ppl,
                                  f"{name} ({score.n} answers)": score.score}
                          for label, (ppl, score) in results.items()})
    return table, results


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def side_by_side(eval_ds, results, n: int = 4, width: int = 110):
    """Prompt, reference, base answer and fine-tuned answer for the first ``n`` held-out examples."""
    import pandas as pd

    def cut(text):
        text = text.replace("\n", " ")
        return text if len(text) <= width else text[: width - 3] + "..."

    base = results["base (adapter off)"][1].predictions
    tuned = results["fine-tuned (adapter on)"][1].predictions
    rows = []
    for i, messages in enumerate(eval_ds["messages"][:n]):
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        rows.append({"prompt": cut(prompt), "reference": cut(messages[-1]["content"]),
                     "base model": cut(base[i]), "fine-tuned": cut(tuned[i])})
    return pd.DataFrame(rows)


def tuned_answer(results, i: int = 0) -> str:
    """The fine-tuned model's answer to the i-th held-out prompt, from :func:`before_after`."""
    return results["fine-tuned (adapter on)"][1].predictions[i]


def system_prompt(settings: CourseSettings) -> str | None:
    """The system prompt the model was fine-tuned with (the demo task has one), for the chat box."""
    from .data import DEMO_SYSTEM

    return DEMO_SYSTEM if settings.dataset == "demo" else None


def chat_script(settings: CourseSettings) -> list[str] | None:
    """What the chat box sends when it cannot show a widget: two turns suited to the data."""
    if settings.dataset == "demo":
        return ["Aiko Tanaka paid $1,250 in Vienna on March 3, 2021.",
                "On 9 July 2015, Omar Haddad won 75 dollars in Lima."]
    return None  # lora_kit.chat's default two-turn script


def prompt_of(eval_ds, i: int = 0):
    """The i-th held-out conversation without its answer (system prompt kept), ready to generate from."""
    messages = eval_ds["messages"][i]
    return [m for m in messages if m["role"] != "assistant"]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def model_card(settings: CourseSettings, table=None) -> dict:
    card = {"base_model": settings.model, "method": settings.method,
            "lora": {"r": settings.r, "alpha": settings.alpha, "dropout": settings.dropout,
                     "targets": settings.target_modules},
            "data": settings.dataset, "steps": settings.max_steps}
    if table is not None:
        card["metrics"] = {f"{row} / {col}": round(float(v), 4) for col in table.columns
                           for row, v in table[col].items()}
    return card


def reload_kwargs(settings: CourseSettings) -> dict:
    """Keyword arguments for ``AutoPeftModelForCausalLM.from_pretrained``: the base stored as in training."""
    from .hardware import resolve_precision, torch_dtype
    from .models import quantization_config

    dtype = torch_dtype(resolve_precision("auto"))
    kwargs = {"dtype": dtype}
    q = quantization_config(settings.quantization, dtype)
    if q is not None:
        kwargs["quantization_config"] = q
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return kwargs


def merged_load_kwargs() -> dict:
    """Keyword arguments for loading a merged model: this machine's precision, on the GPU if there is one."""
    from .hardware import resolve_precision, torch_dtype

    kwargs = {"dtype": torch_dtype(resolve_precision("auto"))}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return kwargs


def hub_repo_id(settings: CourseSettings, token: str) -> str:
    """<your Hub user name>/<model>-<method>-lora_kit."""
    from huggingface_hub import HfApi

    user = HfApi(token=token).whoami()["name"]
    return f"{user}/{model_label(settings).split(' ')[0]}-{settings.method}-lora_kit"


def hub_token() -> tuple[str | None, str]:
    """(token, where it came from): HF_TOKEN, Colab's Secrets panel or a huggingface-cli login."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token, "the HF_TOKEN environment variable"
    if in_colab():
        try:
            from google.colab import userdata

            token = userdata.get("HF_TOKEN")
            if token:
                return token, "Colab's Secrets panel"
        except Exception:  # noqa: BLE001 - no secret set, or access not granted to this notebook
            pass
    try:
        from huggingface_hub import get_token

        token = get_token()
        if token:
            return token, "a saved huggingface-cli login"
    except Exception:  # noqa: BLE001
        pass
    return None, ("no Hugging Face token: set HF_TOKEN (Colab: the key icon, Secrets panel, name HF_TOKEN), "
                  "or run huggingface_hub.login()")


def folder_report(folder) -> str:
    """Files of a saved folder and their sizes."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    listed = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files if p.stat().st_size > 2**16)
    return f"{folder}: {len(files)} files, {total / 2**20:.1f} MiB in all. Largest: {listed}"


__all__ = [
    "CourseSettings", "course_settings", "mount_drive", "environment_report", "in_colab", "smoke_requested",
    "model_config", "memory_estimates", "memory_summary", "claims_table", "rank_table", "zero_init_check",
    "update_report", "guard_cpu_nf4", "original_weight", "quantization_table", "bits_table", "footprint_report", "optimizer_report",
    "load_course_data", "show_rows", "show_loss_tokens", "token_f1", "scorer_for", "before_after", "side_by_side",
    "prompt_of", "tuned_answer", "system_prompt", "chat_script", "model_card", "hub_token", "hub_repo_id",
    "reload_kwargs", "merged_load_kwargs", "folder_report", "training_report", "model_report", "model_label",
    "notebook_defaults", "replace",
]
