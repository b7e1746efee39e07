"""Chat with a (fine-tuned) model: a multi-turn session, and a chat box for notebooks.

    chat_box(model, tokenizer)                 # in Jupyter/Colab: a widget; tokens appear as they stream
    chat_box(model, tokenizer, script=["Hi!", "Tell me more."])   # the same, with a scripted start

Where no widget can render (a plain script, pytest/nbmake, ``LORA_KIT_SMOKE=1``), ``chat_box``
runs the scripted exchange instead and prints it, through the same ``ChatSession`` the widget
uses. ``ChatSession`` is plain Python, so the turn logic is tested without a browser.
"""

from __future__ import annotations

import html
import os
import sys
import warnings
import weakref
from collections.abc import Callable

from .data import render_chat
from .errors import LoraKitError
from .evaluate import GenerationSettings, stream_generate

DEFAULT_SCRIPT = [
    "Hi! In one sentence, what is fine-tuning a language model?",
    "Now say that in five words or fewer.",
]
"""The scripted exchange of the headless path: two turns, the second leaning on the first."""


_SESSIONS: "weakref.WeakSet[ChatSession]" = weakref.WeakSet()


def release_models(objects) -> int:
    """Make every chat session that talks to one of ``objects`` (models, or trainers holding them) let go of it.

    A chat box shown in a notebook lives on in the widget registry, and with it its model: without this, freeing
    the training model before a reload frees nothing. Returns how many sessions let go; they refuse new messages.
    """
    wanted = set()
    for obj in objects:
        for candidate in (obj, getattr(obj, "model", None)):
            if candidate is not None:
                base = getattr(candidate, "get_base_model", None)
                wanted |= {id(candidate), id(base()) if callable(base) else id(candidate)}
    released = [session for session in list(_SESSIONS) if session.model is not None and id(session.model) in wanted]
    for session in released:
        session.model = None
    return len(released)


class ChatSession:
    """The turns of one conversation: ``send(text, on_token)`` renders the system message, the history and
    ``text`` with the tokenizer's chat template, streams the answer through ``on_token(piece)`` and appends both
    messages to ``history``; the oldest exchanges are left out of the prompt when it outgrows the context.
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        _SESSIONS.add(self)
        self.settings = settings or GenerationSettings()
        if max_prompt_tokens is None:
            context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
            max_prompt_tokens = max(context - self.settings.max_new_tokens, 1)
        self.max_prompt_tokens = max_prompt_tokens
        self.history: list[dict] = []
        self.last_prompt: str | None = None
        """The exact text the model saw on the last turn (chat template applied)."""

    def conversation(self, text: str) -> list[dict]:
        """The messages the model will see if ``text`` is sent now (oldest exchanges dropped to fit); a LoraKitError
        when the message alone does not fit."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": text}]
        past = list(self.history)
        while True:
            messages = head + past + user
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            if len(ids) <= self.max_prompt_tokens:
                return messages
            if not past:  # generating past the model's context would give garbage, not an answer
                raise LoraKitError(
                    f"The message{' with the system prompt' if head else ''} is {len(ids)} tokens; this chat takes "
                    f"at most {self.max_prompt_tokens} (max_prompt_tokens: the model's context less max_new_tokens="
                    f"{self.settings.max_new_tokens}). Send a shorter message, or lower max_new_tokens."
                )
            past = past[2:]  # leave out the oldest exchange (user + assistant)

    def send(self, text: str, on_token: Callable[[str], None] | None = None) -> str:
        """Answer ``text`` in the context of the history; stream pieces to ``on_token``; return the answer."""
        text = (text or "").strip()
        if not text:
            raise LoraKitError("ChatSession.send: the message is empty; type something to send.")
        if self.model is None:
            raise LoraKitError(
                "This chat's model was freed (free_memory). Run the chat cell again with a loaded model."
            )
        messages = self.conversation(text)
        self.last_prompt = render_chat(self.tokenizer, messages)
        pieces = []
        for piece in stream_generate(self.model, self.tokenizer, messages, self.settings):
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)
        answer = "".join(pieces).strip()
        # Only a finished turn enters the history: an error mid-answer leaves it as it was.
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()
        self.last_prompt = None

    def __repr__(self) -> str:
        return f"ChatSession({len(self.history) // 2} exchanges, system={self.system!r})"


def widgets_can_render() -> bool:
    """True inside a Jupyter/Colab kernel that can show ipywidgets; False in a script, pytest/nbmake
    (``PYTEST_CURRENT_TEST`` is set, so a notebook run by nbmake inherits it), or with ``LORA_KIT_SMOKE=1``."""
    if os.environ.get("LORA_KIT_SMOKE", "").lower() in ("1", "true", "yes") or "PYTEST_CURRENT_TEST" in os.environ:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:
        return False
    shell = get_ipython()  # None in plain Python; terminal IPython has no kernel
    # Jupyter and Colab kernels are ZMQ shells
    return getattr(shell, "kernel", None) is not None and isinstance(shell, ZMQInteractiveShell)


_STYLE = {  # role: (label, bubble style)
    "user": ("You", "background:#e8f0fe;border-radius:8px;padding:6px 10px;margin:4px 0 4px 15%;"),
    "assistant": ("Model", "background:#f1f3f4;border-radius:8px;padding:6px 10px;margin:4px 15% 4px 0;"),
    "error": ("Error", "background:#fdecea;color:#a50e0e;border-radius:8px;padding:6px 10px;margin:4px 0;"),
}


def _bubble(role: str, text: str) -> str:
    label, style = _STYLE[role]
    body = html.escape(text).replace("\n", "<br>")
    return f'<div style="{style}white-space:pre-wrap;"><b>{label}:</b> {body}</div>'


class ChatBox:
    """The ipywidgets face of a ``ChatSession``: history area, text input, Send and Reset buttons (``widget``)."""

    def __init__(self, session: ChatSession):
        import ipywidgets as widgets

        self.session = session
        self.output = widgets.HTML(
            layout=widgets.Layout(max_height="420px", overflow="auto", border="1px solid #ddd", padding="4px")
        )
        self.input = widgets.Text(
            placeholder="Type a message, then Send (or Enter)", layout=widgets.Layout(flex="1 1 auto")
        )
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.reset_button = widgets.Button(description="Reset", icon="refresh", tooltip="Clear the conversation")
        self.send_button.on_click(self._on_send)
        self.reset_button.on_click(self._on_reset)
        with warnings.catch_warnings():  # Enter sends; deprecated in ipywidgets 8 but still the simplest hook
            warnings.simplefilter("ignore", DeprecationWarning)
            self.input.on_submit(self._on_send)
        self.widget = widgets.VBox([self.output, widgets.HBox([self.input, self.send_button, self.reset_button])])
        self._busy = False
        self._hide_next_display = False
        self._render()

    @property
    def history(self) -> list[dict]:
        return self.session.history

    def _render(self, pending: str | None = None, partial: str = "", error: str | None = None) -> None:
        parts = [_bubble(m["role"], m["content"]) for m in self.session.history if m["role"] in ("user", "assistant")]
        if pending is not None:
            parts += [_bubble("user", pending), _bubble("assistant", partial + " ▌")]
        if error is not None:
            parts.append(_bubble("error", error))
        if not parts:
            parts = ['<div style="color:#888;padding:6px;">No messages yet. Say something to the model.</div>']
        self.output.value = "".join(parts)

    def send(self, text: str) -> str | None:
        """Send ``text`` as if typed: the answer streams into the box. Returns it (None on error)."""
        text = (text or "").strip()
        if not text or self._busy:
            return None
        self._busy = True
        self.send_button.disabled = self.reset_button.disabled = True
        partial = []

        def on_token(piece: str) -> None:
            partial.append(piece)
            self._render(pending=text, partial="".join(partial))

        try:
            answer = self.session.send(text, on_token=on_token)
            self._render()
            return answer
        except Exception as exc:  # noqa: BLE001 - a widget callback's exception would vanish into the log
            self._render(error=f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self._busy = False
            self.send_button.disabled = self.reset_button.disabled = False

    def _on_send(self, _source=None) -> None:
        text = self.input.value
        self.input.value = ""
        self.send(text)

    def _on_reset(self, _source=None) -> None:
        self.session.reset()
        self._render()

    def _ipython_display_(self):
        # chat_box() has already shown the widget; when its result is also the cell's value, do not
        # show it a second time. Shown again in any later cell.
        if self._hide_next_display:
            self._hide_next_display = False
            return
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        return f"ChatBox({self.session!r})"


def run_script(session: ChatSession, script: list[str], out=None) -> ChatSession:
    """Run scripted user messages through ``session``, printing the exchange as it streams."""
    out = out or sys.stdout
    for text in script:
        print(f"user: {text}", file=out)
        print("assistant: ", end="", file=out, flush=True)
        session.send(text, on_token=lambda piece: print(piece, end="", file=out, flush=True))
        print(file=out, flush=True)
    return session


def chat_box(
    model,
    tokenizer,
    settings: GenerationSettings | None = None,
    system: str | None = None,
    script: list[str] | None = None,
    mode: str = "auto",
):
    """Chat with ``model``: a widget in a notebook, a scripted, printed exchange elsewhere.

    In a notebook (``mode="widget"``, or ``"auto"`` when ``widgets_can_render()``) it shows and returns a
    ``ChatBox`` with ``script`` played into it; elsewhere (``mode="script"``) it sends ``script`` (default: two
    turns) through a ``ChatSession``, prints the exchange and returns the session. ``system``: e.g. the system
    message the model was fine-tuned with.
    """
    if mode not in ("auto", "widget", "script"):
        raise LoraKitError(f"chat_box mode={mode!r}: expected 'auto', 'widget' or 'script'.")
    if script is not None and (isinstance(script, str) or not all(isinstance(s, str) for s in script)):
        raise LoraKitError(f"chat_box script must be a list of user messages (strings); got {script!r}.")
    session = ChatSession(model, tokenizer, settings=settings, system=system)
    if mode == "script" or (mode == "auto" and not widgets_can_render()):
        return run_script(session, DEFAULT_SCRIPT if script is None else list(script))
    from IPython import get_ipython
    from IPython.display import display

    box = ChatBox(session)
    display(box.widget)
    box._hide_next_display = True
    shell = get_ipython()
    if shell is not None:

        def _clear_flag(*_args):
            box._hide_next_display = False
            shell.events.unregister("post_run_cell", _clear_flag)

        shell.events.register("post_run_cell", _clear_flag)
    for text in script or []:
        box.send(text)
    if script:  # a saved copy of the notebook keeps printed text, not the widget's state: the exchange stays readable
        print("\n".join(f"{m['role']}: {m['content']}" for m in session.history))
    return box
