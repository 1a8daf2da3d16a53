"""Fixtures for the app's tests: tiny checkpoints, the app, a test client.

``checkpoint_dir`` (built once per test session, in a few milliseconds) holds:

    tiny-gpt/     char GPT, random weights, a training summary with every listed fact
    tiny-lstm/    char LSTM, random weights, no summary
    endless/      char GPT rigged to write ENDLESS_CHAR forever (never eos): for limits,
                  deadlines and clients that disconnect mid-stream
    broken/       config.json is not JSON: must be reported, not served
    .tiny-gpt.tmp-0/  a save_checkpoint temporary directory: must be ignored
    notes.txt     a stray file: ignored

``app`` is a fresh app over it for every test (creating one takes milliseconds);
``make_app(**overrides)`` builds one with other settings; ``client`` is its test client.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return build_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def app_config(checkpoint_dir) -> dict:
    """Settings for test apps: every FABLE_* value given, so the environment cannot leak in."""
    return {
        "TESTING": True,
        "FABLE_CHECKPOINT_DIR": str(checkpoint_dir),
        "FABLE_DEVICE": "cpu",
        "FABLE_TORCH_THREADS": 1,  # tiny models: one thread is fastest, and immune to a busy CI
        "FABLE_DECODE_THREADS": 2,  # models step at once, whatever the machine's cores
        "FABLE_MAX_PROMPT_CHARS": 4000,
        "FABLE_MAX_NEW_TOKENS": 512,
        "FABLE_DEFAULT_NEW_TOKENS": 64,
        "FABLE_MAX_BODY_BYTES": 64 * 1024,
        "FABLE_ADMIN_TOKEN": "",
        "FABLE_DEFAULT_MODEL": "",
        "FABLE_LOG_PROMPTS": False,
        "FABLE_API_KEYS": "",
        "FABLE_PROTECT_PAGES": False,
        "FABLE_SECRET_KEY": "",
        "FABLE_CORS_ORIGINS": "",
        "FABLE_MAX_BATCH": 4,
        "FABLE_QUEUE_TIMEOUT_S": 5,
        "FABLE_REQUEST_TIMEOUT_S": 30,
    }


@pytest.fixture
def make_app(app_config):
    """``make_app(FABLE_X=..., ...)``: an app with some settings changed."""
    from app import create_app

    threads = torch.get_num_threads()  # create_app sets torch's threads for the process

    def make(**overrides):
        return create_app({**app_config, **overrides})
    yield make
    torch.set_num_threads(threads)  # leave the process as other test files expect it


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """The model of every generation started from now on."""
    from app.serving.service import GenerationService

    calls: list[str] = []
    real = GenerationService._start

    def counting(self, loaded, *args, **kwargs):
        calls.append(loaded.name)
        return real(self, loaded, *args, **kwargs)
    monkeypatch.setattr(GenerationService, "_start", counting)
    return calls


@pytest.fixture
def client(app):
    return app.test_client()


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


@pytest.fixture
def script(monkeypatch):
    """``script(pieces, delay=0, error=None, reason="stop")``: every generation (after the
    usual checks of model and parameters) writes exactly these pieces."""
    from app.serving.service import GenerationService, GenerationStream

    def install(pieces, **kwargs):
        def start(self, loaded, prompt_ids, params, *, strip=False):
            return GenerationStream(loaded.name, ScriptedTicket(pieces, **kwargs),
                                    deadline=float("inf"), clock=lambda: 0.0,
                                    prompt_tokens=len(prompt_ids),
                                    encode=loaded.tokenizer.encode,
                                    decode=loaded.tokenizer.decode, strip=strip)
        monkeypatch.setattr(GenerationService, "_start", start)
    return install
