"""The arithmetic of ``benchmarks/load.py``: percentiles, a level's summary and the ratios
held to the serving targets (the benchmark itself needs minutes and a real gunicorn)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def load():
    spec = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_percentile_is_the_nearest_rank(load):
    values = list(range(1, 101))  # 1..100
    assert load.percentile(values, 50) == 50
    assert load.percentile(values, 99) == 99  # a whole rank is not rounded up
    assert load.percentile(values, 7) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert load.percentile(values, 100) == 100
    assert load.percentile([7.0], 99) == 7.0
    assert math.isnan(load.percentile([], 50))


def test_a_level_counts_only_successful_answers(load):
    results = [load.Result(200, 0.1, 64), load.Result(200, 0.3, 64), load.Result(503, 0.01),
               load.Result(None, 5.0, error="TimeoutError")]
    level = load.summarize(4, results, wall=2.0)
    assert (level.requests, level.ok, level.tokens) == (4, 2, 128)
    assert level.tokens_per_s == 64.0 and level.requests_per_s == 1.0
    assert level.latency_ms["mean"] == 200.0 and level.latency_ms["max"] == 300.0
    assert level.errors == {"503": 1, "TimeoutError": 1}


def closed_loop_level(load, clients: int, latencies_s: list[float]):
    """A level as a closed loop gives it: each client sends its next request when the last
    returns, so the wall time is one client's share of the requests' summed latency."""
    wall = sum(latencies_s) / clients
    return load.summarize(clients, [load.Result(200, s, 64) for s in latencies_s], wall)


def test_ratios_follow_littles_law(load):
    alone = closed_loop_level(load, 1, [0.030] * 100)
    # 16 clients, every request 3.5x as long as alone, no tail at all
    busy = closed_loop_level(load, 16, [0.105] * 1600)
    r = load.ratios([alone, busy])
    assert r["p99_16_over_lone"] == 3.5
    # Little's law: 16 clients at 3.5x the latency serve 16 / 3.5 = 4.57x the requests
    assert r["requests_per_s_16_over_1"] == pytest.approx(16 / 3.5, abs=0.01)
    assert r["tokens_per_s_16_over_1"] == pytest.approx(16 / 3.5, abs=0.01)
    # without tails, p99 <= 3x needs the requests/s at 16 to be 16 / 3 of those at 1
    assert r["requests_per_s_16_over_1_for_target"] == pytest.approx(16 / 3, abs=0.01)


def test_a_tail_at_16_raises_the_throughput_the_latency_target_needs(load):
    alone = closed_loop_level(load, 1, [0.030] * 100)
    busy = closed_loop_level(load, 16, [0.080] * 1580 + [0.160] * 20)  # p99 twice the rest
    r = load.ratios([alone, busy])
    mean = (0.080 * 1580 + 0.160 * 20) / 1600
    assert r["requests_per_s_16_over_1_for_target"] == pytest.approx(16 / 3 * 0.160 / mean, abs=0.01)


def test_ratios_need_both_levels(load):
    alone = closed_loop_level(load, 1, [0.030] * 10)
    assert all(v is None for v in load.ratios([alone]).values())
