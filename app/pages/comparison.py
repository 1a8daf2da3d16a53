"""A comparison: one prompt, one seed and one set of sampling settings for 2-4 models,
read from the compare page's form, and run to its end (one ordinary generation per model,
all in the engine loop together). The compare page streams it; without JavaScript, and in
benchmarks/compare.py, it runs here.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from werkzeug.datastructures import MultiDict

from app.pages.jobs import (SAMPLING_FIELDS, SEED_RANGE, TEXT_FIELDS, FormErrors, Job, Result, collect,
                             in_form_order, output_tokens, read_job)
from app.pages.token_view import run_stats
from app.serving.registry import get_registry
from app.serving.service import GenerationStream, ServiceError

MIN_MODELS, MAX_MODELS = 2, 4
MODES = ("generate", "infill")
FIELD_ORDER = ("models", "mode", "prompt", "first", "last", *SAMPLING_FIELDS)


@dataclass(frozen=True)
class Comparison:
    """A validated comparison: one job per model, the same texts, settings and seed."""
    kind: str  # "generate" or "infill"
    jobs: list[Job]

    def query(self) -> dict[str, Any]:
        """The URL query that fills the form in with this comparison (its seed included,
        so the shared link writes the same texts)."""
        first = self.jobs[0]
        values = dict(first.values)
        if values.get("stop"):
            values["stop"] = values["stop"][0].replace("\\", "\\\\").replace("\n", "\\n") \
                .replace("\t", "\\t")
        return {"models": [job.model for job in self.jobs], "mode": self.kind,
                **{name: text for name, text in first.texts.items() if text},
                **{name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}}


def _shown(name: str) -> str:
    return repr(name if len(name) <= 100 else name[:100] + "...")


def read_comparison(args: MultiDict) -> Comparison:
    """The comparison a submitted form asks for; ``FormErrors`` with every problem, each
    under its field's name (the models' under "models")."""
    errors: dict[str | None, str] = {}
    kind = args.get("mode") or "generate"
    if kind not in MODES:
        errors["mode"] = f"'mode' must be generate or infill, got {_shown(kind)}"
        kind = "generate"
    names = list(dict.fromkeys(args.getlist("models")))  # each model once, in order
    registry = get_registry()
    if kind == "infill" and infill_unavailable():
        errors["mode"] = infill_unavailable()
    if not MIN_MODELS <= len(names) <= MAX_MODELS:
        chosen = {0: "none is", 1: "1 is"}.get(len(names), f"{len(names)} are")
        errors["models"] = f"choose {MIN_MODELS} to {MAX_MODELS} models to compare; {chosen} chosen"
    for name in names:
        loaded = registry.get(name)
        if loaded is None:
            errors.setdefault("models", f"{_shown(name)} is not a loaded model")
        elif kind == "infill" and not loaded.facts.can_infill:
            errors.setdefault("models", f"{_shown(name)} was not trained to infill; to fill in "
                                        f"the middle, choose models that do")
    fields = {name: args.get(name) for name in (*TEXT_FIELDS[kind], *SAMPLING_FIELDS)}
    if not (fields["seed"] or "").strip():  # one seed for every column, shown in the URL
        fields["seed"] = str(secrets.randbelow(SEED_RANGE))
    jobs = []
    for name in names[:MAX_MODELS] or [""]:
        try:
            jobs.append(read_job(kind, {**fields, "model": name}))
        except FormErrors as e:  # the same for every model but the model's own
            for field, message in e.errors.items():
                if field != "model":
                    errors.setdefault(field, message)
    if errors:
        raise FormErrors(in_form_order(errors, FIELD_ORDER))
    return Comparison(kind, jobs)


def infill_unavailable() -> str | None:
    """Why the models loaded here cannot be compared filling in a middle (fewer than
    ``MIN_MODELS`` of them infill), or None."""
    infillers = [facts.name for facts in get_registry().facts(infill=True)]
    if len(infillers) >= MIN_MODELS:
        return None
    which = f"only {infillers[0]} does" if infillers else "none does"
    return (f"filling in the middle needs {MIN_MODELS} loaded models trained to infill; "
            f"{which}")


def run_comparison(comparison: Comparison, logprobs: int | None = 0) -> list[Result]:
    """Every column's finished text and figures (the no-JavaScript path, and the benchmark):
    the generations all start, then run together in the engine loop, each collected by a
    thread of its own (so that each one's timings are its own)."""
    streams: list[GenerationStream | ServiceError] = []
    for job in comparison.jobs:
        try:
            streams.append(job.open(logprobs))
        except ServiceError as e:
            streams.append(e)
    with ThreadPoolExecutor(len(streams)) as pool:
        finished = list(pool.map(_finish, comparison.jobs, streams))
    for result, stream in zip(finished, streams):
        if isinstance(stream, GenerationStream) and result.error is None:
            result.stats = run_stats(stream, output_tokens(result.job, stream))
    return finished


def _finish(job: Job, stream: GenerationStream | ServiceError) -> Result:
    if isinstance(stream, ServiceError):
        return Result(job, error=stream.message, status=stream.status)
    return collect(job, stream)
