import json

import pytest
from datasets import Dataset

from lora_kit.data import (
    DEMO_SYSTEM,
    demo_task,
    json_exact_match,
    parse_json_answer,
    split_train_eval,
    tokenize_conversation,
    tokenize_conversations,
)
from lora_kit.errors import LoraKitError
from lora_kit.models import LLAMA2_TEMPLATE


def test_only_the_answer_and_its_end_token_carry_loss(embedded_tokenizer):
    tok = embedded_tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    row = tokenize_conversation(tok, msgs)
    learned = tok.decode([t for t in row["labels"] if t != -100])
    assert learned.replace("\n", "") == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert row["labels"].count(tok.eos_token_id) == 2  # EOS learned once per answer: the model learns to stop
    assert len(row["labels"]) == len(row["input_ids"])


def test_eos_is_added_when_the_template_does_not_end_turns_with_it(embedded_tokenizer):
    tok = type(embedded_tokenizer).from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = tokenize_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert row["input_ids"][-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id


def test_llama2_fallback_template_masks_the_prompt(embedded_tokenizer):
    tok = type(embedded_tokenizer).from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = LLAMA2_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST] A" in text
    row = tokenize_conversation(tok, msgs)
    assert tok.decode([t for t in row["labels"] if t != -100]).strip().startswith("A")


def test_truncation_is_reported(embedded_tokenizer):
    train, _ = demo_task(20, 2)
    ds, report = tokenize_conversations(train, embedded_tokenizer, max_length=75)
    assert report.truncated == 20 and report.longest <= 75
    assert "truncated" in str(report)
    with pytest.raises(LoraKitError, match="Raise max_length"):
        tokenize_conversations(train, embedded_tokenizer, max_length=5)


def test_empty_or_answerless_data_is_not_told_to_raise_max_length(embedded_tokenizer):
    with pytest.raises(LoraKitError, match="no conversations") as err:
        tokenize_conversations(Dataset.from_dict({"messages": []}), embedded_tokenizer)
    assert "max_length" not in str(err.value)
    questions = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi?"}]}])
    with pytest.raises(LoraKitError, match="needs an assistant turn") as err:
        tokenize_conversations(questions, embedded_tokenizer)
    assert "Raise max_length" not in str(err.value)


def test_demo_task_is_deterministic_and_held_out():
    a_train, a_eval = demo_task(50, 10, seed=3)
    b_train, b_eval = demo_task(50, 10, seed=3)
    assert a_train["messages"] == b_train["messages"] and a_eval["messages"] == b_eval["messages"]
    train_sentences = {m[1]["content"] for m in a_train["messages"]}
    assert not train_sentences & {m[1]["content"] for m in a_eval["messages"]}
    first = a_train[0]["messages"]
    assert first[0]["content"] == DEMO_SYSTEM and set(json.loads(first[2]["content"])) == {
        "person",
        "city",
        "date",
        "amount",
    }


def test_json_exact_match_parses_rather_than_compares_text():
    ref = '{"person": "Ana", "city": "Rome", "date": "2020-01-02", "amount": 5}'
    assert json_exact_match('Sure! {"amount": 5, "city": "Rome", "person": "Ana", "date": "2020-01-02"}', ref) == 1.0
    assert json_exact_match('{"person": "Ana", "city": "Rome", "date": "2020-01-02", "amount": 6}', ref) == 0.0
    assert json_exact_match("no json here", ref) == 0.0
    assert parse_json_answer("{broken") is None


def test_split_is_deterministic():
    train, _ = demo_task(30, 2)
    a, b = split_train_eval(train, 0.2, seed=1)
    c, d = split_train_eval(train, 0.2, seed=1)
    assert len(b) == 6 and a["messages"] == c["messages"] and b["messages"] == d["messages"]
