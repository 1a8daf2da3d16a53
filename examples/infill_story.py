"""Story infilling: give the bundled TinyStories model a first and a last sentence, and
it writes the middle.

Shows `models_src.infill`: whether a checkpoint learned to infill, and `infill`, which
builds the `<bos> first <blank> last <sep>` prompt, stops at the end marker and never
repeats the last sentence.

    python examples/infill_story.py
    python examples/infill_story.py --first "Lily wanted to fly a kite." \\
        --last "From then on, the kite hung in her room." --seed 3
"""

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the library is imported from the checkout, not installed

import torch  # noqa: E402

from models_src.checkpoint import load_checkpoint  # noqa: E402
from models_src.infill import infill, trained_to_infill  # noqa: E402
from models_src.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinystories-gpt"))
    parser.add_argument("--first", default="Tom had a red ball.")
    parser.add_argument("--last", default="Tom was happy again.")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one-token steps on a small model: one thread is fastest
    checkpoint = load_checkpoint(args.checkpoint)
    # Every Fable tokenizer has the <blank>/<sep> markers; only a model trained on the
    # infilling task knows what to do with them (its training summary says so).
    if not trained_to_infill(checkpoint.training, checkpoint.tokenizer):
        sys.exit(f"{checkpoint.name} was not trained to infill: its middles would be noise")

    # Sampled rather than greedy: greedy middles of this small model loop ("He jumped and
    # jumped on the ball." over and over). The seed makes the story the same every run.
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.8, top_p=0.9,
                            seed=args.seed)
    middle = infill(checkpoint.model, checkpoint.tokenizer, args.first, args.last, params)

    ended = ("the model ended the middle itself" if middle.finish_reason == "stop"
             else f"cut at --max-tokens {args.max_tokens}")
    print(f"first:  {args.first}")
    print(textwrap.fill(middle.text, 88, initial_indent="middle: ", subsequent_indent=" " * 8))
    print(f"last:   {args.last}")
    print(f"({middle.completion_tokens} tokens, {ended})")


if __name__ == "__main__":
    main()
