"""Save adapters, merge them into a 16-bit base, prove the merge, export.

Never merge into quantized weights: rounding the merged W + (alpha/r)BA back to 4 (or 8) bits
throws most of the small update away. Instead reload the base in 16-bit (fp32 on CPU), merge
there, and check that the merged model's logits equal base + adapter's.

Every folder is written under a temporary name beside its target and renamed when complete,
so an interrupted save never leaves a folder that looks finished.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraKitError


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def free_memory(*objects) -> None:
    """Drop references and return GPU memory, e.g. the training model before reloading the base."""
    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_adapter(model, tokenizer, out_dir, card: dict | None = None) -> Path:
    """Save the adapter with the tokenizer and its chat template beside it (loads with AutoPeftModelForCausalLM)."""
    if not hasattr(model, "peft_config"):
        raise LoraKitError(f"save_adapter needs a PEFT model (with LoRA adapters); got {type(model).__name__}.")
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if card:
            write_model_card(tmp, {**card, "kind": "LoRA adapter"})
    return Path(out_dir)


def _quantization_of(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    q = getattr(base, "lora_kit_quantization", None)
    if q:
        return q
    if getattr(base, "is_loaded_in_4bit", False):
        return "nf4"
    return "8bit" if getattr(base, "is_loaded_in_8bit", False) else "none"


def merge_in_place(model):
    """Merge and unload adapters of a PEFT model on a 16-bit base; refuses quantized bases."""
    quantization = _quantization_of(model)
    if quantization != "none":
        raise LoraKitError(
            f"Refusing to merge adapters into {quantization} weights: the merged update (alpha/r)*B@A is far smaller "
            f"than the {quantization} rounding step, so most of what training learned would be rounded away. "
            "Save the adapter, then call lora_kit.merge_adapter(adapter_dir, out_dir): it reloads the base in 16-bit "
            "and merges there."
        )
    return model.merge_and_unload()


@dataclass
class MergeCheck:
    max_abs_diff: float
    max_rel_diff: float  # max |merged - adapter| / max |adapter logits|
    same_argmax: bool
    ok: bool

    def as_dict(self) -> dict:
        return self.__dict__.copy()


CHECK_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "John paid $20 in Paris."]


@torch.no_grad()
def _logits(model, tokenizer, prompts) -> torch.Tensor:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    enc = enc.to(next(model.parameters()).device)
    model.eval()
    logits = model(**enc).logits.float()
    return logits[enc["attention_mask"].bool()].cpu()


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, tolerance: float = 0.01) -> MergeCheck:
    diff = (merged - reference).abs().max().item()
    rel = diff / max(reference.abs().max().item(), 1e-12)
    same = bool((merged.argmax(-1) == reference.argmax(-1)).all())
    return MergeCheck(max_abs_diff=diff, max_rel_diff=rel, same_argmax=same, ok=same and rel < tolerance)


def _adapter_base_name(adapter_dir: Path) -> str:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise LoraKitError(
            f"{adapter_dir} is not an adapter folder: adapter_config.json is missing. "
            "Pass the folder written by lora_kit.save_adapter (or PeftModel.save_pretrained)."
        )
    return json.loads(config_file.read_text())["base_model_name_or_path"]


def load_base_for_merge(base_name: str, base: str = "original", precision: str = "auto"):
    """The base model in 16-bit (fp32 on CPU) for merging.

    base="original": the base's own 16-bit weights (what users expect; the default).
    base="dequantized": the NF4 weights, dequantized to 16-bit: exactly what a QLoRA adapter was
    trained against, so the merged model reproduces the adapter's behaviour on the 4-bit base.
    """
    from .models import load_model

    if base == "original":
        model, tokenizer = load_model(base_name, "none", precision=precision)
    elif base == "dequantized":
        model, tokenizer = load_model(base_name, "nf4", precision=precision)
        model = model.dequantize()
        model.lora_kit_quantization = "none"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # prepare_model_for_kbit_training left norms in fp32 and input grads on; harmless for inference.
    else:
        raise LoraKitError(f"base={base!r} is not 'original' or 'dequantized'.")
    return model, tokenizer


def merge_adapter(adapter_dir, out_dir, *, base: str = "original", precision: str = "auto", card: dict | None = None,
                  tolerance: float = 0.01, max_shard_size: str = "2GB") -> MergeCheck:
    """Reload the base in 16-bit, apply the adapter, check, merge, check again, and save atomically.

    Returns the comparison of the merged model's logits with base+adapter's; raises when they
    disagree (same argmax everywhere and relative difference under ``tolerance`` required).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    model, tokenizer = load_base_for_merge(_adapter_base_name(adapter_dir), base, precision)
    model = PeftModel.from_pretrained(model, adapter_dir)
    reference = _logits(model, tokenizer, CHECK_PROMPTS)
    merged = model.merge_and_unload()
    check = compare_logits(reference, _logits(merged, tokenizer, CHECK_PROMPTS), tolerance)
    if not check.ok:
        raise LoraKitError(
            f"The merged model disagrees with base+adapter (max relative difference {check.max_rel_diff:.2e}, same "
            f"argmax: {check.same_argmax}); nothing was saved to {out_dir}. Was the adapter trained on this base?"
        )
    with atomic_folder(out_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            write_model_card(tmp, {**card, "kind": f"merged model (adapter merged into the {base} base)",
                                   "merge_check": check.as_dict()})
    free_memory(merged, model)
    return check


def write_model_card(folder, info: dict) -> None:
    """A README.md model card: base model, method, LoRA settings, data, steps, metrics."""
    lines = [f"# {info.get('title', 'Fine-tuned with lora_kit')}", "", f"A {info.get('kind', 'model')} made with lora_kit.", ""]
    for key in ("base_model", "method", "lora", "data", "steps", "metrics", "merge_check"):
        if key in info:
            value = info[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    lines += ["", "Use the same chat template as in training (saved with the tokenizer in this folder)."]
    Path(folder, "README.md").write_text("\n".join(lines) + "\n")
