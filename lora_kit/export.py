"""Export a merged model folder to GGUF, the file llama.cpp and Ollama run.

    path = export_gguf("out/merged", "out/model-q8_0.gguf", quantization="q8_0")
    write_modelfile(path)          # out/Modelfile, then:  ollama create my-model -f out/Modelfile

The conversion is llama.cpp's own ``convert_hf_to_gguf.py``, run in its own process. llama.cpp publishes it in its
source only, so lora_kit fetches the sdist of the installed (else pinned) ``llama-cpp-python`` once and keeps the
converter in the cache: the converter and the runtime that loads the file come from the same llama.cpp.
``LORA_KIT_LLAMA_CPP`` may name a llama.cpp checkout instead. Files are written like lora_kit's folders (under a
hidden partial name, renamed into place, never over a file lora_kit did not write); a hidden
``.name.lora_kit_output.json`` beside each GGUF records that lora_kit wrote it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import LoraKitError
from .files import MARKER, atomic_file, atomic_folder, check_disk_space, clean_stale_partials, partial_file
from .models import cache_dir

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python version requirements.txt pins; its converter is used when the binding is not installed."""
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from llama.cpp's source tree (its GGUF library, model classes and templates).
_CONVERTER_FILES = (CONVERTER, "conversion/", "gguf-py/", "models/templates/", "LICENSE")

QUANTIZATIONS = {
    # name: (bytes per weight in the file, what it is)
    "f16": (2.0, "16-bit floats: the same answers as the merged folder"),
    "q8_0": (1.07, "8-bit blocks (llama.cpp's Q8_0): half the size, answers nearly always the same"),
    "q4_k_m": (0.75, "about 4.8 bits (llama.cpp's Q4_K_M): Ollama's usual size, costs a small model more"),
}
_LLAMA_FTYPE_Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M in llama.h


# --- The converter ---------------------------------------------------------------------------
def converter_dir() -> Path:
    """A folder holding llama.cpp's ``convert_hf_to_gguf.py`` and what it imports; fetched once."""
    override = os.environ.get("LORA_KIT_LLAMA_CPP")
    if override:
        folder = Path(override).expanduser()
        if not (folder / CONVERTER).is_file():
            raise LoraKitError(
                f"LORA_KIT_LLAMA_CPP={override!r} has no {CONVERTER}. Point it at a llama.cpp checkout, "
                "or unset it to let lora_kit fetch the converter of the installed llama-cpp-python."
            )
        return folder
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = LLAMA_CPP_PYTHON
    target = cache_dir() / f"llama.cpp-converter-{version}"
    clean_stale_partials(target)
    if (target / CONVERTER).is_file():
        return target
    logger.info("Fetching llama.cpp's converter from the llama-cpp-python %s sdist (once) into %s", version, target)
    with tempfile.TemporaryDirectory() as download:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
        done = subprocess.run(pip + [f"llama-cpp-python=={version}", "-d", download], capture_output=True, text=True)
        sdists = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise LoraKitError(
                f"Could not download the llama-cpp-python {version} sdist, which holds llama.cpp's converter "
                f"(pip said: {_last_lines(done.stderr, 3)}). Run once with access to the package index, or set "
                "LORA_KIT_LLAMA_CPP to a llama.cpp checkout of the same version."
            )
        with atomic_folder(target) as tmp:
            _extract_converter(sdists[0], tmp)
    return target


def _extract_converter(sdist: Path, into: Path) -> None:
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = []
        for member in tar.getmembers():
            inner = member.name[len(root) :]
            if member.isfile() and member.name.startswith(root) and inner.startswith(_CONVERTER_FILES):
                member.name = inner
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise LoraKitError(
                f"{sdist.name} holds no vendor/llama.cpp/{CONVERTER}; this llama-cpp-python version "
                f"cannot be used to export. Install llama-cpp-python=={LLAMA_CPP_PYTHON}."
            )
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **extra)


def _supported_architectures(converter: Path) -> set[str] | None:
    """The architectures the converter registers (its TEXT_MODEL_MAP), or None when it cannot be read."""
    try:
        for node in ast.parse((converter / "conversion" / "__init__.py").read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                    return set(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        return None
    return None


# --- Checks, before any work ------------------------------------------------------------------
def _model_config(merged_dir: Path, given: str) -> dict:
    if not merged_dir.is_dir():
        raise LoraKitError(
            f"Model folder {given!r} does not exist or is not a folder. Pass the merged folder "
            "(lora_kit.merge_adapter writes one), which holds config.json and *.safetensors."
        )
    try:
        config = json.loads((merged_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LoraKitError(
            f"Folder {given!r} is not a model folder: it has no readable config.json ({err}). Pass the "
            "merged folder written by lora_kit.merge_adapter or model.save_pretrained."
        ) from None
    if not any(merged_dir.glob("*.safetensors")) and not any(merged_dir.glob("*.bin")):
        raise LoraKitError(
            f"Model folder {given!r} has a config.json but no weights (*.safetensors or *.bin). Pass the "
            "folder that holds the weights too, e.g. the one lora_kit.merge_adapter wrote."
        )
    if "adapter_config.json" in os.listdir(merged_dir):
        raise LoraKitError(
            f"{given!r} is an adapter folder; llama.cpp and Ollama need the merged model. Merge first: "
            f"lora_kit.merge_adapter({given!r}, 'out/merged'), then export that folder."
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise LoraKitError(
            f"Model folder {given!r} holds {method} weights (config.json has a quantization_config). "
            "Export a 16-bit or 32-bit merged folder (lora_kit.merge_adapter writes one); the GGUF "
            "quantization is chosen with quantization='q8_0' or 'q4_k_m'."
        )
    return config


def _has_chat_template(merged_dir: Path) -> bool:
    """Whether the folder has a chat template where the converter looks for one."""
    if (merged_dir / "chat_template.jinja").is_file():
        return True
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            if json.loads((merged_dir / name).read_text(encoding="utf-8")).get("chat_template"):
                return True
        except (OSError, ValueError):
            continue
    return False


def _weight_count(merged_dir: Path) -> int:
    """Parameters in the folder's weight files, read from the safetensors headers (bytes/2 for .bin files)."""
    count = 0
    for file in merged_dir.glob("*.safetensors"):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError, MemoryError) as err:
            raise LoraKitError(
                f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); the folder "
                "is damaged or half-copied. Merge or copy it again, then export."
            ) from None
        count += sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")
    if count == 0:
        count = sum(f.stat().st_size for f in merged_dir.glob("*.bin")) // 2
    return count


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


def _written_by_lora_kit(path: Path) -> bool:
    """True when ``path`` is the file lora_kit recorded writing there, unchanged since."""
    try:
        record = json.loads(_record_path(path).read_text())
        stat = path.stat()
        return record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_output_file(out_path: Path, given: str) -> None:
    if out_path.is_symlink() or (out_path.exists() and not out_path.is_file()):
        raise LoraKitError(
            f"out_path {given!r} exists and is not a file ({out_path}). Pass a file name such as 'out/model-q8_0.gguf'."
        )
    if out_path.exists() and not _written_by_lora_kit(out_path):
        raise LoraKitError(
            f"out_path {given!r} is a file that lora_kit did not write (or that changed since); "
            "exporting there would replace it. Pass a new file name, or move that file away."
        )


# --- Export ----------------------------------------------------------------------------------
def _last_lines(text: str, n: int) -> str:
    # Skip the converter's progress bars and traceback carets: the error is the last line that says something.
    stripped = map(str.strip, (text or "").replace("\r", "\n").splitlines())
    lines = [line for line in stripped if line and not line.startswith("Writing:") and set(line) - set("^~ ")]
    return " | ".join(lines[-n:]) or "nothing"


def _run_converter(converter: Path, merged_dir: Path, outfile: Path, outtype: str, given: str, arch: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py beside the converter
    command = [sys.executable, str(converter / CONVERTER), str(merged_dir), "--outfile", str(outfile)]
    command += ["--outtype", outtype]
    logger.info("Running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return
    output = done.stderr + done.stdout
    if "not supported" in output and arch in output:
        raise _unsupported(given, arch, converter)
    if "No module named" in output:
        raise LoraKitError(
            f"llama.cpp's converter needs a Python package that is missing ({_last_lines(output, 1)}). "
            "Install it (pip install -r requirements.txt lists what lora_kit's export uses), then retry."
        )
    raise LoraKitError(
        f"llama.cpp's converter failed on {given!r} (exit {done.returncode}): {_last_lines(output, 4)}. "
        "Nothing was written to out_path."
    )


def _unsupported(given: str, arch: str, converter: Path) -> LoraKitError:
    return LoraKitError(
        f"Model folder {given!r} is a {arch!r} (config.json 'architectures'), which llama.cpp's converter in {converter} "
        "does not support, so it cannot become a GGUF file. Serve the merged folder with transformers or vLLM instead "
        "(docs/deploy.md), or use a newer llama.cpp: install a newer llama-cpp-python, or set LORA_KIT_LLAMA_CPP to a "
        "llama.cpp checkout that lists it."
    )


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize, through llama-cpp-python), in its own process."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {ftype}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LoraKitError(
            f"llama.cpp's quantizer failed (exit {done.returncode}): "
            f"{_last_lines(done.stderr + done.stdout, 4)}. Nothing was written to out_path."
        )


def export_gguf(merged_dir: str | os.PathLike, out_path: str | os.PathLike, quantization: str = "f16") -> Path:
    """Convert a merged model folder to one GGUF file with llama.cpp's converter; return its path.

    ``quantization``: ``"f16"``, ``"q8_0"`` (both written by the converter) or ``"q4_k_m"`` (f16, then
    llama.cpp's quantizer; needs llama-cpp-python installed). The chat template, BOS/EOS and the
    end-of-turn token travel in the file's metadata; the export is refused when the folder has no
    chat template. ``out_path`` may be a new file or one an earlier export wrote.
    """
    if quantization not in QUANTIZATIONS:
        raise LoraKitError(
            f"quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)} "
            f"({'; '.join(f'{k}: {v[1]}' for k, v in QUANTIZATIONS.items())})."
        )
    given, given_out = os.fspath(merged_dir), os.fspath(out_path)
    merged_dir, out_path = (Path(os.path.abspath(os.path.expanduser(p))) for p in (given, given_out))
    config = _model_config(merged_dir, given)
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if not _has_chat_template(merged_dir):
        raise LoraKitError(
            f"Model folder {given!r} has no chat template (no chat_template.jinja, and no chat_template in "
            "tokenizer_config.json): llama.cpp and Ollama would format prompts differently from training. Save the "
            "tokenizer you trained with into the folder (tokenizer.save_pretrained(folder); lora_kit.merge_adapter "
            "does this), then export again."
        )
    if out_path.suffix.lower() != ".gguf":
        raise LoraKitError(f"out_path {given_out!r} should end in .gguf, e.g. 'out/model-{quantization}.gguf'.")
    if merged_dir == out_path.parent or merged_dir in out_path.parents:
        raise LoraKitError(
            f"out_path {given_out!r} is inside the model folder {given!r}; write the GGUF beside it, "
            f"e.g. '{merged_dir.parent / out_path.name}', so the merged folder stays as it was written."
        )
    if quantization == "q4_k_m" and importlib.util.find_spec("llama_cpp") is None:
        raise LoraKitError(
            f"quantization='q4_k_m' uses llama.cpp's quantizer from llama-cpp-python, which is not "
            f"installed: pip install llama-cpp-python=={LLAMA_CPP_PYTHON} (it compiles llama.cpp), or "
            "export 'q8_0' or 'f16'."
        )
    if importlib.util.find_spec("sentencepiece") is None:
        raise LoraKitError(
            "llama.cpp's converter imports sentencepiece, which is not installed: "
            "pip install -r requirements.txt (or pip install sentencepiece)."
        )
    converter = converter_dir()
    supported = _supported_architectures(converter)
    if supported is not None and arch not in supported:
        raise _unsupported(given, arch, converter)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out_path)  # what a killed export left
    _check_output_file(out_path, given_out)
    weights = _weight_count(merged_dir)
    needed = weights * QUANTIZATIONS[quantization][0] + 64 * 2**20  # + tokenizer and metadata
    if quantization == "q4_k_m":
        needed += weights * QUANTIZATIONS["f16"][0]  # the f16 file it is quantized from, removed afterwards
    check_disk_space(out_path.parent, int(needed), f"the {quantization} GGUF of {given!r}", "out_path")

    with atomic_file(out_path, ".gguf") as partial:
        if quantization == "q4_k_m":
            intermediate = partial_file(out_path, ".f16.gguf")
            try:
                _run_converter(converter, merged_dir, intermediate, "f16", given, arch)
                _quantize(intermediate, partial, _LLAMA_FTYPE_Q4_K_M)
            finally:
                intermediate.unlink(missing_ok=True)
        else:
            _run_converter(converter, merged_dir, partial, quantization, given, arch)
        if not gguf_metadata(partial).get("chat_template"):
            raise LoraKitError(
                f"The converter wrote no chat template into the GGUF of {given!r}; nothing was written "
                "to out_path. Check that the folder's tokenizer files are complete."
            )
        _check_output_file(out_path, given_out)  # again: a file may have appeared while this export ran
    stat = out_path.stat()
    record = {"written_by": "lora_kit", "from": str(merged_dir), "quantization": quantization}
    record.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    _record_path(out_path).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("Wrote %s (%.0f MB, %s)", out_path, stat.st_size / 1e6, quantization)
    return out_path


# --- What the file says about itself, and Ollama's Modelfile ----------------------------------
def gguf_metadata(gguf_path: str | os.PathLike) -> dict:
    """The chat template and special tokens a GGUF file carries, read with gguf-py's GGUFReader.

    Keys: ``chat_template``, ``bos_token``, ``eos_token``, ``eot_token`` (None when absent),
    ``add_bos_token``, ``architecture``, ``file_type``.
    """
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(gguf_path))

    def value(key):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    meta = {"chat_template": value("tokenizer.chat_template"), "add_bos_token": value("tokenizer.ggml.add_bos_token")}
    meta.update(architecture=value("general.architecture"), file_type=value("general.file_type"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    for name in ("bos", "eos", "eot"):  # stored as ids into the vocabulary
        index = value(f"tokenizer.ggml.{name}_token_id")
        meta[f"{name}_token"] = None if index is None or tokens is None else tokens.contents(index)
    return meta


def _render(template: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """The template rendered the way transformers renders chat templates."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos or "",
        eos_token=eos or "",
    )
    return rendered[0]


def _between(text: str, start: str | None, end: str | None) -> str:
    begin = text.index(start) + len(start) if start else 0
    return text[begin : text.index(end, begin)] if end else text[begin:]


def _turn_pieces(template: str, bos: str, eos: str) -> tuple[dict, str, str | None]:
    """Split the template's rendering into what comes before and after each role's content.

    Renders conversations with marker contents and reads the text around them: returns
    ({role: (prefix, suffix)}, generation prompt, default system message or None).
    """
    S, U, A, U2 = "LKSYSTEM0", "LKUSER1", "LKASSISTANT2", "LKUSER3"
    msgs = [{"role": r, "content": c} for r, c in (("system", S), ("user", U), ("assistant", A), ("user", U2))]
    full = _render(template, msgs, True, bos, eos)
    closed = _render(template, msgs[:3], False, bos, eos)
    short, short_gen = _render(template, msgs[:2], False, bos, eos), _render(template, msgs[:2], True, bos, eos)
    if not short_gen.startswith(short):
        raise ValueError("the generation prompt is not appended at the end")
    generation = short_gen[len(short) :]
    assistant_suffix = _between(closed, A, None)
    tail = _between(full, U2, None)
    if generation and not tail.endswith(generation):
        raise ValueError("the last user turn is not followed by the generation prompt")
    user_suffix = tail[: len(tail) - len(generation)]
    user_to_assistant = _between(full, U, A)
    assistant_to_user = _between(full, A, U2)
    if not (user_to_assistant.startswith(user_suffix) and assistant_to_user.startswith(assistant_suffix)):
        raise ValueError("turns do not end the same way each time")
    assistant_prefix = user_to_assistant[len(user_suffix) :]
    user_prefix = assistant_to_user[len(assistant_suffix) :]
    system_to_user = _between(full, S, U)
    if not system_to_user.endswith(user_prefix):
        raise ValueError("the system turn is not followed by a user turn's start")
    pieces = {
        "system": (full[: full.index(S)], system_to_user[: len(system_to_user) - len(user_prefix)]),
        "user": (user_prefix, user_suffix),
        "assistant": (assistant_prefix, assistant_suffix),
    }
    # A template may add a system message of its own when the conversation has none (SmolLM2 does).
    alone = _render(template, [msgs[1]], True, bos, eos)
    plain = user_prefix + U + user_suffix + generation
    default_system = None
    if alone != plain:
        head, (sys_prefix, sys_suffix) = alone[: len(alone) - len(plain)], pieces["system"]
        if not (alone.endswith(plain) and head.startswith(sys_prefix) and head.endswith(sys_suffix)):
            raise ValueError(
                "a conversation without a system message starts in a way the template's turns do not explain"
            )
        default_system = head[len(sys_prefix) : len(head) - len(sys_suffix)]
    return pieces, generation, default_system


def _apply_pieces(pieces: dict, generation: str, default_system: str | None, messages: list[dict]) -> str:
    """What the Go template built from ``pieces`` renders for ``messages`` (Ollama adds SYSTEM first)."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}] + messages
    return "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages) + generation


def ollama_modelfile(
    gguf_path: str | os.PathLike, from_path: str | None = None, temperature: float = 0.0, system: str | None = None
) -> str:
    """An Ollama Modelfile for ``gguf_path`` whose TEMPLATE and stop tokens come from the file's own chat template.

    The chat template in the GGUF metadata is rendered with marker messages; the text around each
    role's content becomes the Go template, and a system message the template adds by itself becomes
    ``SYSTEM``. The result is checked against the Jinja rendering on several conversations; a template
    that cannot be written this way is refused (write TEMPLATE by hand then). ``temperature`` 0 is greedy,
    as lora_kit's generation defaults. ``system``: the system prompt the model was fine-tuned with, which then
    replaces the template's default (the model answers as in training when a user sends none).
    """
    meta = gguf_metadata(gguf_path)
    template = meta["chat_template"]
    if not template:
        raise LoraKitError(
            f"{os.fspath(gguf_path)!r} carries no chat template (tokenizer.chat_template), so there is "
            "nothing to derive Ollama's TEMPLATE from. Export it again with lora_kit.export.export_gguf."
        )
    bos, eos = meta["bos_token"], meta["eos_token"]
    try:
        pieces, generation, default_system = _turn_pieces(template, bos, eos)
        for conversation in (
            [("user", "Hi")],
            [("system", "Be brief."), ("user", "Hi")],
            [("user", "Hi"), ("assistant", "Hello."), ("user", "Name a city.")],
            [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")],
        ):
            messages = [{"role": r, "content": c} for r, c in conversation]
            expected = _render(template, messages, True, bos, eos)
            if _apply_pieces(pieces, generation, default_system, messages) != expected:
                raise ValueError("the rendering depends on more than each message's role")
    except Exception as err:  # str.index's ValueError, jinja2's TemplateError, a template's raise_exception
        raise LoraKitError(
            f"The chat template in {os.fspath(gguf_path)!r} cannot be turned into an Ollama TEMPLATE "
            f"automatically ({err}). Write the Modelfile's TEMPLATE by hand from the template "
            "(docs/deploy.md shows ChatML's)."
        ) from None
    default_system = system if system is not None else default_system
    texts = [p for pair in pieces.values() for p in pair] + [generation, default_system or ""]
    if any("{{" in t or '"""' in t for t in texts):
        raise LoraKitError(
            "The chat template's text holds '{{' or '\"\"\"', which a Modelfile cannot quote; "
            "write its TEMPLATE by hand."
        )
    turns = (
        f'eq .Role "{r}" }}}}{pieces[r][0]}{{{{ .Content }}}}{pieces[r][1]}' for r in ("system", "user", "assistant")
    )
    go = "{{ range .Messages }}{{ if " + "{{ else if ".join(turns) + "{{ end }}{{ end }}" + generation
    # The model ends its turn with the text that closes an assistant turn (ChatML: <|im_end|>), and with EOS.
    stops = dict.fromkeys(stop for stop in (pieces["assistant"][1].strip(), eos, meta["eot_token"]) if stop)
    name = Path(gguf_path).name
    lines = [
        f"# Written by lora_kit.export for {name}: TEMPLATE, SYSTEM and stop come from its chat template.",
        f"FROM {from_path or './' + name}",
        f'TEMPLATE """{go}"""',
    ]
    if default_system is not None:
        lines.append(f'SYSTEM """{default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, path: str | os.PathLike | None = None, **kwargs) -> Path:
    """Write ``ollama_modelfile(gguf_path)`` to ``path`` (default: ``Modelfile`` beside the GGUF); return it.

    A file already there is replaced only when lora_kit wrote it (its first line says so).
    """
    gguf_path = Path(gguf_path).absolute()
    path = Path(path).absolute() if path is not None else gguf_path.parent / "Modelfile"
    same_folder = path.parent == gguf_path.parent
    text = ollama_modelfile(gguf_path, None if same_folder else str(gguf_path), **kwargs)
    if path.exists():
        try:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith("# Written by lora_kit.export"):
            raise LoraKitError(
                f"{os.fspath(path)!r} exists and lora_kit did not write it; writing the Modelfile there "
                "would replace it. Pass another path, or move that file away."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path
