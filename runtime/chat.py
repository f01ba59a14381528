"""A chat request's prompt from a bundle's chat template (a Hugging Face audio-LLM
checkpoint's, carried as `chat_template.jinja`), rendered as transformers renders it: Jinja in
a sandbox, blocks trimmed, the messages in the template's own part format."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from runtime.errors import RuntimeUserError

CHAT_TEMPLATE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    """A bundle's chat template and the form of message content it reads: parts (`{type:
    text, text}`, `{type: audio}`), or one string with the audio as its placeholder in it (the
    manifest's `extra.chat_content` is "text"; Granite's templates read content so)."""

    source: str
    audio_token: str
    text_content: bool = False

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self.text_content:
            messages = [{**message, "content": joined_content(message["content"], self.audio_token)} for message in messages]
        return render_chat(self.source, messages)


def joined_content(content: str | list[dict[str, Any]], audio_token: str) -> str:
    """A message's content as one string: its text parts in order, an audio part as the placeholder."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] if part["type"] == "text" else audio_token for part in content)


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]]) -> str:
    """The prompt for `messages` (`{role, content: [{type: text, text} | {type: audio}]}`),
    ready for the assistant's answer. A template that refuses the messages (its
    `raise_exception`) is the request's fault: a `RuntimeUserError` with its words."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True)
    except TemplateError as err:
        raise RuntimeUserError(f"the bundle's chat template refuses these messages: {err}") from None
