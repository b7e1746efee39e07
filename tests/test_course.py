"""lora_kit.course: the notebooks' knobs per environment and their small views of results."""

import re
from dataclasses import fields, replace

import pytest
import torch

from lora_kit import course
from lora_kit.errors import LoraKitError
from lora_kit.hardware import Hardware
from lora_kit.train import LoraSettings, TrainSettings

CPU = Hardware(device="cpu", name="CPU", compute_capability=None, vram_gib=None, gpu_count=0)
T4 = Hardware(device="cuda", name="Tesla T4", compute_capability=(7, 5), vram_gib=14.7, gpu_count=1)
H100 = Hardware(device="cuda", name="H100", compute_capability=(9, 0), vram_gib=79.1, gpu_count=1)
KNOBS = [f.name for f in fields(course.CourseSettings) if f.name != "reasons"]


@pytest.fixture(autouse=True)
def no_smoke_env(monkeypatch):
    monkeypatch.delenv(course.SMOKE_ENV, raising=False)


def test_gpu_qlora_is_the_seeds_recipe():
    cfg = course.course_settings("qlora", hardware=T4)
    assert cfg.profile == "gpu"
    assert (cfg.model, cfg.dataset) == ("NousResearch/Llama-2-7b-chat-hf", "mlabonne/guanaco-llama2-1k")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.quantization, cfg.optim) == (64, 16, 0.1, "nf4", "paged_adamw_32bit")
    assert cfg.gradient_checkpointing and cfg.num_epochs == 1.0


def test_gpu_runs_start_short_and_the_full_epoch_is_one_knob_away():
    cfg = course.course_settings("qlora", hardware=T4)
    assert 0 < cfg.max_steps <= 100 and "max_steps=-1" in cfg.reasons["max_steps"]
    full = course.course_settings("qlora", hardware=T4, max_steps=-1)
    assert full.train.max_steps == -1 and full.checkpoint_folder != cfg.checkpoint_folder


def test_gpu_lora_fits_a_t4_and_lora8_is_the_7b_in_8bit():
    lora = course.course_settings("lora", hardware=T4)
    assert lora.quantization == "none" and lora.model == course.T4_LORA_MODEL
    assert (lora.r, lora.alpha) == (16, 32)
    lora8 = course.course_settings("lora8", hardware=T4)
    assert lora8.quantization == "8bit" and lora8.model == course.SEED_QLORA_MODEL


def test_big_gpu_gets_bigger_batches_than_a_t4():
    t4, h100 = course.course_settings("qlora", hardware=T4), course.course_settings("qlora", hardware=H100)
    assert t4.micro_batch_size * t4.max_length < h100.micro_batch_size * h100.max_length


def test_no_gpu_means_the_embedded_model_and_demo_task():
    cfg = course.course_settings("qlora", hardware=CPU)
    assert (cfg.profile, cfg.model, cfg.dataset, cfg.quantization) == ("cpu", "embedded", "demo", "nf4")
    assert not cfg.gradient_checkpointing


@pytest.mark.parametrize("hardware", [CPU, T4])
def test_smoke_env_shrinks_the_run_everywhere(monkeypatch, hardware):
    monkeypatch.setenv(course.SMOKE_ENV, "1")
    cfg = course.course_settings("lora", hardware=hardware)
    full = course.course_settings("lora", smoke=False, hardware=CPU)
    assert cfg.profile == "smoke" and cfg.model == "embedded"
    assert cfg.max_steps < full.max_steps and cfg.eval_samples <= 20 and not cfg.resume
    assert course.course_settings("lora", smoke=False, hardware=T4).profile == "gpu"  # the argument wins


@pytest.mark.parametrize("method", course.METHODS)
@pytest.mark.parametrize("hardware", [CPU, T4, H100])
def test_every_knob_has_a_reason(method, hardware):
    cfg = course.course_settings(method, hardware=hardware)
    assert set(cfg.reasons) == set(KNOBS)
    assert all(len(cfg.reasons[k]) > 5 for k in KNOBS)
    text = str(cfg)
    for knob in KNOBS:
        assert knob in text and cfg.reasons[knob] in text
    assert "seed 0" not in text  # reasons name the tutorial or paper, not our internal numbering


def test_overrides_replace_a_knob_and_say_so():
    cfg = course.course_settings("lora", hardware=CPU, r=8, max_steps=3)
    assert (cfg.r, cfg.max_steps, cfg.lora.r, cfg.train.max_steps) == (8, 3, 8, 3)
    assert cfg.reasons["r"] == "set by you in the knobs cell"
    taught = course.course_settings("lora", hardware=CPU, bias="lora_only", seed=7)
    assert (taught.lora.bias, taught.train.seed) == ("lora_only", 7)
    with pytest.raises(LoraKitError, match="bias"):
        course.course_settings("lora", hardware=CPU, bias="some").lora
    with pytest.raises(LoraKitError, match="rank"):
        course.course_settings("lora", hardware=CPU, rank=8)
    with pytest.raises(LoraKitError, match="qlora"):
        course.course_settings("dora", hardware=CPU)


def test_settings_become_lora_kit_settings():
    cfg = course.course_settings("qlora", hardware=T4)
    assert isinstance(cfg.lora, LoraSettings) and isinstance(cfg.train, TrainSettings)
    assert cfg.lora.scale == 16 / 64
    assert cfg.train.optim == "paged_adamw_32bit" and cfg.train.output_dir.startswith(cfg.output_dir)
    assert cfg.adapter_dir.name == "adapter"


def test_a_changed_training_knob_gets_its_own_checkpoint_folder():
    base = course.course_settings("lora", hardware=CPU)
    assert course.course_settings("lora", hardware=CPU).checkpoint_folder == base.checkpoint_folder
    for knob, value in [("learning_rate", 5e-4), ("bias", "all"), ("seed", 7), ("dataset", "my.jsonl")]:
        other = course.course_settings("lora", hardware=CPU, **{knob: value})
        assert other.checkpoint_folder != base.checkpoint_folder, knob
    # knobs that leave the weights unchanged keep the folder, so a rerun still resumes
    assert course.course_settings("lora", hardware=CPU, eval_samples=3).checkpoint_folder == base.checkpoint_folder
    epoch = course.course_settings("lora", hardware=T4, max_steps=-1)
    assert "--" not in epoch.checkpoint_folder and "-1epoch-" in epoch.checkpoint_folder
    assert epoch.train.output_dir in str(epoch)  # the knobs printout names the folder


def test_epoch_estimate_scales_the_measured_pace():
    text = course.epoch_estimate(4.0, 450)  # 450 steps at 4 s: 30 minutes
    assert "450 steps" in text and "30 min" in text and "max_steps=-1" in text
    assert "2.0 h" in course.epoch_estimate(8.0, 450, num_epochs=2)
    assert "45 s" in course.epoch_estimate(0.5, 90)


def test_training_report_estimates_the_full_epoch_after_a_short_run():
    from types import SimpleNamespace

    args = SimpleNamespace(max_steps=60, train_batch_size=2, gradient_accumulation_steps=1, num_train_epochs=1.0)
    log = [{"step": 1, "loss": 2.0}, {"step": 60, "loss": 1.0}]
    trainer = SimpleNamespace(args=args, train_dataset=[None] * 900, state=SimpleNamespace(log_history=log))
    result = SimpleNamespace(global_step=60, metrics={"train_runtime": 240.0, "train_steps_per_second": 0.25})
    report = course.training_report(trainer, result)
    assert "loss 2.000 at step 1 -> 1.000 at step 60" in report
    assert "450 steps" in report and "30 min" in report  # 900 rows / 2 per step at 4 s per step
    args.max_steps = -1  # the run was the full epoch already: nothing to estimate
    assert "would take" not in course.training_report(trainer, result)


def test_training_report_gives_tokens_per_second_from_the_rows_trained():
    from types import SimpleNamespace

    from datasets import Dataset

    args = SimpleNamespace(max_steps=10, train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1.0)
    rows = Dataset.from_dict({"input_ids": [[1] * 500, [1] * 1500] * 10})  # 1,000 tokens a row on average
    trainer = SimpleNamespace(args=args, train_dataset=rows, state=SimpleNamespace(log_history=[]))
    result = SimpleNamespace(global_step=10, metrics={"train_runtime": 20.0, "train_steps_per_second": 0.5})
    assert "About 2,000 tokens/s (4 rows of 1,000 tokens on average per step)" in course.training_report(
        trainer, result
    )


def test_training_memory_report_puts_the_measured_peak_beside_the_estimate(tiny_lora):
    from types import SimpleNamespace

    from lora_kit.memory import memory_breakdown

    model, _, _ = tiny_lora
    args = SimpleNamespace(
        optim="paged_adamw_32bit", per_device_train_batch_size=2, max_length=64, gradient_checkpointing=True,
        bf16=False, fp16=True,
    )  # fmt: skip
    paged = torch.zeros(1000)
    paged.is_paged = True  # as bitsandbytes marks the states it puts in managed memory
    optimizer = SimpleNamespace(state={"w": {"state1": paged, "step": 3}})
    report = course.training_memory_report(SimpleNamespace(args=args, model=model, optimizer=optimizer), 1.5, 2.0)
    expected = memory_breakdown(
        model.config, "lora", r=4, micro_batch=2, seq_len=64, optimizer="paged_adamw_32bit", precision="fp16"
    )
    assert "1.50 GiB allocated, 2.00 GiB reserved" in report
    assert f"estimated {expected.total_gib:.2f} GiB allocated for 2 rows of up to 64 tokens" in report
    assert f"keeps {4000 / 2**30:.2f} GiB" in report  # 1,000 fp32 numbers
    args.optim = "sgd_with_a_new_name"  # an optimizer the estimator does not know: said, not raised
    assert "No estimate to compare" in course.training_memory_report(
        SimpleNamespace(args=args, model=model, optimizer=None), 1.5, 2.0
    )


def test_forgetting_check_compares_general_answers_with_the_adapter_off_and_on(tiny_lora):
    model, tok, _ = tiny_lora
    cfg = course.course_settings("lora", smoke=True, hardware=CPU)
    b = next(m for m in model.modules() if hasattr(m, "lora_B")).lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.5)  # a trained-looking adapter: the answers and the perplexity must move
    from datasets import Dataset

    json_answers = Dataset.from_dict({"messages": [[{"role": "assistant", "content": '{"a": 1}'}]] * 5})
    assert course.training_form(json_answers) == "{"
    mixed = Dataset.from_dict({"messages": [[{"role": "assistant", "content": t}] for t in ("Yes", "No", "Maybe")]})
    assert course.training_form(mixed) is None  # no form most answers share
    try:
        summary, answers = course.forgetting_check(model, tok, cfg, json_answers, n_shown=2)
    finally:
        with torch.no_grad():
            b.zero_()
    first, second = summary.split("\n")
    numbers = [float(x.rstrip(",")) for x in first.split() if x.replace(".", "").rstrip(",").isdigit()]
    off, on = numbers[1], numbers[2]  # 6 answers, then off, then on
    assert "Answers in the training answers' form (starting with '{')" in second and "of 6 with it on" in second
    assert off != on and f"{len(course.GENERAL_CHECK)} general reference answers" in summary
    assert ("rose" if on > off else "fell") in first
    assert list(answers.columns) == ["prompt", "base (adapter off)", "fine-tuned (adapter on)"] and len(answers) == 2


def test_drive_is_only_used_in_colab():
    cfg = course.course_settings("lora", hardware=CPU, use_drive=True)
    assert not cfg.use_drive and "Colab" in cfg.reasons["use_drive"]
    assert not cfg.output_dir.startswith("/content")
    assert "not mounted" in course.mount_drive(cfg)


def test_optimizer_report_says_paged_needs_cuda():
    cfg = course.course_settings("qlora", hardware=CPU)
    report = course.optimizer_report(cfg)
    if not torch.cuda.is_available():
        assert "adamw_torch" in report and "CUDA" in report


def test_memory_views_and_claims():
    from lora_kit.memory import llama2_7b_config

    est = course.memory_estimates(llama2_7b_config(), r=16)
    totals = [b.total_gib for b in est.values()]
    assert len(est) == 4 and totals == sorted(totals, reverse=True)  # full > LoRA 16 > LoRA 8 > QLoRA
    assert "100.0% of full" in course.memory_summary(est)
    claims = course.claims_table()
    assert {"source", "claim", "computed", "verdict"} <= set(claims.columns) and len(claims) >= 8
    assert course.LLAMA2_COLAB in set(claims["source"]) and "seed 0" not in claims.to_string()
    bits = course.bits_table(llama2_7b_config())
    assert list(bits["bits per parameter"]) == [16.0, 4.5, 4.127]


def test_quantization_table_nf4_beats_int4_and_fp4_on_a_normal_weight():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    table = course.quantization_table(weight)
    assert list(table["format"])[0] == "NF4"
    assert table["relative RMS error"].is_monotonic_increasing


def test_token_f1_and_scorer_choice():
    assert course.token_f1("the cat sat", "the cat sat") == 1.0
    assert course.token_f1("", "x") == 0.0 and 0 < course.token_f1("a cat", "the cat") < 1
    name, _ = course.scorer_for(course.course_settings("lora", hardware=CPU))
    assert "exact match" in name
    assert course.scorer_for(course.course_settings("lora", hardware=T4))[1] is course.token_f1


def test_loss_tokens_are_the_answer(embedded_tokenizer):
    from lora_kit import demo_task

    train, _ = demo_task(2, 1)
    messages = train[0]["messages"]
    text = course.show_loss_tokens(embedded_tokenizer, messages)
    inside = text.split("[[", 1)[1].split("]]", 1)[0]
    assert inside.startswith(messages[-1]["content"]) and "<|im_end|>" in inside
    assert messages[1]["content"] not in inside and "carry loss" in text


def test_show_rows_and_model_card():
    from lora_kit import demo_task

    train, _ = demo_task(5, 1)
    rows = course.show_rows(train, 3)
    assert list(rows.columns) == ["system", "user", "assistant"] and len(rows) == 3
    card = course.model_card(course.course_settings("lora", hardware=CPU))
    assert card["lora"]["r"] == 16 and card["method"] == "lora"


def test_hub_token_absent_says_how_to_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    token, why = course.hub_token()
    assert token is None and "HF_TOKEN" in why
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert course.hub_token() == ("hf_dummy", "the HF_TOKEN environment variable")


def _target_shapes(model, which="all-linear"):
    """(d_in, d_out) of every layer add_lora adapts: the notebooks' count, read from in/out_features."""
    from lora_kit import find_target_modules

    targets = find_target_modules(model, which)
    return [(m.in_features, m.out_features) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]


@pytest.fixture(scope="module")
def tiny_lora():
    """A two-layer Llama with the embedded tokenizer's vocabulary, wrapped with LoRA r=4; its layer shapes before."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_kit import add_lora, load_tokenizer

    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    base = LlamaForCausalLM(config)
    shapes = _target_shapes(base)
    model = add_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0))
    return model, tok, shapes


@pytest.fixture(scope="module")
def nf4_lora():
    """The embedded model on an NF4 base with LoRA r=4, and what the notebook reads from it before wrapping."""
    from lora_kit import add_lora, load_model

    model, tok = load_model("embedded", "nf4")
    report = course.model_report(model, course.course_settings("qlora", smoke=True, hardware=CPU))
    shapes, n_base = _target_shapes(model), model.num_parameters()
    return add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), report, shapes, n_base


def test_lora_trains_r_times_d_in_plus_d_out_per_adapted_layer(tiny_lora, nf4_lora):
    model, _, shapes = tiny_lora
    assert len(shapes) == 14  # 7 projections x 2 layers
    assert model.get_nb_trainable_parameters()[0] == sum(4 * (d_in + d_out) for d_in, d_out in shapes)
    # An NF4 weight is stored packed (two numbers per byte): its shape comes from in_features and out_features.
    nf4, report, shapes, n_base = nf4_lora
    _, layer = course.first_lora_layer(nf4)
    assert layer.base_layer.weight.numel() * 2 == layer.in_features * layer.out_features
    assert nf4.get_nb_trainable_parameters()[0] == sum(4 * (d_in + d_out) for d_in, d_out in shapes)
    assert n_base == 134_515_008  # SmolLM2-135M at its real size, not its packed bytes
    assert "134,515,008 parameters" in report and "NF4 codes" in report


@pytest.mark.parametrize("which", ["tiny", "nf4"])
def test_b_starts_at_zero_so_the_adapter_changes_nothing(tiny_lora, nf4_lora, which):
    model, tok = (tiny_lora[0], tiny_lora[1]) if which == "tiny" else (nf4_lora[0], tiny_lora[1])
    _, layer = course.first_lora_layer(model)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.abs().sum() > 0 and (B == 0).all()
    assert (layer.scaling["default"] * (B.float() @ A.float())).abs().max().item() == 0.0
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(**enc).logits.float()
        on = model(**enc).logits.float()
    assert torch.equal(on, off)
    with pytest.raises(LoraKitError, match="No LoRA layer"):
        course.first_lora_layer(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("which", ["tiny", "nf4"])
def test_a_trained_update_has_rank_r_and_the_layer_adds_it(tiny_lora, nf4_lora, which):
    model = tiny_lora[0] if which == "tiny" else nf4_lora[0]
    _, layer = course.first_lora_layer(model)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.02)  # as training leaves it: B no longer zero
    try:
        A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
        delta = layer.scaling["default"] * (B @ A)
        assert torch.linalg.matrix_rank(delta).item() == 4  # r, though W is 64 x 64 or 576 x 576
        x = torch.randn(64, layer.in_features, dtype=model.get_input_embeddings().weight.dtype)
        model.eval()
        with torch.no_grad():
            frozen, adapted = layer.base_layer(x).float(), layer(x).float()
        update = x.float() @ delta.T
        assert (adapted - frozen - update).abs().max() < 1e-5 * adapted.abs().max()
        assert 0 < update.norm() / frozen.norm() < 1
    finally:
        with torch.no_grad():
            layer.lora_B["default"].weight.zero_()


def test_guard_keeps_nf4_gradients_right_after_evaluation():
    """bitsandbytes 0.50 repacks NF4 weights for CPU inference; its backward is then wrong. The guard stops it."""
    from lora_kit import add_lora, demo_task, load_model
    from lora_kit.data import tokenize_conversation

    model, tok = load_model("embedded", "nf4")  # load_model switches the repacking off
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    model = add_lora(model, LoraSettings(r=4, dropout=0.0))
    ex = tokenize_conversation(tok, demo_task(1, 1)[0][0]["messages"])
    ids = torch.tensor([ex["input_ids"]])
    layer = course.first_lora_layer(model)[1].base_layer
    shape = tuple(layer.weight.shape)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # an evaluation, as before training in the notebooks
    assert tuple(layer.weight.shape) == shape  # not repacked


def test_side_by_side_shows_each_answers_score():
    from lora_kit.evaluate import TaskScore

    ds = __import__("lora_kit").demo_task(4, 2, seed=0)[1]
    results = {
        "base (adapter off)": (9.0, TaskScore(0.0, 2, 0, ["a", "b"], [0.0, 0.0])),
        "fine-tuned (adapter on)": (2.0, TaskScore(0.5, 2, 0, ["c", "d"], [1.0, 0.0])),
    }
    table = course.side_by_side(ds, results, n=2)
    assert list(table["fine-tuned score"]) == [1.0, 0.0] and list(table["base score"]) == [0.0, 0.0]
    assert list(table["fine-tuned"]) == ["c", "d"]


def test_model_menu_marks_what_fits_the_gpu_from_the_estimate():
    t4 = Hardware(device="cuda", name="Tesla T4", compute_capability=(7, 5), vram_gib=15.0, gpu_count=1)
    lora = course.course_settings("lora", smoke=False, hardware=t4)
    menu = course.model_menu(lora, t4).set_index("model")
    fit = menu["on Tesla T4 (15 GiB)"]
    assert fit["HuggingFaceTB/SmolLM2-1.7B-Instruct"] == "fits" and fit["Qwen/Qwen2.5-7B-Instruct"] == "does not fit"
    assert "current choice" in menu.loc[lora.model, "note"]
    qlora = course.model_menu(course.course_settings("qlora", smoke=False, hardware=t4), t4).set_index("model")
    # 4-bit bases shrink the 7-8B models' need; on a 0.5B the fp32 embeddings QLoRA keeps outweigh the 4-bit saving.
    need, need_16bit = qlora["estimated GPU memory (GiB)"], menu["estimated GPU memory (GiB)"]
    big = ["NousResearch/Llama-2-7b-chat-hf", "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"]
    assert (need[big] < need_16bit[big] - 4).all()
    assert need["Qwen/Qwen2.5-0.5B-Instruct"] > need_16bit["Qwen/Qwen2.5-0.5B-Instruct"]
    assert qlora["on Tesla T4 (15 GiB)"]["Qwen/Qwen2.5-7B-Instruct"].startswith("tight")
    shorter = course.model_menu(replace(lora, max_length=256), t4).set_index("model")
    assert (shorter["estimated GPU memory (GiB)"] <= menu["estimated GPU memory (GiB)"]).all()
    assert "no GPU here" in course.model_menu(lora, CPU).columns[2]


def test_gpu_knobs_say_what_they_need_of_the_gpu_and_shrink_when_it_is_too_small():
    from lora_kit.models import embedded_model_path

    t4 = Hardware(device="cuda", name="Tesla T4", compute_capability=(7, 5), vram_gib=15.0, gpu_count=1)
    qlora = course.course_settings("qlora", smoke=False, hardware=t4)
    assert qlora.micro_batch_size == 2 and "estimates 10.0 GiB of this GPU's 15.0 GiB" in str(qlora)
    # A GPU too small for the recipe's 2 x 1024 tokens: the micro-batch goes down, then max_length, with reasons.
    tiny_gpu = Hardware(device="cuda", name="Tiny", compute_capability=(7, 5), vram_gib=1.2, gpu_count=1)
    small = course.course_settings("lora", smoke=False, hardware=tiny_gpu, model=str(embedded_model_path()))
    assert (small.micro_batch_size, small.max_length) == (1, 512)
    assert "so lowered" in small.reasons["micro_batch_size"] and "does not fit" in small.reasons["max_length"]
    assert small.micro_batch_size * small.gradient_accumulation_steps == 2  # the recipe's examples per step
    # What the learner set is kept, with a warning.
    kept = course.course_settings(
        "lora", smoke=False, hardware=tiny_gpu, model=str(embedded_model_path()), micro_batch_size=8
    )
    assert kept.micro_batch_size == 8 and "may not fit" in kept.reasons["micro_batch_size"]
    # Weights alone too big: a clear error with the numbers and the next method down.
    with pytest.raises(LoraKitError, match=r"needs 15\.3 GiB.*Try method 'lora8'"):
        course.course_settings("lora", smoke=False, hardware=t4, model="NousResearch/Llama-2-7b-chat-hf")


def test_showcase_and_merged_answer_report_say_which_answer_is_right():
    from lora_kit.data import demo_task
    from lora_kit.evaluate import TaskScore

    _, eval_ds = demo_task(4, 3, seed=0)
    reference = eval_ds["messages"][1][-1]["content"]
    tuned = TaskScore(score=1 / 3, n=3, failures=0, predictions=["x", reference, "y"], scores=[0.0, 1.0, 0.0])
    assert course.showcase_index({"fine-tuned (adapter on)": (1.0, tuned)}) == 1
    nothing = TaskScore(score=0.0, n=3, failures=0, predictions=["x"] * 3, scores=[0.0] * 3)
    assert course.showcase_index({"fine-tuned (adapter on)": (1.0, nothing)}) == 0
    qlora = course.course_settings("qlora", smoke=True, hardware=CPU)
    same = course.merged_answer_report(reference, reference, eval_ds, 1, qlora)
    assert same.startswith("The merged model gives the adapter's answer") and "adapter 1.00, merged 1.00" in same
    differs = course.merged_answer_report("wrong", reference, eval_ds, 1, qlora)
    assert "adapter 1.00, merged 0.00" in differs and "NF4-rounded" in differs and "dequantized" in differs
    lora = course.course_settings("lora", smoke=True, hardware=CPU)
    assert "rounded to 16 bits" in course.merged_answer_report("wrong", reference, eval_ds, 1, lora)
    assert "rounded to 16 bits" in course.merged_answer_report("wrong", reference, eval_ds, 1, qlora, "dequantized")


def test_reload_report_finds_where_two_answers_part_and_the_logit_gap_there(monkeypatch):
    from lora_kit import load_model
    from lora_kit.data import render_chat
    from lora_kit.evaluate import generate_details

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    gaps = {}
    for quantization in ("none", "8bit"):
        model, tok = load_model("embedded", quantization)
        (answer,) = generate_details(model, tok, [prompt], max_new_tokens=12)
        assert course.reload_report(model, tok, prompt, answer.tokens, answer.tokens).endswith("word for word.")
        rendered = render_chat(tok, prompt)
        other = rendered + answer.text[: answer.text.index(" France")] + " Lyon"  # far from greedy's choice
        other = tok(other, add_special_tokens=False).input_ids[len(tok(rendered, add_special_tokens=False).input_ids) :]
        wide = course.reload_report(model, tok, prompt, answer.tokens, other)
        assert "' France' here, ' Lyon' in section 8" in wide and "more than the batch" in wide
        gaps[quantization] = [float(g) for g in re.findall(r"([\d.]+) apart", wide)]
        # an answer that stops early parts from a longer one at its end of turn
        assert "' France' here, '<|im_end|>' in section 8" in course.reload_report(
            model, tok, prompt, answer.tokens, other[: len(other) - 1]
        )
    alone, batched = gaps["none"]
    assert alone == batched > course.NEAR_TIE_LOGITS  # 16-bit: the batch changes nothing
    assert gaps["8bit"][0] != gaps["8bit"][1]  # 8-bit: the same row computes differently in a padded batch
    monkeypatch.setattr(course, "NEAR_TIE_LOGITS", max(gaps["8bit"]) + 1)  # the same gap read as a tie
    assert "a near tie" in course.reload_report(model, tok, prompt, answer.tokens, other)
