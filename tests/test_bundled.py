"""Every bundled checkpoint in checkpoints/ loads and generates."""

import json
from pathlib import Path

import pytest

from models_src import records

from models_src.checkpoint import load_checkpoint, read_card, suggested_prompt
from models_src.generation import generate
from models_src.sampling import SamplingParams

pytestmark = pytest.mark.bundled

BUNDLED = sorted(p for p in (Path(__file__).resolve().parent.parent / "checkpoints").iterdir()
                 if p.is_dir() and not p.name.startswith("."))


def test_there_are_bundled_models():
    assert BUNDLED, "checkpoints/ should hold the default models the app serves"


def test_the_bundled_models_together_stay_small():
    assert sum(f.stat().st_size for p in BUNDLED for f in p.iterdir()) <= 30_000_000


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_checkpoint_loads_and_generates(path):
    ckpt = load_checkpoint(path)
    # the Hub takes files over 10 MB only through Git LFS: larger weights are sharded
    assert all(f.stat().st_size <= 10_000_000 for f in path.iterdir())
    assert ckpt.training.val_perplexity, "the admin page lists every model's perplexity"
    out = generate(ckpt.model, ckpt.tokenizer, "The ", SamplingParams(max_new_tokens=20, seed=0))[0]
    assert out.completion_tokens > 0 and out.text


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_each_bundled_model_has_a_card_whose_figures_are_its_config_s(path):
    meta, body = read_card(path / "README.md")
    config = json.loads((path / "config.json").read_text())
    evaluation, training = config["evaluation"], config["training"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"bits_per_character": evaluation["bits_per_char"],
                       "perplexity": evaluation["perplexity"], "loss": evaluation["loss"],
                       "accuracy": evaluation["token_accuracy"]}
    assert meta["license"] and meta["language"] == ["en"]
    for figure in (evaluation["bits_per_char"], evaluation["perplexity"], evaluation["loss"],
                   training["training_time_s"], training["hardware"]):
        assert str(figure) in body
    assert body.count("\n> ") >= 3  # three samples
    assert suggested_prompt(path), "the card offers a prompt to try (widget), the app's placeholder"


def test_the_story_model_asked_with_only_a_prompt_writes_stories_that_end(make_app):
    """Issue 35: through /api/generate with only model and prompt (and a seed), at least 9
    of 10 stories end by themselves, at the model's own sampling defaults and length."""
    client = make_app(FABLE_CHECKPOINT_DIR=str(BUNDLED[0].parent), FABLE_DEFAULT_NEW_TOKENS=None,
                      FABLE_MAX_BATCH=16).test_client()
    answers = [client.post("/api/generate", json={"model": "tinystories-gpt", "prompt": "Once upon a time",
                                                  "stream": False, "options": {"seed": seed}}).json
               for seed in range(1, 11)]
    assert sum(a["done_reason"] == "stop" for a in answers) >= 9, [a["done_reason"] for a in answers]
    assert len({a["response"] for a in answers}) == 10


EXPERIMENTS = BUNDLED[0].parent.parent / "experiments"
# every bundled model ships the record of the run that made it
WITH_RECORDS = tuple(p.name for p in BUNDLED)


@pytest.mark.parametrize("name", WITH_RECORDS)
def test_a_bundled_model_brings_the_record_of_the_run_that_made_it(name):
    training = json.loads((BUNDLED[0].parent / name / "config.json").read_text())["training"]
    runs = {run["run_id"]: run for run in records.run_summaries(EXPERIMENTS)}
    run = runs[training["run_id"]]
    assert run["model"] == training["name"] and run["last_step"] == training["step"]
    [curve] = records.run_losses(EXPERIMENTS, [training["run_id"]]).values()
    assert len(curve["steps"]) >= 5  # a curve, not a point
    assert curve["val_loss"][-1] == pytest.approx(training["val_loss"])  # its final evaluation


def test_a_fresh_clone_s_experiments_page_shows_the_bundled_runs(make_app):
    client = make_app(FABLE_CHECKPOINT_DIR=str(BUNDLED[0].parent), FABLE_EXPERIMENTS_DIR=str(EXPERIMENTS)).test_client()
    page = client.get("/experiments").get_data(as_text=True)
    for name in WITH_RECORDS:
        run_id = json.loads((BUNDLED[0].parent / name / "config.json").read_text())["training"]["run_id"]
        assert run_id in page
