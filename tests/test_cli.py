"""The command line and its YAML configs: shipped configs match the recipes, bad input is caught early and named."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from lora_kit.config import CPU, T4, ConfigError, config_text, load_config, recipe, shipped_configs
from lora_kit.demo import demo_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def lora_kit_cli(*args, stdin=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lora_kit", *args], capture_output=True, text=True, input=stdin, timeout=timeout
    )


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_are_the_recipes():
    made = shipped_configs()
    assert sorted(made) == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    for name, text in made.items():
        assert (CONFIGS / name).read_text() == text, f"configs/{name} drifted: regenerate with shipped_configs()"


def test_a_shipped_config_reads_back_as_its_recipe():
    assert load_config(CONFIGS / "demo.yaml", hardware=CPU).train == demo_settings().train
    qlora = load_config(CONFIGS / "qlora-t4.yaml", hardware=T4)
    assert (qlora.quantization, qlora.r, qlora.optim, qlora.max_length) == ("nf4", 64, "paged_adamw_32bit", 1024)
    assert "qlora-t4.yaml, line" in qlora.reasons["r"]


def test_a_short_config_takes_the_rest_from_the_recipe(tmp_path):
    path = write(tmp_path, "method: qlora\ntrain:\n  learning_rate: 1e-4   # YAML reads this as a string\n")
    settings = load_config(path, ["lora.r=8", "train.max_steps=5"], hardware=CPU)
    assert (settings.learning_rate, settings.r, settings.max_steps, settings.model) == (1e-4, 8, 5, "embedded")
    assert settings.reasons["r"] == "set in --set lora.r=8"


@pytest.mark.parametrize(
    "text, sets, expected",
    [
        ("method: lora\ntrain:\n  lr: 0.1\n", [], ["run.yaml, line 3", "'train.lr'", "learning_rate"]),
        ("method: lora\ntrain:\n  r: 8\n", [], ["line 3", "train.r is not a knob there", "lora.r"]),
        ("method: lora\nlora:\n  r: eight\n", [], ["line 3", "lora.r", "'eight'", "a whole number"]),
        ("method: qlora4\n", [], ["line 1", "method", "'qlora4'", "lora, lora8, qlora"]),
        ("method: lora\ntrain:\n  learning_rate: -1\n", [], ["line 3", "train.learning_rate", "positive"]),
        ("method: lora\nlora:\n  dropout: 1.5\n", [], ["line 3", "lora.dropout", "[0, 1)"]),
        ("method: lora\ntrain: [1, 2]\n", [], ["line 2", "train", "a list", "learning_rate"]),
        ("method: lora\n  r: 8\n", [], ["line 2", "not valid YAML"]),
        ("", [], ["empty"]),
        ("method: lora\n", ["train.max_steps"], ["--set train.max_steps", "KEY=VALUE"]),
        ("method: lora\n", ["train.max_stepz=3"], ["--set train.max_stepz=3", "unknown key", "max_steps"]),
        ("method: lora\n", ["train.gradient_checkpointing=maybe"], ["train.gradient_checkpointing", "true or false"]),
    ],
)
def test_bad_configs_name_the_file_line_key_and_what_is_allowed(tmp_path, text, sets, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), sets, hardware=CPU)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_train_checks_the_config_before_loading_anything(tmp_path):
    proc = lora_kit_cli("train", str(write(tmp_path, "method: lora\nlora:\n  r: 0\n")), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "run.yaml, line 3, lora.r" in proc.stderr and "positive integer" in proc.stderr
    assert not (tmp_path / "outputs").exists()
    missing = lora_kit_cli("train", str(tmp_path / "nope.yaml"), timeout=120)
    assert missing.returncode == 2 and "nope.yaml does not exist" in missing.stderr


def test_config_command_prints_a_recipe_that_reads_back(tmp_path):
    proc = lora_kit_cli("config", "qlora", "--set", "lora.r=32", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "r: 32  # set in --set lora.r=32" in proc.stdout
    settings = load_config(write(tmp_path, proc.stdout), hardware=CPU)
    assert knobs(settings) == knobs(recipe("qlora", ["lora.r=32"], hardware=CPU))
    assert config_text(settings).count("\n") == config_text(recipe("qlora", hardware=CPU)).count("\n")


def knobs(settings):
    return {k: v for k, v in asdict(settings).items() if k != "reasons"}


def test_estimate_prints_each_method_for_the_configs_model():
    proc = lora_kit_cli("estimate", str(CONFIGS / "demo.yaml"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for label in ("full fine-tuning", "LoRA, 16-bit base", "LoRA, 8-bit base", "QLoRA, NF4 base"):
        assert label in proc.stdout
    assert "r=16, 4 x 256 tokens" in proc.stdout


def test_train_merge_and_chat_from_the_command_line(tmp_path):
    config = write(
        tmp_path,
        f"method: lora\noutput_dir: {tmp_path / 'out'}\ndata:\n  n_train: 16\n  n_eval: 4\n"
        "train:\n  max_steps: 3\n  micro_batch_size: 2\neval:\n  eval_samples: 4\n"
        "  max_new_tokens: 8\n",
    )
    proc = lora_kit_cli("train", str(config), "--set", "train.learning_rate=2e-3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["score"] == "JSON exact match"
    assert result["after_perplexity"] < result["before_perplexity"]
    assert result["merged_matches_adapter"] is True
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    again = lora_kit_cli("merge", result["adapter_dir"], str(tmp_path / "merged2"))
    assert again.returncode == 0, again.stderr
    assert "Merge into the original weights: ok" in again.stdout
    too_long = "word " * 20000  # past the model's context: an error line, and the chat goes on
    chat = lora_kit_cli("chat", result["adapter_dir"], "--max-new-tokens", "6", stdin=f"{too_long}\nHello!\n\n")
    assert chat.returncode == 0, chat.stderr
    assert "error: The message is" in chat.stdout and "Send a shorter message" in chat.stdout
    assert chat.stdout.count("model> ") == 1 and len(chat.stdout.split("model> ")[1].strip()) > 0


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    proc = lora_kit_cli("export", str(tmp_path / "notes"), str(tmp_path / "model.gguf"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "notes" in proc.stderr and not (tmp_path / "model.gguf").exists()
