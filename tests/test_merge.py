"""Tests for lora_kit.merge on the embedded model after a short real QLoRA run.

One module-scoped QLoRA run (NF4 base, a few steps) feeds every test: the adapter must load
with peft alone, the merged folder with transformers alone (checked in subprocesses that never
import lora_kit), the merged logits must match base+adapter, merging into 4-bit must be refused,
and a killed merge must leave no finished-looking folder. The Hub upload is tested in test_hub.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lora_kit
from lora_kit import files, merge
from lora_kit.errors import LoraKitError

REPO = Path(__file__).resolve().parents[1]
N_PROMPTS = 2

# Greedy answers, one prompt at a time (no padding), exactly as a user of plain transformers
# would write it. Executed here and, as text, in the subprocesses.
GREEDY = textwrap.dedent(
    """
    import torch
    def greedy(model, tok, conversations, n=40):
        out = []
        model.eval()
        for messages in conversations:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=n, do_sample=False)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out
    """
)
_ns: dict = {}
exec(GREEDY, _ns)
greedy = _ns["greedy"]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(extra)
    return env


def _run_plain(code: str, tmp_path: Path, timeout: int = 240, **env) -> dict:
    """Run ``code`` in a fresh interpreter, outside the repo, and assert it never imported lora_kit."""
    script = (
        GREEDY
        + textwrap.dedent(code)
        + textwrap.dedent(
            """
        import json, sys
        assert not any(m == "lora_kit" or m.startswith("lora_kit.") for m in sys.modules), "lora_kit was imported"
        print("RESULT " + json.dumps(result))
        """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short QLoRA run on the NF4 base; the adapter saved with a model card."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("merge")
    train_ds, eval_ds = lora_kit.demo_task(48, 8, seed=0)
    model, tok = lora_kit.load_model("embedded", quantization="nf4")
    lora = lora_kit.LoraSettings(r=8, alpha=16, dropout=0.0)
    model = lora_kit.add_lora(model, lora)
    prompts = [m[:-1] for m in eval_ds["messages"][:N_PROMPTS]]  # system + user, no answer
    with lora_kit.adapter_disabled(model):
        base_answers = greedy(model, tok, prompts)
    trainer = lora_kit.build_trainer(
        model,
        tok,
        train_ds,
        lora=lora,
        train=lora_kit.TrainSettings(
            max_steps=6,
            micro_batch_size=4,
            gradient_accumulation_steps=1,
            learning_rate=1e-3,
            gradient_checkpointing=False,
            report_to="none",
            output_dir=str(root / "trainer"),
            fast=False,
            save_steps=10**6,
        ),
    )
    trainer.train()
    model = trainer.model
    adapter_answers = greedy(model, tok, prompts)
    card = {
        "base_model": "embedded",
        "method": "qlora",
        "steps": 6,
        "data": "lora_kit demo task (48 train / 8 held out)",
        "lora": {"r": 8, "alpha": 16},
        "metrics": {"before_exact_match": 0.0, "after_exact_match": 0.5},
    }
    adapter_dir = merge.save_adapter(model, tok, root / "adapter", card)
    return dict(
        root=root,
        model=model,
        tok=tok,
        eval_ds=eval_ds,
        prompts=prompts,
        card=card,
        adapter_dir=adapter_dir,
        base_answers=base_answers,
        adapter_answers=adapter_answers,
    )


@pytest.fixture(scope="module")
def merged_original(run):
    out = run["root"] / "merged"
    check = merge.merge_adapter(run["adapter_dir"], out, card=run["card"], max_shard_size="200MB")
    return out, check


def test_adapter_folder_has_tokenizer_chat_template_and_card(run):
    folder = run["adapter_dir"]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "README.md",
        merge.ADAPTER_META,
    ):
        assert (folder / name).is_file(), name
    assert (folder / "chat_template.jinja").read_text() == run["tok"].chat_template
    assert json.loads((folder / merge.ADAPTER_META).read_text())["base_quantization"] == "nf4"
    card = (folder / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: peft" in card
    assert "qlora" in card and "r=8" in card and "after exact match" in card
    assert not list(folder.parent.glob(".adapter.partial-*"))


def test_training_changed_the_answers(run):
    # Otherwise the "same answers" checks below could pass with an adapter that does nothing.
    assert run["adapter_answers"] != run["base_answers"]


def test_merge_into_nf4_weights_is_refused_with_the_reason(run):
    with pytest.raises(LoraKitError, match="rounded away") as err:
        merge.merge_in_place(run["model"])
    assert "merge_adapter" in str(err.value)


def test_merged_logits_match_base_plus_adapter(merged_original):
    _, check = merged_original
    assert check.ok and check.logits_checked and check.same_argmax and check.max_rel_diff < 0.01
    assert check.as_dict()["base"] == "original"
    assert check.tensors_merged == 7 * 30  # every projection of the 30 layers
    assert check.update_kept > 0.999  # fp32 weights: nothing of the update is rounded away
    assert "read back" in str(check)


def test_each_merged_weight_is_w_plus_scaled_ba(run, merged_original):
    """Straight from the files: the merged weight equals W + (alpha/r)·B·A, untouched weights equal W."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, _ = merged_original
    base_dir = lora_kit.embedded_model_path()
    lora = load_file(str(run["adapter_dir"] / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.3.mlp.down_proj"
    delta = (16 / 8) * (lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def read(folder, file, name):
        with safe_open(str(folder / file), framework="pt") as f:
            return f.get_tensor(name)

    for name, expect_change in (("model.layers.3.mlp.down_proj.weight", True), ("model.norm.weight", False)):
        base = read(base_dir, "model.safetensors", name)
        merged = read(out, index[name], name)
        if expect_change:
            assert delta.abs().max() > 0 and torch.allclose(merged, base + delta, atol=1e-6)
        else:
            assert torch.equal(merged, base)


def test_merged_export_files(run, merged_original):
    out, _ = merged_original
    assert len(list(out.glob("model-*.safetensors"))) >= 2  # 540 MB in fp32, sharded at 200MB
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "chat_template.jinja").read_text() == run["tok"].chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert (
        gen["eos_token_id"] in (run["tok"].eos_token_id, [run["tok"].eos_token_id])
        or run["tok"].eos_token_id in gen["eos_token_id"]
    )
    assert gen["pad_token_id"] == run["tok"].pad_token_id != run["tok"].eos_token_id
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    card = (out / "README.md").read_text()
    for needle in (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name: transformers",
        "qlora",
        "r=8",
        "training steps**: 6",
        "before exact match",
        "after exact match",
        "merge check",
        "original",
    ):
        assert needle in card, needle
    assert not [p for p in out.parent.iterdir() if ".merged.partial-" in p.name]


def test_adapter_and_merged_folder_load_without_lora_kit(run, merged_original, tmp_path):
    """Plain peft / transformers, in a fresh interpreter: same greedy answers everywhere."""
    out, _ = merged_original
    result = _run_plain(
        f"""
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        prompts = {run["prompts"]!r}
        adapter, merged = {str(run["adapter_dir"])!r}, {str(out)!r}
        tok = AutoTokenizer.from_pretrained(adapter)
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
        result = {{"auto_peft": greedy(auto, tok, prompts)}}
        base_path = auto.peft_config["default"].base_model_name_or_path
        del auto
        base = AutoModelForCausalLM.from_pretrained(base_path)
        result["base"] = greedy(base, tok, prompts)
        peft_model = PeftModel.from_pretrained(base, adapter)
        result["peft_model"] = greedy(peft_model, tok, prompts)
        del peft_model, base
        mtok = AutoTokenizer.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged)
        result["merged"] = greedy(model, mtok, prompts)
        result["merged_dtype"] = str(model.dtype)
        """,
        tmp_path,
    )
    assert result["merged"] == result["auto_peft"] == result["peft_model"]
    assert result["merged"] != result["base"]  # the fine-tuned answers, not the base's
    assert result["merged_dtype"] == "torch.float32"


def test_dequantize_flattens_blocks_for_odd_shapes():
    """A 64 x 96 NF4 layer (96 is not a multiple of the blocksize 64): our dequantize matches
    bitsandbytes' round trip of the flat tensor, the case bnb 0.50.2 gets wrong in 2-D."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 64, bias=False)
    layer = bnb.nn.Linear4bit(
        96, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer = layer.to("cpu")
    packed, state = F.quantize_4bit(dense.weight.data.reshape(-1), quant_type="nf4", compress_statistics=True)
    expected = F.dequantize_4bit(packed, state).reshape(64, 96)
    ours = merge.dequantize_4bit_weight(layer.weight)
    assert ours.shape == (64, 96)
    assert torch.allclose(ours, expected, atol=1e-6)
    rel = ((ours - dense.weight).norm() / dense.weight.norm()).item()
    assert rel < 0.15
    wrapper = torch.nn.Sequential(layer)
    x = torch.randn(3, 96)
    with torch.no_grad():
        merge.dequantize_model(wrapper)
        assert type(wrapper[0]) is torch.nn.Linear
        assert torch.allclose(wrapper(x), x @ expected.T, atol=1e-5)


def test_dequantize_8bit_layer_matches_its_own_forward():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 64)
    layer = bnb.nn.Linear8bitLt(96, 64, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    wrapper = torch.nn.Sequential(layer.to("cpu"))
    assert wrapper[0].weight.dtype == torch.int8
    x = torch.randn(3, 96)
    with torch.no_grad():
        y8 = wrapper(x)
        merge.dequantize_model(wrapper)
        assert type(wrapper[0]) is torch.nn.Linear
        assert torch.allclose(wrapper(x), y8, atol=1e-5)
        assert (wrapper[0].weight - dense.weight).abs().max() < 0.01  # int8 rounding, not garbage


def test_dequantized_merge_reproduces_the_adapter_on_its_nf4_base(run, tmp_path):
    out = tmp_path / "merged-dq"
    check = merge.merge_adapter(run["adapter_dir"], out, base="dequantized", card=run["card"])
    assert check.ok and check.base == "dequantized"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    assert greedy(model, AutoTokenizer.from_pretrained(out), run["prompts"]) == run["adapter_answers"]


def test_compare_merge_bases_table(run):
    table = merge.compare_merge_bases(
        run["adapter_dir"], run["eval_ds"], run["tok"], adapter_model=run["model"], batch_size=8
    )
    print("\n" + str(table))
    names = [r["model"] for r in table.rows]
    assert names == [merge.ADAPTER_ROW, merge.ORIGINAL_ROW, merge.DEQUANTIZED_ROW]
    adapter, original, dq = (table.row(n) for n in names)
    for r in table.rows:
        assert 0.0 <= r["exact_match"] <= 1.0 and 1.0 < r["perplexity"] < 1e4
    # The dequantized merge is the adapter on its NF4 base, up to float rounding...
    assert abs(dq["perplexity"] - adapter["perplexity"]) < 1e-3 * adapter["perplexity"]
    # Greedy answers can flip on near-ties (bnb's 4-bit matmul vs a dense one); measured 6/8 same vs 0/8.
    assert dq["same_answers_as_adapter"] >= 0.5 and dq["same_answers_as_adapter"] > original["same_answers_as_adapter"]
    # ...while the original weights differ from NF4 by ~10%, which moves the perplexity visibly.
    assert abs(original["perplexity"] - adapter["perplexity"]) > 10 * abs(dq["perplexity"] - adapter["perplexity"])


def test_compare_merge_bases_loads_the_adapter_itself_when_not_given_one(run):
    # The path a script takes: base + adapter loaded from the folder, measured, then freed before the merges load.
    sample = run["eval_ds"].select(range(4))
    table = merge.compare_merge_bases(run["adapter_dir"], sample, run["tok"], batch_size=4)
    names = [r["model"] for r in table.rows]
    assert names == [merge.ADAPTER_ROW, merge.ORIGINAL_ROW, merge.DEQUANTIZED_ROW]
    adapter, dq = table.row(merge.ADAPTER_ROW), table.row(merge.DEQUANTIZED_ROW)
    assert abs(dq["perplexity"] - adapter["perplexity"]) < 1e-3 * adapter["perplexity"]
    text = str(table)
    assert "exact match" in text and merge.DEQUANTIZED_ROW in text and "<table>" in table._repr_html_()


KILL_SCRIPT = """
import sys, time
from safetensors import torch as safetensors_torch
from lora_kit import merge
save = safetensors_torch.save_file
def slow_save(*args, **kwargs):
    save(*args, **kwargs)                # a shard is on disk in the temporary folder...
    print("WEIGHTS_WRITTEN", flush=True)
    time.sleep(300)                      # ...and the kill comes before the rest, the card, the rename
safetensors_torch.save_file = slow_save
merge.merge_adapter(sys.argv[1], sys.argv[2], check_logits=False)
print("FINISHED", flush=True)
"""


def test_killed_merge_leaves_no_finished_looking_folder(run, tmp_path):
    target = tmp_path / "merged"
    env = _clean_env(PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(run["adapter_dir"]), str(target)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.time() + 240
        line = ""
        while time.time() < deadline and "WEIGHTS_WRITTEN" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WEIGHTS_WRITTEN" in line, "the merge subprocess never reached the save"
        partials = list(tmp_path.glob(".merged.partial-*"))
        assert len(partials) == 1 and list(partials[0].glob("*.safetensors"))  # mid-save, weights written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [partials[0].name]  # only the hidden temporary folder
    # The next save to the same target removes the leftovers of the killed one.
    with files.atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_folder_keeps_a_live_writers_partial_and_cleans_on_error(tmp_path):
    target = tmp_path / "out"
    live = tmp_path / f".out.partial-{files._host_tag()}-1-abc"  # pid 1 is alive: another writer's folder
    live.mkdir()
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """The embedded model saved again in shards (as 7B checkpoints are), to break in the tests below."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded") / "base"
    AutoModelForCausalLM.from_pretrained(lora_kit.embedded_model_path()).save_pretrained(folder, max_shard_size="200MB")
    return folder


def _copy_of(folder, tmp_path):
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_merge_streams_from_a_sharded_base_given_by_path(run, sharded_base, tmp_path):
    out = tmp_path / "merged"
    check = merge.merge_adapter(run["adapter_dir"], out, base_model=str(sharded_base), check_logits=False)
    assert check.ok and not check.logits_checked and "do not fit" not in check.note
    assert check.tensors_merged == 7 * 30 and (out / "config.json").is_file()


def test_merge_refuses_a_base_with_a_missing_shard(run, sharded_base, tmp_path):
    base = _copy_of(sharded_base, tmp_path)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoraKitError, match="incomplete") as err:
        merge.merge_adapter(run["adapter_dir"], tmp_path / "merged", base_model=str(base))
    assert shard.name in str(err.value)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_merge_refuses_an_unknown_base(run, tmp_path):
    with pytest.raises(LoraKitError, match="neither a local model folder nor in the Hugging Face cache"):
        merge.merge_adapter(run["adapter_dir"], tmp_path / "merged", base_model=str(tmp_path / "no_such_model"))
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_another_base_of_the_same_shape(run, sharded_base, tmp_path):
    """A folder with the adapter's base name now holding another model: refused, naming both."""
    from safetensors.torch import load_file, save_file

    base = _copy_of(sharded_base, tmp_path)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shard = base / index["model.embed_tokens.weight"]
    tensors = load_file(str(shard))
    tensors["model.embed_tokens.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.02
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(LoraKitError, match="trained on other weights") as err:
        merge.merge_adapter(run["adapter_dir"], tmp_path / "merged", base_model=str(base))
    assert str(base) in str(err.value) and str(run["adapter_dir"]) in str(err.value)
    assert not (tmp_path / "merged").exists()


def test_merge_checks_the_disk_space_first(run, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100 * 2**20))
    with pytest.raises(LoraKitError, match=r"needs 0\.\d+ GiB .* 0\.10 GiB are free"):
        merge.merge_adapter(run["adapter_dir"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_compare_logits_forgives_near_ties_only():
    from lora_kit.merge import compare_logits

    reference = torch.tensor([[10.0, 2.0, 1.0], [5.0, 4.99, 0.0]])  # the second position is a near-tie
    swapped_tie = reference + torch.tensor([[0.0, 0.0, 0.0], [-0.02, 0.0, 0.0]])
    check = compare_logits(reference, swapped_tie, tolerance=0.02)
    assert check.ok and check.same_argmax and check.near_ties == 1 and check.positions == 2
    assert "1 of 2 positions are near-ties" in str(check.__class__(**{**check.as_dict(), "logits_checked": True}))
    clear = torch.tensor([[10.0, 9.7, 0.0]])  # top two 0.3 apart: more than 2% of the largest logit
    flipped = torch.tensor([[9.85, 9.86, 0.0]])  # every logit within 0.16 (1.6%), yet the clear winner lost
    check = compare_logits(clear, flipped, tolerance=0.02)
    assert check.max_rel_diff < 0.02 and not check.same_argmax and not check.ok
    assert not compare_logits(reference, reference * 1.3, tolerance=0.02).ok  # a wrong scale: 30% off
    assert compare_logits(reference, reference + 0.1, tolerance=0.02).ok  # 1% of the largest logit


def test_adapter_tensors_scale_by_alpha_pattern_and_rslora(tmp_path):
    from safetensors.torch import save_file

    A, B = torch.ones(2, 3), torch.ones(4, 2)
    prefix = "base_model.model.model.layers.0"
    save_file(
        {f"{prefix}.{m}.lora_{x}.weight": t.clone() for m in ("q_proj", "v_proj") for x, t in (("A", A), ("B", B))},
        str(tmp_path / "adapter_model.safetensors"),
    )
    config = {"lora_alpha": 4, "alpha_pattern": {"v_proj": 8}}
    updates, replaced = merge._adapter_tensors(tmp_path, config)
    assert replaced == {}
    assert updates["model.layers.0.q_proj.weight"].scale == 2.0  # lora_alpha / r
    assert updates["model.layers.0.v_proj.weight"].scale == 4.0  # the pattern's alpha / r
    updates, _ = merge._adapter_tensors(tmp_path, {**config, "use_rslora": True})
    assert updates["model.layers.0.v_proj.weight"].scale == pytest.approx(8 / 2**0.5)


def test_check_export_names_what_is_missing(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(LoraKitError, match="incomplete") as err:
        merge._check_export(tmp_path)
    for missing in ("config.json", "README.md", "*.safetensors", "model-00001.safetensors", "chat template"):
        assert missing in str(err.value)
    table = merge.MergeComparison(rows=[{"model": "a", "n": 1}, {"model": "a", "n": 2}])
    assert table.row("a")["n"] == 1
    with pytest.raises(KeyError):
        table.row("b")
