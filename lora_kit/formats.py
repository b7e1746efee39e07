"""Load the conversational data a learner brings and turn it into one shape.

:func:`load_data` returns a ``datasets.Dataset`` with either a ``messages`` column (each row a list of
``{"role", "content"}`` with an optional first ``system`` turn, at least one ``user`` turn, ending with an
``assistant`` turn) or, for raw documents, a ``text`` column of overlapping chunks. The formats understood are
listed in :data:`FORMATS`, one small converter each in :data:`CONVERTERS`. Every problem a user can cause is a
:class:`lora_kit.errors.DataFormatError` naming the file, the line or row (1-based), the fields seen, the formats
accepted and what to do.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import json
import os
import re
import warnings
from pathlib import Path

from lora_kit.errors import DataFormatError

__all__ = ["load_data", "to_messages", "detect_format", "chunk_text", "CONVERTERS", "FORMATS"]

# What each format looks like, in words (used in every error message).
FORMATS = {
    "alpaca": "alpaca (instruction, output[, input])",
    "instruction": "instruction (instruction, response[, system])",
    "sharegpt": "sharegpt (conversations: [{from, value}, ...])",
    "messages": "messages (messages: [{role, content}, ...])",
    "prompt_completion": "prompt_completion (prompt, completion)",
    "guanaco": "guanaco (text: '### Human: ... ### Assistant: ...')",
    "llama2": "llama2 (text: '<s>[INST] ... [/INST] ... </s>')",
    "text": "text (text: raw documents, or a folder of .txt/.md files)",
}
ACCEPTED = "Expected one of: " + ", ".join(FORMATS.values()) + "."

ROLES = ("system", "user", "assistant")
# Names other tools give the three roles (ShareGPT dumps use human/gpt, some chatgpt/bing/bard;
# Gemini uses model; OpenAI's newer API calls the system prompt "developer").
ROLE_ALIASES = {
    **dict.fromkeys(("system", "developer"), "system"),
    **dict.fromkeys(("user", "human"), "user"),
    **dict.fromkeys(("assistant", "gpt", "chatgpt", "bard", "bing", "model"), "assistant"),
}

# Field names people often use, and the name lora_kit expects instead (for the "what to do" hint).
_RENAME_HINTS = {
    **dict.fromkeys(("question", "query"), "instruction"),
    **dict.fromkeys(("answer", "reply"), "response"),
    **dict.fromkeys(("dialog", "dialogue", "chat"), "messages"),
    **dict.fromkeys(("content", "document"), "text"),
    **{"prompt_text": "prompt", "target": "output", "conversation": "conversations"},
}
# File extension -> how it is read.
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".txt": "raw", ".md": "raw"}


class _Problem(Exception):
    """A problem inside one record; turned into a DataFormatError with its location."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _short(value, width: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def _message(where: str | None, record, problem: str, fix: str, fmt_note: str = "") -> str:
    head, note = (f"{where}: " if where else ""), (f" [format {fmt_note}]" if fmt_note else "")
    kind = type(record).__name__
    fields = repr(list(record)) if isinstance(record, dict) else f"none (the item is a {kind}, not an object)"
    seen = "" if problem.startswith("fields seen") else f" Fields seen: {fields}."
    fix = fix or "Fix this record, or pass format=... to say which format the data uses."
    return f"{head}{problem}{note}.{seen} {ACCEPTED} {fix}"


# Small checks shared by the converters.
def _clean(value, what: str, *, required: bool = True) -> str:
    """Return ``value`` stripped; it must be a string (``None``/"" allowed when optional)."""
    if value is None:
        if required:
            raise _Problem(f"{what} is null (empty)", f"Give {what} some text.")
        return ""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value)
    ):
        value = "\n".join(p["text"] for p in value)  # OpenAI "content parts": the text parts, in order
    if not isinstance(value, str):
        raise _Problem(
            f"{what} must be a string, got {type(value).__name__} {_short(value)}",
            f"Write {what} as text (in JSON, put it in quotes).",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Problem(
            f"{what} contains an invalid character (a lone surrogate escape such as \\ud800)",
            "Remove or fix that character; the file must hold valid Unicode text.",
        ) from None
    value = value.strip()
    if required and not value:
        raise _Problem(f"{what} is empty", f"Give {what} some text, or drop this record.")
    return value


def _field(record: dict, name: str, fmt: str):
    if name not in record:
        raise _Problem(
            f"missing field '{name}' needed by {FORMATS[fmt]}",
            f"Add '{name}' to this record, or pass format=... if the data is in another format.",
        )
    return record[name]


def _text_field(record: dict, name: str, fmt: str, *, required: bool = True) -> str:
    return _clean(_field(record, name, fmt), f"'{name}'", required=required)


def _finish(messages: list[dict]) -> tuple[list[dict], bool]:
    """Check the conversation rules; drop trailing user turns (nothing to learn from them).

    Returns the messages and whether trailing turns were dropped.
    """
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise _Problem(
            f"turn {roles.index('system', 1) + 1} is a system turn; a system prompt may only be the first turn, once",
            "Move the system prompt to the start, or merge the system turns into one.",
        )
    if "user" not in roles:
        raise _Problem(
            "the conversation has no user turn",
            "Every example needs at least one user turn followed by an assistant answer.",
        )
    if "assistant" not in roles:
        raise _Problem(
            "the conversation has no assistant turn to learn from",
            "Every example needs at least one assistant answer after a user turn.",
        )
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if "user" not in roles[:last]:
        raise _Problem(
            "no user turn comes before the last assistant answer",
            "Every example needs a user turn followed by an assistant answer.",
        )
    return messages[: last + 1], last < len(roles) - 1


def _turns(turns, list_field: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    if not isinstance(turns, list):
        raise _Problem(
            f"'{list_field}' must be a list of {{{role_key}, {content_key}}} objects, got {type(turns).__name__}",
            "A string is not a list of turns; CSV cells cannot hold lists, so store "
            "conversations in JSON Lines (.jsonl), one object per line."
            if isinstance(turns, str)
            else f"Make '{list_field}' a list of turns.",
        )
    if not turns:
        raise _Problem(f"'{list_field}' is an empty list", "Drop this record or give it turns.")
    out, shape = [], f'Write each turn as {{"{role_key}": ..., "{content_key}": ...}}.'
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise _Problem(f"turn {n} of '{list_field}' is a {type(turn).__name__}, not an object", shape)
        rk = role_key if role_key in turn else "role"  # ShareGPT dumps also use role/content
        ck = content_key if content_key in turn else "content"
        if rk not in turn or ck not in turn:
            raise _Problem(
                f"turn {n} of '{list_field}' has keys {list(turn.keys())!r}, expected '{role_key}' and '{content_key}'",
                shape,
            )
        raw_role = turn[rk]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _Problem(
                f"turn {n} of '{list_field}' has unknown role {_short(raw_role, 40)}",
                "Use one of system, user, assistant "
                f"(also understood: {', '.join(sorted(set(ROLE_ALIASES) - set(ROLES)))}).",
            )
        out.append({"role": role, "content": _clean(turn[ck], f"the content of turn {n} of '{list_field}'")})
    return out


def _with_system(system: str, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _exchange(record: dict, prompt: str, answer: str) -> list[dict]:
    """One user prompt and its answer, after the record's optional 'system' field."""
    system = _clean(record.get("system"), "'system'", required=False)
    return _with_system(system, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


# One converter per format, named _from_<format>: record -> list of messages (checked by _finish afterwards).
def _from_alpaca(record: dict) -> list[dict]:
    instruction = _text_field(record, "instruction", "alpaca")
    extra = _clean(record.get("input"), "'input'", required=False)
    output = _text_field(record, "output", "alpaca")
    return _exchange(record, f"{instruction}\n\n{extra}" if extra else instruction, output)


def _from_instruction(record: dict) -> list[dict]:
    instruction, response = (_text_field(record, k, "instruction") for k in ("instruction", "response"))
    return _exchange(record, instruction, response)


def _from_sharegpt(record: dict) -> list[dict]:
    turns = _turns(_field(record, "conversations", "sharegpt"), "conversations", "from", "value")
    system = _clean(record.get("system"), "'system'", required=False)
    if system and turns[0]["role"] == "system":
        raise _Problem("both a 'system' field and a system turn are given", "Keep only one system prompt.")
    return _with_system(system, turns)


def _from_messages(record: dict) -> list[dict]:
    return _turns(_field(record, "messages", "messages"), "messages")


def _from_prompt_completion(record: dict) -> list[dict]:
    prompt = _field(record, "prompt", "prompt_completion")
    completion = _field(record, "completion", "prompt_completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        # TRL's conversational prompt-completion: two lists of {role, content}.
        return _turns(prompt, "prompt") + _turns(completion, "completion")
    system = _clean(record.get("system"), "'system'", required=False)
    prompt, completion = _clean(prompt, "'prompt'"), _clean(completion, "'completion'")
    return _with_system(system, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])


_GUANACO_SPLIT = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _from_guanaco(record: dict) -> list[dict]:
    text = _text_field(record, "text", "guanaco")
    pieces = _GUANACO_SPLIT.split(text)
    if len(pieces) < 3:
        raise _Problem(
            "'text' has no '### Human:' / '### Assistant:' markers",
            "Pass format='text' if this is raw text, or add the markers.",
        )
    out = []
    lead = pieces[0].strip()
    if lead:  # text before the first marker reads as a system prompt
        out.append({"role": "system", "content": lead})
    for n, (marker, content) in enumerate(zip(pieces[1::2], pieces[2::2]), 1):
        if not content.strip():
            raise _Problem(f"turn {n} ('### {marker}:') of 'text' is empty", "Give every turn some text.")
        out.append({"role": "user" if marker.lower() == "human" else "assistant", "content": content.strip()})
    return out


_LLAMA2_SPLIT = re.compile(r"(\[/?INST\])")
_SYS = re.compile(r"^\s*<<SYS>>(.*?)<</SYS>>(.*)$", re.DOTALL)
_BOS_EOS = re.compile(r"\A(?:\s*<s>)*|(?:\s*</?s>)*\s*\Z")  # leading <s>, trailing </s> or <s>, any number


def _strip_bos_eos(s: str) -> str:
    return _BOS_EOS.sub("", s).strip()


def _from_llama2(record: dict) -> list[dict]:
    text = _text_field(record, "text", "llama2")
    parts = _LLAMA2_SPLIT.split(text)
    if _strip_bos_eos(parts[0]):
        raise _Problem(
            "'text' has text before the first [INST]",
            "Start each example with '<s>[INST]', or pass format='text' for raw text.",
        )
    markers = parts[1::2]
    if not markers or any(m != ("[INST]" if k % 2 == 0 else "[/INST]") for k, m in enumerate(markers)):
        raise _Problem(
            "'text' has unbalanced [INST] ... [/INST] markers",
            "Each turn must read '[INST] prompt [/INST] answer </s>'.",
        )
    bodies = parts[2::2]  # user, assistant, user, assistant, ...
    out = []
    for k, body in enumerate(bodies):
        content, role = _strip_bos_eos(body), "user" if k % 2 == 0 else "assistant"
        if role == "user":
            m = _SYS.match(content)
            if m:
                if k != 0:
                    raise _Problem(
                        "<<SYS>> appears after the first turn", "Put the system prompt in the first [INST] only."
                    )
                system = m.group(1).strip()
                if system:
                    out.append({"role": "system", "content": system})
                content = m.group(2).strip()
            if "<<SYS>>" in content or "<</SYS>>" in content:
                raise _Problem(
                    "'text' has an unclosed or misplaced <<SYS>> block",
                    "Write '<<SYS>>\\nsystem prompt\\n<</SYS>>' right after [INST].",
                )
        if not content:
            if role == "assistant" and k == len(bodies) - 1:
                continue  # a prompt with no answer yet: dropped like any trailing user turn
            raise _Problem(f"turn {k + 1} ({role}) of 'text' is empty", "Give every turn text.")
        out.append({"role": role, "content": content})
    return out


def _from_text(record: dict) -> list[dict]:
    raise _Problem(
        "raw text is not a conversation",
        "load_data(..., format='text') returns raw text as a 'text' column of chunks.",
    )


CONVERTERS = {
    "alpaca": _from_alpaca,
    "instruction": _from_instruction,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "guanaco": _from_guanaco,
    "llama2": _from_llama2,
    "text": _from_text,
}


# Detection.
def _require_object(record) -> None:
    if not isinstance(record, dict):
        raise _Problem(
            f"the item is a {type(record).__name__}, not an object",
            "Each example must be a JSON object / dict of fields.",
        )


def _detect(record) -> str:
    _require_object(record)
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        text = record["text"] if isinstance(record["text"], str) else ""
        if "[INST]" in text and "[/INST]" in text:
            return "llama2"
        return "guanaco" if _GUANACO_SPLIT.search(text) else "text"
    hints = [f"'{k}' -> '{_RENAME_HINTS[k]}'" for k in record if isinstance(k, str) and k in _RENAME_HINTS]
    hint = f" (e.g. {', '.join(hints)})" if hints else ""
    raise _Problem(
        f"fields seen {list(record.keys())!r} match no known format", f"Rename the fields{hint} or pass format=..."
    )


def _format_of(record) -> str | None:
    """The format of ``record``, or None when it matches none (a turn alone matches none)."""
    try:
        return _detect(record)
    except _Problem:
        return None


def detect_format(record: dict) -> str:
    """Name the format of one record (a dict): one of the keys of :data:`FORMATS`.

    Raises DataFormatError when the record matches no format.
    """
    try:
        return _detect(record)
    except _Problem as p:
        raise DataFormatError(_message(None, record, p.problem, p.fix)) from None


# Other names people give the formats.
_FORMAT_ALIASES = {"openai": "messages", "chat": "messages", "raw": "text", "llama_2": "llama2"}
_FORMAT_ALIASES |= {"prompt_and_completion": "prompt_completion"}


def _normalise_format(fmt) -> str:
    name = fmt.strip().lower().replace("-", "_") if isinstance(fmt, str) else fmt
    name = _FORMAT_ALIASES.get(name, name)
    if name != "auto" and name not in CONVERTERS:
        raise DataFormatError(
            f"format={fmt!r} is not a format lora_kit knows. Pass format='auto' to detect it, "
            f"or one of {sorted(CONVERTERS)!r}. {ACCEPTED}"
        )
    return name


def _convert(record, fmt: str) -> tuple[list[dict], bool]:
    _require_object(record)
    return _finish(CONVERTERS[fmt](record))


def to_messages(record: dict, fmt: str = "auto") -> list[dict]:
    """Turn one record of format ``fmt`` (or ``"auto"``) into a list of role/content dicts.

    Trailing user turns with no answer are dropped. Raises DataFormatError for anything else
    that does not fit the format; ``fmt="text"`` (raw text) is not a conversation and raises.
    """
    name = _normalise_format(fmt)
    try:
        if name == "auto":
            name = _detect(record)
        return _convert(record, name)[0]
    except _Problem as p:
        note = "" if name == "auto" else name
        raise DataFormatError(_message(None, record, p.problem, p.fix, note)) from None


# Raw text chunking.
def chunk_text(text: str, chunk_tokens: int = 512, overlap_tokens: int = 64, tokenizer=None) -> list[str]:
    """Split ``text`` into pieces of at most ``chunk_tokens`` tokens; neighbours share
    ``overlap_tokens`` tokens. Tokens come from ``tokenizer`` when given, else whitespace.
    The pieces are slices of the original text, so inner spacing and newlines survive."""
    _check_chunking(chunk_tokens, overlap_tokens)
    spans = ids = None  # character spans of the tokens, or (tokenizer without offsets) their ids
    if tokenizer is None:
        spans = [m.span() for m in re.finditer(r"\S+", text)]
    else:
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            spans = [tuple(s) for s in enc["offset_mapping"]]
        except Exception:  # slow tokenizers cannot give offsets: decode the ids of each window instead
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            spans = [s for s in spans if s[1] > s[0]]
    n = len(ids if spans is None else spans)
    # A window starts every chunk - overlap tokens, until one has reached the end.
    windows = [(i, min(i + chunk_tokens, n)) for i in range(0, n, chunk_tokens - overlap_tokens)]
    windows = [(i, j) for i, j in windows if i == 0 or i + overlap_tokens < n]
    if spans is None:
        pieces = [tokenizer.decode(ids[i:j], skip_special_tokens=True) for i, j in windows]
    else:
        pieces = [text[spans[i][0] : spans[j - 1][1]] for i, j in windows]
    return [p.strip() for p in pieces if p.strip()]


def _check_chunking(chunk_tokens, overlap_tokens) -> None:
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in (chunk_tokens, overlap_tokens))
    if not whole or chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
        raise DataFormatError(
            f"text_chunk_tokens={chunk_tokens!r}, text_overlap_tokens={overlap_tokens!r}: the "
            "chunk size must be a whole number >= 1 and the overlap a whole number from 0 up "
            "to (not including) the chunk size, e.g. 512 and 64."
        )


# Reading files into (location, record) pairs.
def _read_text(path: Path, name: str) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 (PowerShell's `>`, Excel "Unicode")
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise DataFormatError(
                f"{name}: starts with a UTF-16 byte-order mark but is not valid UTF-16. Re-save the file as UTF-8."
            ) from None
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise DataFormatError(
            f"{name}, line {line}: holds NUL bytes, so it looks like a binary file, not text. "
            "Pass a UTF-8 text file (.jsonl, .json, .csv, .txt, .md) or a .parquet file with "
            "the .parquet extension."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start]
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            raise DataFormatError(
                f"{name}, line {line}: not UTF-8 text (byte 0x{bad:02x} cannot be decoded), "
                "nor Windows-1252. Re-save the file as UTF-8 (in Excel: 'CSV UTF-8'; in an "
                "editor: 'Save with encoding UTF-8')."
            ) from None
        warnings.warn(
            f"{name}, line {line}: not valid UTF-8 (byte 0x{bad:02x}); read the file as "
            "Windows-1252 instead. If accented letters look wrong, re-save it as UTF-8.",
            UnicodeWarning,
            stacklevel=4,
        )
        return text.removeprefix("\ufeff")


def _line_of(newlines: list[int], pos: int) -> int:
    return bisect.bisect_left(newlines, pos) + 1


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _value_offsets(text: str, pos: int) -> dict:
    """Start offset of each value in the (already valid) JSON array or object starting at ``pos``,
    keyed by index or key (the last duplicate key wins, as in json.loads)."""
    dec, skip = json.JSONDecoder(), lambda at: _WHITESPACE.match(text, at).end()
    out, is_object, pos = {}, text[pos] == "{", skip(pos + 1)
    while text[pos] not in "]}":
        key = len(out)
        if is_object:
            key, pos = dec.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past the colon
        out[key] = pos
        pos = skip(dec.raw_decode(text, pos)[1])
        if text[pos] == ",":
            pos = skip(pos + 1)
    return out


def _json_error(name: str, text: str, e: Exception, offset_line: int = 0) -> DataFormatError:
    if isinstance(e, json.JSONDecodeError):
        lines = text.splitlines()
        where = f"{name}, line {e.lineno + offset_line}"
        shown = _short(lines[e.lineno - 1].strip()) if 0 < e.lineno <= len(lines) else "''"
        return DataFormatError(
            f"{where}, column {e.colno}: not valid JSON ({e.msg}) in {shown}. Fix that line "
            "(common causes: a missing comma or quote, single quotes instead of double quotes, "
            "a trailing comma, a line cut in two)."
        )
    if isinstance(e, RecursionError):
        return DataFormatError(f"{name}: JSON nested too deeply to read. Flatten the data.")
    return DataFormatError(f"{name}: not valid JSON ({e}). Fix the file.")


def _records_jsonl(path: Path, name: str, text: str):
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            if not records:  # maybe a whole JSON document saved as .jsonl
                with contextlib.suppress(DataFormatError):
                    return _records_json(path, name, text, fallback=False)
            raise _json_error(name, line, e, offset_line=n - 1) from None
        if not records and isinstance(value, list):  # a JSON array on one line
            return _records_json(path, name, text, fallback=False)
        records.append((f"{name}, line {n}", value))
    return records


def _records_json(path: Path, name: str, text: str, fallback: bool = True):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if fallback and e.msg == "Extra data":  # JSON Lines saved as .json
            with contextlib.suppress(DataFormatError):
                return _records_jsonl(path, name, text)
        raise _json_error(name, text, e) from None
    except (ValueError, RecursionError) as e:
        raise _json_error(name, text, e) from None
    newlines = [m.start() for m in re.finditer("\n", text)]
    start = _WHITESPACE.match(text).end()
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        # {"conversations": [record, ...]}: whole records, not the turns of one conversation.
        nested = [k for k in ("conversations", "messages") if k in lists and data[k] and _format_of(data[k][0])]
        preferred = nested + [k for k in ("data", "train", "examples", "rows", "records", "items") if k in lists]
        key = preferred[0] if preferred else (lists[0] if len(lists) == 1 else None)
        if _format_of(data) and not preferred:  # the file is one record
            return [(f"{name}, line {_line_of(newlines, start)}", data)]
        if key is None:
            raise DataFormatError(
                f"{name}: the top-level JSON object has keys {list(data.keys())!r} but no list "
                "of examples under a key such as 'data'. Write the file as a list of objects "
                '[{...}, {...}], or put that list under "data". ' + ACCEPTED
            )
        items, prefix = data[key], f"{name}, '{key}' item"
    elif isinstance(data, list):
        items, prefix = data, f"{name}, item"
    else:
        raise DataFormatError(
            f"{name}: the JSON holds a single {type(data).__name__}, not a list of examples. "
            "Write it as a list of objects [{...}, {...}] (or use JSON Lines, one object per "
            "line, in a .jsonl file). " + ACCEPTED
        )
    try:  # the line each item starts on; location is a nicety, never fail on it
        at = _value_offsets(text, start)[key] if isinstance(data, dict) else start
        lines = [f" (line {_line_of(newlines, pos)})" for pos in _value_offsets(text, at).values()]
    except Exception:
        lines = []
    if len(lines) != len(items):
        lines = [""] * len(items)
    return [(f"{prefix} {i}{line}", item) for i, (item, line) in enumerate(zip(items, lines), 1)]


def _records_csv(path: Path, name: str, text: str):
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    first = next((line for line in text.split("\n") if line.strip()), "")  # the header, after any blank lines
    if delimiter == "," and "," not in first:  # European Excel writes ';'
        delimiter = next((d for d in (";", "\t") if d in first), ",")
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents in cells
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, header, header_line, next_start = [], None, 1, 1
    try:
        for row in reader:
            start, next_start = next_start, reader.line_num + 1  # a quoted cell may span lines
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header, header_line = [c.strip() for c in row], start
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise DataFormatError(
                        f"{name}, line {start}: the header repeats column(s) {dupes!r}. "
                        "Give every column a different name."
                    )
            elif len(row) != len(header):
                raise DataFormatError(
                    f"{name}, line {start}: {len(row)} values but the header (line {header_line}) has "
                    f"{len(header)} columns {header!r}. Quote values that contain "
                    f"'{delimiter}' or line breaks with double quotes, and give every row "
                    "every column."
                )
            else:
                records.append((f"{name}, line {start}", dict(zip(header, row))))
    except csv.Error as e:
        raise DataFormatError(
            f"{name}, line {reader.line_num}: cannot read this CSV ({e}). Check the quoting on that line."
        ) from None
    if header is not None and not records:
        raise DataFormatError(f"{name}: has a header {header!r} but no rows. Add examples below the header.")
    return records


def _records_parquet(path: Path, name: str):
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataFormatError(
            f"{name}: cannot read as Parquet ({type(e).__name__}: {e}). Check that the file is "
            "a Parquet file, or give it the extension of its real type."
        ) from None
    return _numbered(f"{name}, row", rows)


def _looks_like_path(s: str) -> bool:
    by_shape = s.startswith((".", "/", "~")) or "\\" in s or ":" in s or s.count("/") > 1
    return by_shape or Path(s).suffix.lower() in _SUFFIXES


def _numbered(where: str, rows) -> list[tuple[str, object]]:
    """(location, record) pairs: ``where`` is e.g. "data.parquet, row"."""
    return [(f"{where} {i}", row) for i, row in enumerate(rows, 1)]


# The public loader.
def load_data(source, format="auto", *, split="train", text_chunk_tokens=512, text_overlap_tokens=64, tokenizer=None):
    """Load conversational data (or raw text) from ``source`` into a ``datasets.Dataset``.

    Args:
        source: a local file (.jsonl, .json, .csv, .tsv, .parquet, .txt, .md), a folder of
            .txt / .md files, a list of dicts, a ``datasets.Dataset`` (or ``DatasetDict``), or
            the name of a Hugging Face Hub dataset.
        format: "auto" (detect from the first record) or one of :data:`FORMATS`.
        split: the split to take from a Hub dataset or a DatasetDict.
        text_chunk_tokens, text_overlap_tokens: chunk size and overlap for raw text.
        tokenizer: counts tokens for chunking raw text (a whitespace split when None).

    Returns:
        A Dataset with one ``messages`` column (conversations) or one ``text`` column (raw
        text chunks). Raises DataFormatError, naming the file and line, for bad input.
    """
    import datasets

    fmt = _normalise_format(format)
    _check_chunking(text_chunk_tokens, text_overlap_tokens)
    chunking = dict(chunk_tokens=text_chunk_tokens, overlap_tokens=text_overlap_tokens, tokenizer=tokenizer)

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataFormatError(
                f"the DatasetDict has splits {list(source)!r}, not {split!r}. Pass split= one of those."
            )
        source = source[split]

    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(os.fspath(source)))
        name = os.fspath(source)
        if path.is_dir():
            return _load_folder(path, name, fmt, chunking, datasets)
        if path.is_file():
            kind = _SUFFIXES.get(path.suffix.lower())
            if kind is None:
                raise DataFormatError(
                    f"{name}: files of type {path.suffix or '(no extension)'!r} are not "
                    f"supported. Use one of {sorted(_SUFFIXES)!r} (from Excel: save as "
                    "'CSV UTF-8'), or a folder of .txt/.md files."
                )
            if kind == "raw":
                return _raw_dataset([_read_text(path, name)], name, fmt, chunking, datasets)
            if kind == "parquet":
                records = _records_parquet(path, name)
            else:
                text = _read_text(path, name)
                if not text.strip():
                    raise DataFormatError(f"{name}, line 1: the file is empty. Put examples in it. " + ACCEPTED)
                reader = {"json": _records_json, "jsonl": _records_jsonl, "csv": _records_csv}[kind]
                records = reader(path, name, text)
            return _records_dataset(records, name, fmt, chunking, datasets)
        if isinstance(source, os.PathLike) or _looks_like_path(name):
            raise DataFormatError(
                f"{name}: no such file or folder (looked in {os.getcwd()}). Check the path; "
                "in Colab, upload the file or mount Drive first."
            )
        return _load_hub(name, split, fmt, chunking, datasets)

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _records_dataset(_numbered("the Dataset, row", source), "the Dataset", fmt, chunking, datasets)
    if isinstance(source, (list, tuple)):
        return _records_dataset(_numbered("the list, item", source), "the list", fmt, chunking, datasets)

    hint = " For a pandas DataFrame use df.to_dict('records')." if type(source).__name__ == "DataFrame" else ""
    raise DataFormatError(
        f"source is a {type(source).__name__}; load_data takes a file path, a folder of "
        f".txt/.md files, a Hub dataset name, a list of dicts or a datasets.Dataset.{hint}"
    )


def _load_hub(name, split, fmt, chunking, datasets):
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataFormatError(
            f"{name}: not a local file or folder, and loading it as a Hugging Face Hub dataset "
            f"failed: the Hub was unreachable or has no such dataset/split "
            f"({type(e).__name__}: {msg}). Download the data and pass a local file "
            "(.jsonl, .json, .csv, .parquet) or a folder of .txt/.md files instead."
        ) from None
    return _records_dataset(_numbered(f"{name} (Hub), row", ds), f"{name} (Hub)", fmt, chunking, datasets)


def _load_folder(path: Path, name: str, fmt: str, chunking, datasets):
    texts = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
    files = sorted(p for p in texts if not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        others = sorted(p.name for p in path.iterdir())[:8]
        raise DataFormatError(
            f"{name}: the folder has no .txt or .md files (found {others!r}). Put raw text "
            "documents in it, or pass a data file (.jsonl, .json, .csv, .parquet) directly."
        )
    docs = [_read_text(p, os.path.join(name, str(p.relative_to(path)))) for p in files]
    return _raw_dataset(docs, name, fmt, chunking, datasets)


def _raw_dataset(docs, name, fmt, chunking, datasets):
    if fmt not in ("auto", "text"):
        raise DataFormatError(
            f"{name}: .txt/.md files hold raw text, which is format 'text', not {fmt!r}. Pass "
            "format='auto' or 'text', or give the conversations as .jsonl/.json/.csv."
        )
    chunks = [chunk for text in docs for chunk in chunk_text(text, **chunking)]
    if not chunks:
        raise DataFormatError(f"{name}: no text found (the files are empty). Add some text.")
    return datasets.Dataset.from_dict({"text": chunks})


def _records_dataset(records, name, fmt, chunking, datasets):
    if not records:
        raise DataFormatError(f"{name}: holds no examples. Add some. " + ACCEPTED)
    first_loc, first = records[0]
    detected_from = None
    if fmt == "auto":
        try:
            fmt = _detect(first)
        except _Problem as p:
            raise DataFormatError(_message(first_loc, first, p.problem, p.fix)) from None
        detected_from = first_loc[len(name) + 2 :]

    if fmt == "text":
        chunks = []
        for loc, rec in records:
            try:
                _require_object(rec)
                text = _text_field(rec, "text", "text", required=False)
            except _Problem as p:
                raise DataFormatError(_message(loc, rec, p.problem, p.fix, "text")) from None
            chunks.extend(chunk_text(text, **chunking))
        if not chunks:
            raise DataFormatError(f"{name}: every 'text' is empty. Add some text. " + ACCEPTED)
        return datasets.Dataset.from_dict({"text": chunks})

    conversations, trimmed = [], []
    for loc, rec in records:
        try:
            messages, cut = _convert(rec, fmt)
        except _Problem as p:
            note, fix = fmt, p.fix
            if detected_from is not None and loc != first_loc:
                note = f"{fmt}, detected from {detected_from}"
                other = _format_of(rec)
                if other and other != fmt:
                    fix = (
                        f"This row looks like {other}, but every row must use one format: "
                        f"convert this row to {fmt}, or split the file by format."
                    )
            raise DataFormatError(_message(loc, rec, p.problem, fix, note)) from None
        if cut:
            trimmed.append(loc)
        conversations.append(messages)
    if trimmed:
        warnings.warn(
            f"{name}: {len(trimmed)} conversation(s) ended with a user turn with no answer "
            f"(first: {trimmed[0]}); those trailing turns were dropped.",
            stacklevel=3,
        )
    return datasets.Dataset.from_dict({"messages": conversations})
