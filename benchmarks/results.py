"""Train every shipped config on the corpora in ../shared/data and print the results table.

    python benchmarks/results.py [--configs char_gpt_shakespeare ...] [--skip-training]

Each config is trained with the project's own command (``python -m training.train``),
then scored with ``python -m training.evaluate`` on its validation split; the Markdown
table (parameters, data, validation perplexity, bits per character, token accuracy,
training time, hardware, command) is what README.md shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import ROOT
from models_src.checkpoint import read_config
from models_src.records import TrainingSummary

CONFIGS = ["char_gpt_shakespeare", "char_lstm_shakespeare", "word_lstm_books", "tinystories_gpt",
           "tinystories_word_lstm", "tinystories_lstm", "word_lstm_wikitext", "bpe_lstm_tinystories",
           "bpe_gpt_tinystories"]


def run(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--skip-training", action="store_true", help="only evaluate existing runs")
    args = parser.parse_args()
    print("| config | model | parameters | data | tokens | val perplexity | bits/char | token accuracy "
          "| training time | hardware |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.configs:
        config = f"training/configs/{name}.yaml"
        if not args.skip_training:
            run("training.train", "--config", config, "--quiet")
        summary = TrainingSummary.from_dict(read_config(ROOT / "runs" / _run_name(config) / "final")["training"])
        result = json.loads(run("training.evaluate", "--checkpoint", f"runs/{_run_name(config)}/final",
                                "--samples", "0", "--json"))
        model = summary.config_section("model")
        shape = (f"{model['arch']} {model['n_layer']}x{model.get('n_hidden') or model.get('n_embd')}")
        data = "/".join(Path(summary.data).parts[-2:])
        print(f"| `{name}` | {shape} | {summary.parameters / 1e6:.2f}M | {data} "
              f"| {summary.tokenizer} ({result['vocab_size']:,}) | {result['perplexity']:.2f} "
              f"| {result['bits_per_char']:.3f} | {result['token_accuracy']:.1%} "
              f"| {summary.training_time_s / 60:.1f} min | {summary.hardware} |", flush=True)


def _run_name(config: str) -> str:
    import yaml
    return yaml.safe_load((ROOT / config).read_text())["name"]


if __name__ == "__main__":
    main()
