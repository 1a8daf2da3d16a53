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
data from a checkpoint, not code to trust. The sandbox keeps a template from Python's
internals but not from the machine's time and memory, so every render also runs under a
budget (models_src.template_budget): a template over it is refused with
ChatTemplateOverBudget, before the value that would break it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from jinja2 import Template, TemplateError

from .template_budget import ENVIRONMENT, OverBudget, render

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

MAX_SOURCE_CHARS = 100_000  # the template itself (the Hub's longest are a few tens of KB)


class ChatTemplateError(ValueError):
    """A chat template that does not compile or cannot render a plain conversation."""


class ChatTemplateOverBudget(ChatTemplateError):
    """A render that went over its budget: refused before it went further."""


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    turn_marker: str  # where the assistant's turn ends: the generation stops there
    compiled: Template = field(repr=False, compare=False)

    def render(self, messages: list[Message] | tuple[Message, ...]) -> str:
        """The conversation, ending where the assistant's next message starts."""
        try:
            return render(self.compiled, messages=[{"role": m.role, "content": m.content}
                                                   for m in messages],
                          add_generation_prompt=True, **SPECIAL_TEXT)
        except OverBudget as e:
            raise ChatTemplateOverBudget(f"the chat template went over its budget: {e}") from None
        except Exception as e:  # a template can raise anything Python can (1/0, MemoryError...)
            why = e if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
            raise ChatTemplateError(f"the chat template cannot render this conversation "
                                    f"({why})") from None


def checked(source: str) -> ChatTemplate:
    """A checked template: it compiles, and renders an exchange within the budget, from
    which the turn marker is read. Raises ChatTemplateError (ChatTemplateOverBudget for
    a render over the budget) saying why not."""
    verdict = _verdict(source)
    if isinstance(verdict, ChatTemplate):
        return verdict
    error, message = verdict
    raise error(message)  # a new one each time: a cached one would pile up tracebacks


@lru_cache(maxsize=64)
def _verdict(source: str) -> ChatTemplate | tuple[type[ChatTemplateError], str]:
    """The checked template, or why it was refused: a refusal is remembered too, so a
    template that spends its whole budget does so once, not at every request."""
    if len(source) > MAX_SOURCE_CHARS:
        return ChatTemplateError, (f"the chat template is {len(source)} characters long; "
                                   f"the most is {MAX_SOURCE_CHARS}")
    try:
        compiled = ENVIRONMENT.from_string(source)
        text = render(compiled, messages=[{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": _A},
                                          {"role": "user", "content": _B}],
                      add_generation_prompt=False, **SPECIAL_TEXT)
    except OverBudget as e:
        return ChatTemplateOverBudget, f"the chat template went over its budget: {e}"
    except Exception as e:  # TemplateError, and whatever else a template can raise
        return ChatTemplateError, f"the chat template does not work ({type(e).__name__}: {e})"
    if _A not in text or _B not in text:
        return ChatTemplateError, "the chat template leaves out the messages' content"
    marker = text.split(_A, 1)[1].split(_B, 1)[0].rstrip()
    if not marker.strip():
        return ChatTemplateError, "the chat template puts nothing between two turns"
    return ChatTemplate(source, marker, compiled)
