"""Model cards (a checkpoint's ``README.md``) as HTML a page may trust, and the samples
they hold. Not a blueprint: the model pages use it.

The card is Markdown that whoever trained or imported the model wrote, so it is
rendered as untrusted text: markdown-it-py's CommonMark preset (plus tables, which every
card has) with raw HTML off, so that ``<script>`` in a card is shown as text; links only
to http(s) or relative addresses (``javascript:``, ``data:`` and any other scheme stay
text); images dropped for their alt text (the CSP would block other origins anyway, and
a card has no same-origin image to show); table alignment as classes, not ``style``
attributes (the CSP forbids inline style). Headings move down to fit under the page's
own (the card's ``# <name>`` title, which the page already shows, is dropped). The file
itself is read only if it is a regular file inside the checkpoint's folder (a card that
links to ``/proc/self/environ`` is never opened), within MAX_CARD_BYTES.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# markdown-it-py: a CommonMark parser whose raw-HTML switch and link validator make an
# untrusted card safe without a separate HTML sanitiser (python-markdown passes HTML through)
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml

from models_src import safe_files
from models_src.checkpoint import CARD_FILE, split_card
from models_src.safe_files import MAX_CARD_BYTES

LINK_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)
_ALIGN = re.compile(r"^text-align:(left|right|center)$")
_SAMPLES_HEADING = re.compile(r"^samples?\b", re.IGNORECASE)


@dataclass
class Card:
    """A rendered card: its HTML (safe to mark ``|safe``), the samples it quotes (plain
    text) under the heading they came with, and why it is missing, when it is."""
    html: str = ""
    samples: list[str] = field(default_factory=list)
    samples_heading: str | None = None
    problem: str | None = None

    @property
    def samples_note(self) -> str:
        """What the samples heading says besides "Samples" ("temperature 0.8, seeds 1-3")."""
        return _SAMPLES_HEADING.sub("", self.samples_heading or "").strip(" :()-–")


def safe_link(url: str) -> bool:
    """markdown-it's ``validateLink``: http(s) and relative addresses only (it gets the
    URL normalised, entities decoded; control characters are percent-encoded by then)."""
    scheme = _SCHEME.match(url.strip())
    return scheme is None or scheme.group(1).lower() in LINK_SCHEMES


def _dropped_image(self, tokens, idx, options, env) -> str:
    alt = self.renderInlineAsText(tokens[idx].children or [], options, env)
    if not alt:
        return ""
    return f'<span class="card-image" title="image not shown">{escapeHtml(alt)}</span>'


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.validateLink = safe_link
    md.add_render_rule("image", _dropped_image)
    return md


_MD = _parser()


def _retouch(tokens: list, title: str) -> list:
    """Headings down under the page's (h3 and below), the title heading dropped, table
    alignment as classes, and other sites' links marked ``rel="nofollow noopener"``."""
    if (len(tokens) >= 3 and tokens[0].type == "heading_open" and tokens[0].tag == "h1"
            and tokens[1].content.strip() == title):
        tokens = tokens[3:]
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(max(int(token.tag[1]) + 1, 3), 6)}"
        elif token.type in ("th_open", "td_open"):
            align = _ALIGN.match(str(token.attrs.pop("style", "")))
            if align:
                token.attrSet("class", f"align-{align.group(1)}")
        for child in token.children or []:
            href = str(child.attrGet("href") or "") if child.type == "link_open" else ""
            if _SCHEME.match(href) or href.startswith("//"):
                child.attrSet("rel", "nofollow noopener noreferrer")
    return tokens


def _samples(tokens: list) -> tuple[str | None, list[str]]:
    """The block quotes under the card's "Samples" heading, as plain text (how
    training/model_card.py writes them), and that heading's text."""
    heading, samples, level, depth, inside = None, [], None, 0, []
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            if level is not None and int(token.tag[1]) <= level:
                break
            text = tokens[i + 1].content.strip()
            if level is None and _SAMPLES_HEADING.match(text):
                heading, level = text, int(token.tag[1])
        elif level is None:
            continue
        elif token.type == "blockquote_open":
            depth += 1
        elif token.type == "blockquote_close":
            depth -= 1
            if depth == 0 and inside:
                samples.append("\n".join(inside))
                inside = []
        elif token.type == "inline" and depth:
            inside.append(_MD.renderer.renderInlineAsText(token.children or [], _MD.options, {}))
    return heading, [s.strip() for s in samples if s.strip()]


def card_body(text: str) -> str:
    """The card's Markdown without its YAML front matter (even a front matter that is not
    valid YAML is never shown)."""
    try:
        return split_card(text)[1]
    except ValueError:  # a front matter that never ends: all of it is front matter
        return ""


def _read_card(directory: Path) -> str | Card:
    """The card's text, or a Card that says why it is not shown."""
    try:
        with safe_files.open_file(directory, CARD_FILE, cap=None) as f:
            if os.fstat(f.fileno()).st_size > MAX_CARD_BYTES:
                return Card(problem=f"The model card is over {MAX_CARD_BYTES // 1024} kB: "
                                    "download it below to read it.")
            return f.read(MAX_CARD_BYTES).decode("utf-8")
    except FileNotFoundError:
        return Card(problem="This checkpoint has no model card (README.md).")
    except safe_files.UnsafeFile:
        return Card(problem="The model card is not shown: its README.md is not a regular "
                            "file in the checkpoint's folder.")
    except (OSError, UnicodeDecodeError):
        return Card(problem="The model card cannot be read (it is not UTF-8 text).")


def render_card(directory: Path, title: str) -> Card:
    """The card of the checkpoint in ``directory``, titled ``title`` (the model's name)."""
    text = _read_card(directory)
    if isinstance(text, Card):
        return text
    tokens = _MD.parse(card_body(text))
    heading, samples = _samples(tokens)
    html = _MD.renderer.render(_retouch(tokens, title), _MD.options, {})
    return Card(html=html, samples=samples, samples_heading=heading)
