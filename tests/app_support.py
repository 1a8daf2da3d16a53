"""What the app's tests share besides fixtures (tests/conftest.py has those): the tiny
checkpoints they serve, the facts about them, a generation that holds its row, and a
ticket that hands out scripted pieces; and a wait for a condition.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from models_src import ModelConfig, build_model
from models_src.checkpoint import save_checkpoint
from models_src.tokenization import Tokenizer

TEXT = ("Once upon a time, there was a little girl named Lily. She liked to play outside.\n"
        "One day, she saw a big red ball! \"Can I play?\" she asked. The end.\n")
ENDLESS_CHAR = "o"
MODELS = ("endless", "tiny-gpt", "tiny-lstm")  # the loadable ones, sorted
INFILL_MODELS = ("endless", "tiny-gpt")  # their summaries declare "infill": true
SUMMARY = {"val_perplexity": 3.5, "val_loss": 1.2528, "bits_per_char": 1.807,
           "token_accuracy": 0.41, "tokens_seen": 12345, "training_time_s": 1.5,
           "data": "tests/conftest.py", "step": 10, "hardware": "cpu",
           "infill": True}  # as an imported model declares it; tiny-lstm cannot infill


def _config(tokenizer: Tokenizer, arch: str) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32,
                       n_head=4, n_hidden=48, block_size=64, sep_id=tokenizer.sep_id,
                       pad_id=tokenizer.pad_id)


def save_endless(path: Path, char: str, tokenizer: Tokenizer | None = None) -> Path:
    """A char GPT that writes ``char`` forever (never eos)."""
    tokenizer = tokenizer or Tokenizer.train_char([TEXT])
    torch.manual_seed(0)
    # Whatever the input, ln_f makes the last hidden state all ones, so the logits are the
    # row sums of the (tied) embedding: the char's row is all ones, the rest are small.
    endless = build_model(_config(tokenizer, "gpt"))
    with torch.no_grad():
        endless.ln_f.weight.zero_()
        endless.ln_f.bias.fill_(1.0)
        endless.wte.weight.normal_(0.0, 0.01)
        endless.wte.weight[tokenizer.encode(char)[0]] = 1.0
    return save_checkpoint(path, endless, tokenizer, {"note": f"always writes {char!r}", "infill": True})


def hold_row(service, model: str = "endless"):
    """A generation that holds its row until it is closed: the endless model asked for
    more tokens than any test waits for (one of the default length can end, and give
    its row back, before the request that should find the server full)."""
    from models_src.sampling import SamplingParams

    return service.stream(model, "x", SamplingParams(max_new_tokens=10**6))


def build_checkpoints(directory: Path) -> Path:
    """Write the test checkpoints described above into ``directory``."""
    tokenizer = Tokenizer.train_char([TEXT])
    torch.manual_seed(0)
    save_checkpoint(directory / "tiny-gpt", build_model(_config(tokenizer, "gpt")), tokenizer,
                    SUMMARY)
    save_checkpoint(directory / "tiny-lstm", build_model(_config(tokenizer, "lstm")), tokenizer)

    save_endless(directory / "endless", ENDLESS_CHAR, tokenizer)

    (directory / "broken").mkdir()
    (directory / "broken" / "config.json").write_text("{ not json")
    shutil.copytree(directory / "tiny-lstm", directory / ".tiny-gpt.tmp-0")
    (directory / "notes.txt").write_text("not a checkpoint")
    return directory


class ScriptedTicket:
    """Stands in for an engine ticket: hands out fixed pieces (``delay`` seconds before
    each), then a completion, or raises ``error`` after the pieces."""

    first_piece_ns = None
    logprobs = None
    prompt_ids = ()

    def __init__(self, pieces, delay=0.0, error=None, reason="stop"):
        from app.serving.engine_loop import Failed, Finished
        from models_src.sampling import Completion

        self._items = list(pieces) + [
            Failed(error) if error is not None else
            Finished(Completion("".join(pieces), [], reason, 1, len(pieces)))]
        self.delay = delay

    def next_event(self, timeout):
        time.sleep(self.delay)
        return self._items.pop(0)

    def collect_only(self):
        pass

    def held_text(self):
        return ""

    def cancel(self):
        pass


def wait_until(condition, timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held (a
    wait for a condition, not a retry: the caller asserts what it needs)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
