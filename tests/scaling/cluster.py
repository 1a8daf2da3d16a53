"""Replicas behind a balancer on one machine: gunicorn app servers and Debian's nginx in
front, run as the current user from a temporary folder. tests/scaling/test_replicas.py
and benchmarks/replicas.py use it; docs/scaling.md shows ``SITE`` as a deployment uses it.

    replicas = [Replica(folder / "a", settings), Replica(folder / "b", settings)]
    start_all(replicas)
    with Balancer(folder / "nginx", [r.port for r in replicas]) as balancer:
        httpx.get(balancer.url + "/healthz")
    for r in replicas: r.stop()

Everything is driven over HTTP and through environment variables (``FABLE_*``): nothing
of the app is imported here.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .processes import Tracked, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)),
                                      None)
#: The caller's variables that would change a server's settings: never passed on.
SERVER_VARIABLES = ("FABLE_", "GUNICORN", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR", "PORT")

#: The site: what a deployment puts in /etc/nginx/conf.d/ (docs/scaling.md shows it with
#: ports 7861, 7862 and 8080). ``{servers}``: one ``server`` line per replica.
SITE = """\
upstream fable {
    # Round robin (nginx's default), no sticky sessions: any replica serves any request,
    # a page's stream included (its job token is signed with the shared FABLE_SECRET_KEY).
    # Passive health checks only (open-source nginx has no active ones): a replica that
    # fails a request (refused, reset, timed out) gets none for 5 s, then one is tried.
{servers}
    keepalive 16;
    # Under gunicorn's keepalive (5 s): nginx never sends a request on a connection the
    # replica is closing (a POST sent there could not be retried without non_idempotent).
    keepalive_timeout 4s;
}

server {
    listen {listen};

    location / {
        proxy_pass http://fable;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # The app compares a form's Origin with the Host it sees: keep the port in it.
        proxy_set_header Host $http_host;
        # Read by the app with FABLE_PROXY_HOPS=1 (client addresses for rate limits, logs)
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;
        # Streams (SSE pages, NDJSON and OpenAI chunks) go out as they are written.
        proxy_buffering off;
        # Longer than a generation may run (FABLE_REQUEST_TIMEOUT_S) plus its queue wait.
        proxy_read_timeout 120s;
        proxy_connect_timeout 2s;
        # A request a replica failed (refused, reset before its answer, timed out) goes to
        # the next, POSTs too: every POST here is a generation (or a reload), which has no
        # effect but its answer, so running it again elsewhere is safe. An answer already
        # under way (a stream) cannot be retried: its client sees it cut.
        proxy_next_upstream error timeout non_idempotent;
        proxy_next_upstream_tries 2;
    }
}
"""
LOG_LINE = re.compile(r'^(\S+) (\S+) (\S+) (\d+) "([^"]*)" "([^"]*)" (\S+) "([^"]*)"$')
SERVER_LINE = "    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;"

#: What runs the site as the current user from a folder (no root, nothing under /var).
HARNESS = """\
{user}worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    # $uri has no query string: a stream's job token, which holds its prompt, is not logged.
    # X-Request-Id: what a test client names its request by, to find its line.
    log_format upstreams '$msec $request_method $uri $status "$upstream_addr" "$upstream_status" '
                         '$request_time "$http_x_request_id"';
    access_log {folder}/access.log upstreams;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{site}
}}
"""


def site(ports: list[int], listen: str) -> str:
    servers = "\n".join(SERVER_LINE.format(port=port) for port in ports)
    return SITE.replace("{servers}", servers).replace("{listen}", listen)


def server_environment(settings: dict[str, str], port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_VARIABLES)}
    return {**env, **settings, "FABLE_HOST": "127.0.0.1", "PORT": str(port)}


class Replica:
    """One app server, ``gunicorn -c gunicorn.conf.py 'app:create_app()'`` from the
    repository root, on its own port, logging to ``folder/gunicorn.log``."""

    def __init__(self, folder: Path, settings: dict[str, str], port: int | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.port = port or free_port()
        self.log = folder / "gunicorn.log"
        self.server: Tracked | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> Replica:
        with open(self.log, "ab") as log:
            self.server = Tracked([GUNICORN, "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT,
                                  env=server_environment(self.settings, self.port),
                                  stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.server.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.server.process.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    self.server.look()
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy in {timeout:g} s:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def running(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the master and its workers: the machine is gone."""
        self.server.kill()
        self.server.process.wait(10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=15)


def start_all(replicas: list[Replica], timeout: float = 120) -> None:
    """Start the replicas at once (they load their models side by side); all healthy, or
    every one stopped and the error raised."""
    try:
        for replica in replicas:
            replica.launch()
        for replica in replicas:
            replica.wait_healthy(timeout)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise


@dataclass
class Logged:
    """One line of the balancer's access log."""
    at: float  # seconds since the epoch, when nginx logged it (the answer's end)
    method: str
    path: str
    status: int
    upstreams: list[str]  # every replica tried, in order ("127.0.0.1:7861"); nginx's own: []
    seconds: float
    request_id: str | None  # the request's X-Request-Id


class Balancer:
    """nginx in front of ``ports``, as the current user, from ``folder``: its config, temp
    folders, pid file and access log are there; its error log goes to ``folder/error.log``."""

    def __init__(self, folder: Path, ports: list[int], port: int | None = None) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # As root, nginx's workers would drop to "nobody", who cannot enter a private temp
        # folder; as anyone else the directive only earns a warning, so it is left out.
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        self.config = folder / "nginx.conf"
        self.config.write_text(HARNESS.format(user=user, folder=folder,
                                              site=site(ports, f"127.0.0.1:{self.port}")))
        self.process: Tracked | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Balancer:
        with open(self.folder / "error.log", "ab") as log:
            self.process = Tracked([NGINX, "-p", str(self.folder), "-c", str(self.config), "-e", "stderr",
                                    "-g", f"daemon off; pid {self.folder}/nginx.pid; error_log stderr;"],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout, self.process.process)
        except BaseException:
            self.stop()
            raise RuntimeError(f"nginx did not start:\n{self.errors()}") from None
        return self

    def errors(self) -> str:
        return (self.folder / "error.log").read_text(errors="replace")[-3000:]

    def access_log(self) -> list[Logged]:
        entries = []
        path = self.folder / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            at, method, uri, status, upstreams, _, seconds, request_id = LOG_LINE.match(line).groups()
            addresses = [a.strip() for a in upstreams.replace(" : ", ", ").split(",")]
            entries.append(Logged(float(at), method, uri, int(status), [a for a in addresses if a and a != "-"],
                                  float(seconds), None if request_id in ("", "-") else request_id))
        return entries

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- training across nodes ------------------------------------------------------------

def node_args(endpoint: str, run_id: str) -> list[str]:
    """One node of two, one process on it; c10d gives the node ranks in order of arrival."""
    return ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", run_id]
