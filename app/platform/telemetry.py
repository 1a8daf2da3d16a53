"""The server's Prometheus metric families, and the calls that record them.

Recorded by the service, the engine loop and the app's request hook; served by the
``/metrics`` blueprint (app/platform/metrics.py). Under gunicorn each worker writes its samples
to ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn.conf.py sets it before any worker imports
prometheus_client); the live gauges are summed over the workers that are alive.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("fable_requests", "HTTP requests answered, by route and status",
                   ["route", "method", "status"])
RUNNING = Gauge("fable_running_rows", "Generations holding a decoding row",
                multiprocess_mode="livesum")
QUEUED = Gauge("fable_queued_requests", "Requests waiting for a decoding row",
               multiprocess_mode="livesum")
BATCH = Histogram("fable_batch_size", "Sequences decoded together in one step, per step",
                  ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
FIRST_TOKEN = Histogram("fable_time_to_first_token_seconds",
                        "From a request asking for a row to its first text",
                        ["model"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PER_TOKEN = Histogram("fable_time_per_output_token_seconds",
                      "Mean time between a generation's tokens after the first",
                      ["model"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
TOKENS = Counter("fable_generated_tokens", "Tokens generated (eos included)", ["model"])
LOAD_ERRORS = Gauge("fable_model_load_errors", "Checkpoint directories that failed to load",
                    multiprocess_mode="max")


def load_errors(registry) -> None:
    """After a registry (re)load: how many checkpoint directories failed."""
    LOAD_ERRORS.set(len(registry.errors))


def rows(running: int, queued: int) -> None:
    RUNNING.set(running)
    QUEUED.set(queued)


def generation(model: str, asked_ns: int, first_ns: int | None, finished_ns: int,
               tokens: int) -> None:
    """One finished generation: times in ``time.perf_counter_ns`` nanoseconds."""
    TOKENS.labels(model).inc(tokens)
    if first_ns is None:
        return
    FIRST_TOKEN.labels(model).observe(max(0, first_ns - asked_ns) / 1e9)
    if tokens > 1:
        PER_TOKEN.labels(model).observe(max(0, finished_ns - first_ns) / 1e9 / (tokens - 1))
