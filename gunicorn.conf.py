"""gunicorn settings for serving Fable: ``gunicorn -c gunicorn.conf.py 'app:create_app()'``.

Sized for a 2-vCPU CPU Space by default; every value can be changed from the
environment without editing this file.

- gthread workers: each worker is one process with a thread pool. Threads wait on the
  network (slow clients, long streams) while generation runs in torch, which releases
  the GIL; the main loop keeps heart-beating during long streams (unlike sync workers,
  which would be killed by ``timeout`` mid-stream).
- No preload: each worker imports torch and loads the models *after* the fork, because
  CUDA (and torch's thread pools) cannot survive a fork once initialised.
- workers x FABLE_TORCH_THREADS should not exceed the cores: the app defaults its torch
  threads to (cores - 1) // workers, leaving a core to the request threads.
"""

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# HF Spaces route to one port, 7860 by default ($PORT); FABLE_HOST=127.0.0.1 keeps a local
# or test server off the network.
bind = f"{os.environ.get('FABLE_HOST', '0.0.0.0')}:{_int('PORT', 7860)}"

worker_class = "gthread"
workers = _int("FABLE_WORKERS", _int("WEB_CONCURRENCY", 1))  # the app reads the same value
# Requests in flight per worker: enough for every decoding row and queued request
# (FABLE_MAX_BATCH + FABLE_MAX_QUEUE, 16 + 48) so that the app, not gunicorn's own
# unbounded backlog, decides when to answer 503. The threads only wait on sockets and
# queues; one scheduler thread per worker runs the model.
threads = _int("FABLE_THREADS", 64)
preload_app = False

# For gthread workers ``timeout`` is a heartbeat, not a request limit (generation has its
# own deadline, FABLE_REQUEST_TIMEOUT_S); it must cover a worker's start-up, which loads
# every model.
timeout = _int("GUNICORN_TIMEOUT", 120)
# On SIGTERM (a restart, a redeploy) workers stop accepting and finish what is running for
# up to graceful_timeout seconds, then are killed. A generation runs for at most
# FABLE_REQUEST_TIMEOUT_S (60 by default), so the default waits that long plus 5 s: every
# stream already started ends complete (done: true) instead of being cut mid-response.
# (A container stop with a shorter grace period, e.g. docker stop's 10 s, still cuts it.)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT",
                        int(float(os.environ.get("FABLE_REQUEST_TIMEOUT_S", "").strip() or 60)) + 5)
keepalive = 5

accesslog = "-"  # stdout: what the Spaces log viewer shows
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# The heartbeat file on a tmpfs: a container's overlay disk can stall it.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# gunicorn >= 25 opens a control socket under $HOME by default; nothing here uses it, and
# two servers on one machine (tests, several Spaces) would fight over the path.
control_socket_disable = True
