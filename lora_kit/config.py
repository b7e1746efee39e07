"""Run configurations as YAML files: the notebooks' knobs, grouped by concern, checked before any model loads.

A config names the knobs of ``course.CourseSettings``; the method's recipe fills in every knob left out::

    method: qlora
    model: NousResearch/Llama-2-7b-chat-hf
    data:
      dataset: mlabonne/guanaco-llama2-1k
    lora:
      r: 64
    train:
      max_steps: 60

``lora-kit config qlora`` writes the whole recipe with a reason beside each value; ``--set train.max_steps=10``
overrides one knob by its dotted name. A wrong key, type or value is reported with the file, the line, the key
path, what was given and what is allowed.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import yaml

from .course import METHODS, CourseSettings, course_settings
from .errors import LoraKitError
from .hardware import Hardware

# Where each knob lives in a config file. "" is the top level. Knobs that follow from others (quantization
# from the method, the profile from the machine) and Colab's Drive switch are not part of a config.
SECTIONS = {
    "": ("method", "model", "output_dir"),
    "data": ("dataset", "n_train", "n_eval"),
    "lora": ("r", "alpha", "dropout", "target_modules", "bias"),
    "train": ("learning_rate", "max_steps", "num_epochs", "micro_batch_size", "gradient_accumulation_steps")
    + ("max_length", "optim", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "seed")
    + ("gradient_checkpointing", "fast", "save_steps", "resume"),
    "eval": ("eval_samples", "max_new_tokens"),
}
SECTION_OF = {knob: section for section, knobs in SECTIONS.items() for knob in knobs}
EXAMPLES = {
    "int": "a whole number, e.g. 16",
    "float": "a number, e.g. 2.0e-4",
    "str": 'a string, e.g. "cosine"',
    "bool": "true or false",
    "str | list": 'a string ("all-linear") or a list of module names',
}
# Machines the shipped configs are written for (the recipes depend on the GPU's memory).
T4 = Hardware(device="cuda", name="Tesla T4", compute_capability=(7, 5), vram_gib=15.0, gpu_count=1)
CPU = Hardware(device="cpu", name="cpu", compute_capability=None, vram_gib=None, gpu_count=0)


class ConfigError(LoraKitError):
    """A config file or --set override that cannot describe a run."""


def dotted(knob: str) -> str:
    section = SECTION_OF[knob]
    return f"{section}.{knob}" if section else knob


def read_config(path, sets=()) -> tuple[dict, dict]:
    """(knob -> value, knob -> where it was set) from a YAML file and ``--set key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist. Write one with `lora-kit config lora > {path.name}` "
            "or pick one from configs/."
        )
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}). A config is a mapping "
            "of keys to values, e.g. `method: qlora`, with sections such as `train:` indented below."
        ) from None
    if root is None:
        raise ConfigError(f"{path} is empty. Give at least `method: lora` (or lora8, qlora).")
    values, where = {}, {}
    _collect(root, "", f"{path}", values, where)
    for item in sets:
        _apply_set(item, values, where)
    return values, where


def _collect(node, section: str, source: str, values: dict, where: dict) -> None:
    at = f"{source}, line {node.start_mark.line + 1}"
    if not isinstance(node, yaml.MappingNode):
        expected = f"the keys of `{section}:` ({', '.join(SECTIONS[section])})" if section else "a mapping of keys"
        raise ConfigError(f"{at}{', ' + section if section else ''}: got {_kind(node)}; expected {expected}.")
    for key_node, value_node in node.value:
        key = str(key_node.value)
        place = f"{source}, line {key_node.start_mark.line + 1}"
        path = f"{section}.{key}" if section else key
        if not section and key in SECTIONS and key:
            _collect(value_node, key, source, values, where)
            continue
        _check_key(key, section, path, place)
        values[key] = yaml.safe_load(yaml.serialize(value_node))
        where[key] = place


def _check_key(key: str, section: str, path: str, place: str) -> None:
    if key in SECTION_OF and SECTION_OF[key] == section:
        return
    if key in SECTION_OF:
        raise ConfigError(f"{place}: {path} is not a knob there; {key} belongs at {dotted(key)}.")
    allowed = ", ".join(SECTIONS[section]) if section else ", ".join(list(SECTIONS[""]) + [s for s in SECTIONS if s])
    raise ConfigError(
        f"{place}: unknown key {path!r}. Allowed {'under ' + section + ':' if section else 'at the top'}: {allowed}."
    )


def _apply_set(item: str, values: dict, where: dict) -> None:
    place = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{place}: expected KEY=VALUE with a dotted key, e.g. --set train.max_steps=10.")
    path, raw = item.split("=", 1)
    section, _, key = path.strip().rpartition(".")
    _check_key(key, section, path.strip(), place)
    try:
        values[key] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        values[key] = raw
    where[key] = place


def _kind(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


_TYPES = typing.get_type_hints(CourseSettings)


def _annotation(knob: str) -> str:
    hint = _TYPES[knob]
    return hint.__name__ if isinstance(hint, type) else "str | list"  # target_modules is the one union


def _typed(knob: str, value, place: str):
    """``value`` as the knob's type; a clear error where it is not one."""
    kind = _annotation(knob)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "str | list": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[kind]
    if not ok and kind == "float" and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise ConfigError(
            f"{place}, {dotted(knob)}: got {value!r} ({type(value).__name__}); expected {EXAMPLES[kind]}."
        )
    return value  # an int stays an int where a float is allowed, as in the recipes (the checkpoint name hashes it)


def load_config(path, sets=(), hardware: Hardware | None = None) -> CourseSettings:
    """The run a config file (plus ``--set`` overrides) describes: every knob checked, before any model loads."""
    values, where = read_config(path, sets)
    return _settings(values, where, str(path), hardware)


def recipe(method: str, sets=(), hardware: Hardware | None = None) -> CourseSettings:
    """``method``'s recipe for this machine (or ``hardware``), with ``--set`` overrides."""
    values, where = {"method": method}, {"method": "the command line"}
    for item in sets:
        _apply_set(item, values, where)
    return _settings(values, where, "the command line", hardware)


def _settings(values: dict, where: dict, source: str, hardware: Hardware | None) -> CourseSettings:
    values = dict(values)
    method = values.pop("method", "lora")
    if method not in METHODS:
        raise ConfigError(
            f"{where.get('method', source)}, method: got {method!r}; expected one of "
            f"{', '.join(METHODS)} (LoRA on a 16-bit base, on an 8-bit base, QLoRA on an NF4 base)."
        )
    knobs = {k: _typed(k, v, where[k]) for k, v in values.items()}
    settings = course_settings(method, smoke=False, hardware=hardware, **knobs)
    for knob in knobs:
        settings.reasons[knob] = f"set in {where[knob]}"
    try:  # the trainer's own checks, run now rather than after a model has loaded
        _ = (settings.lora, settings.train)
    except LoraKitError as err:
        knob = str(err).split("=", 1)[0].rpartition(".")[2]
        place = where.get(knob, f"the {method} recipe")
        raise ConfigError(f"{place}, {dotted(knob) if knob in SECTION_OF else 'config'}: {err}") from None
    return settings


def _scalar(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # JSON strings are YAML strings, quoted so "none" stays a string
    if isinstance(value, float):
        return repr(value) if "e" in repr(value) or "." in repr(value) else f"{value:.1f}"
    return json.dumps(value)


def config_text(settings: CourseSettings, header: str = "") -> str:
    """``settings`` as a config file, every knob with its reason as a comment (what ``lora-kit config`` prints)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, knobs in SECTIONS.items():
        if section:
            lines += ["", f"{section}:"]
        indent = "  " if section else ""
        for knob in knobs:
            lines.append(f"{indent}{knob}: {_scalar(getattr(settings, knob))}  # {settings.reasons.get(knob, '')}")
    return "\n".join(lines).lstrip("\n") + "\n"


def shipped_configs() -> dict[str, str]:
    """File name -> text of every config in configs/: each notebook recipe on a T4, and the CPU demo."""
    made = {}
    for method in METHODS:
        settings = course_settings(method, smoke=False, hardware=T4)
        made[f"{method}-t4.yaml"] = config_text(
            settings, f"The {method} notebook's recipe on a 15 GB T4 GPU.\nRun: lora-kit train configs/{method}-t4.yaml"
        )
    from .demo import demo_settings  # the demo imports this module

    demo = demo_settings()
    made["demo.yaml"] = config_text(
        demo,
        "The main job: the embedded model learns the demo task on a CPU, offline.\n"
        "Run: lora-kit train configs/demo.yaml (what `python -m lora_kit demo` runs)",
    )
    return made
