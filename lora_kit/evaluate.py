"""Perplexity, generation, task scores and before/after comparisons.

The same functions run before and after training, on the same model object: with a PEFT
model, ``adapter_disabled(model)`` gives the base's behaviour without a second load.

    ppl = perplexity(model, eval_ds, tokenizer)              # token-weighted over the answers
    answers = generate(model, tokenizer, ["Hi!"], max_new_tokens=64)
    for piece in stream_generate(model, tokenizer, "Hi!"):    # token by token, for a chat box
        print(piece, end="")
    table = compare_answers(model, tokenizer, prompts)       # base vs fine-tuned, side by side
    knobs = decoding_showcase(model, tokenizer, "Write a haiku about autumn.")
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass, field, replace

import torch

from .data import json_exact_match, render_chat, tokenize_conversations
from .errors import LoraKitError


@contextlib.contextmanager
def adapter_disabled(model):
    """Run the base model: adapters switched off inside the block (a no-op for a plain model)."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield model


@contextlib.contextmanager
def _eval_mode(model, seed: int | None = None):
    from .speed import eager_inference

    was_training = model.training
    model.eval()
    if seed is not None:  # a sampled answer can be reproduced
        torch.manual_seed(seed)
    try:
        with eager_inference(model):  # no training-only attention kernel or compiled blocks in inference
            yield
    finally:
        model.train(was_training)


# --- Perplexity -------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, dataset, tokenizer=None, batch_size: int = 8, max_length: int = 2048) -> float:
    """exp(mean negative log-likelihood) over the tokens that carry loss (the answers).

    Token-weighted: a long answer counts for more tokens than a short one, as in training.
    ``dataset`` is a ``messages`` dataset (needs ``tokenizer``) or a tokenized one with labels.
    Deterministic: the model runs in eval mode (no dropout) and batches are formed the same way
    every call (sorted by length, which also wastes less compute on padding).
    """
    if "messages" in dataset.column_names:
        if tokenizer is None:
            raise LoraKitError(
                "perplexity on a 'messages' dataset needs the tokenizer: perplexity(model, ds, tokenizer)."
            )
        dataset, _ = tokenize_conversations(dataset, tokenizer, max_length)
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise LoraKitError(
            f"perplexity needs a 'messages' dataset or a tokenized one with input_ids and labels; "
            f"this one has {dataset.column_names} (missing {sorted(missing)})."
        )
    if batch_size < 1:
        raise LoraKitError(f"batch_size={batch_size} must be at least 1.")
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    all_ids, all_labels = dataset["input_ids"], dataset["labels"]
    order = sorted(range(len(all_ids)), key=lambda i: (len(all_ids[i]), i))
    total_nll, total_tokens = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(all_ids[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(rows):  # right padding: causal attention never looks at the pads
                n = len(all_ids[i])
                ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(all_ids[i]), torch.tensor(all_labels[i]), 1
            # use_cache=False: a model fresh from loading would otherwise keep every layer's keys and values of
            # the batch (8 GiB in fp32 for 8 x 1,024 tokens of a 7B), which a T4 does not have beside the weights.
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            # Position t predicts token t+1; keep only the positions whose next token carries loss
            # (in fp32, so half-precision models do not round the sum).
            shift_labels = labels[:, 1:].to(device)
            keep = shift_labels != -100
            picked = logits[:, :-1][keep].float()
            nll = torch.nn.functional.cross_entropy(picked, shift_labels[keep], reduction="sum")
            total_nll += nll.item()
            total_tokens += int(keep.sum())
    if total_tokens == 0:
        raise LoraKitError("perplexity: no tokens carry loss in this dataset (no assistant answers?).")
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise LoraKitError(
            f"perplexity: the mean loss is {mean} (overflow). With fp16 weights, evaluate in fp32 or bf16 instead."
        )
    return math.exp(mean)


# --- Generation -------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    """The knobs of decoding. Defaults are greedy: reproducible, best for extraction tasks.

    Sampling (``do_sample=True``) draws each next token at random from the model's distribution,
    reshaped by temperature, then cut by top-k and top-p. Beams search several continuations
    and keep the most likely whole answer. Set ``seed`` to make sampling reproducible.
    """

    max_new_tokens: int = 128
    """Upper bound on the answer's length. Generation stops earlier at the end-of-turn token."""
    do_sample: bool = False
    """False: greedy (always the most likely token). True: sample with the knobs below."""
    temperature: float = 0.7
    """Divides the logits: <1 sharpens the distribution (safer), >1 flattens it (more varied)."""
    top_p: float = 0.9
    """Sample only from the smallest set of tokens whose probabilities add up to top_p (1.0: off)."""
    top_k: int = 50
    """Sample only from the k most likely tokens (0: off)."""
    num_beams: int = 1
    """Keep this many candidate continuations and return the most likely whole sequence."""
    repetition_penalty: float = 1.0
    """>1 makes tokens already in the text less likely: curbs loops, but can garble exact copies."""
    seed: int | None = None
    """Seed torch's random generator before generating, so a sampled answer can be reproduced."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LoraKitError(f"max_new_tokens={self.max_new_tokens}: must be at least 1 (e.g. 128).")
        if self.do_sample and not self.temperature > 0:
            raise LoraKitError(
                f"temperature={self.temperature} with do_sample=True: must be > 0. For deterministic answers "
                "use do_sample=False (greedy) instead of temperature 0."
            )
        if not 0 < self.top_p <= 1:
            raise LoraKitError(f"top_p={self.top_p}: must be in (0, 1]; 1.0 switches it off.")
        if self.top_k < 0:
            raise LoraKitError(f"top_k={self.top_k}: must be >= 0; 0 switches it off.")
        if self.num_beams < 1:
            raise LoraKitError(f"num_beams={self.num_beams}: must be at least 1 (1 means no beam search).")
        if not self.repetition_penalty > 0:
            raise LoraKitError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1.0 means no penalty).")
        defaults = GenerationSettings.__dataclass_fields__
        changed = [k for k in _SAMPLING if getattr(self, k) != defaults[k].default]
        if not self.do_sample and changed:
            warnings.warn(
                f"{', '.join(changed)} set but do_sample=False: greedy decoding ignores them. "
                "Pass do_sample=True to sample.",
                stacklevel=3,
            )

    def as_kwargs(self) -> dict:
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample,
            # Greedy passes None to override sampling values a model's generation_config may carry
            # (Llama's has temperature 0.6): greedy ignores them, and transformers would warn about each.
            **{k: getattr(self, k) if self.do_sample else None for k in _SAMPLING},
        )
        if self.num_beams > 1:
            kwargs.update(early_stopping=True)
        return kwargs


_SAMPLING = ("temperature", "top_p", "top_k")  # the knobs only sampling reads


def _settings(settings: GenerationSettings | None, overrides: dict) -> GenerationSettings:
    settings = settings or GenerationSettings()
    return replace(settings, **overrides) if overrides else settings


def _prompts_to_messages(prompts) -> list[list[dict]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]  # one prompt (a string, or one conversation) rather than a list of them
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    # A conversation that already ends with the answer: drop it so the model writes its own.
    return [m[:-1] if m and m[-1]["role"] == "assistant" else m for m in conversations]


def _eos_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """The tokens that end an answer: the tokenizer's EOS (ChatML's <|im_end|>) and the model's; and the pad
    token (the tokenizer's, else the first EOS)."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise LoraKitError("The tokenizer has no eos_token: generation could not stop. Set tokenizer.eos_token.")
    return ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]


@dataclass
class Generation:
    """One answer and how it ended."""

    text: str
    stopped: bool
    """True when the model ended its turn (EOS); False when it ran into max_new_tokens."""
    tokens: list[int]
    """The answer's token ids as generated, the end-of-turn token left out. Two runs' answers compare exactly
    by these; decoded text does not always tokenize back to the same ids."""

    @property
    def new_tokens(self) -> int:
        """Tokens generated, the end-of-turn token included."""
        return len(self.tokens) + self.stopped


@torch.no_grad()
def generate_details(
    model, tokenizer, prompts, settings: GenerationSettings | None = None, batch_size: int = 16, **overrides
) -> list[Generation]:
    """Like ``generate``, but each answer comes with its token count and whether it hit EOS."""
    settings = _settings(settings, overrides)
    conversations = _prompts_to_messages(prompts)
    device = next(model.parameters()).device
    eos_ids, pad_id = _eos_and_pad_ids(model, tokenizer)
    results = []
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation continues from the last token, so pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with _eval_mode(model, settings.seed):
            for start in range(0, len(conversations), batch_size):
                texts = [render_chat(tokenizer, m) for m in conversations[start : start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, **settings.as_kwargs(), pad_token_id=pad_id, eos_token_id=eos_ids)
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    # generate pads a row only after its EOS: a row without one is all answer, pad id or not
                    end = next((k for k, t in enumerate(row) if t in eos_ids), None)
                    kept = row if end is None else row[:end]
                    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                    results.append(Generation(text, end is not None, kept))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return results


def generate(
    model, tokenizer, prompts, settings: GenerationSettings | None = None, batch_size: int = 16, **overrides
) -> list[str]:
    """Answers to a list of prompts (strings or message lists), batched with left padding.

    Each prompt goes through the tokenizer's chat template (the one used in training); each
    answer ends at the end-of-turn token or at ``max_new_tokens``. Keyword overrides change
    single settings: ``generate(model, tok, prompts, max_new_tokens=32)``.
    """
    return [g.text for g in generate_details(model, tokenizer, prompts, settings, batch_size, **overrides)]


def stream_generate(model, tokenizer, messages, settings: GenerationSettings | None = None, **overrides):
    """Yield the answer to one prompt (a string or a message list) piece by piece as it is generated.

    The model runs in a background thread feeding transformers' ``TextIteratorStreamer``; joined, the pieces are
    ``generate``'s text. Beam search (``num_beams > 1``) knows its answer only at the end, so it comes as one
    piece. Stopping the iteration early stops the model too.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    settings = _settings(settings, overrides)
    conversation = _prompts_to_messages(messages)
    if len(conversation) != 1:
        raise LoraKitError(f"stream_generate takes one prompt; got {len(conversation)}. Use generate for a batch.")
    if settings.num_beams > 1:
        yield generate(model, tokenizer, conversation, settings)[0]
        return
    eos_ids, pad_id = _eos_and_pad_ids(model, tokenizer)
    text = render_chat(tokenizer, conversation[0])
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors = threading.Event(), []

    def consumer_gone(input_ids, scores, **kwargs):  # a stopping criterion: the consumer of the stream went away
        return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def work():
        try:
            model.generate(
                **enc,
                **settings.as_kwargs(),
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([consumer_gone]),
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread below
            errors.append(exc)
            streamer.end()  # unblock the consumer

    with _eval_mode(model, settings.seed):  # seeded before the thread starts
        thread = threading.Thread(target=work, name="lora_kit-stream", daemon=True)
        thread.start()
        started = False
        try:
            for piece in streamer:
                if not started:  # generate() strips the answer; strip its start here the same way
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece
        finally:
            stop.set()
            thread.join()
    if errors:
        raise errors[0]


def decoding_showcase(model, tokenizer, prompt, seed: int = 0, max_new_tokens: int = 64):
    """One prompt answered under each decoding setting the notebooks teach, as a DataFrame.

    Every row is seeded with ``seed``: change it to see the sampled rows vary while greedy and beams stay put.
    """
    import pandas as pd

    base = GenerationSettings(max_new_tokens=max_new_tokens, seed=seed)
    sample = replace(base, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    rows = [
        ("greedy", base),
        ("temperature 0.3", replace(sample, temperature=0.3)),
        ("temperature 1.2", replace(sample, temperature=1.2)),
        ("top-p 0.9", replace(sample, top_p=0.9)),
        ("top-k 20", replace(sample, top_k=20)),
        ("beams 4", replace(base, num_beams=4)),
        ("repetition penalty 1.3", replace(base, repetition_penalty=1.3)),
    ]
    answers = [(name, generate(model, tokenizer, [prompt], s)[0]) for name, s in rows]
    return pd.DataFrame(answers, columns=["setting", "answer"])


# --- Task scores and before/after comparison --------------------------------------------------
@dataclass
class TaskScore:
    score: float
    n: int
    failures: int  # predictions the scorer could not score (it raised, or returned no finite number)
    predictions: list[str]
    scores: list[float] = field(default_factory=list)
    """One score per prediction (failures count as 0.0)."""
    tokens: list[list[int]] = field(default_factory=list)
    """Each prediction's token ids as generated (``Generation.tokens``)."""

    def as_dict(self) -> dict:
        return {"score": self.score, "n": self.n, "failures": self.failures}


def task_score(
    model, tokenizer, dataset, scorer=None, settings: GenerationSettings | None = None, batch_size: int = 16
) -> TaskScore:
    """Generate answers for a ``messages`` dataset and average ``scorer(prediction, reference)``.

    The reference is each conversation's last (assistant) message; the model answers the
    conversation without it. The default scorer is the demo task's JSON exact match. A scorer
    that raises or returns something that is not a finite number counts as 0 and as a failure,
    so one odd answer cannot crash an evaluation.
    """
    if "messages" not in dataset.column_names:
        raise LoraKitError(f"task_score needs a 'messages' dataset; this one has {dataset.column_names}.")
    scorer = scorer or json_exact_match
    conversations = dataset["messages"]
    bad = [i for i, m in enumerate(conversations) if not m or m[-1]["role"] != "assistant"]
    if bad:
        raise LoraKitError(
            f"task_score: {len(bad)} conversation(s) (first: row {bad[0]}) do not end with an assistant message, "
            "so there is no reference answer to score against."
        )
    references = [m[-1]["content"] for m in conversations]
    generations = generate_details(model, tokenizer, conversations, settings, batch_size=batch_size)
    predictions = [g.text for g in generations]
    scores, failures = [], 0
    for pred, ref in zip(predictions, references):
        try:
            value = float(scorer(pred, ref))
            if not math.isfinite(value):
                raise ValueError(f"scorer returned {value}")
            scores.append(value)
        except Exception:  # noqa: BLE001 - a user's scorer may fail on odd text; count it, do not crash
            scores.append(0.0)
            failures += 1
    return TaskScore(
        sum(scores) / max(len(scores), 1), len(scores), failures, predictions, scores, [g.tokens for g in generations]
    )


def compare_answers(model, tokenizer, prompts, settings: GenerationSettings | None = None):
    """Base (adapter off) and fine-tuned answers side by side, as a pandas DataFrame.

    One model object: PEFT switches the adapters off for the base column, no second load.
    Columns: prompt, base model, fine-tuned, changed (whether the two answers differ).
    """
    import pandas as pd

    if not hasattr(model, "disable_adapter"):
        warnings.warn(
            "compare_answers: this model has no LoRA adapter, so both columns come from the same weights.", stacklevel=2
        )
    with adapter_disabled(model):
        before = generate(model, tokenizer, prompts, settings)
    after = generate(model, tokenizer, prompts, settings)
    shown = [m[-1]["content"] for m in _prompts_to_messages(prompts)]
    return pd.DataFrame(
        {"prompt": shown, "base model": before, "fine-tuned": after, "changed": [b != a for b, a in zip(before, after)]}
    )
