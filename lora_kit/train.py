"""LoRA settings, presets, target-module detection and the trainer.

``build_trainer`` returns a stock ``trl.SFTTrainer``: call ``.train()`` on it, read its
``state.log_history``, save it. lora_kit only chooses good settings and fixes the two things
that break learners' runs (adapter dtype under fp16, NaN/zero losses that go unnoticed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import nn

from . import distributed, speed
from .errors import LoraKitError
from .hardware import detect_hardware, resolve_precision
from .speed import Levers

Bias = Literal["none", "all", "lora_only"]
BIASES = get_args(Bias)


@dataclass
class LoraSettings:
    """What gets adapted and how strongly. W' = W + (alpha / r) * B @ A for each target layer."""

    r: int = 16
    """Rank of the update. Parameters and capacity grow linearly with r; 8-16 suits most
    instruction tuning, 64 is the QLoRA paper's choice to make up for the 4-bit base."""
    alpha: float = 32
    """Scale of the update is alpha / r. Keep alpha/r fixed when you change r and the learning
    rate stays about right (2 for the LoRA preset, 0.25 for QLoRA's r=64, alpha=16)."""
    dropout: float = 0.05
    """Dropout on the adapter's input. Regularises small data sets; 0 is fastest and fine for
    large ones (it also lets PEFT skip a copy of the activations)."""
    target_modules: str | list[str] = "all-linear"
    """Which linear layers get adapters: "all-linear" (attention and MLP projections, the QLoRA
    paper's finding: best quality for the parameter count), "attention" (q_proj and v_proj only,
    the original LoRA paper: fewest parameters), or an explicit list of module names."""
    bias: Bias = "none"
    """Train biases too: "none" (the usual choice; the adapter is self-contained), "lora_only"
    (biases of adapted layers), "all" (every bias; the saved adapter then changes the base)."""

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise LoraKitError(f"LoraSettings.r={self.r!r}: the rank must be a positive integer (8, 16, 64...).")
        if self.alpha <= 0:
            raise LoraKitError(
                f"LoraSettings.alpha={self.alpha!r} must be positive; the update is scaled by alpha / r."
            )
        if not 0 <= self.dropout < 1:
            raise LoraKitError(f"LoraSettings.dropout={self.dropout!r} must be in [0, 1).")
        if self.bias not in BIASES:
            raise LoraKitError(f"LoraSettings.bias={self.bias!r} is not one of {BIASES}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class TrainSettings:
    """How long and how fast to train. Defaults follow the seeds' LoRA column."""

    learning_rate: float = 1e-4
    """Adapters tolerate higher rates than full fine-tuning (1e-4 to 5e-4); too high and the
    loss jumps up after a few steps."""
    micro_batch_size: int = 1
    """Samples per forward pass. Memory grows with it; raise it until memory is nearly full."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step: the effective batch is micro_batch_size * this."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means run num_epochs over the data."""
    num_epochs: float = 1.0
    max_length: int = 2048
    """Longest sample in tokens; longer ones are cut (lora_kit reports how many)."""
    optim: str = "adamw_torch"
    """"paged_adamw_32bit" moves optimizer states to CPU RAM when the GPU runs short (QLoRA);
    it needs CUDA, so lora_kit uses plain AdamW on CPU."""
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    """Gradient clipping at 0.3, as in the QLoRA paper: keeps early adapter updates calm."""
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: ~30% slower, far less memory. Needed for 7B
    models on a T4; off is faster for small models on big GPUs."""
    offload_activations: bool = False
    """Keep the activations saved for backward (with checkpointing: each block's input) in CPU RAM instead of GPU
    memory (TRL's activation offloading): room for longer samples or more of them per micro-batch, at the price of
    copies over PCIe (a few percent of speed on packed rows, more on short steps) and about 0.25 MiB of pinned CPU RAM
    per token for a 7B model. CUDA only. With it the attention outputs wait in CPU RAM too (Levers.kept_attention,
    as much RAM again), so the recompute skips the attention kernel: faster on long samples."""
    tile_layers: bool = False
    """Run the per-token parts of each decoder layer, its MLP and RMSNorms, over the sequence in tiles of hidden_size
    tokens (the tiled MLP of Arctic long-sequence training, extended to the norms): the MLP keeps only its input and
    redoes its tiles in its backward pass, each norm tile runs under a checkpoint of its own. A long sample's MLP
    intermediates (four tensors of tokens x intermediate_size, 4 GiB at 49k tokens on a 7B) and the norms' fp32 copies
    then never exist whole, so longer samples fit: with offload_activations, the longest context on a T4. The norms
    run once more in the backward pass, and the blocks are not compiled."""
    logging_steps: int = 1
    save_steps: int = 50
    """Checkpoint every this many steps (keep 2), so a Colab disconnect loses little."""
    output_dir: str = "outputs/run"
    seed: int = 42
    fast: bool = True
    """Use lora_kit's speed levers where they are correct on this hardware (lora_kit.speed); False: the stock
    transformers + peft + trl recipe, every lever off."""
    levers: Levers | None = None
    """Each speed lever on, off or left to the machine, e.g. Levers(compile_blocks=False); None: Levers() with fast,
    Levers.off() without. A lever forced on where it cannot run is switched off with a printed reason."""
    report_to: str = "tensorboard"

    def __post_init__(self):
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        def need(ok, name, allowed):
            if not ok:
                raise LoraKitError(f"TrainSettings.{name}={getattr(self, name)!r}: {allowed}")

        def whole(name, low):
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def number(name):
            value = getattr(self, name)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(
            number("learning_rate") and self.learning_rate > 0,
            "learning_rate",
            "must be a positive number; adapters train well at 1e-4 to 5e-4.",
        )
        need(
            whole("micro_batch_size", 1), "micro_batch_size", "must be a whole number >= 1 (samples per forward pass)."
        )
        need(
            whole("gradient_accumulation_steps", 1),
            "gradient_accumulation_steps",
            "must be a whole number >= 1 (1 means one micro-batch per optimizer step).",
        )
        need(
            whole("max_steps", -1) and self.max_steps != 0,
            "max_steps",
            "must be a positive number of optimizer steps, or -1 to run num_epochs over the data.",
        )
        need(
            number("num_epochs") and (self.num_epochs > 0 or self.max_steps > 0),
            "num_epochs",
            "must be positive when max_steps is -1, or nothing would be trained. Give num_epochs (e.g. 1) or max_steps.",
        )
        need(
            whole("max_length", 1),
            "max_length",
            "must be a whole number of tokens >= 1; samples longer than that are cut (e.g. 512 or 2048).",
        )
        need(
            self.optim in {o.value for o in OptimizerNames},
            "optim",
            "is not an optimizer transformers knows. Use 'adamw_torch', or 'paged_adamw_32bit' for QLoRA on a GPU.",
        )
        need(
            self.lr_scheduler_type in {t.value for t in SchedulerType},
            "lr_scheduler_type",
            "is not a scheduler transformers knows. Use 'constant_with_warmup', 'cosine' or 'linear'.",
        )
        need(
            number("warmup_ratio") and 0 <= self.warmup_ratio < 1,
            "warmup_ratio",
            "is the fraction of steps spent warming up and must be in [0, 1), e.g. 0.03.",
        )
        need(
            number("max_grad_norm") and self.max_grad_norm >= 0,
            "max_grad_norm",
            "must be >= 0 (0 turns clipping off; 0.3 is the QLoRA paper's value).",
        )
        need(
            number("weight_decay") and self.weight_decay >= 0, "weight_decay", "must be >= 0 (0 is usual for adapters)."
        )
        need(
            isinstance(self.offload_activations, bool),
            "offload_activations",
            "must be True or False (True keeps saved activations in CPU RAM: longer contexts, slower steps).",
        )
        need(
            isinstance(self.tile_layers, bool),
            "tile_layers",
            "must be True or False (True computes MLPs and norms in tiles of the sequence: longer contexts, slower steps).",
        )
        need(whole("logging_steps", 1), "logging_steps", "must be a whole number of steps >= 1.")
        need(whole("save_steps", 1), "save_steps", "must be a whole number of steps >= 1 (checkpoint every N steps).")
        need(
            isinstance(self.output_dir, (str, os.PathLike)) and os.fspath(self.output_dir) != "",
            "output_dir",
            "must name a folder for checkpoints, e.g. 'outputs/run' (on Colab, a folder on Drive survives a disconnect).",
        )
        need(whole("seed", 0) and self.seed < 2**32, "seed", "must be a whole number from 0 to 2**32 - 1.")
        need(
            self.levers is None or isinstance(self.levers, Levers),
            "levers",
            "must be a lora_kit.speed.Levers, e.g. Levers(compile_blocks=False), or None to let the machine decide.",
        )
        need(
            self.fast or self.levers in (None, Levers.off()),
            "levers",
            "asks for levers while fast=False switches every lever off. Keep fast=True to choose levers one by one.",
        )

    @property
    def chosen_levers(self) -> Levers:
        """The levers asked for: `levers`, or Levers() with fast and Levers.off() without (None: the machine decides)."""
        if not self.fast:
            return Levers.off()
        return self.levers or Levers()


@dataclass
class Recipe:
    """A method in one object: what to load the base as, and how to adapt and train it."""

    method: str
    quantization: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)


def preset(method: str = "lora") -> Recipe:
    """The notebooks' recipe for ``method`` ("lora": 16-bit base, "lora8": 8-bit base, "qlora": NF4 base) as it runs
    on a T4, from the one table of recipes that the notebooks, the demo and the YAML configs read (``lora_kit.course``,
    each value with its reason: ``lora-kit config METHOD`` prints them)."""
    from .config import T4, recipe

    if method not in ("lora", "lora8", "qlora"):
        raise LoraKitError(f"preset: method={method!r} is not one of 'lora', 'lora8', 'qlora'.")
    settings = recipe(method, hardware=T4)
    return Recipe(method=method, quantization=settings.quantization, lora=settings.lora, train=settings.train)


def _is_linear(module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear in current releases; match by name to be safe.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def find_target_modules(model, which: str | list[str] = "all-linear") -> list[str]:
    """Names (last component) of the linear layers to adapt, found by walking the model.

    The output layer (lm_head) is never adapted: it is huge (vocab x hidden) and tied to the
    embeddings in many models.
    """
    found = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m) and "lm_head" not in name}
    )
    if which == "all-linear":
        return found
    wanted = ["q_proj", "v_proj"] if which == "attention" else list(which) if not isinstance(which, str) else [which]
    missing = [w for w in wanted if w not in found]
    if missing:
        raise LoraKitError(
            f"target_modules {missing} not found in {type(model).__name__}; its linear layers are {found}. "
            "Names differ between architectures (e.g. GPT-2 uses c_attn): pick from that list or use 'all-linear'."
        )
    return wanted


def add_lora(model, lora: LoraSettings):
    """Wrap a model with fresh LoRA adapters (B = 0, so the output is unchanged at first).

    A is drawn from torch's global generator; ``build_trainer`` draws it again from the run's seed.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=find_target_modules(model, lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    _adapters_to_fp32(peft_model)
    return peft_model


def seed_fresh_adapters(model, seed: int) -> bool:
    """Draw untrained adapters' A matrices again from ``seed``; return whether they were redrawn.

    PEFT draws A when the adapter is added, before the Trainer seeds anything, so without this
    two runs with the same seed start from different adapters. Trained adapters (B != 0) are kept.
    """
    from peft.tuners.lora import LoraLayer
    from transformers import set_seed

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(bool(b.weight.any()) for m in layers for b in m.lora_B.values()):
        return False
    set_seed(seed)
    for m in layers:
        for name in m.lora_A:
            m.reset_lora_parameters(name, init_lora_weights=True)
    return True


def _adapters_to_fp32(model) -> None:
    # fp16 trainable weights make the grad scaler fail ("Attempting to unscale FP16 gradients");
    # bf16 ones made QLoRA diverge on CPU. fp32 adapters cost little: they are ~1% of the model.
    speed.upcast_trainable_params(model)


class LossWatchdog:
    """Stops training with a clear message when the loss turns NaN/inf, or exactly 0 (fp16 overflow)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Watchdog(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if loss is None:
                    return
                if not math.isfinite(loss) or (loss == 0.0 and state.global_step > 1):
                    raise LoraKitError(
                        f"Training loss became {loss} at step {state.global_step}. With fp16 this is usually an "
                        "overflow: lower learning_rate (e.g. halve it), keep max_grad_norm at 0.3, and check the data "
                        "for empty answers. On a GPU with compute capability >= 8.0 use precision='bf16'."
                    )

        return _Watchdog()


class SeedAtStart:
    """Seeds every generator from ``args.seed`` when a fresh run starts (dropout, then anything else).

    The Trainer seeds once when it is built; whatever runs between that and ``train()`` (an
    evaluation, a sampled generation) would otherwise change the dropout masks. A resumed run
    gets its generators back from the checkpoint instead.
    """

    def __new__(cls):
        from transformers import TrainerCallback, set_seed

        class _SeedAtStart(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if state.global_step == 0:
                    set_seed(args.seed)

        return _SeedAtStart()


class CheckpointGuard:
    """Removes ``trainer_state.json`` from an older ``checkpoint-N`` just before transformers saves over it.

    transformers writes a checkpoint in place, its state last; a kill in the middle of saving over
    an older folder (a run started again with resume=False) would leave new weights beside the old
    state and optimizer, which looks complete. Without the state file the folder reads as unfinished.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _CheckpointGuard(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if control.should_save and args.should_save:
                    older = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "trainer_state.json")
                    if os.path.isfile(older):
                        os.remove(older)

        return _CheckpointGuard()


def sft_config(train: TrainSettings, precision: str, has_eval: bool, fast_kwargs: dict | None = None):
    from trl import SFTConfig

    hardware = detect_hardware()
    optim = train.optim
    if "paged" in optim and hardware.device != "cuda":
        optim = "adamw_torch"  # paged optimizers page optimizer state through CUDA unified memory
    if distributed.fsdp() and any(word in optim for word in ("paged", "bnb", "8bit", "32bit")):
        # bitsandbytes' optimizers hide their states from FSDP's checkpoint (nested in a dict FSDP cannot load
        # back), so a run could not resume; the adapters' states are sharded and small, torch's AdamW holds them.
        print(f"Optimizer: adamw_torch instead of {optim} under FSDP, so that its checkpoints resume")
        optim = "adamw_torch"
    steps_hint = train.max_steps if train.max_steps > 0 else None
    kwargs = dict(
        output_dir=train.output_dir,
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=max(train.micro_batch_size, 8),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=math.ceil(train.warmup_ratio * steps_hint) if steps_hint else train.warmup_ratio,
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        optim=optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        # The copies to CPU RAM go through CUDA streams and pinned memory: nothing to gain on a CPU.
        activation_offloading=train.offload_activations and hardware.device == "cuda",
        max_length=train.max_length,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.save_steps if has_eval else None,
        report_to=[train.report_to] if train.report_to and train.report_to != "none" else [],
        seed=train.seed,
        data_seed=train.seed,  # the data order, independent of what else drew from torch's generator
        dataloader_pin_memory=hardware.device == "cuda",
        # Processes launched together without a GPU train as one run (gloo) only when the Trainer is told to use the CPU.
        use_cpu=hardware.device == "cpu" and distributed.processes() > 1,
        # Every adapter weight takes part in every step: DDP need not search the graph for unused ones each step.
        ddp_find_unused_parameters=False,
    )
    kwargs.update(fast_kwargs or {})
    return SFTConfig(**kwargs)


def build_trainer(model, tokenizer, train_dataset, eval_dataset=None, *, lora=None, train=None, precision="auto"):
    """A ``trl.SFTTrainer`` for ``model`` (plain or already wrapped with ``add_lora``).

    ``train_dataset`` is a ``messages`` dataset (tokenized here with the chat template and
    assistant-only labels), a ``text`` dataset (raw text from ``load_data``: continued
    pre-training, every token learned) or already tokenized (``input_ids`` and ``labels``).
    ``train.seed`` decides the adapters' initial values, the data order and the dropout masks.
    """
    from trl import SFTTrainer

    from .quant import method_of

    lora = lora or LoraSettings()
    train = train or TrainSettings()
    precision = resolve_precision(precision)
    train_dataset, report = _tokenized(train_dataset, tokenizer, train.max_length, "train_dataset")
    if report:
        print(report)
    if eval_dataset is not None:
        eval_dataset, _ = _tokenized(eval_dataset, tokenizer, train.max_length, "eval_dataset")
    if not hasattr(model, "peft_config"):
        model = add_lora(model, lora)
    seed_fresh_adapters(model, train.seed)
    method = method_of(model)
    distributed.check_fsdp(method, precision, train.tile_layers)
    lengths = [len(ids) for ids in train_dataset["input_ids"]]
    levers, notes = train.chosen_levers.decide(
        detect_hardware(),
        precision,
        method,
        lengths,
        train.max_length,
        train.tile_layers,
        distributed.fsdp(),
        offloaded=train.offload_activations and train.gradient_checkpointing,
    )
    if levers.kept_attention and train.chosen_levers.kept_attention is None:
        if why := speed.kept_attention_too_large(model, train.micro_batch_size * train.max_length):
            levers = replace(levers, kept_attention=False)
            notes.append(f"kept_attention: off, {why}")
    for note in notes:
        print(f"Speed levers: {note}")
    if levers.on():
        print(f"Speed levers on: {', '.join(levers.on())} (TrainSettings(fast=False) switches them off)")
    micro, accum = speed.batch_shape(train.micro_batch_size, train.gradient_accumulation_steps, levers)
    if accum != train.gradient_accumulation_steps:
        print(
            f"Packing: each of the {micro} rows per step holds several samples of up to max_length tokens, so "
            f"gradient_accumulation_steps={train.gradient_accumulation_steps} becomes 1 "
            "(TrainSettings(levers=Levers(packing=False)) keeps it)."
        )
    micro, accum, shared = distributed.keep_one_process_batch(
        micro, accum, "packed rows" if levers.packing else "examples"
    )
    if shared:
        print(shared)
    train = replace(train, micro_batch_size=micro, gradient_accumulation_steps=accum)
    model = speed.prepare_model(model, levers)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(train, precision, eval_dataset is not None, speed.sft_settings(levers)),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[LossWatchdog(), SeedAtStart(), CheckpointGuard()],
    )
    # After the build: SFTTrainer casts a quantized model's adapters to bf16 while it is built, which fp16's grad
    # scaler cannot take (and on CPU QLoRA diverged), so the adapters go back to fp32 unless Levers.bf16_adapters.
    done = speed.after_trainer_built(trainer, levers)
    if train.tile_layers:
        mlps, norms = tile_layers(trainer.model)
        print(f"Tiled layers: {mlps} MLPs and {norms} norms computed in tiles of {_hidden_size(trainer.model)} tokens")
    if train.fast:
        for line in done:
            print(f"Fast path: {line}")
    return trainer


def tile_layers(model, tokens: int | None = None) -> tuple[int, int]:
    """Make each decoder layer's MLP and norms, and the final norm, run over the sequence in tiles of ``tokens``
    (default: hidden_size, for which a tile's MLP intermediates weigh about as much as the MLP's weights); returns
    how many MLPs and norms.

    With gradients on, the backward pass recomputes and frees one tile's intermediates at a time: an MLP keeps only
    its input and redoes its tiles in its own backward (_TiledMLP), a norm runs each tile under a checkpoint of its
    own. Without gradients (evaluation) the tiles only bound the temporaries. These modules act on each token alone,
    so the output equals the untiled one. Calling it again changes nothing.
    """
    tile = tokens or _hidden_size(model)
    mlps = norms = 0
    for parent in model.modules():
        layer = type(parent).__name__.endswith("DecoderLayer")
        if not layer and not isinstance(getattr(parent, "layers", None), nn.ModuleList):
            continue
        for name, module in parent.named_children():
            # A layer's own norms and the final norm see (batch, tokens, hidden); norms inside attention see heads.
            is_norm = "norm" in name.lower()
            if not is_norm and not (layer and name == "mlp"):
                continue
            if not getattr(module, "_lora_kit_tiled", False):
                # A norm after the MLP (Gemma 2, OLMo 2: post_feedforward_layernorm) reads its output in the recompute.
                last = not is_norm and not any("feedforward" in n for n, _ in parent.named_children())
                module.forward = _tiled(
                    module.forward,
                    tile,
                    checkpointed=is_norm,
                    output_unread_in_recompute=last,
                    params=module.parameters,
                )
                module._lora_kit_tiled = True
            norms += is_norm
            mlps += not is_norm
    return mlps, norms


def _tiled(forward, tile: int, checkpointed: bool = True, output_unread_in_recompute: bool = False, params=tuple):
    """``forward`` over tiles of ``tile`` tokens. ``params`` gives the module's parameters at each call (adapters
    added after tiling count too), whose gradients the ``_TiledMLP`` of an unchecked tiling returns."""
    from torch.utils.checkpoint import checkpoint

    def tiled_forward(x):
        if x.shape[-2] <= tile:
            return forward(x)
        if torch.is_grad_enabled() and not checkpointed:
            return _TiledMLP.apply(x, forward, tile, output_unread_in_recompute, *params())
        parts = x.split(tile, dim=-2)
        if torch.is_grad_enabled():
            outs = [checkpoint(forward, part, use_reentrant=False) for part in parts]
        else:
            outs = [forward(part) for part in parts]
        return _joined(outs, forward)

    return tiled_forward


def _joined(outs: list, forward) -> torch.Tensor:
    if not isinstance(outs[0], torch.Tensor):  # a mixture of experts' MLP also returns its router's logits
        raise LoraKitError(
            f"tile_layers: {forward.__qualname__} returns a {type(outs[0]).__name__}, not one tensor, so its "
            "tiles cannot be joined. Train this model with TrainSettings(tile_layers=False)."
        )
    return torch.cat(outs, dim=-2)


class _TiledMLP(torch.autograd.Function):
    """An MLP over the sequence in tiles that keeps only its input for the backward pass (as Arctic's TiledMLP).

    The backward pass redoes one tile at a time with gradients on and backpropagates it at once, so one tile's
    intermediates are alive at a time. The module's parameters are inputs of the Function and their gradients, summed
    over the tiles, its outputs: each reaches ``.grad`` once per backward pass, as DistributedDataParallel expects.
    Under gradient checkpointing the layer's recompute, which runs inside the backward pass, only needs the MLP to
    keep its input again. Where the layer adds the MLP's output to the residual stream and nothing else reads it
    (``output_unread_in_recompute``), the recompute skips the MLP, so each tile's MLP runs twice per step (forward,
    backward) instead of three times.
    """

    @staticmethod
    def forward(ctx, x, forward, tile, output_unread_in_recompute, *params):
        ctx.forward, ctx.tile, ctx.params = forward, tile, params
        ctx.save_for_backward(x)
        # The backward pass redoes the tiles as the forward pass did them: same autocast, same dropout masks.
        device = x.device.type
        ctx.autocast = dict(
            device_type=device, enabled=torch.is_autocast_enabled(device), dtype=torch.get_autocast_dtype(device)
        )
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        if output_unread_in_recompute and torch._C._current_graph_task_id() != -1:  # a recompute in the backward pass
            return torch.empty_like(x)
        with torch.no_grad(), _dequantized_once(forward):
            return _joined([forward(part) for part in x.split(tile, dim=-2)], forward)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        wanted = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[4:]) if needed]
        x_grads, param_grads = [], [None] * len(wanted)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), _dequantized_once(ctx.forward):
            torch.set_rng_state(ctx.rng[0])
            if x.is_cuda:
                torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for part, part_grad in zip(x.split(ctx.tile, dim=-2), grad.split(ctx.tile, dim=-2)):
                part = part.detach().requires_grad_(ctx.needs_input_grad[0])
                # Identity hooks over any of the run's own: activation offloading's stay on through the backward
                # pass and would take this tile's intermediates to its stash, where they outlive the tile.
                with torch.enable_grad(), torch.autocast(**ctx.autocast), _kept_on_device():
                    out = ctx.forward(part)
                inputs = [part, *wanted] if ctx.needs_input_grad[0] else wanted
                grads = list(torch.autograd.grad(out, inputs, part_grad, allow_unused=True))
                if ctx.needs_input_grad[0]:
                    x_grads.append(grads.pop(0))
                for i, g in enumerate(grads):
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
        found = iter(param_grads)
        params = [next(found) if needed else None for needed in ctx.needs_input_grad[4:]]
        return (torch.cat(x_grads, dim=-2) if ctx.needs_input_grad[0] else None), None, None, None, *params


@contextlib.contextmanager
def _dequantized_once(forward):
    """Within the block, each 4-bit base layer of ``forward``'s module multiplies by its weight dequantized here, once,
    where bitsandbytes dequantizes it again at every call, forward and backward: a tiled MLP's tiles then share one
    16-bit copy of each weight per pass (about 260 MiB for a 7B's MLP while it runs) instead of dequantizing it
    three times per tile. The product is the one bitsandbytes computes from the same dequantized weight."""
    module = getattr(forward, "__self__", None)
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layer exists
    layers = [
        m
        for m in (module.modules() if bnb and isinstance(module, nn.Module) else ())
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None
    ]
    if not layers:
        yield
        return
    from bitsandbytes.functional import dequantize_4bit

    for layer in layers:
        layer.forward = functools.partial(
            _dense_forward, layer, dequantize_4bit(layer.weight, layer.weight.quant_state)
        )
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def _dense_forward(layer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward with its weight already dequantized: the same dtypes in and out."""
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    dtype = layer.compute_dtype or x.dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), weight.to(dtype), bias).to(x.dtype)


def _kept_on_device():
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor)


def _hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def _tokenized(dataset, tokenizer, max_length: int, name: str):
    """``dataset`` as input_ids and labels, with the tokenizing report (None when it came tokenized)."""
    from .data import tokenize_conversations, tokenize_texts

    columns = dataset.column_names
    if "messages" in columns:
        return tokenize_conversations(dataset, tokenizer, max_length)
    if "text" in columns:
        return tokenize_texts(dataset, tokenizer, max_length)
    if "input_ids" in columns:
        return dataset, None
    raise LoraKitError(
        f"{name} has columns {columns}; build_trainer needs 'messages' (conversations), 'text' (raw text) or "
        "'input_ids' (already tokenized). Load data with lora_kit.load_data, which gives one of the first two."
    )


def _checkpoint_problem(folder: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return "it has no trainer_state.json, which transformers writes last: its save was interrupted"
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return "its trainer_state.json is cut short: its save was interrupted"
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "adapter_model.bin")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in weights):
        return "it holds no model weights"
    return None


def find_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint in ``output_dir`` and a note for each newer one passed over.

    transformers writes ``checkpoint-N`` in place, ``trainer_state.json`` last, so a kill during
    a save leaves the newest folder incomplete. Nothing is deleted: the next save of that step
    writes over it, and transformers' rotation removes it later.
    """
    if not os.path.isdir(output_dir):
        return None, []
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        problem = _checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"Skipped {folder}: {problem}.")
    return None, skipped


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir, for resuming after a disconnect."""
    return find_checkpoint(output_dir)[0]


def train(trainer, resume: bool = True):
    """Run ``trainer.train()``, resuming from the newest complete checkpoint in its output folder if there is one."""
    checkpoint, skipped = find_checkpoint(trainer.args.output_dir) if resume else (None, [])
    for note in skipped:
        print(note)
    if checkpoint and not distributed.fsdp() and os.path.isfile(os.path.join(checkpoint, "pytorch_model_fsdp.bin")):
        raise LoraKitError(
            f"{checkpoint} was written by an FSDP run (it holds pytorch_model_fsdp.bin), which only an FSDP launch "
            "resumes. Launch as that run was (accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml "
            "...), or train from the start with resume: false."
        )
    if checkpoint and (done := _finished(checkpoint)):
        return _load_finished(trainer, checkpoint, done)
    if checkpoint:
        print(f"Resuming from {checkpoint}")
    elif skipped:
        print("No complete checkpoint: training starts from the beginning.")
    if torch.cuda.is_available():  # the peak a report reads afterwards is training's own, not the loading's
        torch.cuda.reset_peak_memory_stats()
    return trainer.train(resume_from_checkpoint=checkpoint)


def _finished(checkpoint: str):
    """The checkpoint's TrainerState when it holds every step of its run (None otherwise)."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def _load_finished(trainer, checkpoint: str, state):
    """A finished run run again: its adapter and history from the last checkpoint, and no step trained.

    transformers' loop checks for the last step only after taking one, so resuming a finished run would train one
    step past it (and change the adapter) each time the run is started again.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers.trainer_utils import TrainOutput

    print(f"{checkpoint} holds all {state.global_step} steps of this run: its adapter is loaded, nothing is retrained.")
    device = next(trainer.model.parameters()).device
    set_peft_model_state_dict(trainer.model, load_peft_weights(checkpoint, device=str(device)))
    trainer.state = state
    losses = [loss for _, loss in loss_history(trainer)]
    return TrainOutput(state.global_step, losses[-1] if losses else float("nan"), {"train_runtime": 0.0})


def loss_history(trainer) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def plot_loss(trainer, title: str = "Training loss"):
    """The loss curve from the trainer's log, with the learning-rate schedule beside it, as a matplotlib Figure."""
    import matplotlib.pyplot as plt

    points = loss_history(trainer)
    rates = [(h["step"], float(h["learning_rate"])) for h in trainer.state.log_history if "learning_rate" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens only)")
    if rates:
        # A second y axis: the rate is around 1e-4 and the loss around 1, so one axis would flatten the rate.
        lr_ax = ax.twinx()
        lines += lr_ax.plot(
            [r[0] for r in rates], [r[1] for r in rates], color="tab:orange", linestyle="--", label="learning rate"
        )
        lr_ax.set_ylabel("learning rate (dashed)")
        lr_ax.set_ylim(bottom=0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = [
    "LoraSettings",
    "TrainSettings",
    "Levers",
    "Recipe",
    "preset",
    "find_target_modules",
    "add_lora",
    "build_trainer",
    "seed_fresh_adapters",
    "train",
    "find_checkpoint",
    "last_checkpoint",
    "loss_history",
    "plot_loss",
    "replace",
]
