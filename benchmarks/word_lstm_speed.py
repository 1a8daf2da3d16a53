"""Training speed of the word-level LSTM: our trainer against a plain PyTorch loop in the
style of pytorch/examples' word_language_model, same sizes, batch, bptt and optimizer.

    python benchmarks/word_lstm_speed.py [--threads 2] [--steps 8] [--rounds 6] [--sgd]

Ours: ``training.train.Trainer`` from a config dict (``arch: lstm``, word tokenizer), with
its truncated back-propagation through time: the sizes, batch (32) and bptt (70) of
``training/configs/word_lstm_wikitext.yaml``; plain dropout 0.2 on the embeddings, between
the layers and on the output (the examples' regularisation; ours is locked dropout, one
mask per row), no AWD weight drop; untied weights (the examples can tie only when the
hidden size equals the embedding size).

The peer, written here: the text split on whitespace with ``<eos>`` per line, ``batchify``
into 32 columns, ``get_batch`` windows of 70, ``repackage_hidden`` between windows, one
2-layer ``nn.LSTM`` (sequence-first) with an embedding encoder and a linear decoder,
log-softmax + NLL loss, ``clip_grad_norm_(0.25)``. Its vocabulary is cut to the size of
ours (most frequent words, the rest ``<unk>``), so both decoders are the same size. Both
use ``torch.optim.AdamW(fused=True)`` (our trainer's optimizer) with the same learning rate
and weight decay; ``--sgd`` also times the examples' own update (``p.data.add_(p.grad,
alpha=-lr)``), the cheapest possible step.

Each side is built once and warmed up with 2 windows; then ``--rounds`` alternating
rounds each train every side for ``--steps`` more windows (the clock covers batch,
forward, backward, clipping, update, and the loss read-back). The ratio is the median of
the rounds' ratios: on a machine whose speed drifts from minute to minute, a round
compares the two sides a few seconds apart. Data: ../shared/data/wikitext-2/valid.txt
(generated text if absent).
Target (the issue's): ours >= 1.0x the plain loop, aim 1.2x.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from _common import ROOT, environment
from training.config import load_config
from training.train import Trainer

DATA = Path(os.environ.get("FABLE_DATA_DIR", ROOT.parent / "shared" / "data"))
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
SIZES = dict(n_layer=2, n_embd=256, n_hidden=512)  # word_lstm_wikitext.yaml
BATCH, BPTT, LR, WEIGHT_DECAY, CLIP, DROPOUT, WARMUP = 32, 70, 3e-3, 1.2e-6, 0.25, 0.2, 2


def corpus_text() -> str:
    if WIKITEXT.exists():
        return WIKITEXT.read_text()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(12000)]
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like, as words are
    return "\n".join(" ".join(rng.choices(words, weights, k=18)) for _ in range(12000))


# --- ours ---------------------------------------------------------------------------------

class Ours:
    """Our trainer, built once; each ``run`` continues its training for more windows."""

    def __init__(self, corpus: Path, tmp: Path) -> None:
        raw = {"name": "word-lstm-speed",
               "model": {"arch": "lstm", **SIZES, "tie_weights": False, "dropout": DROPOUT,
                         "dropout_input": DROPOUT, "dropout_hidden": DROPOUT},
               "data": {"path": str(corpus), "cache_dir": str(tmp / "cache"),
                        "split": [0.7, 0.15, 0.15], "max_seq_len": BPTT},
               "tokenizer": {"kind": "word", "min_freq": 2},
               "training": {"batch_size": BATCH, "learning_rate": LR, "weight_decay": WEIGHT_DECAY,
                            "grad_clip": CLIP, "schedule": "constant", "max_steps": WARMUP,
                            "eval_every": 10**9, "save_every": 10**9},
               "output": {"dir": str(tmp / "runs/{name}"), "experiments_dir": str(tmp / "exp")}}
        self.trainer = Trainer(load_config(raw=raw), quiet=True)
        self.trainer.evaluate = lambda max_batches: {"loss": 0.0, "perplexity": 1.0,
                                                     "token_accuracy": 0.0}
        self.trainer.fit()  # the warm-up windows
        self.vocab_size = self.trainer.tokenizer.vocab_size

    def run(self, steps: int) -> float:
        """Tokens/s over ``steps`` more windows (the trainer's own clock: the steps only)."""
        t = self.trainer
        seconds, done = t.state.train_time, t.state.step
        t.max_steps = done + steps
        t.fit()  # continues where it stopped: the hidden state and the window carry on
        return (t.state.step - done) * BATCH * BPTT / (t.state.train_time - seconds)


# --- the plain loop (pytorch/examples word_language_model style) ------------------------

def tokenize(text: str, vocab_size: int) -> torch.Tensor:
    lines = [line.split() + ["<eos>"] for line in text.splitlines()]
    counts = Counter(w for line in lines for w in line)
    index = {w: i for i, (w, _) in enumerate(counts.most_common(vocab_size - 1))}
    unk = len(index)  # every rarer word
    return torch.tensor([index.get(w, unk) for line in lines for w in line], dtype=torch.long)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """(T, B): column b is the b-th contiguous slice of the stream."""
    n = data.size(0) // bsz
    return data[: n * bsz].view(bsz, n).t().contiguous()


def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(BPTT, source.size(0) - 1 - i)
    return source[i:i + n], source[i + 1:i + 1 + n].reshape(-1)


def repackage_hidden(h):
    """Cut the graph: the next window's gradient stops here."""
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, x, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        decoded = self.decoder(self.drop(output))
        return torch.log_softmax(decoded.view(-1, decoded.size(-1)), dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        shape = (self.nlayers, bsz, self.nhid)
        return weight.new_zeros(shape), weight.new_zeros(shape)


class Plain:
    """The examples' loop, built once; each ``run`` trains on for more windows."""

    def __init__(self, text: str, vocab_size: int, sgd: bool = False) -> None:
        # the same 70 % of the text as our training split (ours splits by documents; near enough)
        self.data = batchify(tokenize(text, vocab_size)[: int(0.7 * len(text.split()))], BATCH)
        torch.manual_seed(0)
        self.model = RNNModel(vocab_size, SIZES["n_embd"], SIZES["n_hidden"], SIZES["n_layer"],
                              DROPOUT)
        self.optimizer = None if sgd else torch.optim.AdamW(
            self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        self.criterion = nn.NLLLoss()
        self.model.train()
        self.hidden = self.model.init_hidden(BATCH)
        self.i = 0  # the next window's first row
        self.run(WARMUP)

    def run(self, steps: int) -> float:
        """Tokens/s over ``steps`` more windows (the clock: batch to loss read-back)."""
        model, elapsed = self.model, 0.0
        for _ in range(steps):
            started = time.perf_counter()
            if self.i + BPTT + 1 > self.data.size(0):  # the end of the data: start over
                self.i = 0
            x, targets = get_batch(self.data, self.i)
            self.i += BPTT
            model.zero_grad(set_to_none=True)
            self.hidden = repackage_hidden(self.hidden)
            output, self.hidden = model(x, self.hidden)
            loss = self.criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if self.optimizer is not None:
                self.optimizer.step()
            else:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-20.0)  # the examples' learning rate
            loss.item()  # the examples' read-back for their running loss (a sync, as ours)
            elapsed += time.perf_counter() - started
        return steps * BATCH * BPTT / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed windows per side and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sgd", action="store_true",
                        help="also time the plain loop with the examples' SGD")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# word-level LSTM training speed — {environment()}")
    text = corpus_text()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "valid.txt"
        corpus.write_text(text)
        sides = {"ours": Ours(corpus, tmp)}
        vocab = sides["ours"].vocab_size
        sides["plain"] = Plain(text, vocab)
        if args.sgd:
            sides["sgd"] = Plain(text, vocab, sgd=True)
        speeds = {name: [] for name in sides}
        for _ in range(args.rounds):  # alternating rounds: each ratio compares neighbours in time
            for name, side in sides.items():
                speeds[name].append(side.run(args.steps))
    print(f"data: {'WikiText-2 valid.txt' if WIKITEXT.exists() else 'generated text'}; vocabulary {vocab:,} "
          f"(both); LSTM {SIZES['n_layer']} x {SIZES['n_hidden']}, embedding {SIZES['n_embd']}, "
          f"batch {BATCH}, bptt {BPTT}, {args.steps} timed windows x {args.rounds} rounds")

    # each peer's per-round ratios, sorted: the median and the range are read off them
    ratios = {name: sorted(o / p for o, p in zip(speeds["ours"], values))
              for name, values in speeds.items() if name != "ours"}
    labels = {"ours": "ours (Trainer, AdamW fused)", "plain": "plain loop (AdamW fused)",
              "sgd": "plain loop (the examples' SGD)"}
    for name, values in speeds.items():
        line = f"{labels[name] + ':':34s} {statistics.median(values):8,.0f} tokens/s (median)"
        if name in ratios:
            r = ratios[name]
            line += f"   ours / this: {statistics.median(r):.2f}x (rounds {r[0]:.2f}-{r[-1]:.2f}x)"
        print(line)
    ratio = statistics.median(ratios["plain"])
    verdict = "ok" if ratio >= 1.2 else "ok (under the 1.2x aim)" if ratio >= 1.0 else "MISSED"
    print(f"ours / plain (median of the rounds' ratios): {ratio:.2f}x "
          f"(target >= 1.0x, aim 1.2x): {verdict}")


if __name__ == "__main__":
    main()
