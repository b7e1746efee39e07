"""Tests for lora_kit.hub: the model card, and an upload that sends nothing unless it can finish.

No network: the refusals run in fresh processes with no stored login, and the one upload goes to
a stand-in for huggingface_hub.HfApi.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_kit
from lora_kit import files, hub
from lora_kit.errors import LoraKitError

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(extra)
    return env


def test_card_of_an_adapter_links_its_hub_base_and_says_how_to_load_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    hub.write_model_card(
        tmp_path,
        {
            "base_model": "embedded",
            "method": "qlora",
            "lora": {"r": 8, "alpha": 16},
            "metrics": {"after_exact_match": 0.75},
            "seed": 3,
        },
    )
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "- qlora" in card and "r=8, alpha=16" in card and "| after exact match | 0.75 |" in card
    assert "- **seed**: 3" in card and "AutoPeftModelForCausalLM.from_pretrained(FOLDER)" in card


def test_card_of_a_merged_model_from_a_local_base_has_no_hub_link(tmp_path):
    hub.write_model_card(tmp_path, {"base_model": str(tmp_path), "method": "lora", "kind": "merged model"})
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transformers" in card and "base_model:" not in card.split("---")[1]
    assert "AutoModelForCausalLM.from_pretrained(FOLDER)" in card and "- qlora" not in card


def test_push_to_hub_is_one_function_wherever_it_is_imported_from():
    assert lora_kit.push_to_hub is hub.push_to_hub


@pytest.fixture
def small_folder(tmp_path):
    """A finished-looking adapter folder (push_to_hub does not read the weights)."""
    folder = tmp_path / "adapter"
    with files.atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text('{"base_model_name_or_path": "x/y", "r": 8}')
        (tmp / "adapter_model.safetensors").write_bytes(b"0" * 1024)
        hub.write_model_card(tmp, {"base_model": "x/y", "method": "lora", "kind": "LoRA adapter"})
    return folder


PUSH_SCRIPT = """
import json, sys
from pathlib import Path
from lora_kit.hub import push_to_hub
folder = Path(sys.argv[1])
before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
token = sys.argv[2] or None
result = push_to_hub(folder, "someone/lora-kit-test", token=token)
after = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
print("RESULT " + json.dumps({"pushed": result.pushed, "message": result.message, "unchanged": before == after}))
"""


@pytest.mark.parametrize(
    "case, token, env, expect",
    [
        ("no token", "", {}, "no Hugging Face token"),
        ("offline", "hf_not_a_real_token", {"HF_HUB_OFFLINE": "1"}, "offline mode"),
        ("unreachable", "hf_not_a_real_token", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "the upload failed"),
    ],
)
def test_push_to_hub_sends_nothing_without_token_or_network(small_folder, tmp_path, case, token, env, expect):
    # A fresh HF_HOME: no stored login. The environment is read at import, so each case is a new process.
    env = {
        **{k: v for k, v in _clean_env().items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")},
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf_home"),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PUSH_SCRIPT, str(small_folder), token],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert result["pushed"] is False and result["unchanged"]
    assert expect in result["message"] and "Nothing was uploaded" in result["message"]


def test_push_to_hub_refuses_an_unfinished_folder(tmp_path):
    partial = tmp_path / ".merged.partial-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoraKitError, match="not a finished"):
        hub.push_to_hub(partial, "someone/model")


def test_push_to_hub_uploads_the_folder_in_one_commit_when_a_token_is_given(small_folder, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls.append(("upload_folder", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    result = hub.push_to_hub(small_folder, "someone/model", token="hf_x")
    assert result.pushed and result.url == "https://huggingface.co/someone/model"
    assert calls == [
        ("token", "hf_x"),
        ("create_repo", "someone/model", True, True),
        ("upload_folder", "someone/model", str(small_folder)),
    ]


def test_a_refused_push_is_logged_not_printed(small_folder, monkeypatch, capsys, caplog):
    monkeypatch.setattr(hub, "_hub_token", lambda token: None)
    with caplog.at_level(logging.WARNING, logger="lora_kit.hub"):
        result = hub.push_to_hub(small_folder, "someone/model")
    assert not result and "Nothing was uploaded" in str(result)
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [result.message]
