"""One prompt, one bundled model, the sampling settings side by side.

Shows what each knob of `SamplingParams` does to the same continuation: greedy
decoding, a low and a high temperature, top-k, top-p (nucleus) and a repetition penalty.
Every sampled row has the same seed, so the table is the same on every run.

    python examples/sampling_settings.py
    python examples/sampling_settings.py --checkpoint checkpoints/char-lstm-shakespeare \\
        --prompt "ROMEO:" --max-tokens 100
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the library is imported from the checkout, not installed

import torch  # noqa: E402

from models_src.checkpoint import load_checkpoint  # noqa: E402
from models_src.generation import generate  # noqa: E402
from models_src.sampling import SamplingParams  # noqa: E402

# name -> the settings that differ from plain sampling (temperature 1, nothing cut off)
SETTINGS = {
    "greedy": dict(temperature=0.0),  # always the likeliest token: no seed needed
    "temperature 0.5": dict(temperature=0.5),  # sharper: safer, blander
    "temperature 1.5": dict(temperature=1.5),  # flatter: rarer tokens, soon nonsense
    "top-k 10": dict(top_k=10),  # sample among the 10 likeliest tokens only
    "top-p 0.9": dict(top_p=0.9),  # among the fewest tokens that make up 90 % of the mass
    "greedy + repetition penalty 1.3": dict(temperature=0.0, repetition_penalty=1.3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinystories-gpt"))
    parser.add_argument("--prompt", default="Once upon a time, there was a little dog named Max.")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # One-token decoding steps on a small model: a second thread costs more than it saves.
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.checkpoint)
    print(f"model {checkpoint.name}, prompt {args.prompt!r}, {args.max_tokens} new tokens, "
          f"seed {args.seed}\n")

    width = max(map(len, SETTINGS))
    print(f"{'setting':<{width}} | continuation")
    print(f"{'-' * width}-+-{'-' * 60}")
    for name, settings in SETTINGS.items():
        params = SamplingParams(max_new_tokens=args.max_tokens, seed=args.seed, **settings)
        completion = generate(checkpoint.model, checkpoint.tokenizer, args.prompt, params)[0]
        text = " ".join(completion.text.split())  # one line per row: newlines become spaces
        print(f"{name:<{width}} | {text}")


if __name__ == "__main__":
    main()
