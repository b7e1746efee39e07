"""Perplexity, generation, task scores and before/after comparisons.

The same functions run before and after training, on the same model object: with a PEFT
model, ``adapter_disabled(model)`` gives the base's behaviour without a second load.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .errors import LoraKitError


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def adapter_disabled(model):
    """Run the base model: adapters switched off inside the block (a no-op for a plain model)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model, dataset, tokenizer=None, batch_size: int = 8, max_length: int = 2048) -> float:
    """exp(mean negative log-likelihood) over the tokens that carry loss (the answers).

    Token-weighted: a long answer counts for more tokens than a short one, as in training.
    ``dataset`` is a ``messages`` dataset (needs ``tokenizer``) or a tokenized one with labels.
    """
    if "messages" in dataset.column_names:
        from .data import tokenize_conversations

        if tokenizer is None:
            raise LoraKitError("perplexity on a 'messages' dataset needs the tokenizer: perplexity(model, ds, tokenizer).")
        dataset, _ = tokenize_conversations(dataset, tokenizer, max_length)
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            width = max(len(x) for x in rows["input_ids"])
            ids = torch.zeros(len(rows["input_ids"]), width, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
                ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise LoraKitError("perplexity: no tokens carry loss in this dataset (no assistant answers?).")
    return math.exp(total_nll / total_tokens)


@dataclass
class GenerationSettings:
    """The knobs of decoding. Defaults are greedy: reproducible, best for extraction tasks."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    """Divides the logits: <1 sharpens the distribution (safer), >1 flattens it (more varied)."""
    top_p: float = 0.9
    """Sample only from the smallest set of tokens whose probabilities add up to top_p."""
    top_k: int = 50
    """Sample only from the k most likely tokens."""
    num_beams: int = 1
    """Keep this many candidate continuations and return the most likely whole sequence."""
    repetition_penalty: float = 1.0

    def as_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                      repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _prompts_to_messages(prompts) -> list[list[dict]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append([{"role": "user", "content": p}])
        else:
            msgs = list(p)
            # A conversation that already ends with the answer: drop it so the model writes its own.
            out.append(msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs)
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts, settings: GenerationSettings | None = None, batch_size: int = 16, **overrides) -> list[str]:
    """Answers to a list of prompts (strings or message lists), batched with left padding."""
    settings = settings or GenerationSettings()
    if overrides:
        from dataclasses import replace

        settings = replace(settings, **overrides)
    conversations = _prompts_to_messages(prompts)
    device = _device(model)
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last token, so pad on the left
    try:
        with _eval_mode(model):
            for start in range(0, len(conversations), batch_size):
                texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                         for m in conversations[start : start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, **settings.as_kwargs(), pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
    finally:
        tokenizer.padding_side = side
    return answers


@dataclass
class TaskScore:
    score: float
    n: int
    failures: int  # predictions the scorer could not score (it raised)
    predictions: list[str]

    def as_dict(self) -> dict:
        return {"score": self.score, "n": self.n, "failures": self.failures}


def task_score(model, tokenizer, dataset, scorer=None, settings: GenerationSettings | None = None, batch_size: int = 16) -> TaskScore:
    """Generate answers for a ``messages`` dataset and average ``scorer(prediction, reference)``.

    The default scorer is the demo task's JSON exact match. A scorer that raises counts as 0
    and as a failure, so one odd answer cannot crash an evaluation.
    """
    from .data import json_exact_match

    scorer = scorer or json_exact_match
    conversations = dataset["messages"]
    references = [m[-1]["content"] for m in conversations]
    predictions = generate(model, tokenizer, conversations, settings, batch_size=batch_size)
    scores, failures = [], 0
    for pred, ref in zip(predictions, references):
        try:
            scores.append(float(scorer(pred, ref)))
        except Exception:  # noqa: BLE001 - a user's scorer may fail on odd text; count it, do not crash
            scores.append(0.0)
            failures += 1
    return TaskScore(score=sum(scores) / max(len(scores), 1), n=len(scores), failures=failures, predictions=predictions)


def compare_answers(model, tokenizer, prompts, settings: GenerationSettings | None = None):
    """Base (adapter off) and fine-tuned answers side by side, as a pandas DataFrame."""
    import pandas as pd

    with adapter_disabled(model):
        before = generate(model, tokenizer, prompts, settings)
    after = generate(model, tokenizer, prompts, settings)
    shown = [p if isinstance(p, str) else next(m["content"] for m in p if m["role"] == "user") for p in prompts]
    return pd.DataFrame({"prompt": shown, "base model": before, "fine-tuned": after})
