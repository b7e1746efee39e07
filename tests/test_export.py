"""Tests for lora_kit.export: the embedded model exported to GGUF and run in llama.cpp, on CPU.

The embedded model's folder is an ordinary checkpoint, like a merged one. It is exported to f16
and q8_0 with llama.cpp's own converter, and each file is loaded with llama-cpp-python's
``Llama`` using the chat template read from the file's metadata. On held-out demo prompts the
f16 file's greedy answers must equal transformers' greedy answers on the same folder and end at
the end-of-turn token; read with transformers' answers as input (teacher forcing), the q8_0 file
must predict nearly every next token, and the end of turn where transformers ends. Bad inputs and a
killed export must leave no .gguf behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_kit import export
from lora_kit.data import demo_task
from lora_kit.errors import LoraKitError
from lora_kit.evaluate import GenerationSettings, generate_details
from lora_kit.models import embedded_model_path

N_PROMPTS = 3  # each answer is up to 128 tokens on two CPU cores: a few prompts keep the file near two minutes


@pytest.fixture(scope="module")
def folder() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: export.export_gguf(folder, out / f"smol-{q}.gguf", quantization=q) for q in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def conversations():
    _, eval_ds = demo_task(n_train=20, n_eval=N_PROMPTS)
    return [row["messages"][:-1] for row in eval_ds]  # system + user; the reference answer dropped


@pytest.fixture(scope="module")
def transformers_answers(folder, conversations):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    answers = generate_details(model, tokenizer, conversations, GenerationSettings(), batch_size=1)  # greedy, unpadded
    assert all(a.stopped for a in answers)
    return [a.text for a in answers]


def llama_answers(gguf_path, conversations, max_tokens=GenerationSettings().max_new_tokens):
    """Greedy answers from llama.cpp, prompts formatted by the chat template stored in the file."""
    import llama_cpp  # requirements-dev.txt: the tests run every export in llama.cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = export.gguf_metadata(gguf_path)
    handler = Jinja2ChatFormatter(
        meta["chat_template"], eos_token=meta["eos_token"], bos_token=meta["bos_token"]
    ).to_chat_handler()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=2, seed=0, verbose=False, chat_handler=handler)
    out = []
    for messages in conversations:
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.0)[
            "choices"
        ][0]
        out.append((reply["message"]["content"].strip(), reply["finish_reason"]))
    llm.close()
    return out


def test_gguf_carries_the_folders_chat_template_and_special_tokens(folder, exported):
    template = (folder / "chat_template.jinja").read_text()
    for quantization, path in exported.items():
        meta = export.gguf_metadata(path)
        assert meta["chat_template"] == template
        assert (meta["bos_token"], meta["eos_token"]) == ("<|im_start|>", "<|im_end|>")
        assert meta["architecture"] == "llama"
        assert meta["file_type"] == {"f16": 1, "q8_0": 7}[quantization]  # llama_ftype MOSTLY_F16, MOSTLY_Q8_0
        record = json.loads((path.parent / f".{path.name}.lora_kit_output.json").read_text())
        assert record["quantization"] == quantization and record["size"] == path.stat().st_size
    assert not [p for p in exported["f16"].parent.iterdir() if ".partial-" in p.name]


def test_f16_answers_in_llama_cpp_equal_transformers(exported, conversations, transformers_answers):
    answers = llama_answers(exported["f16"], conversations)
    print(
        "\n"
        + "\n".join(f"llama.cpp f16: {a!r}\ntransformers:  {b!r}" for (a, _), b in zip(answers, transformers_answers))
    )
    assert [a for a, _ in answers] == transformers_answers
    assert [reason for _, reason in answers] == ["stop"] * len(answers)  # ended at <|im_end|>, not at max_tokens


def forced_agreement(gguf_path, conversations, answers):
    """llama.cpp reads the prompt and transformers' answer; how often is its next token transformers' token?

    Teacher forcing: one greedy step per answer token, so a single early difference does not send
    the rest of the answer elsewhere. Returns (fraction of answer tokens predicted, and for each
    answer whether the model would end its turn (<|im_end|>) where transformers' answer ends).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from lora_kit.export import _render

    meta = export.gguf_metadata(gguf_path)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    eos = llm.token_eos()
    agree = total = 0
    ends = []
    for messages, answer in zip(conversations, answers):
        prompt = _render(meta["chat_template"], messages, True, meta["bos_token"], meta["eos_token"])
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        answer_ids = llm.tokenize(answer.encode(), add_bos=False, special=False) + [eos]
        llm.reset()
        llm.eval(prompt_ids + answer_ids)
        predicted = np.argmax(llm.scores[len(prompt_ids) - 1 : len(prompt_ids) + len(answer_ids) - 1], axis=-1)
        agree += int((predicted == np.array(answer_ids)).sum())
        total += len(answer_ids)
        ends.append(int(predicted[-1]) == eos)
    llm.close()
    return agree / total, ends


def test_q8_0_in_llama_cpp_predicts_transformers_answers(exported, conversations, transformers_answers):
    f16, f16_ends = forced_agreement(exported["f16"], conversations, transformers_answers)
    q8, q8_ends = forced_agreement(exported["q8_0"], conversations, transformers_answers)
    print(f"\nnext-token agreement with transformers' greedy answers: f16 {f16:.3f}, q8_0 {q8:.3f}")
    assert f16 == 1.0 and all(f16_ends)
    assert q8 >= 0.9 and all(q8_ends)


def test_q4_k_m_export_through_llama_cpps_quantizer(folder, exported, conversations, transformers_answers, tmp_path):
    pytest.importorskip("llama_cpp")
    out = export.export_gguf(folder, tmp_path / "smol-q4_k_m.gguf", quantization="q4_k_m")
    meta = export.gguf_metadata(out)
    assert meta["file_type"] == 15  # llama_ftype MOSTLY_Q4_K_M
    assert meta["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert out.stat().st_size < 0.6 * exported["f16"].stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smol-q4_k_m.gguf.lora_kit_output.json", "smol-q4_k_m.gguf"]
    q4, _ = forced_agreement(out, conversations, transformers_answers)
    print(f"\nnext-token agreement with transformers' greedy answers: q4_k_m {q4:.3f}")
    assert q4 >= 0.6  # 4 bits cost a 135M model much more than a 7B


def test_modelfile_template_and_stop_come_from_the_chat_template(exported):
    path = export.write_modelfile(exported["q8_0"])
    text = path.read_text()
    assert path == exported["q8_0"].parent / "Modelfile"
    assert "FROM ./smol-q8_0.gguf" in text
    assert (
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    ) in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert export.write_modelfile(exported["q8_0"]) == path  # its own file: replaced
    trained = export.write_modelfile(exported["q8_0"], system="Answer in JSON.").read_text()
    assert 'SYSTEM """Answer in JSON."""' in trained and "SmolLM" not in trained  # the fine-tuning's prompt wins
    mine = path.parent / "Modelfile.mine"
    mine.write_text("FROM llama3\n")
    with pytest.raises(LoraKitError, match="lora_kit did not write it"):
        export.write_modelfile(exported["q8_0"], mine)
    assert mine.read_text() == "FROM llama3\n"


def test_a_template_ollama_cannot_express_is_refused():
    from lora_kit.models import LLAMA2_TEMPLATE

    with pytest.raises(ValueError):  # the system message sits inside the first user turn
        export._turn_pieces(LLAMA2_TEMPLATE, "<s>", "</s>")


def _fake_model(path: Path, architecture="LlamaForCausalLM", template=True) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "x"}))
    (path / "model.safetensors").write_bytes(b"")
    if template:
        (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return path


def test_bad_inputs_are_refused_with_what_to_do(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraKitError, match="no readable config.json"):
        export.export_gguf(tmp_path / "empty", tmp_path / "a.gguf")
    with pytest.raises(LoraKitError, match="does not exist"):
        export.export_gguf(tmp_path / "missing", tmp_path / "a.gguf")
    no_template = _fake_model(tmp_path / "no-template", template=False)
    with pytest.raises(LoraKitError, match="no chat template") as err:
        export.export_gguf(no_template, tmp_path / "a.gguf")
    assert "tokenizer.save_pretrained" in str(err.value)
    alien = _fake_model(tmp_path / "alien", architecture="AlienForCausalLM")
    with pytest.raises(LoraKitError, match="'AlienForCausalLM'.*does not support") as err:
        export.export_gguf(alien, tmp_path / "a.gguf")
    assert "alien" in str(err.value) and "LORA_KIT_LLAMA_CPP" in str(err.value)
    with pytest.raises(LoraKitError, match="quantization='q3'"):
        export.export_gguf(folder, tmp_path / "a.gguf", quantization="q3")
    with pytest.raises(LoraKitError, match="inside the model folder"):
        export.export_gguf(folder, folder / "model.gguf")
    users = tmp_path / "users.gguf"
    users.write_bytes(b"my own model")
    with pytest.raises(LoraKitError, match="lora_kit did not write"):
        export.export_gguf(folder, users)
    assert users.read_bytes() == b"my own model"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or ".partial-" in p.name) == ["users.gguf"]


def test_a_failed_conversion_leaves_no_gguf(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, broken / name)
    (broken / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{" * 64)  # a header that is not JSON
    out = tmp_path / "out"
    with pytest.raises(LoraKitError, match="not a readable safetensors file"):
        export.export_gguf(broken, out / "model.gguf")
    with open(folder / "model.safetensors", "rb") as f:  # the real header, then the weights cut short: half-copied
        head = f.read(8)
        (broken / "model.safetensors").write_bytes(head + f.read(int.from_bytes(head, "little") + 2**20))
    with pytest.raises(LoraKitError, match="converter failed"):
        export.export_gguf(broken, out / "model.gguf")
    assert list(out.iterdir()) == []


def test_a_killed_export_leaves_no_gguf_and_the_next_one_cleans_up(folder, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    code = f"from lora_kit import export; export.export_gguf({str(folder)!r}, {str(out)!r}, 'f16')"
    writer = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(p.stat().st_size > 10**6 for p in tmp_path.glob(".model.gguf.partial-*")):
            assert writer.poll() is None and time.time() < deadline, "the export ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(writer.pid, signal.SIGKILL)  # the export and the converter it started
        writer.wait()
    partials = list(tmp_path.glob(".model.gguf.partial-*"))
    assert not out.exists() and len(partials) == 1
    # The next export removes the dead writer's partial file before anything else can fail (here: the disk).
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100 * 2**20))
    with pytest.raises(LoraKitError, match=r"needs 0\.\d\d GiB .* 0\.10 GiB are free"):
        export.export_gguf(folder, out)
    assert list(tmp_path.iterdir()) == []


def test_the_demo_trained_model_answers_alike_in_llama_cpp(tmp_path):
    """The main job's own GGUF (f16) and a q8_0 export, on all 40 held-out demo prompts: f16 answers equal the
    merged model's in transformers; q8_0's exact match is within 0.05 of theirs; every answer stops by itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit.course import load_course_data
    from lora_kit.data import json_exact_match
    from lora_kit.demo import demo_settings, run

    settings = demo_settings(output_dir=str(tmp_path))
    result = run(settings, log=lambda *_: None)
    merged = Path(result["merged_dir"])
    q8_0 = export.export_gguf(merged, tmp_path / "model-q8_0.gguf", quantization="q8_0")
    _, eval_ds = load_course_data(settings)
    conversations = [m[:-1] for m in eval_ds["messages"]]
    references = [m[-1]["content"] for m in eval_ds["messages"]]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    settings_gen = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    ours = [a.text for a in generate_details(model, tokenizer, conversations, settings_gen, batch_size=1)]
    f16 = llama_answers(result["gguf"], conversations, settings.max_new_tokens)
    q8 = llama_answers(q8_0, conversations, settings.max_new_tokens)
    assert len(conversations) == 40 and [a for a, _ in f16] == ours
    assert all(reason == "stop" for _, reason in f16 + q8)

    def exact(answers):
        return sum(json_exact_match(a, r) for a, r in zip(answers, references)) / len(references)

    assert exact(ours) >= 0.85 and abs(exact([a for a, _ in q8]) - exact(ours)) <= 0.05


def test_transformers_reads_the_f16_file_back_to_the_same_logits(folder, exported):
    """transformers' own GGUF loader: the exported file dequantizes to the folder's model, logit for logit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit.merge import compare_logits

    f16 = exported["f16"]
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    read_back = AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Ana paid $5 in Rome on 2 January 2020."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        check = compare_logits(original(**ids).logits[0], read_back(**ids).logits[0], tolerance=0.01)
    assert check.ok and check.same_argmax, check  # 16-bit storage moves the logits by about 0.1%


def test_the_converters_architectures_and_last_words_are_read(tmp_path):
    assert export._supported_architectures(tmp_path) is None  # no conversion/__init__.py: not checked before converting
    (tmp_path / "conversion").mkdir()
    for source, expected in [
        ("X = 1\nTEXT_MODEL_MAP: dict[str, type] = {'LlamaForCausalLM': 1}\n", {"LlamaForCausalLM"}),
        ("TEXT_MODEL_MAP = {'A': 1, 'B': 2}\n", {"A", "B"}),
        ("TEXT_MODEL_MAP = build()\n", None),
        ("TEXT_MODEL_MAP = {\n", None),
    ]:
        (tmp_path / "conversion" / "__init__.py").write_text(source)
        assert export._supported_architectures(tmp_path) == expected, source
    output = "loading\r\nWriting:  10%|#     \r\n  x = f(\n      ^^^^\nValueError: bad shape\n"
    assert export._last_lines(output, 2) == "x = f( | ValueError: bad shape"
    assert export._last_lines("", 4) == "nothing"


def test_a_chat_template_in_tokenizer_config_is_enough(tmp_path):
    model = _fake_model(tmp_path / "model", template=False)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    with pytest.raises(LoraKitError, match=r"should end in \.gguf"):  # past the chat template check
        export.export_gguf(model, tmp_path / "model.bin")
