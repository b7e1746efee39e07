"""The main job, end to end, shrunk: the same code path as `python -m lora_kit demo`."""

import json
import subprocess
import sys

import pytest

from lora_kit.demo import demo_settings, run

KEYS = {
    "model",
    "method",
    "steps",
    "train_seconds",
    "score",
    "before_score",
    "after_score",
    "before_perplexity",
    "after_perplexity",
    "adapter_dir",
    "merged_dir",
    "merged_matches_adapter",
    "gguf",
}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_demo_runs_end_to_end_and_merges_into_full_precision(tmp_path, method):
    result = run(
        demo_settings(
            method,
            max_steps=3,
            micro_batch_size=2,
            n_train=16,
            n_eval=4,
            eval_samples=4,
            max_new_tokens=8,
            output_dir=str(tmp_path),
        )
    )
    assert KEYS <= set(result)
    assert result["method"] == method and result["steps"] == 3
    assert result["score"] == "JSON exact match"
    assert result["merged_matches_adapter"] is True and result["merge_logits_checked"] is True  # a 135M fits
    assert result["merge_max_rel_diff"] < 0.01
    assert result["after_perplexity"] < result["before_perplexity"]
    gguf = tmp_path / "model-f16.gguf"  # the merged model for llama.cpp and Ollama, with its Modelfile beside it
    assert result["gguf"] == str(gguf) and gguf.stat().st_size > 100 * 2**20
    assert (tmp_path / "Modelfile").read_text().count("<|im_end|>") >= 1
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # merged into a 16-bit reload, never into NF4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "README.md").read_text().count(method) >= 1


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_kit",
            "demo",
            "--model",
            "no-such/model",
            "--steps",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "no-such/model" in proc.stderr and "Traceback" not in proc.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stderr  # harmless bitsandbytes log, muted
