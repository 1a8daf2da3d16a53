"""Chat: a conversation rendered as the text a model continues.

A checkpoint whose tokenizer config carries a ``chat_template`` (the Hugging Face
convention: a Jinja template over ``messages``) is rendered with it. Base models, which
never saw a chat format, get a plain transcript::

    System: You tell short stories.
    User: Tell me about a cat.
    Assistant:

and the model writes the assistant's turn. It stops at the next turn marker: the text a
template puts between an assistant's message and the next user message ("\\nUser:" in
the transcript), so a base model does not go on to write the user's side as well.

Templates run in Jinja's immutable sandbox, as transformers runs them: a template is
data from a checkpoint, not code to trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message.role | capitalize }}: {{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_A, _B = "\x00fable-a\x00", "\x00fable-b\x00"  # placeholders no message contains
# Empty: the server puts the bos id first itself, and typed special tokens stay text
# (models_src.tokenization), so a template's "</s>" would not be the eos token anyway.
SPECIAL_TEXT = {"bos_token": "", "eos_token": ""}


class ChatTemplateError(ValueError):
    """A chat template that does not compile or cannot render a plain conversation."""


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    turn_marker: str  # where the assistant's turn ends: the generation stops there

    def render(self, messages: list[Message] | tuple[Message, ...]) -> str:
        """The conversation, ending where the assistant's next message starts."""
        try:
            return _compiled(self.source).render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True, **SPECIAL_TEXT)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template cannot render this conversation ({e})") from None


@lru_cache(maxsize=16)
def _compiled(source: str):
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)


@lru_cache(maxsize=16)
def checked(source: str) -> ChatTemplate:
    """A checked template: it compiles, and renders an exchange, from which the turn
    marker is read."""
    try:
        compiled = _compiled(source)
        text = compiled.render(messages=[{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": _A},
                                         {"role": "user", "content": _B}],
                               add_generation_prompt=False, **SPECIAL_TEXT)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not work ({type(e).__name__}: {e})") from None
    if _A not in text or _B not in text:
        raise ChatTemplateError("the chat template leaves out the messages' content")
    marker = text.split(_A, 1)[1].split(_B, 1)[0].rstrip()
    if not marker.strip():
        raise ChatTemplateError("the chat template puts nothing between two turns")
    return ChatTemplate(source, marker)
