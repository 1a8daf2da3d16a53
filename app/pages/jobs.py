"""A page's generation as a ``Job``: a form read into a validated request, the signed job
token that carries it to a stream (on whichever worker or replica), and running it to its
end. The story pages and the compare page share it (app.pages.events streams a job); not a
blueprint: blueprints import it, never each other. Why the tokens are as they are:
docs/web-app.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from flask import current_app
from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from app.pages.token_view import Token, stream_tokens
from app.platform.settings import get_settings
from app.serving.registry import get_registry
from app.serving.schema import GenerationRequest, check_form, request_models, requested, sampling_values
from app.serving.service import GenerationStream, InfillStream, ServiceError, get_service, open_stream

log = logging.getLogger(__name__)

TEXT_FIELDS = {"generate": ("prompt",), "infill": ("first", "last")}
#: What a kind's form asks beyond its texts and the sampling fields
OPTION_FIELDS = {"generate": (), "infill": ("candidates",)}
SAMPLING_FIELDS = ("temperature", "max_new_tokens", "top_k", "top_p", "min_p", "seed",
                   "repetition_penalty", "stop")
#: Longest job token: "GET /infill/stream?job=<token> HTTP/1.1" stays under gunicorn's
#: default limit_request_line (4094 bytes) and any proxy's.
MAX_JOB_CHARS = 3800
JOB_TTL_S = 600  # a stream's link works this long after the form was posted, then expires
#: Keeps a job token's signature apart from anything else the same key might sign.
JOB_TOKEN_SALT = "fable.job-token"
SEED_RANGE = 2 ** 31  # seeds picked for the user: short enough to read and retype
FALLBACK_PROMPT = "Once upon a time"  # the placeholder for a model whose card offers none
#: Alternatives a streamed page generation asks for at each token (the token view's);
#: measured cheap enough to ask always (docs/web-app.md, "The token view").
TOKEN_VIEW_ALTERNATIVES = 5


class FormErrors(Exception):
    """Every problem of one submitted form: field name -> message (None: the whole form)."""

    def __init__(self, errors: dict[str | None, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors


@dataclass(frozen=True)
class Job:
    """One validated generation request from a page: what a job token carries."""
    kind: str  # "generate" or "infill"
    model: str
    texts: dict[str, str]  # generate: prompt; infill: first, last
    values: dict[str, Any] = field(default_factory=dict)  # SamplingParams kwargs, seed set
    candidates: int | None = None  # infill: candidate middles (set by read_job, never None)

    @property
    def seed(self) -> int:
        return self.values["seed"]

    def to_token(self) -> str:
        """The job, compressed, timestamped and signed with this server's key: the link
        to its stream, which no one else can write or alter (``job_from_token``)."""
        options = {} if self.candidates is None else {"candidates": self.candidates}
        return _job_signer().dumps({"kind": self.kind, "model": self.model, **self.texts,
                                    **options, **self.values})

    def open(self, logprobs: int | None = None) -> GenerationStream:
        """Start generating, with each token's log-probability and ``logprobs``
        alternatives when asked (they change nothing in the text); raises ServiceError:
        busy, unknown model, cannot infill."""
        values = requested(self.values if logprobs is None else {**self.values, "logprobs": logprobs})
        if self.kind == "infill":
            return get_service().stream_infill(self.model, self.texts["first"],
                                               self.texts["last"], values, self.candidates)
        return open_stream(GenerationRequest(self.model, self.texts["prompt"], None, True, values))


# ---- reading forms and tokens ---------------------------------------------------------

def _unescape_stop(text: str) -> str:
    r"""A stop string as typed in a one-line box: ``\n`` is a line break, ``\t`` a tab,
    ``\\`` a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _escape_stop(text: str) -> str:
    """A stop string as the one-line box shows it (``_unescape_stop`` reads it back)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def read_job(kind: str, raw: Mapping[str, Any], *, from_form: bool = True) -> Job:
    """A validated ``Job`` from form fields (strings) or a decoded token (typed values);
    raises ``FormErrors`` with every problem found, each under its field's name."""
    models = request_models(get_settings().limits)
    fields = ("model", *TEXT_FIELDS[kind], *OPTION_FIELDS[kind], *SAMPLING_FIELDS)
    values = {name: raw.get(name) for name in fields}
    if from_form:
        for name in TEXT_FIELDS[kind]:
            if isinstance(values[name], str):  # browsers send a textarea's lines as CRLF
                values[name] = values[name].replace("\r\n", "\n")
        if isinstance(values["stop"], str):  # a list: "\n" typed is a line break, not a blank
            values["stop"] = [_unescape_stop(values["stop"])] if values["stop"].strip() else None
    form, errors = check_form(models.infill_form if kind == "infill" else models.generate_form,
                              values)
    if "model" not in errors:
        loaded = get_registry().get(values["model"])
        if loaded is None:
            errors["model"] = (f"'model' must be one of the loaded models; "
                               f"{values['model']!r} is not loaded")
        elif kind == "infill" and not loaded.facts.can_infill:
            errors["model"] = (f"'model' must be a model that infills; {values['model']!r} "
                               f"was not trained to")
    if kind == "infill" and not errors.keys() & {"first", "last"}:
        for name, purpose in (("first", "how the story begins"), ("last", "how it ends")):
            if not (values[name] or "").strip():
                errors[name] = f"'{name}' is required: {purpose}"
    candidates = None
    if kind == "infill" and form is not None:
        try:  # resolved now: the page says how many are written, and the link carries it
            candidates = get_service().candidates_for(form.candidates if form else None)
        except ServiceError as e:
            errors["candidates"] = e.message
    if errors:  # in the order the form shows the fields
        raise FormErrors(in_form_order(errors, fields))
    texts = {name: getattr(form, name) or "" for name in TEXT_FIELDS[kind]}
    values = sampling_values(form, dict(zip(SAMPLING_FIELDS, SAMPLING_FIELDS)))
    values.setdefault("seed", secrets.randbelow(SEED_RANGE))  # shown, so a text can be redone
    return Job(kind, form.model, texts, values, candidates)


def in_form_order(errors: dict[str | None, str], order: tuple[str, ...]) -> dict[str | None, str]:
    """``errors`` by field, in the order the form shows the fields (others last)."""
    def position(item) -> int:
        name = (item[0] or "").split("[")[0]
        return order.index(name) if name in order else len(order)
    return dict(sorted(errors.items(), key=position))


def job_token_signer(key: str) -> URLSafeTimedSerializer:
    """What signs and reads job tokens with ``key`` (create_app keeps one per app): JSON,
    zlib-compressed when that is shorter, with a signed timestamp for the expiry."""
    return URLSafeTimedSerializer(key, salt=JOB_TOKEN_SALT,
                                  signer_kwargs={"digest_method": hashlib.sha256})


def _job_signer() -> URLSafeTimedSerializer:
    return current_app.extensions["fable.job_tokens"]


def job_from_token(kind: str, token: str) -> Job:
    """The job a token describes: its signature and age checked before anything of it is
    read (nothing unsigned is even inflated), then validated again from scratch (the
    models or limits may have changed since)."""
    invalid = FormErrors({None: "this generation link is invalid; submit the form again"})
    if not token or len(token) > MAX_JOB_CHARS * 2:
        raise invalid
    try:
        body = _job_signer().loads(token, max_age=JOB_TTL_S)
    except SignatureExpired:  # signed here, but too long ago
        raise FormErrors({None: "this generation link has expired; submit the form again"}) \
            from None
    except BadData:  # another key (a restart without FABLE_SECRET_KEY), altered, not a token
        raise invalid from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise invalid
    return read_job(kind, body, from_form=False)


# ---- results --------------------------------------------------------------------------

@dataclass
class Result:
    """What a result panel shows: the texts given, the text generated so far, and either
    the finish note or the URL of the stream that will write them."""
    job: Job
    text: str = ""
    note: str | None = None
    error: str | None = None
    status: int = 200  # the HTTP status an error maps to
    stream_url: str | None = None
    stats: Any = None  # a comparison column's app.pages.token_view.RunStats, once finished
    # the generate form's fields that continue a text cut at the token limit (continuation)
    continue_fields: dict[str, str] | None = None


def finish_note(stream: GenerationStream, seed: int) -> str:
    completion = stream.completion
    if completion is None:
        return f"Stopped · seed {seed}"
    if stream.timed_out:
        reason = "Stopped at the time limit"
    elif completion.finish_reason == "length":
        reason = "Cut at the token limit"  # said plainly: the text had not ended
    else:
        reason = "Ended by itself"
    seconds = ((stream.finished_ns or time.perf_counter_ns()) - stream.started_ns) / 1e9
    choice = stream.choice if isinstance(stream, InfillStream) else None
    tokens = completion.completion_tokens  # an infill's: its middle's
    plural = "" if tokens == 1 else "s"
    note = f"{reason} · {tokens:,} token{plural} in {seconds:.1f} s · seed {seed}"
    if choice is None:
        return note
    count = len(choice.candidates)
    if count > 1:  # what the other candidates cost is said beside it
        written = sum(c.completion.completion_tokens for c in choice.candidates)
        note += f" · best of {count} candidates ({written:,} tokens in all)"
    if not choice.any_ended:  # said plainly: the model did not finish this middle
        which = ("the middle did not end" if count == 1
                 else f"none of the {count} candidate middles ended")
        note += f" · {which} by itself: shown up to its last complete sentence, never run into the ending"
    return note


def continuation(job: Job | None, stream: GenerationStream | None) -> dict[str, str] | None:
    """The generate form's fields that continue a text cut at the token limit: its prompt
    and text as the new prompt, the same model and settings, a fresh seed. None for a text
    that ended (or was not a generation)."""
    completion = stream.completion if stream is not None else None
    if job is None or job.kind != "generate" or completion is None or completion.finish_reason != "length":
        return None
    prompt = job.texts["prompt"] + completion.text
    if len(prompt) > get_settings().limits.max_prompt_chars:
        return None  # too long to send back as a prompt
    fields = {"model": job.model, "prompt": prompt}
    for name, value in job.values.items():
        if name == "stop":
            fields["stop"] = _escape_stop(value[0]) if value else ""
        elif name not in ("seed", "logprobs"):
            fields[name] = f"{value:g}" if isinstance(value, float) else str(value)
    return fields


def collect(job: Job, stream: GenerationStream) -> Result:
    """Run an open stream to its end (the no-JavaScript path)."""
    try:
        completion = stream.collect()
    except Exception as e:
        log.exception("generation with %s failed", job.model)
        return Result(job, text=stream.text, error=f"generation failed ({type(e).__name__})",
                      status=500)
    return Result(job, text=completion.text, note=finish_note(stream, job.seed))


def run_to_end(job: Job) -> Result:
    """Generate the whole text now (the no-JavaScript path)."""
    try:
        stream = job.open()
    except ServiceError as e:
        return Result(job, error=e.message, status=e.status)
    result = collect(job, stream)
    result.continue_fields = continuation(job, stream)
    return result


def output_tokens(job: Job | None, stream: GenerationStream | None) -> list[Token] | None:
    """The token view of a finished job's text (None: no job or stream, no
    log-probabilities, or the model is gone)."""
    if job is None or stream is None:
        return None
    loaded = get_registry().get(job.model)
    return stream_tokens(stream, loaded and loaded.tokenizer, stripped=job.kind == "infill")


def form_bounds() -> dict[str, dict[str, Any]]:
    """The sampling boxes' HTML limits (min, max, maxlength), read from the schema that
    validates the form, so that the page and the server never disagree."""
    return _bounds(get_settings().limits)


@cache  # one JSON Schema per set of limits, not one per page drawn
def _bounds(limits) -> dict[str, dict[str, Any]]:
    schema = request_models(limits).generate_form.model_json_schema()
    bounds = {}
    for name in SAMPLING_FIELDS:
        kind = schema["properties"][name]["anyOf"][0]  # the value's type; the other is null
        found = {"min": kind.get("minimum", kind.get("exclusiveMinimum")), "max": kind.get("maximum"),
                 "maxlength": kind.get("maxLength")}
        if name == "seed":  # a text box: as many characters as the longest seed
            found = {"maxlength": max(len(str(kind["minimum"])), len(str(kind["maximum"])))}
        bounds[name] = {key: value for key, value in found.items() if value is not None}
    return bounds
