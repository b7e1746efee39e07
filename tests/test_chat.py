"""Tests for lora_kit.chat: the turn logic (ChatSession), the widget's handlers, the headless path."""

import pytest
import torch

import lora_kit
from lora_kit import chat
from lora_kit.errors import LoraKitError
from lora_kit.evaluate import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_tok():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; oversubscribed threads make generation far slower
    yield lora_kit.load_model("embedded")
    torch.set_num_threads(threads)


def test_two_turns_keep_history_and_the_second_prompt_holds_the_first_exchange(model_tok):
    model, tok = model_tok
    session = chat.ChatSession(model, tok, settings=SETTINGS, system="You are terse.")
    pieces = []
    first = session.send("My name is Ada. Say hello to me.", on_token=pieces.append)
    assert first and "".join(pieces).strip() == first
    assert len(pieces) > 1  # it streamed
    second = session.send("What is my name?")
    assert second
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    prompt = session.last_prompt
    assert "You are terse." in prompt
    assert prompt.index("My name is Ada") < prompt.index(first) < prompt.index("What is my name?")
    assert prompt.endswith(
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True).split(
            "x"
        )[-1]
    )


def test_reset_empties_history_and_the_next_prompt_forgets(model_tok):
    model, tok = model_tok
    session = chat.ChatSession(model, tok, settings=SETTINGS)
    session.history += [{"role": "user", "content": "old question"}, {"role": "assistant", "content": "old answer"}]
    session.reset()
    assert session.history == []
    assert session.conversation("new") == [{"role": "user", "content": "new"}]
    with pytest.raises(LoraKitError, match="empty"):
        session.send("   ")


def test_oldest_exchanges_leave_the_prompt_when_it_is_too_long(model_tok):
    model, tok = model_tok
    session = chat.ChatSession(model, tok, settings=SETTINGS, max_prompt_tokens=80)
    for i in range(6):
        session.history += [
            {"role": "user", "content": f"question {i} " * 3},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages = session.conversation("latest")
    assert messages[-1] == {"role": "user", "content": "latest"}
    assert len(messages) < 13 and messages[-2] == {"role": "assistant", "content": "answer 5"}
    assert len(session.history) == 12  # the history itself is kept
    with pytest.raises(LoraKitError, match=r"is \d+ tokens; this chat takes at most 80 .*shorter message"):
        session.conversation("a long message " * 40)  # too long even with every old exchange left out
    assert len(session.history) == 12


def test_widget_send_and_reset_buttons(model_tok):
    model, tok = model_tok
    box = chat.ChatBox(chat.ChatSession(model, tok, settings=SETTINGS))
    assert "No messages yet" in box.output.value
    seen = []
    box.output.observe(lambda change: seen.append(change["new"]), "value")
    box.input.value = "Hi <there>"
    box._on_send(box.send_button)
    assert box.input.value == "" and not box.send_button.disabled
    assert [m["role"] for m in box.history] == ["user", "assistant"]
    assert "Hi &lt;there&gt;" in box.output.value  # escaped, shown
    assert box.history[1]["content"].split()[0] in box.output.value
    assert sum("▌" in v for v in seen) > 1  # the answer was shown growing, piece by piece
    box._on_send(box.send_button)  # empty input: nothing happens
    assert len(box.history) == 2
    box._on_reset(box.reset_button)
    assert box.history == [] and "No messages yet" in box.output.value


def test_widget_shows_errors_and_keeps_history(model_tok, monkeypatch):
    model, tok = model_tok
    box = chat.ChatBox(chat.ChatSession(model, tok, settings=SETTINGS))

    def broken(text, on_token=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(box.session, "send", broken)
    assert box.send("Hello") is None
    assert "out of memory" in box.output.value and box.history == []
    assert not box.send_button.disabled and not box._busy


def test_chat_box_runs_a_scripted_exchange_where_widgets_cannot_render(model_tok, capsys, monkeypatch):
    model, tok = model_tok
    monkeypatch.setenv("LORA_KIT_SMOKE", "1")
    assert not chat.widgets_can_render()
    session = chat.chat_box(model, tok, settings=SETTINGS, script=["Hi!", "And again?"])
    assert isinstance(session, chat.ChatSession) and len(session.history) == 4
    printed = capsys.readouterr().out
    assert "user: Hi!" in printed and "user: And again?" in printed
    assert session.history[1]["content"] in printed and session.history[3]["content"] in printed
    with pytest.raises(LoraKitError, match="list of user messages"):
        chat.chat_box(model, tok, script="Hi!")


def test_no_widgets_under_pytest_even_without_the_smoke_flag(monkeypatch):
    monkeypatch.delenv("LORA_KIT_SMOKE", raising=False)
    assert not chat.widgets_can_render()  # no kernel here, and PYTEST_CURRENT_TEST is set (as under nbmake)


def test_chat_box_in_widget_mode_returns_the_box(model_tok, capsys):
    model, tok = model_tok
    box = chat.chat_box(model, tok, settings=SETTINGS, system="Be brief.", mode="widget")
    assert isinstance(box, chat.ChatBox) and box.session.system == "Be brief." and box.history == []
    assert box._hide_next_display  # shown once by chat_box; not twice as the cell's value
    assert "user: " not in capsys.readouterr().out  # nothing played, no exchange printed
    played = chat.chat_box(model, tok, settings=SETTINGS, script=["Hi.", "Bye."], mode="widget")
    printed = capsys.readouterr().out  # the exchange as text too: saved copies of a notebook keep no widget state
    assert len(played.history) == 4 and printed.count("user: ") == 2 and printed.count("assistant: ") == 2
    assert played.history[1]["content"] in printed
    with pytest.raises(LoraKitError, match="mode"):
        chat.chat_box(model, tok, mode="terminal")


def test_free_memory_releases_a_trained_model_held_by_a_chat_session(tmp_path):
    """A notebook's chat box keeps its session alive; after free_memory the model goes all the same."""
    import weakref

    import bitsandbytes  # noqa: F401 - imported first: pytest's log capture keeps the frames of a failed
    import peft  # noqa: F401 - optional import inside bitsandbytes, and with them whatever they held

    import lora_kit
    from lora_kit.chat import ChatSession
    from lora_kit.errors import LoraKitError
    from lora_kit.merge import free_memory

    train_ds, _ = lora_kit.demo_task(8, 2, seed=0)
    model, tok = lora_kit.load_model("embedded")
    alive = weakref.ref(model)
    model = lora_kit.add_lora(model, lora_kit.LoraSettings(r=4))
    trainer = lora_kit.build_trainer(
        model,
        tok,
        train_ds,
        train=lora_kit.TrainSettings(
            max_steps=1,
            micro_batch_size=2,
            gradient_accumulation_steps=1,
            report_to="none",
            save_steps=10**6,
            output_dir=str(tmp_path / "run"),
            gradient_checkpointing=False,
        ),
    )
    trainer.train()
    model = trainer.model
    session = ChatSession(model, tok)  # what the chat widget holds
    free_memory(trainer, model)
    del trainer, model
    free_memory()
    assert alive() is None
    with pytest.raises(LoraKitError, match="freed"):
        session.send("Hello?")


def test_release_models_finds_sessions_by_model_trainer_or_peft_base():
    class Base:
        pass

    class Peft:
        def __init__(self, base):
            self.base = base

        def get_base_model(self):
            return self.base

    base, other = Base(), Base()
    trainer = type("Trainer", (), {})()
    trainer.model = Peft(base)
    on_trainer, on_base, elsewhere = (
        chat.ChatSession(m, None, max_prompt_tokens=8) for m in (trainer.model, base, other)
    )
    assert chat.release_models([trainer]) == 2
    assert on_trainer.model is None and on_base.model is None and elsewhere.model is other
    assert chat.release_models([trainer]) == 0  # already let go
