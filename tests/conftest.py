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

import gc
import os
from pathlib import Path

import pytest
import torch

from tests.app_support import ScriptedTicket, build_checkpoints


def pytest_collection_modifyitems(items):
    """Every property test (hypothesis) is marked ``fuzz``: it tries a hundred inputs or more,
    which the suite wants and the edit-test loop (``make quick``) can leave out."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)


@pytest.fixture(scope="session", autouse=True)
def _test_process(app_config):
    """The test process, set up once. Every test app's registry collects garbage once the
    test checkpoints' broken one has failed to load (app/serving/registry.py): with the
    objects torch, Flask and the app leave behind at import (one app made first imports
    every module) moved out of the collector's way, that takes milliseconds instead of
    half a second per app. The app itself is unchanged."""
    from app import create_app

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread a worker: -n 2 on 2 cores
        torch.set_num_threads(1)  # would otherwise run 4 threads that wait on each other
    threads = torch.get_num_threads()
    create_app(app_config)
    torch.set_num_threads(threads)
    gc.freeze()
    yield
    gc.unfreeze()


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
        "FABLE_TRAIN_DIR": str(checkpoint_dir.parent / "training-page-runs"),
        "FABLE_TRAIN_THREADS": 1,
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
