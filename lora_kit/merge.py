"""Save adapters, merge them into the base's 16-bit weights, prove the merge.

Never merge into quantized weights: rounding W + (alpha/r)BA back to 4 (or 8) bits throws most of the small update
away. ``merge_adapter`` reads the base's safetensors one tensor at a time, adds the update in fp32 and writes the
stored precision, so no second copy of the model is ever held (a 7B merges on a free Colab); every shard is read back.
A QLoRA adapter was trained against the NF4 weights: ``base="original"`` merges into the base's own weights (the
default), ``base="dequantized"`` into the NF4 weights dequantized, and ``compare_merge_bases`` measures both.

    adapter_dir = save_adapter(model, tokenizer, "out/adapter", card)   # small; loads with peft alone
    free_memory(trainer, model); del trainer, model; free_memory()      # before reloading the base
    check = merge_adapter(adapter_dir, "out/merged", card=card)         # loads with transformers alone
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors import torch as safetensors_torch

from .data import render_chat
from .errors import LoraKitError
from .files import atomic_folder, check_disk_space, check_target
from .hub import write_model_card
from .quant import dequantize_4bit_weight, dequantize_int8_weight, quantization_of, round_trip


logger = logging.getLogger(__name__)

ADAPTER_META = "lora_kit_adapter.json"
"""Written beside an adapter: how its base was quantized in training (for base='dequantized')."""


def free_memory(*objects) -> None:
    """Drop references and return GPU memory, e.g. the training model before reloading the base.

    Chat boxes, a trainer's optimizer, scheduler, callback handler and accelerator, and compiled code let go of
    the objects too. Then ``del`` your own names and call it once more with none: a model is full of reference
    cycles, which only the collector frees::

        free_memory(trainer, model)
        del trainer, model
        free_memory()
    """
    import sys

    from .chat import release_models

    release_models(objects)
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            continue
        # A trainer holds the model, the optimizer (2 states per trainable weight) and the dataloader.
        for attr in ("model", "model_wrapped", "optimizer", "lr_scheduler"):
            if hasattr(obj, attr):
                with contextlib.suppress(Exception):
                    setattr(obj, attr, None)
        handler = getattr(obj, "callback_handler", None)
        for attr in ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"):
            if hasattr(handler, attr):
                setattr(handler, attr, None)
        accelerator = getattr(obj, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "free_memory"):
            accelerator.free_memory()  # its lists of prepared models and optimizers
    obj = objects = None  # the loop's own references
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()  # compiled blocks keep their modules in the compiled code's guards
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- Adapters ---------------------------------------------------------------------------------


def save_adapter(model, tokenizer, out_dir, card: dict | None = None) -> Path:
    """Save the adapter with the tokenizer and its chat template beside it.

    The folder loads without lora_kit: ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)``
    (the base is found through ``base_model_name_or_path`` in adapter_config.json), or
    ``PeftModel.from_pretrained(base_model, out_dir)``.
    """
    if not hasattr(model, "peft_config"):
        raise LoraKitError(
            f"save_adapter needs a PEFT model (with LoRA adapters); got {type(model).__name__}. "
            "Wrap it with lora_kit.add_lora(model, settings) and train it, or pass trainer.model."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise LoraKitError(
            "The tokenizer has no chat template; the adapter would be served with a different prompt format than "
            "it was trained on. Use the tokenizer returned by lora_kit.load_model (it always has one)."
        )
    quantization = quantization_of(model)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"base_quantization": quantization, "base_fingerprint": base_fingerprint(model)}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        if card:
            write_model_card(tmp, {"lora": _lora_settings_of(tmp), **card, "kind": "LoRA adapter"})
    return Path(out_dir)


_FINGERPRINT_ROWS = (0, 1, 2, 3)


def base_fingerprint(model) -> dict:
    """A few values of the base's input embeddings (never quantized), to recognise the base at merge time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.get_input_embeddings().weight
    return {
        "hidden_size": int(weight.shape[1]),
        "values": [round(float(v), 6) for v in weight[list(_FINGERPRINT_ROWS), :8].detach().float().flatten()],
    }


def _json_or_empty(file: Path) -> dict:
    return json.loads(file.read_text()) if file.is_file() else {}


def _adapter_meta(adapter_dir: Path) -> dict:
    """What save_adapter recorded beside the adapter; empty for an adapter from elsewhere."""
    return _json_or_empty(Path(adapter_dir) / ADAPTER_META)


def _check_fingerprint(adapter_dir: Path, base_name: str, weight_files: dict[str, Path]) -> None:
    """Refuse to merge into weights other than those the adapter was trained on (same name, other model)."""
    recorded = _adapter_meta(adapter_dir).get("base_fingerprint")
    name = next((n for n in weight_files if n.endswith("embed_tokens.weight")), None)
    if not recorded or name is None:
        return  # an adapter from elsewhere, or an architecture with other names: nothing to compare
    embeddings = _read_tensor(weight_files[name], name)
    values = embeddings[list(_FINGERPRINT_ROWS), :8].float().flatten()
    same = embeddings.shape[1] == recorded["hidden_size"] and torch.allclose(
        values, torch.tensor(recorded["values"]), rtol=2e-2, atol=1e-4
    )
    if not same:
        raise LoraKitError(
            f"The adapter in {adapter_dir} was trained on other weights than those of the base {base_name!r} found now "
            f"({weight_files[name].parent}): their input embeddings differ. The name in adapter_config.json "
            "(base_model_name_or_path) now points at another model. Pass base_model='...' with the model the adapter "
            "was trained on; nothing was written."
        )


def _adapter_config(adapter_dir: Path) -> dict:
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise LoraKitError(
            f"{adapter_dir} is not an adapter folder: adapter_config.json is missing. "
            "Pass the folder written by lora_kit.save_adapter (or PeftModel.save_pretrained)."
        )
    return json.loads(config_file.read_text())


def _lora_settings_of(adapter_dir: Path) -> dict:
    config = _adapter_config(adapter_dir)
    targets = config.get("target_modules")
    return {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "targets": sorted(targets) if isinstance(targets, (list, set)) else targets,
    }


def _adapter_quantization(adapter_dir: Path) -> str:
    # An adapter from elsewhere: base="dequantized" is asked for QLoRA adapters.
    return _adapter_meta(adapter_dir).get("base_quantization", "nf4")


def _adapter_tokenizer(adapter_dir: Path, fallback):
    """The tokenizer saved with the adapter (the training one, with its chat template), else ``fallback``."""
    from transformers import AutoTokenizer

    from .models import prepare_tokenizer

    if any((Path(adapter_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return prepare_tokenizer(AutoTokenizer.from_pretrained(adapter_dir))
    return fallback


def merge_in_place(model):
    """Merge and unload adapters of a PEFT model on a 16-bit base; refuses quantized bases."""
    quantization = quantization_of(model)
    if quantization != "none":
        raise LoraKitError(
            f"Refusing to merge adapters into {quantization} weights: the merged update (alpha/r)*B@A is far smaller "
            f"than the {quantization} rounding step, so most of what training learned would be rounded away. "
            "Save the adapter, then call lora_kit.merge_adapter(adapter_dir, out_dir): it reloads the base in 16-bit "
            "and merges there."
        )
    return model.merge_and_unload()


# --- Dequantizing -----------------------------------------------------------------------------


@torch.no_grad()
def dequantize_model(model, dtype: torch.dtype | None = None):
    """Replace every 4-bit / 8-bit bitsandbytes Linear by an ``nn.Linear`` holding its dequantized weight.

    The result is a plain model: no quantization config, saves and loads like any checkpoint.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit_weight(module.weight)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = dequantize_int8_weight(module)
        else:
            continue
        out_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        dense = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=out_dtype
        )
        dense.weight.copy_(weight.to(out_dtype))
        if module.bias is not None:
            dense.bias.copy_(module.bias.data.to(out_dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    # Marked unquantized first: transformers refuses to cast a model it thinks is bitsandbytes-quantized.
    model.lora_kit_quantization = "none"
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "hf_quantizer", "quantization_method"):
        if getattr(model, attr, None):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False if attr.startswith("is_") else None)
    if getattr(model, "config", None) is not None:
        _drop_quantization_config(model.config)
    if dtype is not None:
        model.to(dtype)
    return model


def _drop_quantization_config(config) -> None:
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)


def load_base_for_merge(base_name: str, base: str = "original", precision: str = "auto", quantization: str = "nf4"):
    """The base model in 16-bit (fp32 on CPU) for merging.

    base="original": the base's own 16-bit weights (what users expect; the default).
    base="dequantized": the ``quantization`` (nf4 or 8bit) weights, dequantized to 16-bit: exactly
    what a QLoRA adapter was trained against, so the merged model reproduces the adapter's
    behaviour on the 4-bit base.
    """
    from .hardware import resolve_precision, torch_dtype
    from .models import load_model

    if base not in ("original", "dequantized"):
        raise LoraKitError(f"base={base!r} is not 'original' or 'dequantized'.")
    if base == "original" or quantization == "none":
        if base == "dequantized":
            logger.info("The adapter was trained on an unquantized base: base='dequantized' is the original base.")
        model, tokenizer = load_model(base_name, "none", precision=precision)
    else:
        model, tokenizer = load_model(base_name, quantization, precision=precision)
        # prepare_model_for_kbit_training put norms in fp32 and input grads on: undo both for inference.
        with contextlib.suppress(Exception):
            model.disable_input_require_grads()
        model = dequantize_model(model, torch_dtype(resolve_precision(precision)))
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


# --- Merging and proving it -------------------------------------------------------------------


@dataclass
class MergeCheck:
    """How a merge was proven: each weight as written, and the logits where the model fits memory."""

    ok: bool = False
    base: str = "original"
    tensors_merged: int = 0  # weights that received an update
    tensors_written: int = 0  # all weights, each read back from disk and compared
    update_kept: float = 1.0  # worst share of (alpha/r)·B·A that survived rounding to the stored dtype
    logits_checked: bool = False
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None  # max |merged - adapter| / max |adapter logits|
    same_argmax: bool | None = None  # where the adapter's most-likely token is clear (not a near-tie)
    near_ties: int | None = None  # positions whose top two logits lie within the tolerance: rounding may swap them
    positions: int | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return self.__dict__.copy()

    def __str__(self) -> str:
        text = (
            f"Merge into the {self.base} weights: {'ok' if self.ok else 'FAILED'}. {self.tensors_merged} weights got "
            f"the update W + (alpha/r)·B·A, {self.tensors_written} tensors written and read back; at worst "
            f"{self.update_kept:.1%} of an update survived rounding to the stored precision."
        )
        if self.logits_checked:
            text += (
                f"\nLogits on {len(CHECK_PROMPTS)} prompts, merged vs base + adapter: max relative difference "
                f"{self.max_rel_diff:.1e}, same most-likely token wherever it is clear: {self.same_argmax}"
            )
            text += (
                f" ({self.near_ties} of {self.positions} positions are near-ties, where 16-bit rounding alone may "
                "swap the top two)."
                if self.near_ties
                else " (at every position)."
            )
        elif self.note:
            text += f"\n({self.note}.)"
        return text


CHECK_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "John paid $20 in Paris."]


@torch.no_grad()
def _logits(model, tokenizer, prompts) -> torch.Tensor:
    texts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    enc = enc.to(next(model.parameters()).device)
    model.eval()
    logits = model(**enc).logits.float()
    return logits[enc["attention_mask"].bool()].cpu()


# 16-bit storage moves the logits by up to ~1.4% of the largest; a wrong base or scale moves them by tens of percent.
LOGITS_TOLERANCE = 0.02


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, tolerance: float = LOGITS_TOLERANCE) -> MergeCheck:
    """Merged vs base + adapter logits (positions x vocabulary): within ``tolerance`` of the largest logit, and
    the same most-likely token wherever the reference's top two are further apart than that (a near-tie
    can flip under rounding alone; random-weight models are full of them)."""
    scale = max(reference.abs().max().item(), 1e-12)
    diff = (merged - reference).abs().max().item()
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > tolerance * scale
    same = bool((merged.argmax(-1) == reference.argmax(-1))[clear].all())
    return MergeCheck(
        max_abs_diff=diff,
        max_rel_diff=diff / scale,
        same_argmax=same,
        ok=same and diff / scale < tolerance,
        near_ties=int((~clear).sum()),
        positions=clear.numel(),
    )


def merged_model(
    adapter_dir, *, base: str = "original", precision: str = "auto", tolerance: float = LOGITS_TOLERANCE, prompts=None
):
    """Load the base, apply the adapter, merge, and prove it; return ``(merged, tokenizer, check)``.

    The merge and its check run in fp32, so the check measures the merge and not 16-bit rounding;
    the merged model is then cast to this machine's precision. Nothing is written. Raises when the
    merged logits disagree with base + adapter's.
    """
    from .hardware import resolve_precision, torch_dtype

    adapter_dir = Path(adapter_dir)
    base_name = _adapter_config(adapter_dir)["base_model_name_or_path"]
    model, base_tokenizer = _fp32_adapted(adapter_dir, base_name, base, precision, _adapter_quantization(adapter_dir))
    tokenizer = _adapter_tokenizer(adapter_dir, base_tokenizer)
    prompts = prompts or CHECK_PROMPTS
    reference = _logits(model, tokenizer, prompts)
    merged = model.merge_and_unload()
    check = compare_logits(reference, _logits(merged, tokenizer, prompts), tolerance)
    check.base = base
    merged.to(torch_dtype(resolve_precision(precision)))  # proven in fp32; used in this machine's precision
    _refuse_disagreement(check, tolerance, adapter_dir, base_name)
    _set_generation_tokens(merged.generation_config, merged.config, tokenizer)
    return merged, tokenizer, check


def _refuse_disagreement(check: MergeCheck, tolerance: float, adapter_dir, base_name: str) -> None:
    if not check.ok:
        raise LoraKitError(
            f"The merged model disagrees with base+adapter (max relative difference {check.max_rel_diff:.2e}, "
            f"tolerance {tolerance}; same argmax: {check.same_argmax}); nothing was saved. "
            f"Was the adapter in {adapter_dir} trained on {base_name}?"
        )


def _set_generation_tokens(generation, config, tokenizer) -> None:
    """The generation config stops at the tokenizer's EOS (the end of the answer) and pads with its pad token."""
    eos = generation.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation.pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "bos_token_id", None) is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id


EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "README.md")


def _check_export(folder: Path) -> None:
    missing = [f for f in EXPORT_FILES if not (folder / f).is_file()]
    missing += [] if any(folder.glob("*.safetensors")) else ["*.safetensors"]
    shards = _json_or_empty(folder / "model.safetensors.index.json").get("weight_map", {}).values()
    missing += sorted({f for f in shards if not (folder / f).is_file()})
    tokenizer_config = _json_or_empty(folder / "tokenizer_config.json")
    if not (folder / "chat_template.jinja").is_file() and "chat_template" not in tokenizer_config:
        missing.append("chat template")
    if missing:
        raise LoraKitError(
            f"The export in {folder} is incomplete (missing: {', '.join(missing)}); nothing was moved into place."
        )


def merge_adapter(
    adapter_dir,
    out_dir,
    *,
    base: str = "original",
    precision: str = "auto",
    card: dict | None = None,
    tolerance: float = LOGITS_TOLERANCE,
    max_shard_size: str = "1GB",
    check_logits: str | bool = "auto",
    base_model: str | None = None,
) -> MergeCheck:
    """Write W' = W + (alpha/r)·B·A into a plain model folder, one tensor at a time.

    Each weight is read from the base's safetensors, merged in fp32 (on the GPU when there is one), cast back to
    its stored dtype, written in shards of ``max_shard_size`` and read back. ``base="dequantized"`` first rounds
    every quantized layer the way training saw it (NF4 or int8). ``base_model`` points at the base when the name
    recorded in the adapter no longer finds it. ``check_logits`` also compares the logits with base + adapter's
    (``"auto"``: when an fp32 copy fits memory); a failed check raises and leaves no output folder. The folder
    (config, generation config with EOS and pad, the training tokenizer, a model card) loads with transformers alone.
    """
    from .hardware import resolve_precision, torch_dtype
    from .models import load_tokenizer

    adapter_dir = Path(adapter_dir)
    check_target(out_dir, inputs=(adapter_dir,))  # before any work: never over the adapter or the user's files
    if base not in ("original", "dequantized"):
        raise LoraKitError(f"base={base!r} is not 'original' or 'dequantized'.")
    config = _adapter_config(adapter_dir)
    base_name = base_model or config["base_model_name_or_path"]
    quantization = _adapter_quantization(adapter_dir) if base == "dequantized" else "none"
    base_dir, weight_files = _base_weight_files(base_name, adapter_dir)
    updates, replaced = _adapter_tensors(adapter_dir, config)
    _check_fingerprint(adapter_dir, base_name, weight_files)
    plan = _shard_plan(weight_files, replaced, max_shard_size)
    needed = sum(size for shard in plan for _, size in shard)
    check_disk_space(Path(out_dir).parent, needed, "the merged model", "out_dir")
    quantized = _quantized_weight_names(base_dir) if quantization != "none" else set()
    train_dtype = torch_dtype(resolve_precision(precision))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = _adapter_tokenizer(adapter_dir, None) or load_tokenizer(base_name)

    check = MergeCheck(base=base)
    merged_names: set[str] = set()
    with atomic_folder(out_dir, inputs=(adapter_dir,)) as tmp:
        index = {}
        for i, shard in enumerate(plan):
            file_name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1 else "model.safetensors"
            written = {}
            for name, _ in shard:
                w = _read_tensor(weight_files[name], name) if name in weight_files else None
                if name in replaced:
                    written[name] = replaced[name].to(w.dtype if w is not None else replaced[name].dtype).contiguous()
                    continue
                W = w.to(device, torch.float32)
                if name in quantized:
                    W = round_trip(W, quantization, train_dtype)
                update = updates.get(name)
                if update is not None:
                    delta = update.delta(device)
                    out = (W + delta).to(w.dtype)
                    check.update_kept = min(check.update_kept, _update_kept(out, W, delta))
                    merged_names.add(name)
                else:
                    out = W.to(w.dtype) if name in quantized else w
                if not torch.isfinite(out).all():
                    raise LoraKitError(
                        f"Merging {name} overflowed {w.dtype} (inf or NaN in W + (alpha/r)·B·A); nothing was saved. "
                        "The adapter's update is far larger than the weight: check how it was trained."
                    )
                written[name] = out.cpu().contiguous()
            safetensors_torch.save_file(written, str(tmp / file_name), metadata={"format": "pt"})
            _read_back(tmp / file_name, written)
            check.tensors_written += len(written)
            index.update({name: file_name for name in written})
            del written
        missing = sorted(set(updates) - merged_names)
        if missing:
            raise LoraKitError(
                f"The adapter in {adapter_dir} updates {len(missing)} weights that the base {base_name} does not have "
                f"(first: {missing[0]}); nothing was saved. Was it trained on another model? Pass base_model=... ."
            )
        check.tensors_merged = len(merged_names)
        if len(plan) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": needed}, "weight_map": index}, indent=2) + "\n"
            )
        _write_config_files(base_dir, tmp, tokenizer, replaced)
        info = {"base_model": base_name, "lora": _lora_settings_of(adapter_dir), **(card or {})}
        info["kind"] = f"merged model (LoRA adapter merged into the {base} base weights)"
        if _logits_fit(plan, device) if check_logits == "auto" else bool(check_logits):
            logits = _logits_check(adapter_dir, tmp, base_name, base, precision, quantization, tokenizer, tolerance)
            for key in ("max_abs_diff", "max_rel_diff", "same_argmax", "near_ties", "positions"):
                setattr(check, key, getattr(logits, key))
            check.logits_checked = True
            _refuse_disagreement(logits, tolerance, adapter_dir, base_name)
        else:
            check.note = (
                "logits not compared: an fp32 copy of this model does not fit the free memory with room to "
                "spare; every merged weight was checked as written"
            )
        check.ok = True
        info["merge_check"] = check.as_dict()
        write_model_card(tmp, info)
        _check_export(tmp)
    return check


@dataclass
class _Update:
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    def delta(self, device) -> torch.Tensor:
        delta = self.scale * (self.B.to(device, torch.float32) @ self.A.to(device, torch.float32))
        return delta.T if self.fan_in_fan_out else delta


def _adapter_tensors(adapter_dir: Path, config: dict) -> tuple[dict[str, _Update], dict[str, torch.Tensor]]:
    """The adapter's updates keyed by the base weight they change, and the tensors it replaces outright
    (trained biases, resized embeddings, ``modules_to_save``)."""
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise LoraKitError(f"{adapter_dir} has no adapter_model.safetensors: pass the folder written by save_adapter.")
    if config.get("use_dora"):
        raise LoraKitError(
            f"{adapter_dir} is a DoRA adapter (use_dora=true): lora_kit merges plain LoRA adapters only. "
            "Merge it with peft: PeftModel.from_pretrained(base, folder).merge_and_unload()."
        )
    pairs: dict[str, dict] = {}
    replaced = {}
    for key, tensor in safetensors_torch.load_file(str(file)).items():
        name = key.removeprefix("base_model.model.")
        module, sep, rest = name.partition(".lora_")
        if sep and rest[:2] in ("A.", "B."):
            pairs.setdefault(module, {})[rest[0]] = tensor
        elif sep:
            raise LoraKitError(
                f"{file}: the tensor {key} is not a plain LoRA matrix (lora_A / lora_B); lora_kit cannot "
                "merge it. Merge it with peft's merge_and_unload instead."
            )
        else:
            replaced[name.replace(".modules_to_save.default", "")] = tensor
    updates = {}
    for module, ab in pairs.items():
        rank = ab["A"].shape[0]
        patterns = (config.get("alpha_pattern") or {}).items()
        alpha = next((v for p, v in patterns if re.match(rf"(.*\.)?({p})$", module)), config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        updates[f"{module}.weight"] = _Update(ab["A"], ab["B"], scale, bool(config.get("fan_in_fan_out")))
    return updates, replaced


def _base_weight_files(base_name: str, adapter_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The base's folder and, for each weight, the safetensors file holding it; clear errors otherwise."""
    from transformers.utils import cached_file

    from .models import resolve_model_name

    path = resolve_model_name(base_name)

    def find(file_name):  # None when missing, offline or refused
        quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
        with contextlib.suppress(OSError):
            found = cached_file(path, file_name, **quiet)
            return Path(found) if found else None
        return None

    config_file = find("config.json")
    if config_file is None:
        raise LoraKitError(
            f"The adapter in {adapter_dir} was trained on {base_name!r} (adapter_config.json, base_model_name_or_path), "
            "which is neither a local model folder nor in the Hugging Face cache, and could not be downloaded. "
            "Pass merge_adapter(..., base_model='path/to/the/base') or go online once to download it."
        )
    index_file = find("model.safetensors.index.json")
    if index_file is not None:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = {shard: find(shard) for shard in sorted(set(weight_map.values()))}
        missing = [shard for shard, found in files.items() if found is None]
        if missing:
            raise LoraKitError(
                f"The base {base_name!r} is incomplete: {len(missing)} of its {len(files)} weight shards are missing "
                f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}), listed in {index_file}. "
                "Download it again (huggingface-cli download NAME) or copy the missing files; nothing was written."
            )
        return config_file.parent, {name: files[shard] for name, shard in weight_map.items()}
    single = find("model.safetensors")
    if single is None:
        raise LoraKitError(
            f"The base {base_name!r} ({config_file.parent}) has no safetensors weights (model.safetensors or an index "
            "of shards). lora_kit merges from safetensors one tensor at a time; convert the base with "
            "AutoModelForCausalLM.from_pretrained(...).save_pretrained(...) first."
        )
    with safe_open(str(single), framework="pt") as f:
        return config_file.parent, {name: single for name in f.keys()}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _shard_plan(weight_files: dict[str, Path], replaced: dict, max_shard_size) -> list[list[tuple[str, int]]]:
    """Output shards as lists of (tensor name, bytes), in the base's order, each under ``max_shard_size``."""
    from transformers.utils.hub import convert_file_size_to_int

    limit = convert_file_size_to_int(max_shard_size)
    sizes = {}
    for file in dict.fromkeys(weight_files.values()):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                sizes[name] = math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 4)
    for name, tensor in replaced.items():
        sizes[name] = tensor.numel() * tensor.element_size()
    shards, current, filled = [], [], 0
    for name, size in sizes.items():
        if current and filled + size > limit:
            shards.append(current)
            current, filled = [], 0
        current.append((name, size))
        filled += size
    return shards + ([current] if current else [])


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def _read_back(file: Path, written: dict) -> None:
    """Every tensor of a just-written shard, read from disk, equals what was computed."""
    with safe_open(str(file), framework="pt") as f:
        for name, tensor in written.items():
            if not torch.equal(f.get_tensor(name), tensor):
                raise LoraKitError(
                    f"{file}: {name} reads back different from what was written (disk error?); "
                    "nothing was moved into place. Check the disk and merge again."
                )


def _update_kept(out: torch.Tensor, W: torch.Tensor, delta: torch.Tensor) -> float:
    """Share of the update (alpha/r)·B·A that survived rounding W + update to the output dtype."""
    size = delta.norm().item()
    return 1.0 if size == 0.0 else max(0.0, 1.0 - ((out.float() - W) - delta).norm().item() / size)


def _quantized_weight_names(base_dir: Path) -> set[str]:
    """The weights bitsandbytes quantizes when loading: every nn.Linear but the output layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    head = skeleton.get_output_embeddings()
    return {
        f"{name}.weight" for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }


def _write_config_files(base_dir: Path, folder: Path, tokenizer, replaced: dict) -> None:
    """config.json without quantization, generation_config.json with EOS and pad, and the tokenizer."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base_dir)
    _drop_quantization_config(config)
    embeddings = [t for name, t in replaced.items() if name.endswith("embed_tokens.weight")]
    if embeddings and embeddings[0].shape[0] != config.vocab_size:  # the vocabulary grew in training (a pad token)
        config.vocab_size = embeddings[0].shape[0]
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    _set_generation_tokens(generation, config, tokenizer)
    config.save_pretrained(folder)
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _logits_fit(plan, device) -> bool:
    """Whether an fp32 copy of the model (what the logits check loads) fits the free memory with room to spare."""
    import psutil

    needed = sum(size for shard in plan for _, size in shard) * 2  # 16-bit files, fp32 in memory
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else psutil.virtual_memory().available
    return needed < 0.5 * free


def _fp32_adapted(adapter_dir, base_name, base, precision, quantization):
    """(base + adapter, base tokenizer) as the logits checks want them, in fp32: the original weights read
    exactly, or the quantized ones as training saw them in this machine's precision, dequantized."""
    from peft import PeftModel

    from .models import check_adapter_fits

    if base == "original" or quantization == "none":
        model, tokenizer = load_base_for_merge(base_name, "original", "fp32")
    else:
        model, tokenizer = load_base_for_merge(base_name, base, precision, quantization)
    model = model.float()
    check_adapter_fits(model, adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer


def _logits_check(adapter_dir, merged_dir, base_name, base, precision, quantization, tokenizer, tolerance):
    """base + adapter's logits, then the merged folder's, one model in memory at a time."""
    from transformers import AutoModelForCausalLM

    model, _ = _fp32_adapted(adapter_dir, base_name, base, precision, quantization or "none")
    reference = _logits(model, tokenizer, CHECK_PROMPTS)
    del model
    free_memory()  # collect it before the merged copy is loaded
    device_map = {"": 0} if torch.cuda.is_available() else None
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map=device_map)
    check = compare_logits(reference, _logits(merged, tokenizer, CHECK_PROMPTS), tolerance)
    del merged
    free_memory()
    return check


# --- Which base to merge into: measured -------------------------------------------------------


@dataclass
class MergeComparison:
    """Exact match and perplexity of each way to use a QLoRA adapter (a small table)."""

    rows: list[dict] = field(default_factory=list)
    n_eval: int = 0

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["model"] == name:
                return r
        raise KeyError(name)

    def _cells(self) -> list[list[str]]:
        head = ["model", "exact match", "perplexity", "same answers as adapter"]
        keys = ("exact_match", "perplexity", "same_answers_as_adapter")
        return [head] + [[r["model"]] + ["" if r[k] is None else f"{r[k]:.3f}" for k in keys] for r in self.rows]

    def __str__(self) -> str:
        lines = [f"{m:<44} {e:>11} {p:>10} {s:>24}" for m, e, p, s in self._cells()]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines + [f"({self.n_eval} held-out examples; greedy decoding)"])

    def _repr_html_(self) -> str:
        head, *rows = self._cells()
        cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        return (
            "<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + f"</tr>{cells}</table>"
            f"<p>{self.n_eval} held-out examples; greedy decoding</p>"
        )


ADAPTER_ROW = "adapter on the NF4 base (as trained)"
ORIGINAL_ROW = "merged into the original weights"
DEQUANTIZED_ROW = "merged into the dequantized NF4 weights"


def compare_merge_bases(
    adapter_dir,
    eval_ds,
    tokenizer=None,
    *,
    adapter_model=None,
    settings=None,
    batch_size: int = 40,
    precision: str = "auto",
    include_base: bool = False,
) -> MergeComparison:
    """Measure a QLoRA adapter on ``eval_ds`` (a ``messages`` dataset) on its NF4 base (as trained; pass the
    in-memory model as ``adapter_model`` to skip reloading it), merged into the original weights and merged into
    the dequantized NF4 weights: exact match, perplexity and the share of answers identical to the adapter's.
    ``include_base`` adds the NF4 base without the adapter (the "before").
    """
    from .evaluate import GenerationSettings, adapter_disabled, perplexity, task_score

    settings = settings or GenerationSettings(max_new_tokens=48)
    adapter_dir = Path(adapter_dir)
    quantization = _adapter_quantization(adapter_dir)
    table = MergeComparison(n_eval=len(eval_ds))

    def measure(name, model, tok, reference=None):
        score = task_score(model, tok, eval_ds, settings=settings, batch_size=batch_size)
        pairs = list(zip(score.predictions, reference or []))
        same = None if reference is None else sum(a == b for a, b in pairs) / max(len(reference), 1)
        row = {"model": name, "exact_match": score.score, "perplexity": perplexity(model, eval_ds, tok)}
        table.rows.append({**row, "same_answers_as_adapter": same})
        return score.predictions

    owned, base_tok = adapter_model is None, None
    if owned:
        from peft import PeftModel

        from .models import check_adapter_fits, load_model

        base_name = _adapter_config(adapter_dir)["base_model_name_or_path"]
        base_model, base_tok = load_model(base_name, quantization, precision=precision)
        check_adapter_fits(base_model, adapter_dir)
        adapter_model = PeftModel.from_pretrained(base_model, adapter_dir)
    tok = tokenizer or _adapter_tokenizer(adapter_dir, base_tok)
    if tok is None:
        raise LoraKitError("compare_merge_bases: pass tokenizer=... (the adapter folder has none).")
    name = ADAPTER_ROW if quantization == "nf4" else f"adapter on the {quantization} base (as trained)"
    reference = measure(name, adapter_model, tok)
    if include_base:
        with adapter_disabled(adapter_model):
            measure(f"{quantization} base without the adapter", adapter_model, tok, reference)
    if owned:  # the base the adapter wraps too: otherwise it stays while the merged models are measured
        del adapter_model, base_model
        free_memory()
    for base, row in (("original", ORIGINAL_ROW), ("dequantized", DEQUANTIZED_ROW)):
        merged, _, check = merged_model(adapter_dir, base=base, precision=precision)
        measure(row, merged, tok, reference)
        table.rows[-1]["merge_max_rel_diff"] = check.max_rel_diff
        del merged
        free_memory()
    return table
