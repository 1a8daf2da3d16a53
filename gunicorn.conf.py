"""gunicorn settings for serving Fable: ``gunicorn -c gunicorn.conf.py 'app:create_app()'``.

gthread workers, each loading the models after the fork (no preload: CUDA and torch's
thread pools cannot survive a fork); sized from the app's own settings (app/platform/settings.py),
so every value can be changed from the environment.
"""

import os
import resource
import secrets
import shutil
import sys
import tempfile
import time

# In a checkout the app is beside this file; `pip install .` puts this file under
# <prefix>/share/fable and the app in site-packages (`fable serve` finds both).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app.pages import training_runs  # noqa: E402  (the standard library only)
from app.platform.settings import Settings  # noqa: E402  (reads FABLE_*; starts no torch threads)

settings = Settings.load()


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# This machine only unless FABLE_HOST says otherwise: the Docker image sets 0.0.0.0, as a
# Space routes to it from outside. HF Spaces route to one port, 7860 by default ($PORT).
bind = f"{os.environ.get('FABLE_HOST', '').strip() or '127.0.0.1'}:{_int('PORT', 7860)}"

# Threads wait on the network while torch, which releases the GIL, generates; the main
# loop keeps heart-beating through long streams (sync workers would be killed mid-stream).
# gthread, except that a thread gets a request only once all of it has arrived: slow
# clients wait in the main loop's poller (app/http_worker.py; SECURITY.md says why).
worker_class = "app.http_worker.BufferingThreadWorker"
workers = settings.workers
# Requests in flight per worker: every decoding row and queued request, plus SPARE_THREADS
# for everything else. A request past the queue then reaches the app, which answers 503
# at once and frees its thread, and /healthz always finds one; with no spare, the 65th
# request waited in gunicorn's backlog instead. The threads only wait on sockets and
# queues; one scheduler thread per worker runs the model.
SPARE_THREADS = 16
threads = _int("FABLE_THREADS", settings.max_batch + settings.max_queue + SPARE_THREADS)
preload_app = False
# Connections a worker holds at once, requests in flight and waiting ones together: a
# waiting connection costs a buffer in the main loop, not a thread, and a full table sheds
# the oldest that have not sent a whole request (app/http_worker.py). gunicorn's 1,000,
# kept under the open-file limit (each connection is a file descriptor; the worker needs
# some for itself), so the table fills before accept() fails.
worker_connections = _int("GUNICORN_WORKER_CONNECTIONS",
                          max(64, min(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 128)))

# For gthread workers ``timeout`` is a heartbeat, not a request limit (generation has its
# own deadline, FABLE_REQUEST_TIMEOUT_S); it must cover a worker's start-up, which loads
# every model.
timeout = _int("GUNICORN_TIMEOUT", 120)
# On SIGTERM workers finish what is running for up to graceful_timeout seconds, then are
# killed: the generation deadline plus 5 s lets every stream already started end complete.
# (A container stop with a shorter grace period, e.g. docker stop's 10 s, still cuts it.)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", int(settings.request_timeout_s) + 5)
keepalive = 5

accesslog = "-"  # stdout: what the Spaces log viewer shows
# No secrets and no prompts: the path without its query string (a stream's job token holds
# the prompt; a token typed into a URL would be logged) and no user name (%(u)s is the
# Basic user name, where a browser's sign-in dialog invites people to type the admin token).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# The heartbeat file on a tmpfs: a container's overlay disk can stall it.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# gunicorn >= 25 opens a control socket under $HOME by default; nothing here uses it, and
# two servers on one machine (tests, several Spaces) would fight over the path.
control_socket_disable = True

# The workers' shared runtime folder, named here before any worker starts: Prometheus's
# multiprocess samples (app/platform/metrics.py) and the reload stamp every worker follows
# (app/serving/reload.py).
_RUNTIME = tempfile.mkdtemp(prefix="fable-run-")
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(_RUNTIME, "metrics")
# A stamp the caller names wins: replicas (servers that share a checkpoint directory) that
# name one file all follow a reload asked of any of them (docs/scaling.md).
if not os.environ.get("FABLE_RELOAD_STAMP", "").strip():
    os.environ["FABLE_RELOAD_STAMP"] = os.path.join(_RUNTIME, "reload")

# The key that signs the pages' job tokens (app/pages/jobs.py), made here when it is
# not set, so that every worker accepts the others' tokens; a restart makes a new one.
# Never logged.
if not os.environ.get("FABLE_SECRET_KEY", "").strip():
    os.environ["FABLE_SECRET_KEY"] = secrets.token_urlsafe(32)


def on_starting(server):
    """Start from an empty metrics folder: no earlier server's counts carry over. A
    training an earlier server left running (it was killed, not stopped) is stopped, and
    the training page's runs that never ended are marked stopped."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    for name in training_runs.settle(settings.train_dir):
        server.log.warning("training %s did not finish under the last server: marked stopped", name)


def when_ready(server):
    """SIGHUP to the master reloads the models in every worker, in place (app/serving/reload.py),
    instead of gunicorn's restart of every worker: a checkpoint that fails to load then
    leaves its loaded version serving. (Settings change with a restart.)"""
    def reload_models():
        server.log.info("SIGHUP: every worker reloads its models")
        with open(os.environ["FABLE_RELOAD_STAMP"], "w") as stamp:
            stamp.write(f"{os.getpid()} {time.time_ns()}")
    server.handle_hup = reload_models


def on_exit(server):
    """A training started from the training page stops with the server: no process is
    left behind, and the run says it was stopped."""
    name = training_runs.stop_running(settings.train_dir)
    if name:
        server.log.info("training %s stopped with the server", name)
    shutil.rmtree(_RUNTIME, ignore_errors=True)


def child_exit(server, worker):
    """A worker that exits stops counting in the live gauges (queue depth, rows)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
