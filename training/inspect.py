"""Is a model healthy? A report on a checkpoint that names problems in plain words.

    python -m training.inspect --checkpoint checkpoints/char-lstm-shakespeare
    python -m training.inspect --checkpoint runs/my-run/final --data held_out.txt --save

A batch of the checkpoint's validation text (or of ``--data``) goes through the model
forward and backward: each layer's gradient norm, weights, activations, an LSTM's gates
and units, a GPT's dead units and attention entropy (``models_src.health``). The update
sizes its training recorded (``training.health_every``) join them when the run's health
records are found. ``--save`` writes the report to ``<checkpoint>/health.json``, which the
admin page shows. Exit status 1 when a problem is found.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from models_src import health
from models_src.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from models_src.generation import generate
from models_src.sampling import SamplingParams
from models_src.records import HealthLog

from .data import DataError
from .evaluate import documents_for

#: Columns of the per-layer table: (metric, heading); attention heads show their lowest.
COLUMNS = (("grad_norm", "grad norm"), ("update_ratio", "update"), ("weight_std", "weight std"),
           ("activation_std", "act std"), ("dead_units", "dead"),
           ("saturated_gates", "saturated"), ("attention_entropy_bits", "min head bits"))
#: Recorded during training only: a checkpoint alone cannot show the size of a step.
FROM_TRAINING = ("update_ratio",)


def probe_text(checkpoint: Checkpoint, data: str | None) -> tuple[list[str], str]:
    """Documents to probe with, and what they are: ``data``, else the checkpoint's own
    validation text, else (its corpus is not on this machine) text it writes itself."""
    try:
        docs, _ = documents_for(checkpoint, data, "validation" if data is None else "all")
        return docs, data or "its validation text"
    except DataError:
        if data is not None:
            raise
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=0)
    written = generate(checkpoint.model, checkpoint.tokenizer, [""] * 8, params)
    return [c.text for c in written], "text it wrote itself (its training data is not here)"


def probe_batch(checkpoint: Checkpoint, docs: list[str], rows: int = 8,
                length: int = 128) -> torch.Tensor:
    """``rows`` windows of ``length + 1`` tokens of ``docs``, read one after another."""
    context = checkpoint.model.max_context
    length = min(length, context) if context else length
    ids: list[int] = []
    for doc in docs:
        ids += checkpoint.tokenizer.encode(doc)
        if len(ids) >= rows * (length + 1):
            break
    rows = min(rows, len(ids) // (length + 1))
    if rows == 0:
        raise DataError(f"too little text to inspect: {len(ids)} tokens, need {length + 1}")
    return torch.tensor(ids[:rows * (length + 1)]).view(rows, length + 1)


def checkup(model: torch.nn.Module, batch: torch.Tensor) -> list[health.Record]:
    """Activations (a forward pass), gradients (forward and backward on the batch's next
    tokens) and weights of ``model``, which is left unchanged."""
    x, y = batch[:, :-1], batch[:, 1:]
    records = health.probe(model, x)
    was_training, required = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        records += health.gradient_stats(model)
    finally:
        model.zero_grad(set_to_none=True)
        for p, needed in zip(model.parameters(), required):
            p.requires_grad_(needed)
        model.train(was_training)
    return records + health.weight_stats(model)


def recorded(checkpoint: Checkpoint) -> tuple[int | None, list[health.Record]]:
    """The last training-health records of the run that made the checkpoint, if found."""
    summary = checkpoint.training
    run_id, name = summary.run_id, summary.name
    root = summary.config_section("output").get("experiments_dir")
    if not (run_id and name and root):
        return None, []
    step, records = HealthLog(root, name, run_id).latest()
    return step, [r for r in records if r[1] in FROM_TRAINING]


def layer_table(records: list[health.Record]) -> list[dict]:
    """One row per module: parameters' figures under their module (``x.weight`` -> ``x``,
    the weight's figure first), attention heads' under their attention layer (lowest)."""
    table: dict[str, dict] = {}
    for layer, metric, value in records:
        if metric not in dict(COLUMNS):
            continue
        module, _, last = layer.rpartition(".")
        if metric == "attention_entropy_bits":  # blocks.0.attn.head3
            row = table.setdefault(module, {"layer": module})
            row[metric] = min(value, row.get(metric, value))
            continue
        if metric in ("grad_norm", "update_ratio", "weight_std"):  # of a parameter
            if metric in table.get(module or layer, {}) and last != "weight":
                continue
            layer = module or layer
        table.setdefault(layer, {"layer": layer})[metric] = value
    return list(table.values())


def render(name: str, rows: list[dict], problems: list[str], note: str) -> str:
    shown = [(metric, heading) for metric, heading in COLUMNS if any(metric in r for r in rows)]
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines = [f"{name}: {note}", "",
             f"{'layer':<{width}}" + "".join(f"  {heading:>13}" for _, heading in shown)]
    for row in rows:
        cells = "".join(f"  {_cell(metric, row.get(metric)):>13}" for metric, _ in shown)
        lines.append(f"{row['layer']:<{width}}{cells}")
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:")
        lines += [f"  - {text}" for text in problems]
    else:
        lines.append("No problems found: gradients, updates, units, gates and attention heads "
                     "are all within healthy ranges.")
    return "\n".join(lines)


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    if metric in ("dead_units", "saturated_gates"):
        return f"{value:.0%}"
    if metric == "update_ratio":
        return f"{value:.2%}"
    return f"{value:.3g}"


def inspect(path: str | Path, data: str | None = None) -> dict:
    """The report on the checkpoint at ``path``: its layer table, its problems and what
    they were measured on."""
    return report(path, *measure(load_checkpoint(path), data))


def measure(checkpoint: Checkpoint, data: str | None = None) -> tuple[list[health.Record], str]:
    """A checkup's records on the checkpoint's probe text, with the update sizes its
    training recorded, and what they were measured on."""
    docs, source = probe_text(checkpoint, data)
    batch = probe_batch(checkpoint, docs)
    records = checkup(checkpoint.model, batch)
    step, trained = recorded(checkpoint)
    measured = f"{batch.size(0)} x {batch.size(1) - 1} tokens of {source}"
    if step is not None:
        measured += f"; update sizes from training step {step}"
    return records + trained, measured


def report(path: str | Path, records: list[health.Record], measured: str) -> dict:
    """``inspect``'s report from ``measure``'s records."""
    problems = health.diagnose(records)
    return {"checkpoint": str(path), "checked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "measured_on": measured, "layers": layer_table(records),
            "problems": [p.text for p in problems], "problem_kinds": sorted({p.kind for p in problems})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.inspect",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    parser.add_argument("--data", help="a text file or folder to probe with (default: the "
                                       "checkpoint's own validation text)")
    parser.add_argument("--save", action="store_true", help="also write <checkpoint>/health.json")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect(args.checkpoint, args.data)
    except (CheckpointError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save:
        (Path(args.checkpoint) / "health.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(Path(args.checkpoint).name, report["layers"], report["problems"],
                     report["measured_on"]))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
