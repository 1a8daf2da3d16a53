"""The Space image, built and run as a Space runs it (``make docker-test``).

    python scripts/image_test.py [--wheels /opt/wheels] [--keep]

Builds ``Dockerfile`` unchanged with buildah (``--isolation chroot``: no daemon, no
registry), starts the image's own CMD as its own user, and checks what breaks on Spaces:
uid 1000 with a writable HOME and caches, gunicorn on 7860 with ``/healthz`` green, a
generation through the API and through the page, the decoding kernels built on first
use by the image's compiler, the pages frameable by
huggingface.co, SIGTERM draining a running stream, logs on the container's output, and
what ``.dockerignore`` keeps out and lets in. Prints the build time and the image size.

Where ``python:3.11-slim`` cannot be pulled (no registry is reachable here), a stand-in
of that name is made once and kept in buildah's storage: Debian bookworm (Python 3.11)
from ``debootstrap``, with ``python`` and ``pip`` on the PATH as the real image has them
(README, "Deploying as a Hugging Face Space", says how it differs). Torch comes from this
machine's CPU wheel through a one-package local index (the Dockerfile's ``TORCH_INDEX``),
never from a resolver that could choose a CUDA build. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/fable-space-test"
PORT = 7860
URL = f"http://127.0.0.1:{PORT}"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-*.whl"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # a registry proxy's CA, where there is one
CACHES = ("$HOME", "$HF_HOME", "$XDG_CACHE_HOME", "$MPLCONFIGDIR", "$TORCHINDUCTOR_CACHE_DIR")
NEEDED = ("app/__init__.py", "models_src/gpt.py", "training/config.py", "templates/base.html",
          "static/vendor/htmx.min.js", "static/vendor/uPlot.iife.min.js", "gunicorn.conf.py",
          "checkpoints/tinystories-gpt/model.safetensors.index.json")
LEFT_OUT = (".git", ".venv", "tests", "runs", "experiments", "benchmarks", ".pytest_cache")

failures: list[str] = []


def check(ok: bool, what: str, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}{f': {detail}' if detail else ''}", flush=True)
    if not ok:
        failures.append(what)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs)


def mounts() -> list[str]:
    """The host's CA bundle over the image's, where the registries sit behind a proxy
    with its own CA (the build fetches from PyPI and npm)."""
    return ["-v", f"{HOST_CA}:{HOST_CA}:ro"] if HOST_CA.is_file() else []


# ---- the base image and torch -------------------------------------------------------------

def ensure_base() -> None:
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE], capture_output=True).returncode == 0:
        return
    if subprocess.run(["buildah", "pull", "-q", BASE], capture_output=True, timeout=120).returncode == 0:
        return
    print(f"{BASE} cannot be pulled: making the stand-in (debootstrap bookworm)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates",
            "bookworm", str(rootfs), "http://deb.debian.org/debian")
        # as python:3.11-slim: `python` and `pip` on the PATH, and pip may install (Debian
        # marks its Python externally managed; the real image's is its own)
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
            (rootfs / "usr/local/bin" / name).symlink_to(target)
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        for package in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        container = run("buildah", "from", "scratch").stdout.strip()
        try:
            run("buildah", "copy", "--quiet", container, str(rootfs), "/")
            run("buildah", "config", "--env", "LANG=C.UTF-8", "--env",
                "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", "python3", container)
            run("buildah", "commit", "--quiet", container, BASE)
        finally:
            run("buildah", "rm", container)


def torch_index(wheels: Path, tmp: Path) -> Path:
    """A PEP 503 index of one package, torch, pointing at the wheel under /wheels."""
    found = sorted(wheels.glob(TORCH_WHEEL))
    if not found:
        sys.exit(f"no {TORCH_WHEEL} in {wheels} (--wheels)")
    page = tmp / "simple" / "torch" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<a href="file:///wheels/{found[-1].name}">{found[-1].name}</a>\n')
    for path in (tmp, *tmp.rglob("*")):  # the build's pip runs as uid 1000
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tmp


def build(wheels: Path, index: Path) -> float:
    started = time.monotonic()
    subprocess.run(["buildah", "bud", "--isolation", "chroot", "--layers", "-q", "-t", IMAGE,
                    "--build-arg", "TORCH_INDEX=file:///torch-index/simple",
                    "-v", f"{wheels}:/wheels:ro", "-v", f"{index}:/torch-index:ro", *mounts(),
                    str(ROOT)], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


# ---- the running image ----------------------------------------------------------------------

def http(path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    request = urllib.request.Request(URL + path, data, headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_healthy(server: subprocess.Popen, seconds: float) -> dict | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            status, _, body = http("/healthz", timeout=2)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    return None


def gunicorn_master(server: subprocess.Popen) -> int | None:
    """The gunicorn master among ``buildah run``'s descendants (chroot: one PID namespace)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    todo = [server.pid]
    while todo:
        pid = todo.pop()
        try:
            if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid  # the first one down the tree: the workers are its children
        except OSError:
            pass
        todo += children.get(pid, [])
    return None


def check_container(container: str) -> None:
    script = ("id -u; for d in " + " ".join(f'"{c}"' for c in CACHES)
              + '; do mkdir -p "$d" && touch "$d/.fable-write-test" && echo "writable $d"; done')
    out = run("buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c", script).stdout
    lines = out.split("\n")
    check(lines[0] == "1000", "runs as uid 1000", f"id -u: {lines[0]}")
    check(out.count("writable ") == len(CACHES), "HOME and every cache are writable",
          "; ".join(line for line in lines[1:] if line))
    listing = run("buildah", "run", "--isolation", "chroot", container, "--", "python", "-c",
                  "import os, sys; print('\\n'.join(p for p in sys.argv[1:] if os.path.exists(p)))",
                  *NEEDED, *LEFT_OUT).stdout.split()
    check(all(p in listing for p in NEEDED), "what the app needs is in the image",
          ", ".join(p for p in NEEDED if p not in listing) or f"{len(NEEDED)} files")
    check(not any(p in listing for p in LEFT_OUT), ".dockerignore keeps out " + ", ".join(LEFT_OUT),
          ", ".join(p for p in LEFT_OUT if p in listing))


def check_serving(server: subprocess.Popen) -> None:
    health = wait_healthy(server, 180)
    check(health is not None and health.get("status") == "ok" and health.get("errors") == 0,
          f"gunicorn listens on {PORT}, /healthz green", json.dumps(health))
    if health is None:
        return
    status, headers, _ = http("/")
    csp = headers.get("Content-Security-Policy", "")
    check(status == 200 and "frame-ancestors" in csp and "https://huggingface.co" in csp
          and "X-Frame-Options" not in headers, "the pages frame inside https://huggingface.co",
          csp.split("frame-ancestors", 1)[-1].split(";")[0].strip())
    body = json.dumps({"model": "tinystories-gpt", "prompt": "Once upon a time", "stream": False,
                       "options": {"num_predict": 16, "seed": 1}}).encode()
    status, _, answer = http("/api/generate", body, {"Content-Type": "application/json"})
    text = json.loads(answer).get("response", "") if status == 200 else answer[:200]
    check(status == 200 and bool(text), "a generation through the API", repr(text)[:80])
    form = urllib.parse.urlencode({"model": "tinystories-gpt", "prompt": "Once upon a time",
                                   "max_new_tokens": "16", "temperature": "0.8", "seed": "1"})
    status, _, page = http("/", form.encode(), {"Content-Type": "application/x-www-form-urlencoded",
                                                "Origin": URL})
    check(status == 200 and b"output-generated" in page, "a generation through the page",
          f"HTTP {status}")


def check_drain(server: subprocess.Popen) -> None:
    """SIGTERM while a stream runs: the stream still ends whole, then the server exits."""
    body = json.dumps({"model": "tinystories-gpt", "prompt": "Once", "stream": True,
                       "options": {"num_predict": 512}}).encode()
    lines: list[bytes] = []
    started = threading.Event()

    def read() -> None:
        request = urllib.request.Request(URL + "/api/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                lines.append(line)
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    master = gunicorn_master(server)
    if not started.wait(30) or master is None:
        check(False, "SIGTERM drains", "no stream, or no gunicorn master found")
        return
    os.kill(master, signal.SIGTERM)
    sent, before = time.monotonic(), len(lines)
    reader.join(60)
    done = bool(lines) and json.loads(lines[-1]).get("done") is True
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        pass
    check(done and len(lines) > before and server.poll() is not None,
          "SIGTERM drains: the running stream ends whole, then the server exits",
          f"{len(lines) - before} of {len(lines)} chunks after SIGTERM, exited "
          f"{time.monotonic() - sent:.1f} s after it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels")),
                        help="a folder holding torch's CPU wheel (this machine's)")
    parser.add_argument("--keep", action="store_true", help="leave the container for a look")
    args = parser.parse_args()
    if shutil.which("buildah") is None:
        sys.exit("buildah is not installed (apt-get install buildah debootstrap)")
    if subprocess.run(["python3", "-c", f"import socket; socket.create_server(('', {PORT})).close()"]).returncode:
        sys.exit(f"port {PORT} is taken: stop what serves there first")

    ensure_base()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = build(args.wheels, torch_index(args.wheels, Path(tmp)))
    size = run("buildah", "images", "--format", "{{.Size}}", IMAGE).stdout.split("\n")[0]
    # the largest process the build ran (pip installing torch, say): what a Space's builder
    # must hold in memory at once
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"built {IMAGE} in {seconds:.0f} s; image size {size}; its largest build process "
          f"peaked at {peak_mib:,.0f} MiB", flush=True)

    container = run("buildah", "from", IMAGE).stdout.strip()
    logs = Path(tempfile.mkdtemp(prefix="fable-image-logs-"))
    try:
        check_container(container)
        inspected = json.loads(run("buildah", "inspect", "--type", "image", IMAGE).stdout)
        command = inspected["OCIv1"]["config"]["Cmd"]  # the image's own CMD, as a Space runs it
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            server = subprocess.Popen(["buildah", "run", "--isolation", "chroot", container, "--",
                                       *command], stdout=out, stderr=err)
            try:
                check_serving(server)
                check_drain(server)
            finally:
                if server.poll() is None:
                    master = gunicorn_master(server)
                    if master:
                        os.kill(master, signal.SIGKILL)
                    server.kill()
                    server.wait(30)
        kernels = run("buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c",
                      'ls "$XDG_CACHE_HOME/fable/kernels"').stdout.split()
        check(any(name.endswith(".so") for name in kernels),
              "the decoding kernels were built for this CPU on first use (the image's gcc)",
              ", ".join(kernels) or "none")
        stdout, stderr = ((logs / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        check("Listening at: http://0.0.0.0:7860" in stdout + stderr
              and '"GET /healthz HTTP/1.1" 200' in stdout,
              "logs go to the container's output (the access log on stdout, gunicorn's on stderr)",
              f"{len(stdout.splitlines())} + {len(stderr.splitlines())} lines")
    finally:
        if not args.keep:
            run("buildah", "rm", container)
        shutil.rmtree(logs, ignore_errors=True)
    if failures:
        sys.exit(f"image test: {len(failures)} check(s) failed: " + "; ".join(failures))
    print("image test: every check passed")


if __name__ == "__main__":
    main()
