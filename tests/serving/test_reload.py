"""Models without restarts: ModelRegistry.refresh, the reload routes, and generations that
run across a reload (app/serving/reload.py). Across gunicorn workers: tests/apis/test_app_server.py."""

from __future__ import annotations

import shutil
import threading

import pytest

from tests.app_support import ENDLESS_CHAR, MODELS, save_endless


@pytest.fixture
def folder(checkpoint_dir, tmp_path):
    """A private copy of the test checkpoints, to change under a running app."""
    target = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir, target)
    return target


def generate(client, model, n=3, **extra):
    body = {"model": model, "prompt": "Once", "stream": False,
            "options": {"num_predict": n, "temperature": 0}, **extra}
    return client.post("/api/generate", json=body)


def test_refresh_loads_new_reloads_changed_and_unloads_removed_models(folder):
    from app.serving.registry import ModelRegistry

    registry = ModelRegistry.load(folder)
    assert registry.names() == list(MODELS)
    first = registry.get("endless")
    assert registry.refresh()["unchanged"] == list(MODELS)  # nothing to do: nothing reloaded
    assert registry.get("endless") is first
    save_endless(folder / "aaa", "a")
    save_endless(folder / "endless", "e")  # rewritten in place, as a training run publishes
    shutil.rmtree(folder / "tiny-lstm")
    report = registry.refresh()
    assert (report["added"], report["reloaded"], report["removed"]) == (["aaa"], ["endless"],
                                                                        ["tiny-lstm"])
    assert registry.names() == ["aaa", "endless", "tiny-gpt"]
    assert registry.get("endless") is not first
    assert "broken" in registry.errors  # still reported


def test_a_changed_checkpoint_that_fails_to_load_leaves_the_old_one_serving(folder):
    from app.serving.registry import ModelRegistry

    registry = ModelRegistry.load(folder)
    before = registry.get("tiny-gpt")
    (folder / "tiny-gpt" / "model.safetensors").write_bytes(b"truncated")
    report = registry.refresh()
    assert report["failed"] == ["broken", "tiny-gpt"] and registry.get("tiny-gpt") is before
    assert "weights are corrupt or truncated" in registry.errors["tiny-gpt"]
    assert str(folder) not in registry.errors["tiny-gpt"]  # no server paths


def test_the_reload_route_and_the_admin_button(make_app, folder):
    client = make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client()
    assert generate(client, "aaa").status_code == 404
    save_endless(folder / "aaa", "a")
    report = client.post("/api/models/reload").json
    assert report["added"] == ["aaa"] and report["failed"] == {"broken": report["failed"]["broken"]}
    assert "aaa" in report["models"]
    assert generate(client, "aaa").json["response"] == "aaa"
    shutil.rmtree(folder / "aaa")
    page = client.post("/admin/reload", headers={"Origin": "http://localhost"})
    assert page.status_code == 200
    assert "Reloaded. removed: aaa; failed: broken" in " ".join(page.get_data(as_text=True).split())
    assert generate(client, "aaa").status_code == 404


def test_reloading_needs_the_admin_token_when_one_is_set(make_app, folder):
    client = make_app(FABLE_CHECKPOINT_DIR=str(folder), FABLE_ADMIN_TOKEN="t" * 16).test_client()
    assert client.post("/api/models/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Origin": "http://localhost"}).status_code == 401
    ok = client.post("/api/models/reload", headers={"Authorization": "Bearer " + "t" * 16})
    assert ok.status_code == 200


def test_a_generation_running_across_a_reload_keeps_the_weights_it_started_with(make_app,
                                                                                       folder):
    from app.serving.service import get_service
    from models_src.sampling import SamplingParams

    app = make_app(FABLE_CHECKPOINT_DIR=str(folder), FABLE_REQUEST_TIMEOUT_S=600)
    client = app.test_client()
    with app.app_context():  # a generation far longer than the test: it cannot end by itself
        stream = get_service().stream("endless", "Once", SamplingParams(max_new_tokens=10**6))
        with stream:
            pieces = [next(stream)]  # it runs on the old weights
            save_endless(folder / "endless", "a")
            assert client.post("/api/models/reload").json["reloaded"] == ["endless"]
            assert generate(client, "endless").json["response"] == "aaa"  # a new one: new weights
            pieces += [next(stream) for _ in range(2_000)]  # the first one goes on...
            assert stream.completion is None
    assert "".join(pieces) == ENDLESS_CHAR * 2_001  # ...on the weights it began with


def test_a_stamp_makes_another_worker_follow(folder, tmp_path):
    """Two reloaders on one stamp stand for two workers: the second follows the first."""
    import time

    from app.serving.registry import ModelRegistry
    from app.serving.reload import Reloader

    stamp = tmp_path / "reload"
    here, there = ModelRegistry.load(folder), ModelRegistry.load(folder)
    followed = threading.Event()
    first = Reloader(here, stamp, None)
    second = Reloader(there, stamp, None, on_refresh=lambda registry: followed.set())
    second.watch()
    save_endless(folder / "aaa", "a")
    assert first.reload()["added"] == ["aaa"]
    assert followed.wait(5) and "aaa" in there
    time.sleep(0.1)


def test_a_reload_asked_for_while_a_worker_loads_is_not_missed(folder, tmp_path):
    from app.serving.registry import ModelRegistry
    from app.serving.reload import Reloader, read_stamp

    stamp = tmp_path / "reload"
    seen = read_stamp(stamp)  # as create_app does, before loading
    registry = ModelRegistry.load(folder)
    save_endless(folder / "aaa", "a")  # another worker adds it and stamps while this one loads
    stamp.write_text("another worker")
    followed = threading.Event()
    Reloader(registry, stamp, seen, on_refresh=lambda r: followed.set()).watch()
    assert followed.wait(5) and "aaa" in registry
