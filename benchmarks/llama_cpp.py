"""Fable against llama.cpp on the same weights: new tokens/s at batch 1 and with 16
concurrent generations.

    python benchmarks/llama_cpp.py [--checkpoint checkpoints/tinystories-gpt]
        [--threads 1] [--new-tokens 256] [--concurrent 16] [--rounds 5] [--precision f32]

The checkpoint is exported to GGUF (float32, the precision Fable computes in) with
``models_src.gguf_export``; with ``--precision int8`` Fable decodes with int8 products
(``decode_precision: int8``) and llama.cpp runs the ``q8_0`` export, its 8-bit format.
llama.cpp runs through llama-cpp-python's C API (an optional package, built from source:
see README; ``LLAMA_CPP_LIB_PATH`` points it at another build of the library). Both sides get the same prompt ids
(``[bos] + encode(prompt)``), decode greedily over the whole vocabulary, ignore eos, and
generate the same number of new tokens; the clock covers the prompt and every new token.
Fable runs its engine (``models_src.generation``, the one the server uses); llama.cpp runs
its own batch API: every step one ``llama_decode`` over all sequences (its "parallel
sequences"). The two alternate within each round, and each round prints both and the
ratio; the summary gives the best of each and the range of the per-round ratios. The
greedy ids of both are compared too: the run prints how many tokens the two write alike
(past an end of story, with eos ignored, a near-tie can flip: llama.cpp's GELU is the
tanh approximation, Fable's the exact one).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import GGUF_OF, ROOT, STORY_PROMPTS as PROMPTS, environment  # puts the repository on sys.path
from models_src.checkpoint import load_checkpoint
from models_src.generation import generate
from models_src.gguf_export import export_to_gguf
from models_src.sampling import SamplingParams

# This script shares its name with the package it measures: without its folder on the
# path, ``import llama_cpp`` finds llama-cpp-python, not this file.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]



class LlamaCppGreedy:
    """Greedy decoding of several sequences at once with llama.cpp's batch API."""

    def __init__(self, path: Path, threads: int, sequences: int, n_ctx: int) -> None:
        import llama_cpp as ll  # optional, and slow to build: only here
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its load report is long
        self.ll = ll
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = ll.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_ctx * sequences, sequences
        params.n_batch = params.n_ubatch = max(512, n_ctx * sequences)
        params.n_threads = params.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, params)
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        logits = self.ll.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        entries, last = [], []
        for seq, ids in enumerate(prompts):
            entries += [(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)]
            last.append(len(entries) - 1)
        self._decode(entries)
        out = [[] for _ in prompts]
        for step in range(new_tokens):
            tokens = [self._argmax(i) for i in last]
            for seq, token in enumerate(tokens):
                out[seq].append(token)
            if step == new_tokens - 1:
                break
            self._decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(tokens)])
            last = list(range(len(prompts)))
        return out

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def timed(fn) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinystories-gpt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=sorted(GGUF_OF), default="f32",
                        help="f32: both in float32; int8: Fable's int8 products against q8_0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, dtype=torch.float32,
                                 decode_precision="int8" if args.precision == "int8" else "float32")
    model, tokenizer = checkpoint.model.eval(), checkpoint.tokenizer
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    print(f"# Fable ({model.decode_precision}) against llama.cpp ({GGUF_OF[args.precision]}): "
          f"{checkpoint.name}, {args.threads} thread(s), greedy, {args.new_tokens} new tokens "
          f"-- {environment()}")

    with tempfile.TemporaryDirectory() as tmp:
        path = export_to_gguf(model, tokenizer, Path(tmp) / "model.gguf", dtype=GGUF_OF[args.precision])
        n_ctx = max(len(tokenizer.encode(p)) + 1 for p in PROMPTS) + args.new_tokens
        for rows in (1, args.concurrent):
            # a context sized for the rows, as a llama.cpp user would make it
            llama = LlamaCppGreedy(path, args.threads, rows, n_ctx)
            try:
                prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(PROMPTS[i % len(PROMPTS)])]
                              for i in range(rows)]
                peers = {
                    "Fable": lambda: [c.token_ids for c in generate(model, tokenizer, params=greedy,
                                                                    prompt_ids=prompt_ids)],
                    "llama.cpp": lambda: llama.generate(prompt_ids, args.new_tokens),
                }
                texts = {name: fn() for name, fn in peers.items()}  # warm-up, and the parity check
                agree = min(shared_prefix(a, b) for a, b in zip(texts["Fable"], texts["llama.cpp"]))
                rates: dict[str, list[float]] = {name: [] for name in peers}
                for round_ in range(args.rounds):
                    order = list(peers) if round_ % 2 == 0 else list(peers)[::-1]
                    for name in order:
                        seconds, _ = timed(peers[name])
                        rates[name].append(rows * args.new_tokens / seconds)
                    print(f"batch {rows:2d} round {round_ + 1}: Fable {rates['Fable'][-1]:7,.0f} "
                          f"tokens/s, llama.cpp {rates['llama.cpp'][-1]:7,.0f} tokens/s, "
                          f"Fable/llama.cpp {rates['Fable'][-1] / rates['llama.cpp'][-1]:.2f}",
                          flush=True)
                ratios = [f / c for f, c in zip(rates["Fable"], rates["llama.cpp"])]
                print(f"batch {rows:2d}: Fable best {max(rates['Fable']):,.0f} tokens/s, llama.cpp "
                      f"best {max(rates['llama.cpp']):,.0f} tokens/s; Fable/llama.cpp "
                      f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}); "
                      f"greedy tokens the same for the first {agree} of {args.new_tokens}", flush=True)
            finally:
                llama.close()


if __name__ == "__main__":
    main()
