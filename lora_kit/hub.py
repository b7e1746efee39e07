"""Share a finished folder: its README.md model card, and the upload to the Hugging Face Hub.

``merge.save_adapter`` and ``merge.merge_adapter`` write the card into the folders they produce;
``push_to_hub`` uploads such a folder as one commit, and when it cannot (no token, offline, an
error on the way) it sends nothing and returns the reason instead of raising.

    push_to_hub("out/merged", "me/my-model")   # private by default; a falsy result says why not
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraKitError

logger = logging.getLogger(__name__)

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub name of the embedded model, for the card's ``base_model`` link."""


# --- Model card -------------------------------------------------------------------------------


def _hub_base_id(base_model) -> str | None:
    from .models import EMBEDDED_NAMES

    name = str(base_model)
    if name.lower() in EMBEDDED_NAMES or name.rstrip("/").endswith("lora_kit/SmolLM2-135M-Instruct"):
        return EMBEDDED_HUB_ID
    if name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/")):
        return name
    return None


def _format(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def write_model_card(folder, info: dict) -> None:
    """A README.md model card: base model, method, LoRA settings, data, steps, metrics.

    ``info`` keys used: title, kind, base_model, method, lora (dict), data, steps, metrics
    (dict, e.g. before_/after_exact_match), merge_check; other keys are listed under "details".
    The YAML header lets the Hugging Face Hub link the base model.
    """
    folder = Path(folder)
    is_adapter = (folder / "adapter_config.json").is_file() or "adapter" in str(info.get("kind", "")).split(" (")[0]
    hub_base = _hub_base_id(info.get("base_model", ""))
    header = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}"]
    if hub_base:
        header.append(f"base_model: {hub_base}")
    header += ["pipeline_tag: text-generation", "tags:", "- lora_kit", "- lora"]
    if str(info.get("method", "")).lower() == "qlora":
        header.append("- qlora")
    header.append("---")
    lines = header + [
        "",
        f"# {info.get('title', 'Fine-tuned with lora_kit')}",
        "",
        f"A {info.get('kind', 'model')} made with lora_kit.",
        "",
    ]
    labels = {
        "base_model": "base model",
        "method": "method",
        "lora": "LoRA settings",
        "data": "data",
        "steps": "training steps",
        "merge_check": "merge check (merged vs base+adapter logits)",
    }
    for key, label in labels.items():
        if key in info:
            lines.append(f"- **{label}**: {_format(info[key])}")
    extra = {k: v for k, v in info.items() if k not in labels and k not in ("title", "kind", "metrics")}
    for key, value in extra.items():
        lines.append(f"- **{key.replace('_', ' ')}**: {_format(value)}")
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Evaluation (held out)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_format(v)} |" for k, v in metrics.items()]
    usage = (
        [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "model = AutoPeftModelForCausalLM.from_pretrained(FOLDER)  # loads the base, then the adapter",
        ]
        if is_adapter
        else [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
        ]
    )
    usage += [
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True, return_tensors="pt")',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))",
    ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *usage,
        "```",
        "",
        "Use the same chat template as in training: it is saved with the tokenizer in this folder "
        "(chat_template.jinja). Serving with vLLM, TGI, llama.cpp or Ollama: see lora_kit's docs/deploy.md.",
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


# --- The Hub ----------------------------------------------------------------------------------


@dataclass
class PushResult:
    pushed: bool
    message: str
    url: str | None = None

    def __bool__(self) -> bool:
        return self.pushed

    def __str__(self) -> str:
        return self.message


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_token(token: str | None) -> str | None:
    """`token`, else what huggingface_hub finds: HF_TOKEN, a saved login, or Colab's Secrets panel."""
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no stored login is the common case, whatever the reason
        return None


def push_to_hub(
    folder, repo_id: str, token: str | None = None, private: bool = True, commit_message: str = "Upload with lora_kit"
) -> PushResult:
    """Upload a finished adapter or merged folder to the Hugging Face Hub as one commit (never half a folder).

    The token comes from ``token``, else HF_TOKEN, else huggingface_hub's stored login (in Colab the Secrets
    panel). Offline, without a token or when the upload fails, nothing is sent and the returned ``PushResult``
    (falsy) says what to do, also logged as a warning: never raised, so a notebook can run on.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraKitError(
            f"push_to_hub: {folder} is not a folder. Pass the folder written by save_adapter or merge_adapter."
        )
    if ".partial-" in folder.name or not any((folder / f).is_file() for f in ("adapter_config.json", "config.json")):
        raise LoraKitError(
            f"push_to_hub: {folder} is not a finished adapter or model folder (no adapter_config.json or config.json). "
            "Pass the folder written by save_adapter or merge_adapter."
        )
    if "/" not in repo_id:
        raise LoraKitError(f"push_to_hub: repo_id={repo_id!r} should look like 'your-username/model-name'.")

    def refuse(message: str) -> PushResult:
        message = f"Not pushed to the Hub: {message} Nothing was uploaded; the local folder {folder} is complete."
        logger.warning(message)
        return PushResult(False, message)

    import huggingface_hub
    from huggingface_hub import constants

    token = _hub_token(token)
    if _env_flag("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        return refuse(
            "offline mode is on (HF_HUB_OFFLINE=1). Unset it on a machine with internet and call push_to_hub again."
        )
    if not token:
        return refuse(
            "no Hugging Face token found. Pass token=..., set HF_TOKEN (in Colab: the Secrets panel), or run "
            "huggingface_hub.login(); use a token with write access."
        )
    try:
        api = huggingface_hub.HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=[".*", "**/.*"]
        )
    except Exception as err:  # noqa: BLE001 - network, auth and permission errors all end the same way
        first = str(err).splitlines()[0] if str(err) else ""
        return refuse(
            f"the upload failed ({type(err).__name__}: {first}). Check the token's write access, the repo "
            "name and your connection."
        )
    message = f"Pushed {folder} to {url}"
    logger.info(message)
    return PushResult(True, message, str(url))
