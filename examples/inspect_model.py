"""Is a model healthy? Its layers' gradients, units, gates and attention, in plain words.

Probes a checkpoint forward and backward on a batch of its own validation text (or on
text it writes itself, when its corpus is not on this machine) and prints the per-layer
table and any problems found (`training/inspect.py`, `models_src/health.py`). For a GPT it
then shows the entropy of each attention head: near 0 bits, a head looks at one position
only; a layer where most heads do that has collapsed.

    python examples/inspect_model.py
    python examples/inspect_model.py --checkpoint checkpoints/char-lstm-shakespeare

The same report from the command line: `python -m training.inspect --checkpoint DIR`.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the library is imported from the checkout, not installed
os.chdir(ROOT)  # a checkpoint names its corpus relative to the repository (../shared/...)

from models_src.checkpoint import load_checkpoint  # noqa: E402
from training.inspect import measure, render, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/char-gpt-shakespeare")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    records, measured = measure(checkpoint)
    found = report(args.checkpoint, records, measured)
    print(render(Path(args.checkpoint).name, found["layers"], found["problems"],
                 found["measured_on"]))

    if checkpoint.model.max_context is None:
        return  # an RNN: no attention heads (its gates are in the table above)
    print("\nattention entropy per head, in bits (0: one position; higher: spread out)")
    layers: dict[str, list[float]] = {}
    for name, metric, bits in records:
        if metric == "attention_entropy_bits":
            layers.setdefault(name.rpartition(".")[0], []).append(bits)
    for layer, heads in layers.items():
        print(f"  {layer:<16}" + "".join(f"{bits:6.2f}" for bits in heads))


if __name__ == "__main__":
    main()
