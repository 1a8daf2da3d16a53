"""A run's records: one Parquet file per run, all runs queried together with DuckDB. The
trainer and the evaluator write them, the pages and ``python -m training.experiments``
read them; this one module knows the layout, the columns and the queries.

    <root>/<experiment>/<run_id>.parquet          one row per evaluation, columns exactly SCHEMA
    <root>/<experiment>/health/<run_id>.parquet   training health (models_src.health): one
                                                  row per layer and figure, HEALTH_SCHEMA

`ExperimentLog.log` rewrites its run's whole file through a temporary sibling and
`os.replace`, so a crash never leaves half a file and DuckDB only ever reads complete ones.
Every file has the same ordered, typed columns, so a glob over the root is one table:
`connect(root)` exposes it as the view ``experiments``, and the health records as the
view ``health``.

Every query reads the store through ``connect``; a missing or empty store reads as no rows.

A checkpoint keeps its own records in its ``config.json``: the run's summary (section
``training``, ``TrainingSummary``) and the evaluation the model card shows (section
``evaluation``, ``Evaluation``), typed here once for the trainer, the evaluator, the app
and the benchmarks.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),  # checkpoint / model name
    pa.field("architecture", pa.string(), nullable=False),
    pa.field("parameters", pa.int64(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("epoch", pa.float64(), nullable=False),
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("val_perplexity", pa.float64()),
    pa.field("token_accuracy", pa.float64()),
    pa.field("bits_per_char", pa.float64()),
    pa.field("bleu", pa.float64()),
    pa.field("tokens_per_s", pa.float64()),
    pa.field("tokens_seen", pa.int64()),
    pa.field("learning_rate", pa.float64()),
    pa.field("wall_time_s", pa.float64(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("split", pa.string()),  # "validation", "test", ...
    pa.field("kind", pa.string(), nullable=False),  # "train_eval", "evaluate", "infill", ...
    pa.field("config", pa.string(), nullable=False),  # the run config as JSON
    pa.field("git_commit", pa.string()),
])
HEALTH_SCHEMA = pa.schema([
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),  # a parameter, module or attention head
    pa.field("metric", pa.string(), nullable=False),  # grad_norm, update_ratio, dead_units, ...
    pa.field("value", pa.float64()),
    pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
])
#: The run files and the health files under a root (one level apart, so neither glob
#: reads the other's files).
RUN_FILES, HEALTH_FILES = "*/*.parquet", "*/health/*.parquet"
LOWER_IS_BETTER = ("train_loss", "val_loss", "val_perplexity", "bits_per_char")
HIGHER_IS_BETTER = ("token_accuracy", "bleu", "tokens_per_s")
METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
SHOWN = ("experiment", "run_id", "model", "parameters", "step", "split", *METRICS)


def git_commit(path: Path | str | None = None) -> str | None:
    """HEAD of the checkout holding ``path`` (this code by default), so a row names the code
    that produced it; None outside a git checkout or without git, never an exception."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def new_run_id() -> str:
    """``20261125-143012-ab12cd``: the UTC start time (ids sort by time) plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _file_name(name: str, what: str) -> str:
    """Names become directory and file names: refuse ones that would escape the root or hide."""
    if not name or name.startswith(".") or any(sep in name for sep in "/\\"):
        raise ValueError(f"invalid {what} {name!r}: must be a plain file name")
    return name


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write beside the target, fsync, rename over it: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.parquet: globs skip it
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ExperimentLog:
    """The records of one run. Opening an existing run id resumes it: its rows are loaded
    and new ones are appended after them."""

    def __init__(self, root: Path | str, experiment: str, run_id: str | None = None,
                 config: dict | None = None):
        self.experiment = _file_name(experiment, "experiment name")
        self.run_id = _file_name(run_id or new_run_id(), "run id")
        self.path = Path(root) / self.experiment / f"{self.run_id}.parquet"
        self.rows = pq.read_table(self.path).to_pylist() if self.path.exists() else []
        if config is not None:
            self.config = json.dumps(config, sort_keys=True, default=str)
        else:  # a resumed run keeps the config it was started with
            self.config = self.rows[-1]["config"] if self.rows else "{}"
        self.commit = git_commit()

    def log(self, **row) -> dict:
        """Append one evaluation row (SCHEMA column names) and rewrite the run's file.

        experiment, run_id, config, git_commit and timestamp are filled in (the last three
        may be overridden); nullable columns left out are null. Returns the stored row."""
        unknown = sorted(set(row) - set(SCHEMA.names))
        if unknown:
            raise ValueError(f"unknown experiment columns: {', '.join(unknown)}")
        if {"experiment", "run_id"} & set(row):
            raise ValueError("experiment and run_id are set by the ExperimentLog")
        full = {name: None for name in SCHEMA.names} | {
            "experiment": self.experiment, "run_id": self.run_id, "config": self.config,
            "git_commit": self.commit, "timestamp": datetime.now(timezone.utc)} | row
        missing = [f.name for f in SCHEMA if not f.nullable and full[f.name] is None]
        if missing:
            raise ValueError(f"missing experiment columns: {', '.join(missing)}")
        rows = self.rows + [full]
        _write_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), self.path)
        self.rows = rows  # only once the file holds them: a failed write can simply be retried
        return full


class HealthLog:
    """The training-health records of one run (``models_src.health``), appended as they
    come; reopening a run id goes on after its rows, as ExperimentLog does."""

    def __init__(self, root: Path | str, experiment: str, run_id: str) -> None:
        self.experiment = _file_name(experiment, "experiment name")
        self.run_id = _file_name(run_id, "run id")
        self.path = Path(root) / self.experiment / "health" / f"{self.run_id}.parquet"
        self.rows = pq.read_table(self.path).to_pylist() if self.path.exists() else []

    def log(self, step: int, records: list[tuple[str, str, float]]) -> None:
        now = datetime.now(timezone.utc)
        rows = self.rows + [
            {"experiment": self.experiment, "run_id": self.run_id, "step": step, "layer": layer,
             "metric": metric, "value": value, "timestamp": now} for layer, metric, value in records]
        _write_atomic(pa.Table.from_pylist(rows, schema=HEALTH_SCHEMA), self.path)
        self.rows = rows

    def latest(self) -> tuple[int | None, list[tuple[str, str, float]]]:
        """The last recorded step and its records."""
        if not self.rows:
            return None, []
        step = self.rows[-1]["step"]
        return step, [(r["layer"], r["metric"], r["value"]) for r in self.rows if r["step"] == step]


def connect(root: Path | str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the view ``experiments`` over every run file under ``root``
    and ``health`` over every health file (each with its schema's columns and no rows while
    there are none). Times are shown in UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for view, files, schema in (("experiments", RUN_FILES, SCHEMA),
                                ("health", HEALTH_FILES, HEALTH_SCHEMA)):
        if any(Path(root).glob(files)):
            pattern = str(Path(root) / files).replace("'", "''")
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM "
                        f"read_parquet('{pattern}', union_by_name = true)")
        else:
            con.register(view, schema.empty_table())
    return con


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    result = con.execute(sql, params)
    columns = [column[0] for column in result.description or ()]
    return [dict(zip(columns, values)) for values in result.fetchall()] if columns else []


def query(root: Path | str, sql: str, params: list | None = None) -> list[dict]:
    """Rows of ``sql`` over the view ``experiments``, as dicts in column order."""
    with connect(root) as con:
        return _fetch(con, sql, params)


def best(root: Path | str, metric: str = "val_perplexity", top: int = 5,
         experiment: str | None = None) -> list[dict]:
    """The ``top`` runs by ``metric``, one row per run: its best one (lowest loss, perplexity
    or bits per char; highest accuracy, BLEU or throughput). NaN never counts as best."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    order = "ASC" if metric in LOWER_IS_BETTER else "DESC"
    only = "AND experiment = ?" if experiment else ""
    sql = f"""SELECT * FROM experiments WHERE {metric} IS NOT NULL AND NOT isnan({metric}) {only}
        QUALIFY row_number() OVER (
            PARTITION BY experiment, run_id ORDER BY {metric} {order}, step) = 1
        ORDER BY {metric} {order}, run_id LIMIT ?"""
    return query(root, sql, [experiment, top] if experiment else [top])


def leaderboard(root: Path | str, top: int = 10) -> list[dict]:
    """The ``top`` runs with a validation perplexity, one row per run (its best one), ranked
    by bits per character: unlike perplexity, which is per token of each run's own
    vocabulary, it compares character, word and BPE models. Runs without it (infilling
    tasks, partial evaluations) follow, by validation perplexity. NaN never counts."""
    sql = """WITH scored AS (
            SELECT *, CASE WHEN NOT isnan(bits_per_char) THEN bits_per_char END AS _bpc
            FROM experiments WHERE val_perplexity IS NOT NULL AND NOT isnan(val_perplexity))
        SELECT * EXCLUDE (_bpc) FROM scored
        QUALIFY row_number() OVER (
            PARTITION BY experiment, run_id ORDER BY _bpc ASC NULLS LAST, val_perplexity, step) = 1
        ORDER BY _bpc ASC NULLS LAST, val_perplexity, run_id LIMIT ?"""
    return query(root, sql, [top])


def compare(root: Path | str, names: list[str]) -> list[dict]:
    """The latest evaluation row of each name (an experiment, a model or a run id), in order."""
    rows = []
    with connect(root) as con:
        for name in names:
            found = _fetch(con, "SELECT * FROM experiments WHERE ? IN (experiment, model, run_id) "
                                "ORDER BY timestamp DESC, step DESC LIMIT 1", [name])
            if not found:
                raise ValueError(f"no experiment, model or run id named {name!r}")
            rows += found
    return rows


#: Each run's latest rows with a curve to draw: a loss at two steps or more.
RECENT_RUNS_SQL = """SELECT experiment, run_id, any_value(model) AS model,
    count(*) AS evaluations, max(step) AS last_step, min(val_perplexity) AS best_val_perplexity,
    max(timestamp) AS last_logged
    FROM experiments GROUP BY experiment, run_id
    HAVING count(train_loss) + count(val_loss) > 0 AND count(DISTINCT step) > 1
    ORDER BY last_logged DESC, run_id LIMIT ?"""
#: Every run, newest first: what it is, how far it went, and the figures of its evaluation
#: with the lowest validation loss (then the earliest), beside its latest throughput.
RUN_SUMMARIES_SQL = """SELECT experiment, run_id, arg_max(model, timestamp) AS model,
        arg_max(architecture, timestamp) AS architecture,
        arg_max(parameters, timestamp) AS parameters, count(*) AS evaluations,
        max(step) AS last_step, max(timestamp) AS last_logged,
        count(*) FILTER (WHERE isfinite(train_loss) OR isfinite(val_loss)) AS losses,
        min(val_loss) FILTER (WHERE isfinite(val_loss)) AS best_val_loss,
        arg_min(val_perplexity, (val_loss, step)) FILTER (WHERE isfinite(val_loss))
            AS val_perplexity,
        arg_min(bits_per_char, (val_loss, step)) FILTER (WHERE isfinite(val_loss))
            AS bits_per_char,
        arg_min(token_accuracy, (val_loss, step)) FILTER (WHERE isfinite(val_loss))
            AS token_accuracy,
        arg_max(tokens_per_s, (step, timestamp)) FILTER (WHERE isfinite(tokens_per_s))
            AS tokens_per_s
    FROM experiments GROUP BY experiment, run_id
    ORDER BY last_logged DESC, experiment, run_id"""
#: The losses of some runs, one row per run and step (the last finite value logged there).
RUN_LOSSES_SQL = """SELECT experiment, run_id, step,
        arg_max(train_loss, timestamp) FILTER (WHERE isfinite(train_loss)) AS train_loss,
        arg_max(val_loss, timestamp) FILTER (WHERE isfinite(val_loss)) AS val_loss
    FROM experiments WHERE list_contains(?, run_id)
    GROUP BY experiment, run_id, step ORDER BY experiment, run_id, step"""


def recent_runs(root: Path | str, count: int) -> list[dict]:
    """The ``count`` runs logged last that have a loss curve (two steps or more)."""
    return query(root, RECENT_RUNS_SQL, [count])


def run_summaries(root: Path | str) -> list[dict]:
    """One row per run (RUN_SUMMARIES_SQL), newest first."""
    return query(root, RUN_SUMMARIES_SQL, [])


def run_losses(root: Path | str, run_ids: list[str]) -> dict[tuple[str, str], dict[str, list]]:
    """(experiment, run id) -> {"steps", "train_loss", "val_loss"}: equal-length lists by
    step, None where a step has no finite value of that loss."""
    curves: dict[tuple[str, str], dict[str, list]] = {}
    for row in query(root, RUN_LOSSES_SQL, [list(run_ids)]) if run_ids else []:
        curve = curves.setdefault((row["experiment"], row["run_id"]),
                                  {"steps": [], "train_loss": [], "val_loss": []})
        for key, column in (("steps", "step"), ("train_loss", "train_loss"),
                            ("val_loss", "val_loss")):
            curve[key].append(row[column])
    return curves


def loss_curves_png(root: Path | str, run_id: str) -> bytes | None:
    """A 640 x 400 PNG of a run's training and validation loss by step (matplotlib, no
    display); None when the run has no finite loss (or no rows)."""
    rows = query(root, "SELECT step, train_loss, val_loss FROM experiments WHERE run_id = ? "
                       "ORDER BY step, timestamp", [run_id])
    lines = []
    for column, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        points = [(r["step"], r[column]) for r in rows if r[column] is not None and math.isfinite(r[column])]
        if points:
            lines.append((label, *zip(*points)))
    if not lines:
        return None
    from matplotlib.figure import Figure  # draws without pyplot or a display

    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    axes = figure.subplots()
    for label, steps, losses in lines:
        axes.plot(steps, losses, label=label, markersize=3, marker="o" if len(steps) <= 30 else None)
    axes.set(xlabel="step", ylabel="loss (nats/token)", title=run_id)
    axes.grid(alpha=0.3)
    axes.legend()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()


# ---- a checkpoint's records: config.json's "training" and "evaluation" sections ---------

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _described(value: Any) -> bool:
    """Free-form: text, a list or a mapping (an imported model's card may say either)."""
    return isinstance(value, (str, list, dict))


def _known(accepts: Callable[[Any], bool]) -> Any:
    """A field old checkpoints may lack (None); ``from_dict`` reads a value only where
    ``accepts`` takes it."""
    return field(default=None, metadata={"accepts": accepts})


@dataclass(frozen=True, kw_only=True)
class _Section:
    """One config.json section as typed fields, None where the file lacks a value."""

    #: What the file held that no field does, verbatim: unknown keys, and known ones whose
    #: value was unreadable (a string for a number, NaN, null). A re-save writes it back.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        """The section as any Fable wrote it, or a hostile file holds it: never raises; a
        value of the wrong type is read as missing (and kept in ``extra``)."""
        raw = raw if isinstance(raw, dict) else {}
        typed = {f.name: raw[f.name] for f in fields(cls)
                 if "accepts" in f.metadata and f.name in raw and f.metadata["accepts"](raw[f.name])}
        return cls(**typed, extra={k: v for k, v in raw.items() if k not in typed})

    def to_dict(self) -> dict[str, Any]:
        """The section as config.json holds it (fields left None are left out)."""
        written = {f.name: getattr(self, f.name) for f in fields(self)
                   if "accepts" in f.metadata and getattr(self, f.name) is not None}
        return written | {k: v for k, v in self.extra.items() if k not in written}


@dataclass(frozen=True, kw_only=True)
class TrainingSummary(_Section):
    """config.json ``training``: what the trainer knew of its run when it saved the checkpoint
    (fields in the order it writes them), and what an imported model may declare."""

    name: str | None = _known(_text)  # the run's name (the checkpoint folder may differ)
    finished: bool | None = _known(_flag)  # False: stopped early (Ctrl-C), resumable
    step: int | None = _known(_count)
    parameters: int | None = _known(_count)
    epoch: float | None = _known(_finite)
    tokens_seen: int | None = _known(_count)
    train_loss: float | None = _known(_finite)
    val_loss: float | None = _known(_finite)
    val_perplexity: float | None = _known(_finite)
    token_accuracy: float | None = _known(_finite)
    bits_per_char: float | None = _known(_finite)
    best_val_loss: float | None = _known(_finite)  # inf before the first evaluation
    training_time_s: float | None = _known(_finite)
    data: str | list | dict | None = _known(_described)  # the corpus's path or hub name
    tokenizer: str | None = _known(_text)  # its kind: char, word, bpe, ...
    vocab_size: int | None = _known(_count)
    seq_len: int | None = _known(_count)  # tokens per training sequence
    hardware: str | list | dict | None = _known(_described)
    #: The run's whole config (training.config.RunConfig.to_dict()): its shape belongs to
    #: the trainer of its day, so it stays a mapping; ``config_section`` reads a part.
    config: dict[str, Any] | None = _known(_mapping)
    command: str | None = _known(_text)  # what trains it again
    run_id: str | None = _known(_text)  # its rows in the experiment records
    infill: bool | None = _known(_flag)  # an imported model declares it learned the format
    bleu: float | None = _known(_finite)
    samples: list[str] | None = _known(_texts)

    def config_section(self, name: str) -> dict[str, Any]:
        """A section of the run's config (``data``, ``model``, ``output``...); {} without one."""
        section = (self.config or {}).get(name)
        return section if isinstance(section, dict) else {}


@dataclass(frozen=True, kw_only=True)
class Evaluation(_Section):
    """config.json ``evaluation``: what ``python -m training.model_card`` measured with
    ``training.evaluate`` (the model card's figures); BLEU and samples where added."""

    split: str | None = _known(_text)
    tokens: int | None = _known(_count)
    characters: int | None = _known(_count)
    loss: float | None = _known(_finite)
    perplexity: float | None = _known(_finite)
    bits_per_char: float | None = _known(_finite)
    token_accuracy: float | None = _known(_finite)
    reads: str | None = _known(_text)  # "stream" or "documents"
    command: str | None = _known(_text)
    date: str | None = _known(_text)  # ISO 8601, as written
    bleu: float | None = _known(_finite)
    samples: list[str] | None = _known(_texts)
