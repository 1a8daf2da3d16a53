"""Comparison runs and ablations: train one config several ways, one table at the end.

    python -m training.sweep --config training/configs/char_gpt_shakespeare.yaml \\
        --vary model.arch=gpt,lstm,gru training.max_steps=500        # architectures compared
    python -m training.sweep --config ... --vary training.learning_rate=3e-4,1e-3,3e-3
    python -m training.sweep --config ... --vary model.n_layer=2,4 --vary model.dropout=0,0.1   # grid

Every run has the same data and budget and writes the usual experiment rows under the
experiment ``<name>-sweep`` (one run per combination, named after what it varies), its
checkpoints under ``runs/<name>-sweep/<variant>/`` and its loss curves as ``loss.png``
there; the summary table (validation loss, perplexity, bits per character, accuracy, tokens/s, time) is
printed at the end, as Markdown with ``--markdown``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import yaml

from .config import ConfigError, load_config, parse_override
from .data import DataError
from .experiments import summary_table
from .train import Trainer, TrainingError, TrainingInterrupted


def variants(vary: list[str]) -> list[list[str]]:
    """``["a.b=1,2", "c=x,y"]`` -> every combination as override lists."""
    axes = []
    for spec in vary:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError(f"--vary {spec!r} must look like section.key=value1,value2")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def label(overrides: list[str]) -> str:
    """A run's folder name: ``["model.arch=gpt", "training.learning_rate=3e-3"]`` ->
    ``arch=gpt_learning_rate=0.003``."""
    def shown(value) -> str:  # YAML's spelling, without the end-of-document marker
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return "_".join(f"{parse_override(o)[0][-1]}={shown(parse_override(o)[1])}".replace("/", "-")
                    for o in overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2",
                        help="a config key and its values; several --vary make a grid")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("overrides", nargs="*", help="fixed overrides for every run")
    args = parser.parse_args(argv)
    rows = []
    try:
        base = load_config(args.config, args.overrides)
        for combo in variants(args.vary):
            name = label(combo)
            cfg = load_config(args.config, [*args.overrides, *combo,
                                            f"output.dir=runs/{base.name}-sweep/{name}"])
            cfg.name = f"{base.name}-sweep"
            print(f"== {name}", file=sys.stderr)
            summary = Trainer(cfg).fit()
            rows.append({"variant": name, "parameters": summary.parameters,
                         "val_loss": summary.val_loss, "val_perplexity": summary.val_perplexity,
                         "bits_per_char": summary.bits_per_char,
                         "token_accuracy": summary.token_accuracy,
                         "tokens_per_s": summary.tokens_seen / max(summary.training_time_s, 1e-9),
                         "training_time_s": summary.training_time_s})
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # Ctrl-C ends the sweep, the run it stopped saved
        print(e, file=sys.stderr)
        return 130
    print(summary_table(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
