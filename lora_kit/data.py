"""From conversations to training tensors, and the demo task.

Training data is a ``datasets.Dataset`` with a ``messages`` column (see ``lora_kit.formats``
for loading files of many shapes into it). ``tokenize_conversations`` renders each
conversation with the tokenizer's own chat template, the same one used at inference, and
keeps the loss on the assistant's answers only, end-of-turn token included, so the model
learns to answer and to stop, not to parrot the question.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from datasets import Dataset

from .errors import LoraKitError


# ---------------------------------------------------------------------------------------------
# Chat template and loss mask
# ---------------------------------------------------------------------------------------------
def render_chat(tokenizer, messages, add_generation_prompt: bool = True) -> str:
    """``messages`` as the model sees them: the tokenizer's chat template, the one training used."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of each assistant turn.

    Each span runs from the end of the rendered prompt (with the generation prompt that opens
    the assistant turn) to the end of the rendered turn, so it holds the answer and the
    template's end-of-turn token. This works for every template that renders a conversation
    as a prefix of its continuation, which is what chat templates are for.
    """
    text = render_chat(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i])
        upto = render_chat(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise LoraKitError(
                "The tokenizer's chat template does not render a conversation as a prefix of its continuation "
                f"(turn {i + 1}, role 'assistant'), so lora_kit cannot tell which tokens are the answer. "
                "Use a template without history rewriting, or set tokenizer.chat_template to a plain one "
                "(lora_kit.models.CHATML_TEMPLATE)."
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer, messages, max_length: int | None = None) -> dict:
    """input_ids and labels (-100 outside assistant turns) for one conversation."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(tid if inside else -100)
    eos = tokenizer.eos_token_id
    if spans and eos is not None and eos not in [t for t in labels if t != -100]:
        # The template closes the turn without the EOS token: add it so generation learns to stop.
        ids.append(eos)
        labels.append(eos)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


@dataclass
class TokenizeReport:
    samples: int
    truncated: int
    dropped: int  # nothing left to learn after truncation
    max_length: int | None
    longest: int
    unit: str = "conversations"

    def __str__(self) -> str:
        return (
            f"{self.samples} {self.unit} tokenized; {self.truncated} longer than max_length={self.max_length} "
            f"were truncated, {self.dropped} dropped (nothing left to learn); longest kept: {self.longest} tokens."
        )


def tokenize_conversations(
    dataset: Dataset, tokenizer, max_length: int | None = 2048
) -> tuple[Dataset, TokenizeReport]:
    """Tokenize a ``messages`` dataset for training; returns the dataset and a truncation report."""
    if "messages" not in dataset.column_names:
        raise LoraKitError(
            f"tokenize_conversations needs a 'messages' column; the dataset has {dataset.column_names}. "
            "Load files with lora_kit.load_data, which converts alpaca, ShareGPT, prompt/completion... to messages."
        )
    if len(dataset) == 0:
        raise LoraKitError("The dataset holds no conversations (0 rows). Load some with lora_kit.load_data.")
    rows = [tokenize_conversation(tokenizer, m, max_length) for m in dataset["messages"]]
    kept = [r for r in rows if any(t != -100 for t in r["labels"])]
    report = TokenizeReport(
        samples=len(rows),
        truncated=sum(r["truncated"] for r in rows),
        dropped=len(rows) - len(kept),
        max_length=max_length,
        longest=max((len(r["input_ids"]) for r in kept), default=0),
    )
    if not kept:
        cut = sum(r["truncated"] for r in rows)
        fix = (
            "Raise max_length: the answers were cut off."
            if cut == len(rows)
            else "Every conversation needs an assistant turn with some text (role 'assistant')."
        )
        raise LoraKitError(f"No conversation has an assistant answer left to learn from ({report}). {fix}")
    out = Dataset.from_dict({"input_ids": [r["input_ids"] for r in kept], "labels": [r["labels"] for r in kept]})
    return out, report


def tokenize_texts(dataset: Dataset, tokenizer, max_length: int | None = 2048) -> tuple[Dataset, TokenizeReport]:
    """Tokenize a ``text`` dataset (raw documents, chunked by ``load_data``) for continued pre-training.

    The loss is on every token: the model learns to continue the documents, not to answer.
    """
    if "text" not in dataset.column_names or len(dataset) == 0:
        raise LoraKitError(
            f"tokenize_texts needs a non-empty 'text' column; the dataset has {dataset.column_names} and "
            f"{len(dataset)} rows. Load a folder of .txt/.md files with lora_kit.load_data."
        )
    ids = [tokenizer(text)["input_ids"] for text in dataset["text"]]
    kept = [i[:max_length] if max_length else i for i in ids if i]
    report = TokenizeReport(
        samples=len(ids),
        truncated=sum(max_length is not None and len(i) > max_length for i in ids),
        dropped=len(ids) - len(kept),
        max_length=max_length,
        longest=max(map(len, kept), default=0),
        unit="text chunks",
    )
    if not kept:
        raise LoraKitError(f"Every text chunk is empty ({report}). Add some text to the files.")
    return Dataset.from_dict({"input_ids": kept, "labels": [list(i) for i in kept]}), report


def split_train_eval(dataset: Dataset, eval_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A deterministic train / held-out split."""
    if not 0 < eval_fraction < 1:
        raise LoraKitError(f"eval_fraction={eval_fraction} must be between 0 and 1 (e.g. 0.1 for 10% held out).")
    parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------------------------
# The demo task: sentence in, JSON out
# ---------------------------------------------------------------------------------------------
DEMO_SYSTEM = "Extract person, city, date (YYYY-MM-DD) and amount (a number) as JSON."
_FIRST = "Maria John Aiko Omar Lena Carlos Priya Tom Fatima Ivan".split()
_FIRST += "Grace Kwame Sofia Liam Mei Noah Zara Lucas Anya Diego".split()
_LAST = "Lopez Smith Tanaka Haddad Fischer Silva Patel Brown Khan Petrov".split()
_LAST += "Okafor Mensah Rossi Murphy Chen Weber Ali Martin Novak Garcia".split()
_CITIES = "Lisbon Paris Tokyo Cairo Berlin Madrid Mumbai London Nairobi Moscow".split()
_CITIES += "Lagos Accra Rome Dublin Beijing Vienna Dubai Lyon Prague Lima".split()
_MONTHS = "January February March April May June July August September October November December".split()
# Every sentence holds all four facts, in a different order and wording each time; the model must
# copy the name and city, rewrite the date as YYYY-MM-DD and the amount as a plain number.
_TEMPLATES = [
    "{person} paid {amount} in {city} on {date}.",
    "On {date}, {person} spent {amount} while visiting {city}.",
    "In {city}, {person} received {amount} on {date}.",
    "{person} donated {amount} to a school in {city} on {date}.",
    "{person} flew to {city} on {date} and paid {amount} for the ticket.",
    "A payment of {amount} was made by {person} in {city} on {date}.",
    "On {date} in {city}, {person} won {amount}.",
    "{person} sold a car in {city} for {amount} on {date}.",
]


def _demo_example(rng: random.Random) -> dict:
    template = rng.choice(_TEMPLATES)
    person = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    city = rng.choice(_CITIES)
    year, month, day = rng.randint(1990, 2025), rng.randint(1, 12), rng.randint(1, 28)
    date_text = rng.choice([f"{_MONTHS[month - 1]} {day}, {year}", f"{day} {_MONTHS[month - 1]} {year}"])
    value = rng.choice([rng.randint(5, 900), rng.randint(1000, 20000)])
    amount_text = rng.choice([f"${value:,}", f"{value} dollars", f"${value}"])
    sentence = template.format(person=person, city=city, date=date_text, amount=amount_text)
    answer = {"person": person, "city": city, "date": f"{year:04d}-{month:02d}-{day:02d}", "amount": value}
    return {
        "messages": [
            {"role": "system", "content": DEMO_SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))},
        ]
    }


def demo_task(n_train: int = 400, n_eval: int = 40, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The demo task: a sentence about a person, place, date or amount in; a JSON object out.

    Deterministic for a given seed. The held-out examples are drawn from the same generator
    but no held-out sentence appears in the training set.
    """
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        ex = _demo_example(rng)
        key = ex["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    return Dataset.from_list(rows[:n_train]), Dataset.from_list(rows[n_train:])


def parse_json_answer(text: str):
    """The first JSON object in a model's answer, or None when there is none."""
    match = re.search(r"\{.*?\}", text, re.S)
    if not match:
        return None
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError:
        return None


def json_exact_match(prediction: str, reference: str) -> float:
    """1.0 when the parsed JSON objects are equal (key order and spacing do not matter), else 0.0."""
    pred, ref = parse_json_answer(prediction), json.loads(reference)
    return float(pred is not None and pred == ref)
