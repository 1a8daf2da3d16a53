"""Serving: requests share the engine loop's decoding steps, admission bounds the queue,
and a reader that goes away stops its generation."""

from __future__ import annotations

import threading
import time

import pytest

from app.serving.service import GenerationService, ServerBusy
from tests.app_support import ENDLESS_CHAR
from models_src.generation import Batch
from models_src.gpt import GPT
from models_src.sampling import SamplingParams


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def service(app):
    return GenerationService(app.extensions["fable.registry"], max_batch=4, max_queue=2,
                             queue_timeout_s=5)


def test_concurrent_requests_share_forward_passes(service, monkeypatch):
    sizes, real = [], Batch.step

    def recording(batch):
        sizes.append(len(batch))
        return real(batch)
    monkeypatch.setattr(Batch, "step", recording)
    params = SamplingParams(max_new_tokens=200, temperature=0.0)
    streams = [service.stream("endless", "x", params) for _ in range(4)]
    texts = [s.collect().text for s in streams]
    assert texts == [ENDLESS_CHAR * 200] * 4
    assert max(sizes) == 4  # all four rows decoded in the same steps
    assert len(sizes) < 4 * 200


def test_each_request_keeps_its_own_settings_and_seed(service):
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0)
    seeded = SamplingParams(max_new_tokens=30, temperature=1.5, seed=3)
    alone = [service.generate("tiny-gpt", "Once", p).text for p in (greedy, seeded)]
    results = {}

    def run(key, params):
        results[key] = service.generate("tiny-gpt", "Once", params).text
    threads = [threading.Thread(target=run, args=(i, p))
               for i, p in enumerate([greedy, seeded, greedy, seeded])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == alone * 2
    assert alone[0] != alone[1]


def test_a_full_queue_is_refused_at_once_and_a_queued_request_gets_the_next_row(app):
    service = GenerationService(app.extensions["fable.registry"], max_batch=1, max_queue=1,
                                queue_timeout_s=30)
    endless = SamplingParams(max_new_tokens=10**6)
    running = service.stream("endless", "x", endless)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("stream", service.stream("endless", "y")))
    waiter.start()
    wait_for(lambda: service.scheduler.queued == 1)
    start = time.monotonic()
    with pytest.raises(ServerBusy, match="queue is full"):
        service.stream("endless", "z")
    assert time.monotonic() - start < 1  # refused at once, not after the queue timeout
    running.close()
    waiter.join(10)
    assert next(got["stream"]) == ENDLESS_CHAR
    got["stream"].close()
    assert service.active == 0 and service.scheduler.queued == 0


def test_a_reader_that_goes_away_stops_its_decoding(service):
    stream = service.stream("endless", "x", SamplingParams(max_new_tokens=10**6))
    assert next(stream) == ENDLESS_CHAR
    assert service.engine.decoding() == 1
    stream.close()
    assert service.active == 0
    wait_for(lambda: service.engine.decoding() == 0)  # dropped before the next step


def test_a_failing_step_fails_every_request_of_the_batch_and_the_next_ones_work(service, monkeypatch):
    """The model fails in the step that would feed the requests' prompts (they join in
    it): each request is told, none waits for its deadline."""
    real = GPT.join_step

    def exploding(model, tokens, state, prompts):
        raise RuntimeError("model exploded")
    monkeypatch.setattr(GPT, "join_step", exploding)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    streams = [service.stream("endless", "x", params) for _ in range(2)]
    for s in streams:
        with pytest.raises(RuntimeError, match="exploded"):
            list(s)
    assert service.active == 0
    monkeypatch.setattr(GPT, "join_step", real)
    assert service.generate("endless", "x", params).text == ENDLESS_CHAR * 5


def test_several_models_decode_side_by_side(service):
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    a, b = service.stream("endless", "x", params), service.stream("tiny-lstm", "x", params)
    assert a.collect().text == ENDLESS_CHAR * 20
    assert b.collect().completion_tokens <= 20


def test_a_collecting_reader_is_sent_only_the_end(service):
    stream = service.stream("endless", "x", SamplingParams(max_new_tokens=3000, temperature=0.0))
    ticket = stream._ticket
    completion = stream.collect()
    assert completion.text == ENDLESS_CHAR * 3000 and completion.completion_tokens == 3000
    # the reader got at most the pieces decoded before collect() began (a few, or more on
    # a busy machine: the decoding thread starts first); the rest were held in the ticket,
    # and the queue's last item was the end
    assert len(stream._pieces) < 300 and "".join(stream._pieces) + ticket.held_text() == completion.text
    assert stream.first_piece_ns is not None and service.active == 0


def test_admission_hands_rows_out_first_come_first_served():
    from app.serving.scheduler import QueueFull, QueueTimeout, Scheduler

    scheduler = Scheduler(max_batch=1, max_queue=2)
    scheduler.acquire(0)
    order = []

    def wait(name):
        scheduler.acquire(10)
        order.append(name)
    first = threading.Thread(target=wait, args=("first",))
    first.start()
    wait_for(lambda: scheduler.queued == 1)
    second = threading.Thread(target=wait, args=("second",))
    second.start()
    wait_for(lambda: scheduler.queued == 2)
    with pytest.raises(QueueFull):
        scheduler.acquire(10)
    scheduler.release()
    first.join(10)
    scheduler.release()
    second.join(10)
    assert order == ["first", "second"] and scheduler.rows == 1 and scheduler.queued == 0
    with pytest.raises(QueueTimeout):
        scheduler.acquire(0.01)
    assert scheduler.queued == 0
    scheduler.release()
    assert scheduler.rows == 0


def test_a_request_for_several_rows_gets_them_all_at_once_in_its_turn():
    """An infill's candidates: rows handed all at once, first come first served, so no
    request holds part of its rows while it waits (two that did waited for each other until
    both timed out); ``try_acquire`` takes only rows that are free with nobody waiting."""
    from app.serving.scheduler import QueueTimeout, Scheduler

    scheduler = Scheduler(max_batch=4, max_queue=4)
    scheduler.acquire(0, rows=3)
    got = []
    big = threading.Thread(target=lambda: (scheduler.acquire(10, rows=3), got.append("big")))
    big.start()
    wait_for(lambda: scheduler.queued == 1)
    assert scheduler.rows == 3  # the free row is not taken while it waits for three
    small = threading.Thread(target=lambda: (scheduler.acquire(10), got.append("small")))
    small.start()
    wait_for(lambda: scheduler.queued == 2)
    assert scheduler.try_acquire(1) == 0  # others wait: no row is taken past them
    scheduler.release(3)  # both are handed their rows in this one release, in order
    big.join(10)
    small.join(10)
    assert sorted(got) == ["big", "small"] and scheduler.rows == 4 and scheduler.queued == 0
    scheduler.release(4)
    assert scheduler.try_acquire(9) == 4 and scheduler.rows == 4
    scheduler.release(4)
    scheduler.acquire(0, rows=4)
    with pytest.raises(QueueTimeout):  # a waiter that gives up lets the one behind it in
        scheduler.acquire(0.05, rows=2)
    assert scheduler.queued == 0
    scheduler.release(4)
    with pytest.raises(ValueError):
        scheduler.acquire(0, rows=5)


def test_a_default_infill_writes_as_many_candidates_as_there_are_free_rows(make_app):
    """Without a request's count an infill waits for one row and takes the free ones: under
    load it writes fewer candidates instead of holding up the requests behind it."""
    from tests.app_support import hold_row

    app = make_app(FABLE_MAX_BATCH=4, FABLE_INFILL_CANDIDATES=4, FABLE_QUEUE_TIMEOUT_S=1)
    service = app.extensions["fable.service"]
    params = SamplingParams(max_new_tokens=3)
    held = [hold_row(service) for _ in range(2)]
    infill = service.stream_infill("endless", "A cat.", "The end.", params)
    assert infill.candidates == 2
    infill.close()
    for stream in held:
        stream.close()
    assert service.stream_infill("endless", "A cat.", "The end.", params).candidates == 4
