"""New tokens per second with the state / KV cache, against re-running the whole prefix.

    python benchmarks/generation.py [--threads 2] [--repeats 3]

For a GPT (nanoGPT's CPU "baby" shape: 4 layers, 4 heads, 128 wide, 65-character
vocabulary, 256-token context) and a 2-layer LSTM, at batch 1 and 8, it times
``models_src.sampling.generate`` for 256 and 1,024 new tokens and prints tokens/s, the
time per decoding step and the ratio of the two per-step costs: near 1 means the cost
per new token does not grow with the length of the text (the state is reused). The
peer in the same run is the loop the seeds' apps and nanoGPT's ``sample.py`` used: a
full forward pass over the whole (context-cropped) prefix for every new token.
"""

from __future__ import annotations

import argparse

import torch

from _common import best_of, environment
from models_src import ModelConfig, build_model
from models_src.generation import generate
from models_src.sampling import SamplingParams
from models_src.tokenization import Tokenizer

ALPHABET = "".join(chr(c) for c in range(32, 91)) + "\n!?;:'"  # 65 characters
SHAPES = {
    "gpt": dict(arch="gpt", n_layer=4, n_head=4, n_embd=128, block_size=256),
    "lstm": dict(arch="lstm", n_layer=2, n_embd=128, n_hidden=512),
}
PROMPT = "ROMEO:\nBut soft, what light"


def full_prefix_loop(model, ids: torch.Tensor, new_tokens: int, generator) -> None:
    """The peer: no state; every step re-runs the prefix (cropped to the context)."""
    ctx = model.max_context
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits, _ = model(ids if ctx is None else ids[:, -ctx:])
            probs = logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--peer-max", type=int, default=256,
                        help="longest run timed for the quadratic peer (it is slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.train_char([ALPHABET])
    print(f"# generation benchmark — {environment()}")
    print(f"{'model':6} {'batch':>5} {'new':>5} {'tok/s':>9} {'ms/step':>8} "
          f"{'peer tok/s':>10} {'speed-up':>8}")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, **shape)).eval()
        for batch in args.batches:
            step_ms = {}
            for n in args.lengths:
                params = SamplingParams(max_new_tokens=n, temperature=1.0, seed=0, ignore_eos=True)
                generate(model, tokenizer, [PROMPT] * batch, SamplingParams(max_new_tokens=8))
                seconds = best_of(lambda: generate(model, tokenizer, [PROMPT] * batch, params),
                                  args.repeats)
                step_ms[n] = seconds / n * 1e3
                peer = ""
                if n <= args.peer_max:
                    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(PROMPT)] * batch)
                    g = torch.Generator().manual_seed(0)
                    peer_s = best_of(lambda: full_prefix_loop(model, ids, n, g), 1)
                    peer = f"{batch * n / peer_s:10.0f} {peer_s / seconds:7.1f}x"
                print(f"{name:6} {batch:5d} {n:5d} {batch * n / seconds:9.0f} {step_ms[n]:8.2f} {peer}")
            lo, hi = min(args.lengths), max(args.lengths)
            ratio = step_ms[hi] / step_ms[lo]
            verdict = "ok" if ratio <= 1.5 else "GROWS"
            print(f"{name:6} {batch:5d}  per-token cost at {hi} / at {lo}: {ratio:.2f} ({verdict})")


if __name__ == "__main__":
    main()
