"""Reads the training records for the admin and experiments pages, without importing the
trainer.

The trainer writes one Parquet file per run under ``FABLE_EXPERIMENTS_DIR``; DuckDB
queries them here directly. An empty or missing store reads as no rows.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import duckdb

#: Each run's best evaluation, one row per run, ranked by bits per character (which
#: compares models across vocabularies), then by validation perplexity. NaN never counts.
BEST_RUNS_SQL = """SELECT experiment, run_id, model, architecture, parameters, step, split,
        bits_per_char, val_perplexity, val_loss, token_accuracy, tokens_per_s, timestamp
    FROM (SELECT *, CASE WHEN NOT isnan(bits_per_char) THEN bits_per_char END AS bpc,
                 row_number() OVER (PARTITION BY experiment, run_id
                                    ORDER BY bpc ASC NULLS LAST, val_perplexity, step) AS best
          FROM experiments WHERE val_perplexity IS NOT NULL AND NOT isnan(val_perplexity))
    WHERE best = 1 ORDER BY bpc ASC NULLS LAST, val_perplexity, run_id LIMIT ?"""
#: The latest runs with a curve to draw: a loss at two steps or more.
RECENT_RUNS_SQL = """SELECT experiment, run_id, any_value(model) AS model,
    count(*) AS evaluations, max(step) AS last_step, min(val_perplexity) AS best_val_perplexity,
    max(timestamp) AS last_logged
    FROM experiments GROUP BY experiment, run_id
    HAVING count(train_loss) + count(val_loss) > 0 AND count(DISTINCT step) > 1
    ORDER BY last_logged DESC, run_id LIMIT ?"""
LOSSES_SQL = """SELECT step, train_loss, val_loss FROM experiments WHERE run_id = ?
    ORDER BY step, timestamp"""
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


def _rows(root: Path, sql: str, params: list) -> list[dict]:
    """``sql`` over the view ``experiments`` (every run file under ``root``), as dicts;
    timestamps in UTC."""
    # <root>/<experiment>/<run_id>.parquet; health records lie one level down (health/)
    files = str(root / "*" / "*.parquet")
    if not any(root.glob("*/*.parquet")):
        return []
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("CREATE VIEW experiments AS SELECT * FROM read_parquet("
                    f"'{files.replace(chr(39), chr(39) * 2)}', union_by_name = true)")
        result = con.execute(sql, params)
        columns = [c[0] for c in result.description]
        return [dict(zip(columns, row)) for row in result.fetchall()]


def best_runs(root: Path, top: int) -> list[dict]:
    return _rows(root, BEST_RUNS_SQL, [top])


def recent_runs(root: Path, count: int) -> list[dict]:
    return _rows(root, RECENT_RUNS_SQL, [count])


def run_summaries(root: Path) -> list[dict]:
    """One row per run (RUN_SUMMARIES_SQL), newest first."""
    return _rows(root, RUN_SUMMARIES_SQL, [])


def run_losses(root: Path, run_ids: list[str]) -> dict[tuple[str, str], dict[str, list]]:
    """(experiment, run id) -> {"steps", "train_loss", "val_loss"}: equal-length lists by
    step, None where a step has no finite value of that loss."""
    curves: dict[tuple[str, str], dict[str, list]] = {}
    for row in _rows(root, RUN_LOSSES_SQL, [list(run_ids)]) if run_ids else []:
        curve = curves.setdefault((row["experiment"], row["run_id"]),
                                  {"steps": [], "train_loss": [], "val_loss": []})
        for key, column in (("steps", "step"), ("train_loss", "train_loss"),
                            ("val_loss", "val_loss")):
            curve[key].append(row[column])
    return curves


def store_problem(e: Exception, root: Path) -> str:
    """What went wrong reading the store, in a line: file names relative to it (a page
    never shows the server's layout)."""
    message = (str(e) or type(e).__name__).strip().splitlines()[0]
    for prefix in {str(root.resolve()), str(root)}:
        message = message.replace(prefix + "/", "")
    return f"{type(e).__name__}: {message}"


def loss_curves_png(root: Path, run_id: str) -> bytes | None:
    """A 640 x 400 PNG of a run's training and validation loss by step; None when the run
    has no finite loss."""
    rows = _rows(root, LOSSES_SQL, [run_id])
    lines = []
    for column, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        points = [(r["step"], r[column]) for r in rows
                  if r[column] is not None and math.isfinite(r[column])]
        if points:
            lines.append((label, *zip(*points)))
    if not lines:
        return None
    from matplotlib.figure import Figure  # draws without pyplot or a display

    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
    axes = figure.subplots()
    for label, steps, losses in lines:
        axes.plot(steps, losses, label=label, markersize=3,
                  marker="o" if len(steps) <= 30 else None)
    axes.set(xlabel="step", ylabel="loss (nats/token)", title=run_id)
    axes.grid(alpha=0.3)
    axes.legend()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()
