"""Train a tiny character-level GPT from nothing, in well under a minute on a CPU.

Shows the training API end to end: a YAML config (the same file `python -m
training.train --config` takes), the trainer, the validation loss and perplexity it
reports, and a sample from the checkpoint it saved.

    python examples/train_tiny.py                      # 200 steps
    python examples/train_tiny.py --steps 30 --out /tmp/tiny

The text is Tiny Shakespeare when the shared corpora are there ($FABLE_DATA_DIR, else
../shared/data), otherwise a few of Aesop's fables embedded below. Everything the run
writes (corpus, token cache, checkpoints, experiment rows) goes under --out.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the library is imported from the checkout, not installed

from models_src.checkpoint import load_checkpoint  # noqa: E402
from models_src.generation import generate  # noqa: E402
from models_src.sampling import SamplingParams  # noqa: E402
from training.config import load_config  # noqa: E402
from training.train import Trainer  # noqa: E402

# Public domain: Aesop's fables, retold. Enough text for a character model to pick up
# spelling and punctuation in a few hundred steps, small enough to read.
FABLES = """\
The Fox and the Grapes. A hungry fox saw some fine bunches of grapes hanging from a vine
that was trained along a high trellis, and did his best to reach them by jumping as high
as he could into the air. But it was all in vain, for they were just out of reach: so he
gave up trying, and walked away with an air of dignity and unconcern, remarking, "I
thought those grapes were ripe, but I see now they are quite sour."

The Hare and the Tortoise. A hare was one day making fun of a tortoise for being so slow
upon his feet. "Wait a bit," said the tortoise; "I will run a race with you, and I will
wager that I win." "Oh, well," replied the hare, who was much amused at the idea, "let
us try and see." The hare was soon far out of sight, and to make the tortoise feel how
foolish it was to try a race with a hare, he lay down beside the course to take a nap
until the tortoise should catch up. Meanwhile the tortoise kept plodding on, slowly but
surely, and, after a time, passed the place where the hare was sleeping. The hare slept
on very peacefully; and when at last he did wake up, the tortoise was near the goal. The
hare now ran his swiftest, but he could not overtake the tortoise in time. Slow and
steady wins the race.

The Crow and the Pitcher. A crow, half dead with thirst, came upon a pitcher which had
once been full of water; but when the crow put its beak into the mouth of the pitcher he
found that only very little water was left in it, and that he could not reach far enough
down to get at it. He tried, and he tried, but at last had to give up in despair. Then a
thought came to him, and he took a pebble and dropped it into the pitcher. Then he took
another pebble and dropped it into the pitcher. At last, at last, he saw the water mount
up near him, and after casting in a few more pebbles he was able to quench his thirst and
save his life. Little by little does the trick.

The Ant and the Grasshopper. In a field one summer's day a grasshopper was hopping about,
chirping and singing to its heart's content. An ant passed by, bearing along with great
toil an ear of corn he was taking to the nest. "Why not come and chat with me," said the
grasshopper, "instead of toiling and moiling in that way?" "I am helping to lay up food
for the winter," said the ant, "and recommend you to do the same." "Why bother about
winter?" said the grasshopper; "we have got plenty of food at present." But the ant went
on its way and continued its toil. When the winter came the grasshopper had no food, and
found itself dying of hunger, while it saw the ants distributing every day corn and grain
from the stores they had collected in the summer. It is best to prepare for the days of
necessity.

The Lion and the Mouse. Once when a lion was asleep a little mouse began running up and
down upon him; this soon wakened the lion, who placed his huge paw upon him, and opened
his big jaws to swallow him. "Pardon, O King," cried the little mouse, "forgive me this
time, I shall never forget it: who knows but what I may be able to do you a turn some of
these days?" The lion was so tickled at the idea of the mouse being able to help him that
he lifted up his paw and let him go. Some time after, the lion was caught in a trap, and
the hunters tied him to a tree while they went in search of a wagon to carry him on. Just
then the little mouse happened to pass by, and seeing the sad plight in which the lion
was, went up to him and soon gnawed away the ropes that bound the king of the beasts.
"Was I not right?" said the little mouse. Little friends may prove great friends.
"""


def tiny_config(data: Path, out: Path) -> dict:
    """A GPT small enough to train in seconds. Every key is one the YAML files in
    training/configs/ use; defaults for the rest are in training/config.py."""
    return {
        "name": "tiny-char-gpt",
        "model": {"arch": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64,
                  "dropout": 0.0},
        "data": {"path": str(data), "split": [0.9, 0.1], "cache_dir": str(out / "cache")},
        "tokenizer": {"kind": "char"},
        "training": {"batch_size": 16, "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 10,
                     "max_steps": 200, "eval_batches": 10,
                     # Matrices this small gain nothing from a second thread, and on a busy
                     # machine threads waiting on each other make each step many times slower.
                     "num_threads": 1},
        # Keep the run out of the checkout's runs/ and experiments/.
        "output": {"dir": str(out / "run"), "experiments_dir": str(out / "experiments")},
    }


def corpus(out: Path) -> Path:
    """Tiny Shakespeare when the shared corpora are present; else the fables, written out."""
    shared = Path(os.environ.get("FABLE_DATA_DIR", ROOT.parent / "shared" / "data"))
    shakespeare = shared / "tinyshakespeare" / "input.txt"
    if shakespeare.is_file():
        return shakespeare
    path = out / "fables.txt"
    path.write_text(FABLES)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--out", help="where the run goes (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fable-tiny-")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    data = corpus(out)
    config_path = out / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(data, out), sort_keys=False))
    # Overrides work as on the command line: `... --config tiny.yaml training.max_steps=N`.
    cfg = load_config(config_path, [f"training.max_steps={args.steps}"])
    print(f"training {cfg.model.arch} on {data} for {args.steps} steps")
    summary = Trainer(cfg, quiet=True).fit()  # its final evaluation scores all of validation

    loss, perplexity = summary.val_loss, summary.val_perplexity
    print(f"validation loss {loss:.4f} nats/token, perplexity {perplexity:.2f} "
          f"(guessing uniformly over the {summary.vocab_size} characters scores "
          f"{summary.vocab_size})")

    # The run saved final/ like any checkpoint: load it back and sample from it.
    checkpoint = load_checkpoint(cfg.run_dir / "final")
    params = SamplingParams(max_new_tokens=120, temperature=0.8, top_k=20, seed=0)
    sample = generate(checkpoint.model, checkpoint.tokenizer, "The ", params)[0]
    print("sample:\n" + "The " + sample.text)
    print(f"\ncheckpoint: {cfg.run_dir / 'final'}\nthe same run from the command line: "
          f"python -m training.train --config {config_path} training.max_steps={args.steps}")


if __name__ == "__main__":
    main()
