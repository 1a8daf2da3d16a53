"""The experiment records from the command line (the records themselves:
``models_src.records``), and the tables the sweeps print.

    python -m training.experiments --best val_perplexity --top 5
    python -m training.experiments --sql "SELECT model, max(step) FROM experiments GROUP BY 1"
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import duckdb

from models_src.records import METRICS, SHOWN, best, compare, loss_curves_png, query


def _cell(value) -> str:
    """Compact cell text: 4 significant digits, thousands separators, times to the second."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:39] + "…"


def summary_table(rows: list[dict], columns: list[str] | None = None,
                  markdown: bool = False) -> str:
    """Rows as a fixed-width table for the terminal, or a Markdown table for a README.
    Numbers are right-aligned; ``columns`` picks and orders columns (default: all)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    if markdown:
        cells = [[text.replace("|", "\\|") for text in line] for line in cells]
    numeric = [all(isinstance(row.get(c), (int, float, type(None))) for row in rows)
               for c in columns]
    widths = [max(len(c), 3 if markdown else 1, *(len(line[i]) for line in cells))
              for i, c in enumerate(columns)]

    def line(texts):
        padded = [t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric)]
        return f"| {' | '.join(padded)} |" if markdown else "  ".join(padded).rstrip()

    rule = [("-" * (w - 1) + ":" if num and markdown else "-" * w)
            for w, num in zip(widths, numeric)]
    return "\n".join([line(columns), line(rule), *map(line, cells)])


def plot_curves(root: Path | str, run_id: str, out_png: Path | str) -> Path:
    """A PNG of a run's train and validation loss against step, written to ``out_png``."""
    png = loss_curves_png(root, run_id)
    if png is None:
        if not query(root, "SELECT 1 FROM experiments WHERE run_id = ? LIMIT 1", [run_id]):
            raise ValueError(f"no run {run_id!r} under {root}")
        raise ValueError(f"run {run_id!r} has no finite train or validation loss to plot")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return out


# ---- Command line ----

LIST_SQL = """SELECT experiment, count(DISTINCT run_id) AS runs, count(*) AS evaluations,
    min(val_perplexity) AS best_val_perplexity, max(timestamp) AS last_logged
    FROM experiments GROUP BY experiment ORDER BY experiment"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.experiments",
                                     description="Query experiment records (Parquet, via DuckDB).")
    parser.add_argument("--root", default="experiments",
                        help="holds <experiment>/<run_id>.parquet (default: %(default)s)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--sql", help="SQL over the view `experiments`")
    action.add_argument("--best", metavar="METRIC", choices=METRICS,
                        help=f"best runs by a metric: {', '.join(METRICS)}")
    action.add_argument("--compare", nargs="+", metavar="NAME",
                        help="latest row of each experiment, model or run id, side by side")
    action.add_argument("--plot", metavar="RUN_ID", help="train/val loss of a run as a PNG (--out)")
    action.add_argument("--list", action="store_true", help="experiments with run counts")
    parser.add_argument("--top", type=int, default=5, help="rows for --best (default: %(default)s)")
    parser.add_argument("--experiment", help="restrict --best to one experiment")
    parser.add_argument("--out", help="PNG file for --plot")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.plot and not args.out:
        parser.error("--plot needs --out FILE.png")
    try:
        if args.plot:
            print(plot_curves(args.root, args.plot, args.out))
            return 0
        if args.sql is not None:
            rows, columns = query(args.root, args.sql), None
        elif args.best or args.compare:
            rows = best(args.root, args.best, args.top, args.experiment) if args.best \
                else compare(args.root, args.compare)
            columns = [c for c in SHOWN if any(row[c] is not None for row in rows)]
        else:
            rows, columns = query(args.root, LIST_SQL), None
    except (duckdb.Error, ValueError) as error:
        parser.error(str(error))
    print(summary_table(rows, columns, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
