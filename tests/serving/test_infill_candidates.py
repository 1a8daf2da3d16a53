"""A middle that arrives (issue 35, item 3): candidate middles cut at a sentence, scored by
how likely the ending is after them, the best kept; through the library, the service and
the infill page."""

from __future__ import annotations

import re
import time
from html import unescape

import pytest
import torch
from tests.app_support import ENDLESS_CHAR, hold_row

from app.serving.service import InfillStream, ServerBusy, TooManyCandidates
from app.platform.settings import MAX_INFILL_CANDIDATES, Settings, SettingsError
from models_src.checkpoint import load_checkpoint
from models_src.infill import infill
from models_src.infill_candidates import (
    best_middle,
    choose,
    copies_ending,
    cut_to_sentence,
    ending_logprobs,
)
from models_src.sampling import Completion, SamplingParams

FIRST, LAST = "Lily saw a ball.", "She was happy."


@pytest.fixture(scope="module")
def tiny(checkpoint_dir):
    return load_checkpoint(checkpoint_dir / "tiny-gpt")


# ---- the cut --------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason, kept, ended", [
    ("He ran. He fell.", "stop", "He ran. He fell.", True),
    (' "Come back!" she said. ', "stop", '"Come back!" she said.', True),
    ('He said, "Hi."', "stop", 'He said, "Hi."', True),
    # stopped where the model began the ending: the broken sentence goes, never glued to it
    ("The bird sang. You were very kind and", "stop", "The bird sang.", False),
    ("He ran. He fell and", "length", "He ran.", False),
    ("He ran. He fell.", "length", "He ran. He fell.", False),  # the limit, not the model, ended it
    ("Mr. Brown", "length", "Mr.", False),
    ("no sentence at all", "length", "no sentence at all", False),  # nothing to cut back to
    ("", "stop", "", False),
])
def test_a_middle_is_cut_after_its_last_complete_sentence(text, reason, kept, ended):
    assert cut_to_sentence(text, reason) == (kept, ended)


def test_copying_the_ending_is_a_shared_word_4_gram():
    last = "From then on, Lily and the bird were best friends."
    assert copies_ending("Soon Lily and the bird played.", last)
    assert not copies_ending("Lily and a bird played.", last)


# ---- the score ------------------------------------------------------------------------

def test_the_score_is_the_endings_log_probability_per_character_after_first_and_middle(tiny):
    model, tok = tiny.model, tiny.tokenizer
    middles = ["He kicked it.", "", "It rolled away."]  # all within the tiny context
    batched = ending_logprobs(model, tok, FIRST, middles, LAST)
    for middle, score in zip(middles, batched):
        ids = [tok.bos_id, *tok.encode(FIRST)] + (tok.encode(" " + middle) if middle else [])
        ending = tok.encode(" " + LAST)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + ending]))[0][0].float(), -1)
        alone = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(ending)) / len(" " + LAST)
        assert score == pytest.approx(alone, abs=1e-4)  # padding beside it changes nothing
    assert len(set(batched)) == 3  # the middle before it matters


def _completion(text: str, reason: str = "stop") -> Completion:
    return Completion(text, [], reason, 1, 1)


def test_an_ended_middle_beats_a_cut_one_and_then_the_likelier_ending_wins(tiny):
    model, tok = tiny.model, tiny.tokenizer
    a, b = "He kicked it.", "It rolled far away."
    score_a, score_b = ending_logprobs(model, tok, FIRST, [a, b], LAST)
    choice = choose(model, tok, FIRST, LAST, [_completion(a), _completion(b)])
    assert choice.best.text == (a if score_a >= score_b else b)
    assert [c.score for c in choice.candidates] == pytest.approx([score_a, score_b])
    # the same middle cut short by the limit loses to any middle that ended
    worse = a if score_a < score_b else b
    choice = choose(model, tok, FIRST, LAST, [_completion(worse), _completion(f"{a} {b} And", "length")])
    assert choice.best.text == worse and choice.best.ended and choice.any_ended


# ---- the library ----------------------------------------------------------------------

def test_candidates_are_decoded_together_each_as_its_seed_gives_it_alone(tiny):
    model, tok = tiny.model, tiny.tokenizer
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=7)
    choice = best_middle(model, tok, FIRST, LAST, params, candidates=4)
    for i, candidate in enumerate(choice.candidates):
        alone = infill(model, tok, FIRST, LAST, SamplingParams(temperature=1.0, max_new_tokens=30,
                                                               seed=7 + i))
        assert candidate.completion.text.strip() == alone.text
    assert choice.best in choice.candidates
    again = best_middle(model, tok, FIRST, LAST, params, candidates=4)
    assert again.best.text == choice.best.text  # a seed gives one answer
    one = best_middle(model, tok, FIRST, LAST, params, candidates=1)
    assert one.candidates[0].completion.text == choice.candidates[0].completion.text
    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        best_middle(model, tok, FIRST, LAST, params, candidates=0)


# ---- the service and its setting ------------------------------------------------------

def test_the_setting_is_bounded_and_the_service_never_asks_more_rows_than_it_has(make_app):
    assert Settings.model_fields["infill_candidates"].default >= 1
    with pytest.raises(SettingsError, match=f"FABLE_INFILL_CANDIDATES must be from 1 to "
                                            f"{MAX_INFILL_CANDIDATES}, got 17"):
        Settings.load({"FABLE_INFILL_CANDIDATES": "17"})
    service = make_app(FABLE_INFILL_CANDIDATES=8, FABLE_MAX_BATCH=3).extensions["fable.service"]
    assert service.candidates_for(None) == 3 and service.candidates_for(2) == 2
    with pytest.raises(TooManyCandidates, match="'candidates' is 4, .* at most 3"):
        service.candidates_for(4)


def test_the_service_writes_k_rows_and_hands_out_the_librarys_choice(make_app, tiny):
    app = make_app(FABLE_INFILL_CANDIDATES=2)
    service = app.extensions["fable.service"]
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=11)
    # one row per candidate (the endless model's never end by themselves: a tiny model's
    # 30 tokens could end, and give their rows back, before the count is read)
    held = service.stream_infill("endless", FIRST, LAST, SamplingParams(max_new_tokens=10**6),
                                 candidates=3)
    assert service.active == 3
    held.close()
    assert service.active == 0
    stream = service.stream_infill("tiny-gpt", FIRST, LAST, params, candidates=3)
    assert isinstance(stream, InfillStream) and stream.candidates == 3
    pieces = list(stream)
    assert service.active == 0
    expected = best_middle(tiny.model, tiny.tokenizer, FIRST, LAST, params, candidates=3)
    assert "".join(pieces) == stream.completion.text == expected.best.text
    assert stream.choice.best.text == expected.best.text
    assert stream.completion.finish_reason == ("stop" if expected.best.ended else "length")
    # usage is the middle's, as its text is
    assert stream.completion.completion_tokens == expected.best.completion.completion_tokens
    # without a request's count, the setting's
    assert service.stream_infill("tiny-gpt", FIRST, LAST, params).candidates == 2


def test_an_infill_that_cannot_get_all_its_rows_gives_back_those_it_got(make_app):
    app = make_app(FABLE_MAX_BATCH=3, FABLE_QUEUE_TIMEOUT_S=0.2, FABLE_MAX_QUEUE=1)
    service = app.extensions["fable.service"]
    held = hold_row(service)
    with pytest.raises(ServerBusy):
        service.stream_infill("endless", FIRST, LAST, SamplingParams(max_new_tokens=3), candidates=3)
    assert service.active == 1
    held.close()
    assert service.active == 0


def test_infills_needing_every_row_at_once_take_turns_instead_of_deadlocking(make_app):
    import threading

    app = make_app(FABLE_MAX_BATCH=3, FABLE_QUEUE_TIMEOUT_S=3)
    service = app.extensions["fable.service"]
    holds = [hold_row(service), hold_row(service)]
    results: list = []

    def infill():
        try:
            results.append(service.infill("endless", FIRST, LAST, SamplingParams(max_new_tokens=3),
                                          candidates=3).text)
        except ServerBusy as e:  # what both would get, each holding part of its rows
            results.append(e)
    threads = [threading.Thread(target=infill) for _ in range(2)]
    for thread in threads:  # the first takes the free row and waits; the second queues
        thread.start()
        time.sleep(0.2)
    for held in holds:  # rows come free one at a time, in turn to whoever waits first
        held.close()
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=30)
    assert results == [ENDLESS_CHAR * 3] * 2 and service.active == 0


def test_endless_candidates_never_end_and_their_text_is_kept_as_written(app):
    service = app.extensions["fable.service"]
    middle = service.infill("endless", FIRST, LAST, SamplingParams(max_new_tokens=5), candidates=3)
    assert middle.text == ENDLESS_CHAR * 5 and middle.finish_reason == "length"
    assert middle.completion_tokens == 5


# ---- the page -------------------------------------------------------------------------

INFILL = {"model": "endless", "first": FIRST, "last": LAST, "temperature": "0",
          "max_new_tokens": "5"}


def _events(body: str) -> list[tuple[str, str]]:
    events = []
    for block in body.split("\n\n"):
        kind = next((line[7:] for line in block.splitlines() if line.startswith("event: ")), "message")
        data = "\n".join(line[6:] for line in block.splitlines() if line.startswith("data: "))
        if data:
            events.append((kind, data))
    return events


def test_the_page_says_candidates_are_being_written_and_when_none_ended(client):
    html = client.post("/infill/start", data={**INFILL, "candidates": "3"}).get_data(as_text=True)
    assert "Writing 3 candidate middles…" in html
    url = unescape(re.search(r'sse-connect="([^"]+)"', html).group(1))
    events = _events(client.get(url).get_data(as_text=True))
    assert "".join(d for k, d in events if k == "message") == ENDLESS_CHAR * 5
    done = next(d for k, d in events if k == "done")
    assert "Cut at the token limit · 5 tokens" in done
    assert "best of 3 candidates (15 tokens in all)" in done
    assert "none of the 3 candidate middles ended by itself" in done
    # one candidate: the middle is written as before
    html = client.post("/infill/start", data={**INFILL, "candidates": "1"}).get_data(as_text=True)
    assert "Writing the middle…" in html


def test_the_pages_candidates_box_is_checked_and_shows_the_default(make_app):
    client = make_app(FABLE_INFILL_CANDIDATES=2).test_client()
    page = client.get("/infill").get_data(as_text=True)
    assert 'name="candidates"' in page and 'placeholder="2"' in page
    for value, message in (("0", "Candidate middles must be between 1 and 16, got 0"),
                           ("x", "Candidate middles must be an integer"),
                           ("9", "Candidate middles is 9, but this server decodes at most 4")):
        response = client.post("/infill", data={**INFILL, "candidates": value})
        assert response.status_code == 400 and message in response.get_data(as_text=True), value
    response = client.post("/infill", data={**INFILL, "candidates": "2"})
    assert response.status_code == 200
    assert "none of the 2 candidate middles ended by itself" in response.get_data(as_text=True)


@pytest.fixture
def write_candidates(monkeypatch):
    """``write_candidates((text or pieces, finish_reason), ...)``: an infill's candidates
    are these texts (the engine faked, the choice and the cut real)."""
    from tests.app_support import ScriptedTicket

    from app.serving.service import CandidatesTicket, GenerationService, GenerationStream

    def install(*middles):
        def start(self, loaded, prompt_ids, rows, *, strip=False):
            common = {"deadline": float("inf"), "clock": lambda: 0.0, "prompt_tokens": len(prompt_ids),
                      "encode": loaded.tokenizer.encode, "decode": loaded.tokenizer.decode}
            streams = [GenerationStream(loaded.name, ScriptedTicket(
                [text] if isinstance(text, str) else text, reason=reason), strip=strip, **common)
                for text, reason in middles]
            ticket = CandidatesTicket(streams, prompt_ids, rows.pick, logprobs=False)
            return InfillStream(loaded.name, ticket=ticket, counted=False, **common)
        monkeypatch.setattr(GenerationService, "_start", start)
    return install


RAN_INTO_THE_ENDING = [("The bird sang. You were very kind and", "stop"),
                       ("The bird flew up high and", "length")]


def test_the_page_never_shows_a_sentence_cut_into_the_ending(client, write_candidates):
    write_candidates(*RAN_INTO_THE_ENDING)
    form = {**INFILL, "candidates": "2"}
    html = client.post("/infill", data=form).get_data(as_text=True)
    middle = re.search(r'<mark class="story-middle">(.*?)</mark>', html).group(1)
    assert middle == "The bird sang."
    assert "none of the 2 candidate middles ended by itself" in html
    # streamed, the same
    start = client.post("/infill/start", data=form).get_data(as_text=True)
    url = unescape(re.search(r'sse-connect="([^"]+)"', start).group(1))
    events = _events(client.get(url).get_data(as_text=True))
    assert "".join(d for k, d in events if k == "message") == "The bird sang."
    # a middle that ended by itself wins over a likelier-looking one that was cut
    write_candidates(("The bird flew up high. Then it sang and", "length"),
                     ("The bird sang.", "stop"))
    html = client.post("/infill", data=form).get_data(as_text=True)
    assert re.search(r'<mark class="story-middle">(.*?)</mark>', html).group(1) == "The bird sang."
    assert "Ended by itself · " in html and "best of 2 candidates" in html and "ended by itself" not in html


def test_an_ending_longer_than_the_context_is_scored_by_its_tail(tiny):
    model, tok = tiny.model, tiny.tokenizer
    last = "She was happy. " * 8  # far past the tiny model's 64 positions
    a, b = ending_logprobs(model, tok, FIRST, ["He ran.", "It rolled away."], last)
    assert a < 0 and a == pytest.approx(b)  # the window holds the ending alone: no middle shows


def test_a_lone_candidate_streams_each_sentence_once_it_is_complete(client, write_candidates):
    write_candidates((["The bird ", "sang. ", "It flew", " away. ", "You were kind and"], "stop"))
    start = client.post("/infill/start", data={**INFILL, "candidates": "1"}).get_data(as_text=True)
    url = unescape(re.search(r'sse-connect="([^"]+)"', start).group(1))
    events = _events(client.get(url).get_data(as_text=True))
    assert [d for k, d in events if k == "message"] == ["The bird sang.", " It flew away."]
    done = next(d for k, d in events if k == "done")
    assert "the middle did not end by itself" in done and "best of" not in done


# ---- the benchmark --------------------------------------------------------------------

BENCHMARK = ["benchmarks/infill_quality.py"]


def _run_benchmark(*args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, *BENCHMARK, *args], cwd=root, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.subprocess
def test_the_benchmark_prints_the_issues_three_lines(checkpoint_dir, tmp_path):
    stories = tmp_path / "stories.txt"
    stories.write_text("Tom ran. Mia sat. It was fun.\n<|endoftext|>\nToo short.\n<|endoftext|>\n"
                       "Lily hid. Ben looked. He found her.\n<|endoftext|>\n")
    done = _run_benchmark("--checkpoint", str(checkpoint_dir / "tiny-gpt"), "--data", str(stories),
                          "--stories", "5", "--candidates", "2", "--max-new-tokens", "20")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith(("#", "|"))]
    number = r"-?\d+\.\d+"
    assert re.fullmatch(rf"ended by themselves: {number}%", lines[0])
    assert re.fullmatch(rf"ending log-prob per character: generated {number}, true {number}, "
                        rf"first only {number}", lines[1])
    assert re.fullmatch(rf"middles repeating a 4-gram of the last sentence: generated {number}%, "
                        rf"true {number}%", lines[2])
    assert "2 stories of stories.txt" in done.stdout  # the one without a middle is left out


@pytest.mark.subprocess
def test_the_benchmark_says_clearly_when_the_stories_are_missing(tmp_path):
    done = _run_benchmark("--data", str(tmp_path / "valid.txt"))
    assert done.returncode != 0
    assert f"no story file at {tmp_path / 'valid.txt'}" in done.stderr


@pytest.mark.parametrize("path, length", [("/api/generate", {"options": {"num_predict": 4}}),
                                          ("/v1/completions", {"max_tokens": 4})])
def test_the_apis_take_candidates_with_a_suffix(client, path, length):
    body = {"model": "endless", "prompt": FIRST, "suffix": LAST, "stream": False, **length}
    assert client.post(path, json={**body, "candidates": 3}).status_code == 200
    answer = client.post(path, json={**body, "candidates": 17})
    assert answer.status_code == 400 and "candidates" in answer.get_data(as_text=True)
    # without a suffix there is no middle to choose: the option changes nothing
    assert client.post(path, json={**body, "candidates": 2, "suffix": None}).status_code == 200


def test_an_api_infill_writes_the_candidates_it_asks_for(app):
    from app.serving.schema import parse_openai_completion
    from app.platform.settings import get_settings
    from app.serving.service import open_stream

    with app.test_request_context():
        [req] = parse_openai_completion({"model": "endless", "prompt": FIRST, "suffix": LAST,
                                         "candidates": 3, "max_tokens": 4}, get_settings().limits)
        stream = open_stream(req)
        assert stream.candidates == 3
        stream.close()
