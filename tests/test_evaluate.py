"""Tests for lora_kit.evaluate on the embedded model, before and after a few LoRA steps.

One model load and one short training run (10 steps, batch 4, lr 1e-3 on the demo task) are
shared by the whole module; every test reads from that fixture.
"""

import math
import warnings

import pytest
import torch

import lora_kit
from lora_kit import evaluate
from lora_kit.errors import LoraKitError

MAX_NEW = 64  # a demo answer is ~35 tokens: an answer that stops at EOS stays well below this


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; oversubscribed threads make every step far slower
    torch.manual_seed(0)
    model, tok = lora_kit.load_model("embedded")
    lora = lora_kit.LoraSettings(r=8)
    model = lora_kit.add_lora(model, lora)
    train_ds, eval_ds = lora_kit.demo_task(40, 8)
    ppl_before = [evaluate.perplexity(model, eval_ds, tok, batch_size=4) for _ in range(2)]
    settings = lora_kit.TrainSettings(
        max_steps=10,
        micro_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_length=256,
        gradient_checkpointing=False,
        report_to="none",
        output_dir=str(tmp_path_factory.mktemp("run")),
        save_steps=10**6,
        fast=False,
    )
    trainer = lora_kit.build_trainer(model, tok, train_ds, lora=lora, train=settings)
    trainer.train()
    yield {"model": trainer.model, "tok": tok, "eval": eval_ds, "ppl_before": ppl_before}
    torch.set_num_threads(threads)


def test_perplexity_is_finite_deterministic_and_falls_after_training(trained):
    first, second = trained["ppl_before"]
    assert math.isfinite(first) and first > 1
    assert first == second  # the same call gives the same number
    after = evaluate.perplexity(trained["model"], trained["eval"], trained["tok"], batch_size=4)
    assert math.isfinite(after) and after < first
    # The base is still there, unchanged, behind the adapter.
    with evaluate.adapter_disabled(trained["model"]):
        assert evaluate.perplexity(trained["model"], trained["eval"], trained["tok"], batch_size=4) == pytest.approx(
            first, rel=1e-4
        )


def test_perplexity_keeps_no_key_value_cache(trained):
    # A model fresh from loading has use_cache on; a cache of the whole batch is what ran a 7B out of a T4's memory.
    model, caches = trained["model"], []
    handle = model.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    use_cache, model.config.use_cache = model.config.use_cache, True
    try:
        evaluate.perplexity(model, trained["eval"], trained["tok"], batch_size=4)
    finally:
        handle.remove()
        model.config.use_cache = use_cache
    assert caches and all(cache is None for cache in caches)


def test_perplexity_needs_a_tokenizer_for_messages(trained):
    with pytest.raises(LoraKitError, match="needs the tokenizer"):
        evaluate.perplexity(trained["model"], trained["eval"])


def test_compare_answers_shows_base_and_finetuned_differ(trained):
    prompts = list(trained["eval"]["messages"])[:3]
    table = evaluate.compare_answers(
        trained["model"], trained["tok"], prompts, evaluate.GenerationSettings(max_new_tokens=40)
    )
    assert list(table.columns) == ["prompt", "base model", "fine-tuned", "changed"]
    assert list(table["prompt"]) == [m[1]["content"] for m in prompts]  # the user's sentence, not the system
    assert table["changed"].any()
    assert (table["base model"] != table["fine-tuned"]).sum() == table["changed"].sum()


def test_finetuned_model_stops_at_eos(trained):
    results = evaluate.generate_details(
        trained["model"], trained["tok"], list(trained["eval"]["messages"]), max_new_tokens=MAX_NEW, batch_size=8
    )
    assert len(results) == 8
    assert all(r.stopped for r in results), [r for r in results if not r.stopped]
    assert all(r.new_tokens < MAX_NEW for r in results)
    assert all(r.text.startswith("{") for r in results)  # it learned the format
    # the ids as generated: the end-of-turn token left out, and they decode to the text
    assert all(len(r.tokens) == r.new_tokens - 1 for r in results)
    assert all(trained["tok"].decode(r.tokens, skip_special_tokens=True).strip() == r.text for r in results)


def test_streaming_joins_to_the_greedy_answer(trained):
    prompt = list(trained["eval"]["messages"])[0]
    pieces = list(evaluate.stream_generate(trained["model"], trained["tok"], prompt, max_new_tokens=MAX_NEW))
    assert len(pieces) > 1 and all(pieces)  # the streamer emits whole words, so a compact JSON answer is few pieces
    answer = evaluate.generate(trained["model"], trained["tok"], [prompt], max_new_tokens=MAX_NEW)[0]
    assert "".join(pieces).strip() == answer


def test_stream_stops_when_the_consumer_does(trained):
    stream = evaluate.stream_generate(trained["model"], trained["tok"], "Count from 1 to 100.", max_new_tokens=200)
    first = next(stream)
    stream.close()  # joins the generating thread: returns only because generation stopped early
    assert first


def test_task_score_counts_scorer_failures(trained):
    calls = []

    def scorer(prediction, reference):
        calls.append(prediction)
        if len(calls) == 2:
            raise ValueError("cannot parse")
        if len(calls) == 3:
            return float("nan")
        return 1.0

    ds = trained["eval"].select(range(4))
    result = evaluate.task_score(
        trained["model"],
        trained["tok"],
        ds,
        scorer=scorer,
        settings=evaluate.GenerationSettings(max_new_tokens=MAX_NEW),
    )
    assert (result.n, result.failures) == (4, 2)
    assert result.score == pytest.approx(0.5)
    assert result.scores == [1.0, 0.0, 0.0, 1.0]
    assert result.predictions == calls
    assert [trained["tok"].decode(t, skip_special_tokens=True).strip() for t in result.tokens] == calls
    # The default scorer (the demo task's JSON exact match) scores these same answers without failing.
    assert all(lora_kit.json_exact_match(p, m[-1]["content"]) in (0.0, 1.0) for p, m in zip(calls, ds["messages"]))


def test_generation_settings_refuse_nonsense_and_warn_on_ignored_knobs():
    with pytest.raises(LoraKitError, match="temperature"):
        evaluate.GenerationSettings(do_sample=True, temperature=0)
    with pytest.raises(LoraKitError, match="top_p"):
        evaluate.GenerationSettings(top_p=1.5)
    with pytest.raises(LoraKitError, match="max_new_tokens"):
        evaluate.GenerationSettings(max_new_tokens=0)
    with pytest.warns(UserWarning, match="greedy decoding ignores"):
        evaluate.GenerationSettings(temperature=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = evaluate.GenerationSettings().as_kwargs()
    assert kwargs["do_sample"] is False and kwargs["temperature"] is None


def test_decoding_showcase_is_reproducible(trained):
    args = (trained["model"], trained["tok"], "Name three colours.")
    with evaluate.adapter_disabled(trained["model"]):
        first = evaluate.decoding_showcase(*args, seed=1, max_new_tokens=4)
        again = evaluate.decoding_showcase(*args, seed=1, max_new_tokens=4)
    assert list(first.columns) == ["setting", "answer"]
    assert list(first["setting"][:6]) == [
        "greedy",
        "temperature 0.3",
        "temperature 1.2",
        "top-p 0.9",
        "top-k 20",
        "beams 4",
    ]
    assert first.equals(again)
    assert all(isinstance(a, str) and a for a in first["answer"])


def test_as_kwargs_passes_sampling_knobs_only_when_sampling_and_early_stopping_only_with_beams():
    sampled = evaluate.GenerationSettings(do_sample=True, temperature=0.5, top_p=0.8, top_k=10).as_kwargs()
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.5, 0.8, 10)
    assert "early_stopping" not in sampled
    beams = evaluate.GenerationSettings(num_beams=3).as_kwargs()
    assert beams["early_stopping"] is True and beams["num_beams"] == 3 and beams["top_k"] is None


def test_prompts_become_conversations_without_their_answer():
    user = {"role": "user", "content": "Q"}
    answer = {"role": "assistant", "content": "A"}
    assert evaluate._prompts_to_messages("Q") == [[user]]
    assert evaluate._prompts_to_messages([user, answer]) == [[user]]  # one conversation, its answer dropped
    assert evaluate._prompts_to_messages(["Q", [user, answer], []]) == [[user], [user], []]


def test_adapter_disabled_is_a_no_op_for_a_plain_model():
    plain = torch.nn.Linear(2, 2)
    with evaluate.adapter_disabled(plain) as inside:
        assert inside is plain


def test_an_answer_without_eos_keeps_every_token_it_generated(monkeypatch):
    # The pad id (0, <|endoftext|>) is not EOS here: a row that ran into max_new_tokens is all answer, and generate
    # pads only after an EOS, so nothing in such a row is padding to drop.
    model, tok = lora_kit.load_model("embedded")
    assert tok.pad_token_id not in (tok.eos_token_id, model.generation_config.eos_token_id)
    answer = tok("Hello there", add_special_tokens=False)["input_ids"]
    row = [answer[0], tok.pad_token_id, *answer[1:]]

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([row] * len(input_ids))], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    (result,) = evaluate.generate_details(model, tok, ["Hi"], max_new_tokens=len(row))
    assert result.new_tokens == len(row) and not result.stopped
    finished = [*answer, tok.eos_token_id, tok.pad_token_id]  # an EOS, then generate's padding
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: torch.cat([input_ids, torch.tensor([finished])], 1))
    (result,) = evaluate.generate_details(model, tok, ["Hi"], max_new_tokens=len(finished))
    assert result.new_tokens == len(answer) + 1 and result.stopped and result.text == "Hello there"
