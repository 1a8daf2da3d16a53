"""Where a batch-1 decoding step's time goes, and whether ``torch.compile`` shortens it.

    python benchmarks/decode_step.py [--checkpoint checkpoints/tinystories-gpt]
        [--threads 1] [--decode-precision float32] [--compile] [--tokens 256]

1. Fable's step as the server runs it (``model.step``, greedy, ``--tokens`` new tokens):
   tokens/s, best of 5; the one call of Fable's kernel that a one-token step makes, timed
   alone; and a torch.profiler table of one run, by operator, per token (torch's operators
   only: the kernel's call is not one).
2. With ``--compile``: the same model's one-token step written for ``torch.compile``
   (a static key/value cache of the whole context and a position mask, so one graph serves
   every step; ``fullgraph=True``, inductor's C++ code generation), its compile time, its
   greedy tokens against the same function in eager mode, and both speeds, alternating.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _common import ROOT, environment

from models_src.checkpoint import load_checkpoint  # noqa: E402


def fable_step_loop(model, prompt: list[int], tokens: int) -> None:
    with torch.inference_mode():
        logits, state = model.prefill([prompt])
        token = logits.argmax(-1)
        for _ in range(tokens - 1):
            logits, state = model.step(token[:, None], state)
            token = logits[:, -1].argmax(-1)


def best_rate(fn, tokens: int, runs: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def profile_table(fn, tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    print(f"{sum(e.count for e in events) / tokens:.0f} operator calls a token, "
          f"{sum(e.self_cpu_time_total for e in events) / tokens / 1e3:.3f} ms profiled self time "
          "(the profiler adds to small operators)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        print(f"  {e.key:52s} {e.count / tokens:5.1f} a token {e.self_cpu_time_total / tokens:7.1f} µs")


def kernel_call_ms(model, prompt: list[int], repeats: int = 2000) -> float | None:
    """The one-token step's call of Fable's kernel alone (``fast_decode._one_token_step``),
    at the prompt's end, best of 5 x ``repeats``; None where the kernels did not build. The
    profiler sees torch's operators only: this is the rest of a step."""
    from models_src import fast_decode

    with torch.inference_mode():
        _, state = model.prefill([prompt])
        step = fast_decode._one_token_step(model)
        if step is None:
            return None
        state.begin(1, None)  # the call writes the same position each time: nothing moves
        keys, values, positions = state.one_token_storage()
        x = torch.randn(1, model.config.n_embd)
        return best_rate(lambda: [step(x, keys, values, positions) for _ in range(repeats)], repeats) ** -1 * 1e3


def static_cache_step(model):
    """``step(token (1,), position (1,), k, v) -> logits (1, V)`` over caches (L, H, S, D)."""
    c = model.config
    L, H, C, S = c.n_layer, c.n_head, c.n_embd, c.block_size
    D = C // H
    blocks = [{"ln1": (b.ln_1.weight, b.ln_1.bias), "ln2": (b.ln_2.weight, b.ln_2.bias),
               "attn": (b.attn.c_attn.weight.t().contiguous(), b.attn.c_attn.bias),
               "proj": (b.attn.c_proj.weight.t().contiguous(), b.attn.c_proj.bias),
               "fc": (b.mlp.c_fc.weight.t().contiguous(), b.mlp.c_fc.bias),
               "mlp": (b.mlp.c_proj.weight.t().contiguous(), b.mlp.c_proj.bias)}
              for b in model.blocks]
    wte, wpe = model.wte.weight, model.wpe.weight
    head, ln_f = model.lm_head.weight.t().contiguous(), (model.ln_f.weight, model.ln_f.bias)
    keys = torch.arange(S)

    def step(token, position, k_cache, v_cache):
        x = wte[token] + wpe[position]
        mask = torch.where(keys <= position, 0.0, float("-inf"))
        for i, w in enumerate(blocks):
            h = F.layer_norm(x, (C,), *w["ln1"])
            q, k, v = torch.addmm(w["attn"][1], h, w["attn"][0]).view(3, H, 1, D).unbind(0)
            k_cache[i].index_copy_(1, position, k)
            v_cache[i].index_copy_(1, position, v)
            scores = (q @ k_cache[i].transpose(1, 2)) * (1.0 / math.sqrt(D)) + mask
            x = x + torch.addmm(w["proj"][1], (scores.softmax(-1) @ v_cache[i]).reshape(1, C),
                                w["proj"][0])
            h = F.gelu(torch.addmm(w["fc"][1], F.layer_norm(x, (C,), *w["ln2"]), w["fc"][0]))
            x = x + torch.addmm(w["mlp"][1], h, w["mlp"][0])
        return F.layer_norm(x, (C,), *ln_f) @ head

    caches = (torch.zeros(L, H, S, D), torch.zeros(L, H, S, D))
    return step, caches


def greedy(step, caches, bos: int, tokens: int) -> list[int]:
    for cache in caches:
        cache.zero_()
    token, out = torch.tensor([bos]), []
    with torch.inference_mode():
        for position in range(tokens):
            token = step(token, torch.tensor([position]), *caches).argmax(-1)
            out.append(int(token))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinystories-gpt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-precision", choices=("float32", "int8"), default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, decode_precision=args.decode_precision)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    print(f"# {checkpoint.name}, {args.decode_precision}, {args.threads} thread(s), greedy, "
          f"{args.tokens} tokens -- {environment()}")
    prompt = [tokenizer.bos_id, *tokenizer.encode("Once upon a time")]
    run = lambda: fable_step_loop(model, prompt, args.tokens)  # noqa: E731
    rate = best_rate(run, args.tokens)
    print(f"Fable's step: {rate:,.0f} tokens/s ({1e3 / rate:.3f} ms a token)")
    kernel = kernel_call_ms(model, prompt)
    print("Fable's kernels did not build here: every operator is torch's" if kernel is None else
          f"of which the one call of Fable's kernel (every block and the head): {kernel:.3f} ms")
    profile_table(run, args.tokens)
    if not args.compile:
        return
    step, caches = static_cache_step(model)
    eager = greedy(step, caches, tokenizer.bos_id, args.tokens)
    started = time.perf_counter()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got = greedy(compiled, caches, tokenizer.bos_id, 2)
    print(f"torch.compile: {time.perf_counter() - started:.1f} s to the first two tokens")
    got = greedy(compiled, caches, tokenizer.bos_id, args.tokens)
    print(f"greedy tokens the same as eager's: {sum(a == b for a, b in zip(got, eager))} of {args.tokens}")
    for round_ in range(3):
        rates = {name: best_rate(lambda fn=fn: greedy(fn, caches, tokenizer.bos_id, args.tokens),
                                 args.tokens, runs=2)
                 for name, fn in (("eager", step), ("compiled", compiled))[::1 if round_ % 2 == 0 else -1]}
        print(f"round {round_ + 1}: static-cache step eager {rates['eager']:,.0f} tokens/s, "
              f"compiled {rates['compiled']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
