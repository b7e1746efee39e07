"""Tests for lora_kit.formats: every data format a learner brings, and every way it goes wrong."""

import csv
import json
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kit.errors import DataFormatError
from lora_kit.formats import (
    CONVERTERS,
    FORMATS,
    chunk_text,
    detect_format,
    load_data,
    to_messages,
)

ANSWER = "Line one of the answer.\n\n  Indented second paragraph, with  two spaces."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def roles(example):
    return [m["role"] for m in example["messages"]]


def check_conversation(messages):
    """The invariants every converted conversation must satisfy."""
    rs = [m["role"] for m in messages]
    assert set(rs) <= {"system", "user", "assistant"}
    assert "system" not in rs[1:]
    assert "user" in rs and rs[-1] == "assistant"
    for m in messages:
        assert isinstance(m["content"], str) and m["content"]
        assert m["content"] == m["content"].strip()


# ------------------------------------------------------------------------------------------
# Each format, written as a user would.
# ------------------------------------------------------------------------------------------
def test_alpaca_jsonl(tmp_path):
    f = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "  Name a colour.  ", "input": "", "output": ANSWER},
            {"instruction": "Add", "output": "4", "text": "### Instruction: ignored"},
        ],
    )
    ds = load_data(f)
    assert ds.column_names == ["messages"]
    assert len(ds) == 3
    assert roles(ds[0]) == ["user", "assistant"]
    assert ds[0]["messages"][0]["content"] == "Translate to French.\n\nGood morning"
    assert ds[1]["messages"][0]["content"] == "Name a colour."
    assert ds[1]["messages"][1]["content"] == ANSWER.strip()
    assert ds[2]["messages"][1]["content"] == "4"


def test_instruction_response_json_with_optional_system(tmp_path):
    f = write_json(
        tmp_path / "seeds.json",
        [
            {"instruction": "What is LoRA?", "response": ANSWER, "system": "You are terse."},
            {"instruction": "And QLoRA?", "response": "LoRA on a 4-bit base."},
        ],
    )
    ds = load_data(str(f))
    assert len(ds) == 2
    assert roles(ds[0]) == ["system", "user", "assistant"]
    assert ds[0]["messages"][0]["content"] == "You are terse."
    assert ds[0]["messages"][2]["content"] == ANSWER.strip()
    assert roles(ds[1]) == ["user", "assistant"]


def test_json_object_with_list_under_data(tmp_path):
    f = write_json(
        tmp_path / "wrapped.json",
        {"version": 2, "data": [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]},
    )
    ds = load_data(f)
    assert [m["messages"][1]["content"] for m in ds] == ["c1", "c2"]


def test_sharegpt_multi_turn_with_system(tmp_path):
    f = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be kind."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "human", "value": "How are you?"},
                    {"from": "gpt", "value": ANSWER},
                ]
            },
            {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]},
        ],
    )
    ds = load_data(f, format="sharegpt")
    assert len(ds) == 2
    assert roles(ds[0]) == ["system", "user", "assistant", "user", "assistant"]
    assert ds[0]["messages"][4]["content"] == ANSWER.strip()
    assert roles(ds[1]) == ["user", "assistant"]
    assert detect_format({"conversations": []}) == "sharegpt"


def test_messages_format(tmp_path):
    convo = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": ANSWER},
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}, {"messages": convo[1:]}])
    ds = load_data(f)
    assert len(ds) == 2
    assert roles(ds[0]) == ["system", "user", "assistant"]
    assert ds[0]["messages"][2]["content"] == ANSWER.strip()
    assert roles(ds[1]) == ["user", "assistant"]


def test_prompt_completion_csv_with_bom_and_multiline_cell(tmp_path):
    f = write_csv(
        tmp_path / "pc.csv",
        ["prompt", "completion"],
        [["Say hi, politely", ANSWER], ["2+2?", "4"]],
        encoding="utf-8-sig",
    )
    assert f.read_bytes().startswith(b"\xef\xbb\xbf")
    ds = load_data(f)
    assert len(ds) == 2
    assert ds[0]["messages"][0]["content"] == "Say hi, politely"
    assert ds[0]["messages"][1]["content"] == ANSWER.strip()
    assert roles(ds[1]) == ["user", "assistant"]


def test_semicolon_csv_from_european_excel(tmp_path):
    f = tmp_path / "semi.csv"
    f.write_text("instruction;response\nQ1;A1\nQ2;A2\n", encoding="utf-8")
    ds = load_data(f)
    assert [m["messages"][1]["content"] for m in ds] == ["A1", "A2"]


def test_guanaco_text(tmp_path):
    f = write_jsonl(
        tmp_path / "guanaco.jsonl",
        [
            {
                "text": "### Human: Hi there### Assistant: Hello! How can I help?"
                "### Human: Tell me a joke.### Assistant: " + ANSWER
            },
            {"text": "### Human: Q### Assistant: A"},
        ],
    )
    ds = load_data(f)
    assert len(ds) == 2
    assert roles(ds[0]) == ["user", "assistant", "user", "assistant"]
    assert ds[0]["messages"][1]["content"] == "Hello! How can I help?"
    assert ds[0]["messages"][3]["content"] == ANSWER.strip()


def test_llama2_parquet_like_guanaco_llama2_1k(tmp_path):
    rows = [
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n What is 2+2? [/INST] 4 "
        "</s><s>[INST] And 3+3? [/INST] " + ANSWER + " </s>",
        "<s>[INST] Me gradué hace poco, ¿qué hago? [/INST] Busca trabajo. </s>",
    ]
    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": rows}), f)
    ds = load_data(f)
    assert len(ds) == 2
    assert roles(ds[0]) == ["system", "user", "assistant", "user", "assistant"]
    assert ds[0]["messages"][0]["content"] == "You are a helpful assistant."
    assert ds[0]["messages"][1]["content"] == "What is 2+2?"
    assert ds[0]["messages"][4]["content"] == ANSWER.strip()
    assert ds[1]["messages"] == [
        {"role": "user", "content": "Me gradué hace poco, ¿qué hago?"},
        {"role": "assistant", "content": "Busca trabajo."},
    ]


def test_folder_of_text_files_is_chunked_with_overlap(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    words = [f"w{i}" for i in range(50)]
    (docs / "a.txt").write_text(" ".join(words[:25]) + "\n\nnew  paragraph", encoding="utf-8")
    (docs / "sub" / "b.md").write_text("# Title\n\n" + " ".join(words[25:]), encoding="utf-8")
    (docs / "ignored.csv").write_text("x\n1\n", encoding="utf-8")
    ds = load_data(docs, text_chunk_tokens=10, text_overlap_tokens=3)
    assert ds.column_names == ["text"]
    chunks = ds["text"]
    assert all(len(c.split()) <= 10 for c in chunks)
    # a.txt has 27 whitespace tokens -> windows start at 0, 7, 14, 21 (4 chunks); b.md has
    # 27 too (with '#' and 'Title'): 4 more. Chunks never cross from one file to the next.
    assert len(chunks) == 8
    assert chunks[0].split() == words[:10]
    assert chunks[1].split() == words[7:17]  # 3 tokens of overlap
    assert chunks[3] == "w21 w22 w23 w24\n\nnew  paragraph"  # inner spacing kept
    assert chunks[4].startswith("# Title\n\nw25")
    assert "ignored" not in " ".join(chunks)


def test_text_column_without_markers_is_raw_text(tmp_path):
    f = write_jsonl(tmp_path / "raw.jsonl", [{"text": "alpha beta gamma delta"}, {"text": ""}, {"text": "epsilon"}])
    ds = load_data(f, text_chunk_tokens=3, text_overlap_tokens=1)
    assert ds["text"] == ["alpha beta gamma", "gamma delta", "epsilon"]


def test_single_txt_file_and_explicit_text_format(tmp_path):
    f = tmp_path / "book.md"
    f.write_text("one two three", encoding="utf-8")
    assert load_data(f)["text"] == ["one two three"]
    llama = [{"text": "<s>[INST] hi [/INST] yo </s>"}]
    assert load_data(llama, format="text")["text"] == ["<s>[INST] hi [/INST] yo </s>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_chunking_counts_tokens_of_the_given_tokenizer():
    tok = make_tokenizer()
    text = "t1 t2,t3 t4\nt5 t6 t7 t8 t9"  # the comma is a token of its own: 10 tokens
    ds = load_data([{"text": text}], tokenizer=tok, text_chunk_tokens=4, text_overlap_tokens=1)
    chunks = ds["text"]
    assert chunks == ["t1 t2,t3", "t3 t4\nt5 t6", "t6 t7 t8 t9"]
    for c in chunks:
        assert len(tok(c, add_special_tokens=False)["input_ids"]) <= 4
    assert chunk_text(text, 100, 0, tokenizer=tok) == [text]


def test_python_list_dataset_and_datasetdict_sources():
    rows = [{"instruction": "Q", "response": "A"}, {"instruction": "Q2", "response": "A2"}]
    assert len(load_data(rows)) == 2
    ds = datasets.Dataset.from_list(rows)
    out = load_data(ds)
    assert out[1]["messages"] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_data(dd, split="test")) == 1
    with pytest.raises(DataFormatError, match="splits"):
        load_data(dd, split="validation")


def test_load_data_output_feeds_back_into_load_data():
    once = load_data([{"prompt": "p", "completion": "c"}])
    twice = load_data(once)
    assert twice["messages"] == once["messages"]


def test_json_lines_saved_as_json_and_json_array_saved_as_jsonl(tmp_path):
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": "A2"}]
    f = write_jsonl(tmp_path / "oops.json", rows)
    assert len(load_data(f)) == 2
    g = write_json(tmp_path / "oops.jsonl", rows)
    assert len(load_data(g)) == 2


def test_utf16_file_from_powershell_loads(tmp_path):
    f = tmp_path / "ps.jsonl"
    f.write_bytes(('{"instruction": "Café?", "output": "Oui"}\n').encode("utf-16"))
    ds = load_data(f)
    assert ds[0]["messages"][0]["content"] == "Café?"


def test_to_messages_and_detect_format_helpers():
    assert detect_format({"instruction": "a", "output": "b", "input": ""}) == "alpaca"
    assert detect_format({"instruction": "a", "response": "b"}) == "instruction"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "### Human: a ### Assistant: b"}) == "guanaco"
    assert detect_format({"text": "<s>[INST] a [/INST] b </s>"}) == "llama2"
    assert detect_format({"text": "plain"}) == "text"
    assert to_messages({"instruction": "a", "input": "b", "output": "c"}, "alpaca") == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
    ]
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "yo"},
        ]
    }
    assert to_messages(parts)[0] == {"role": "user", "content": "hi"}
    conv_pc = {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}
    assert [m["role"] for m in to_messages(conv_pc, "prompt_completion")] == ["user", "assistant"]
    assert set(CONVERTERS) == set(FORMATS)
    with pytest.raises(DataFormatError, match="raw text is not a conversation"):
        to_messages({"text": "plain"}, "text")


def test_trailing_user_turn_is_dropped_with_a_warning(tmp_path):
    f = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                    {"from": "human", "value": "unanswered"},
                ]
            }
        ],
    )
    with pytest.warns(UserWarning, match=r"t\.jsonl.*line 1"):
        ds = load_data(f)
    assert roles(ds[0]) == ["user", "assistant"]


# ------------------------------------------------------------------------------------------
# Bad input: rejected with the file, the line, the fields, the formats and what to do.
# ------------------------------------------------------------------------------------------
def error_of(*args, **kwargs):
    with pytest.raises(DataFormatError) as info:
        load_data(*args, **kwargs)
    return str(info.value)


def test_broken_json_line(tmp_path):
    f = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Q", "output": "A"})
    f.write_text("\n".join([good] * 6 + ['{"instruction": "Q", "output": "A"'] + [good]) + "\n")
    msg = error_of(f)
    assert "data.jsonl, line 7" in msg
    assert "not valid JSON" in msg and "Fix that line" in msg


def test_broken_json_file_reports_the_line(tmp_path):
    f = tmp_path / "data.json"
    f.write_text('[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": "Q" "output": 1}\n]')
    msg = error_of(f)
    assert "data.json, line 3" in msg and "not valid JSON" in msg


def test_empty_files(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.csv"):
        f = tmp_path / name
        f.write_text("  \n", encoding="utf-8")
        msg = error_of(f)
        assert name in msg and "empty" in msg and "line 1" in msg
    header_only = tmp_path / "header.csv"
    header_only.write_text("instruction,output\n", encoding="utf-8")
    assert "no rows" in error_of(header_only)
    (tmp_path / "empty_dir").mkdir()
    assert "no .txt or .md" in error_of(tmp_path / "empty_dir")
    blank_txt = tmp_path / "blank.txt"
    blank_txt.write_text("\n\n", encoding="utf-8")
    assert "no text" in error_of(blank_txt)
    assert "holds no examples" in error_of([])


def test_unknown_schema_names_fields_formats_and_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", [{"question": "Q", "answer": "A"}])
    msg = error_of("data.jsonl")
    assert msg.startswith("data.jsonl, line 1: fields seen ['question', 'answer'] match no known")
    assert "alpaca (instruction, output[, input])" in msg
    assert "sharegpt" in msg and "llama2" in msg
    assert "'question' -> 'instruction'" in msg and "format=" in msg
    with pytest.raises(DataFormatError, match="match no known format"):
        detect_format({"question": "Q"})


def test_row_missing_a_field(tmp_path):
    f = write_csv(tmp_path / "rows.csv", ["instruction", "response", "system"], [["Q", "A", ""], ["Q2", "", "sys"]])
    msg = error_of(f)
    assert "rows.csv, line 3" in msg and "'response' is empty" in msg
    assert "['instruction', 'response', 'system']" in msg
    g = write_jsonl(
        tmp_path / "rows.jsonl", [{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": None}]
    )
    assert "rows.jsonl, line 2" in error_of(g)


def test_mixed_schemas_report_first_row_that_does_not_fit(tmp_path):
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Q", "output": "A"},
            {"instruction": "Q", "output": "A", "input": "x"},
            {"prompt": "P", "completion": "C"},
            {"question": "never reached", "answer": "x"},
        ],
    )
    msg = error_of(f)
    assert "mixed.jsonl, line 3" in msg
    assert "detected from line 1" in msg and "alpaca" in msg
    assert "looks like prompt_completion" in msg
    assert "['prompt', 'completion']" in msg


def test_mixed_schemas_in_json_name_item_and_line(tmp_path):
    f = write_json(
        tmp_path / "mixed.json",
        [
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
        ],
    )
    msg = error_of(f)
    assert "mixed.json, item 2 (line" in msg and "looks like sharegpt" in msg


def test_non_utf8_csv_falls_back_to_cp1252_with_a_warning(tmp_path):
    f = write_csv(
        tmp_path / "excel.csv",
        ["instruction", "output"],
        [["Q", "A"], ["Où est le café ?", "Là-bas – à droite"]],
        encoding="cp1252",
    )
    with pytest.warns(UnicodeWarning, match=r"excel\.csv, line 3"):
        ds = load_data(f)
    assert ds[1]["messages"][0]["content"] == "Où est le café ?"
    assert ds[1]["messages"][1]["content"] == "Là-bas – à droite"


def test_undecodable_bytes_are_rejected_with_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"instruction": "Q", "output": "A"}\n{"instruction": "\x81", "output": "A"}\n')
    msg = error_of(f)
    assert "bad.jsonl, line 2" in msg and "UTF-8" in msg
    g = tmp_path / "binary.json"
    g.write_bytes(b"[\n\x00\x01\x02")
    assert "binary.json, line 2" in error_of(g)


def test_non_string_content(tmp_path):
    f = write_jsonl(
        tmp_path / "types.jsonl",
        [
            {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": 4}]},
        ],
    )
    msg = error_of(f)
    assert "types.jsonl, line 2" in msg and "must be a string, got int 4" in msg
    assert "quotes" in msg
    g = write_json(tmp_path / "types.json", [{"instruction": ["a"], "output": "b"}])
    assert "types.json, item 1 (line 2)" in error_of(g)


def test_unknown_role_and_bad_turn_order(tmp_path):
    f = write_jsonl(
        tmp_path / "roles.jsonl", [{"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}]
    )
    msg = error_of(f)
    assert "roles.jsonl, line 1" in msg and "unknown role 'bot'" in msg
    assert "system, user, assistant" in msg
    late_system = [
        {
            "messages": [
                {"role": "user", "content": "u"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        }
    ]
    assert "the list, item 1" in error_of(late_system)
    assert "system turn" in error_of(late_system)
    no_answer = [{"conversations": [{"from": "human", "value": "u"}]}]
    assert "no assistant turn" in error_of(no_answer)
    no_user = [{"messages": [{"role": "assistant", "content": "a"}]}]
    assert "no user turn" in error_of(no_user)


def test_llama2_and_guanaco_text_that_does_not_parse():
    assert "unbalanced" in error_of([{"text": "<s>[INST] q [/INST] a [/INST] b </s>"}])
    assert "before the first [INST]" in error_of([{"text": "hello <s>[INST] q [/INST] a"}])
    msg = error_of([{"text": "### Human: only a question"}])
    assert "the list, item 1" in msg and "no assistant turn" in msg


def test_csv_with_wrong_number_of_values(tmp_path):
    f = tmp_path / "cols.csv"
    f.write_text("instruction,output\nQ,A\nQ,A,extra\n", encoding="utf-8")
    msg = error_of(f)
    assert "cols.csv, line 3" in msg and "3 values" in msg and "Quote" in msg


def test_a_csv_with_blank_lines_before_its_header_names_the_header_s_own_line(tmp_path):
    f = tmp_path / "blank_top.csv"
    f.write_text("\n\ninstruction;output\nQ;A\nQ;A;extra\n", encoding="utf-8")
    msg = error_of(f)  # the ';' is found on the header line, not on the blank first one
    assert "blank_top.csv, line 5" in msg and "the header (line 3)" in msg and "'output'" in msg


def test_lists_in_csv_cells_get_a_useful_message(tmp_path):
    f = write_csv(tmp_path / "msgs.csv", ["messages"], [['[{"role": "user"}]']])
    msg = error_of(f)
    assert "msgs.csv, line 2" in msg and ".jsonl" in msg


def test_wrong_sources_and_settings(tmp_path, monkeypatch):
    assert "no such file" in error_of(tmp_path / "missing.jsonl")
    assert "no such file" in error_of("./data/train.jsonl")
    xl = tmp_path / "book.xlsx"
    xl.write_bytes(b"PK")
    assert "'.xlsx'" in error_of(xl)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("not parquet", encoding="utf-8")
    assert "bad.parquet" in error_of(bad_parquet)
    assert "not a format" in error_of([{"text": "x"}], format="yaml")
    assert "chunk size" in error_of([{"text": "x"}], text_chunk_tokens=8, text_overlap_tokens=8)
    assert "source is a int" in error_of(42)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("words", encoding="utf-8")
    assert "format 'text'" in error_of(docs, format="alpaca")
    scalar = write_json(tmp_path / "scalar.json", 5)
    assert "scalar.json" in error_of(scalar) and "list of objects" in error_of(scalar)
    no_list = write_json(tmp_path / "nolist.json", {"a": 1})
    assert "no list of examples" in error_of(no_list)


def test_hub_name_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    msg = error_of("mlabonne/guanaco-llama2-1k")
    assert msg.startswith("mlabonne/guanaco-llama2-1k:")
    assert "Hub was unreachable" in msg and "local file" in msg


def test_hub_dataset_rows_are_converted(monkeypatch):
    fake = datasets.Dataset.from_list([{"text": "<s>[INST] q [/INST] a </s>"}])
    seen = {}

    def fake_load(name, split):
        seen.update(name=name, split=split)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_data("mlabonne/guanaco-llama2-1k", split="train[:1]")
    assert seen == {"name": "mlabonne/guanaco-llama2-1k", "split": "train[:1]"}
    assert ds[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# ------------------------------------------------------------------------------------------
# Properties: whatever comes in, only DataFormatError ever comes out.
# ------------------------------------------------------------------------------------------
KEYS = [
    "instruction",
    "input",
    "output",
    "response",
    "system",
    "conversations",
    "messages",
    "prompt",
    "completion",
    "text",
    "from",
    "value",
    "role",
    "content",
    "data",
]
ROLE_WORDS = ["system", "user", "assistant", "human", "gpt", "bot", "", "USER "]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(ROLE_WORDS),
    st.sampled_from(
        ["### Human: a ### Assistant: b", "<s>[INST] a [/INST] b", "[INST] <<SYS>> s [/INST]", "[/INST][INST]", "  "]
    ),
)
turns = st.lists(
    st.dictionaries(st.sampled_from(["from", "value", "role", "content", "type"]), scalars, max_size=4), max_size=4
)
values = st.recursive(
    scalars | turns,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
records = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=5)
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@FAST
@given(records, st.sampled_from(sorted(CONVERTERS) + ["auto"]))
def test_to_messages_raises_only_data_format_error(record, fmt):
    try:
        name = detect_format(record)
        assert name in FORMATS
    except DataFormatError:
        pass
    try:
        messages = to_messages(record, fmt)
    except DataFormatError:
        return
    check_conversation(messages)


@FAST
@given(st.lists(records | values, max_size=4), st.sampled_from(["auto", "alpaca", "text"]))
def test_load_data_on_arbitrary_lists(rows, fmt):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_data(rows, format=fmt, text_chunk_tokens=4, text_overlap_tokens=1)
    except DataFormatError as e:
        assert str(e)
        return
    assert ds.column_names in (["messages"], ["text"])
    if ds.column_names == ["messages"]:
        for row in ds:
            check_conversation(row["messages"])


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(records, max_size=3).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
        st.lists(records, max_size=3).map(lambda rs: json.dumps(rs).encode()),
        st.text(alphabet='{}[]":,\n\r\ufeffabc ', max_size=60).map(lambda t: t.encode("utf-8")),
    ),
    st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]),
)
def test_load_data_on_arbitrary_bytes(tmp_path, payload, suffix):
    f = tmp_path / f"fuzz{suffix}"
    f.write_bytes(payload)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_data(f)
    except DataFormatError as e:
        assert f"fuzz{suffix}" in str(e)
        return
    if ds.column_names == ["messages"]:
        for row in ds:
            check_conversation(row["messages"])
    else:
        assert ds.column_names == ["text"] and all(ds["text"])


@pytest.mark.parametrize(
    "key,record",
    [
        ("conversations", lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}),
        ("messages", lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}),
    ],
)
def test_a_list_of_records_under_conversations_or_messages_is_many_records(tmp_path, key, record):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({key: [record("Q1?", "A1."), record("Q2?", "A2.")]}))
    ds = load_data(path)
    assert len(ds) == 2
    assert ds[1]["messages"] == [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]
