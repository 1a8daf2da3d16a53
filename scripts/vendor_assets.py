"""Install the front-end assets under static/vendor/: htmx and its SSE extension (the
generate and infill pages), uPlot's script and stylesheet (the experiments page's charts).

    python scripts/vendor_assets.py

The versions and their sha512 checksums are those pinned by package-lock.json; each
package's tarball comes from the npm registry, is checked against the lock file, and only
the files the pages load are taken from it. Standard library only, so a machine with
nothing but Python (a fresh clone, the Docker build) can serve the pages without Node,
and the pages never load anything from a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
#: package -> ((file in its tarball, where the pages load it from), ...)
FILES = {
    "htmx.org": (("package/dist/htmx.min.js", "static/vendor/htmx.min.js"),),
    "htmx-ext-sse": (("package/dist/sse.js", "static/vendor/sse.js"),),
    "uplot": (("package/dist/uPlot.iife.min.js", "static/vendor/uPlot.iife.min.js"),
              ("package/dist/uPlot.min.css", "static/vendor/uPlot.min.css")),
}


def locked(name: str) -> tuple[str, str]:
    """(version, integrity) of ``name`` in package-lock.json."""
    lock = json.loads((ROOT / "package-lock.json").read_text())
    entry = lock["packages"][f"node_modules/{name}"]
    return entry["version"], entry["integrity"]


def fetch(name: str, version: str, integrity: str) -> bytes:
    url = f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    algorithm, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise SystemExit(f"{url}: {algorithm} checksum does not match package-lock.json")
    return data


def main() -> None:
    for name, members in FILES.items():
        version, integrity = locked(name)
        with tarfile.open(fileobj=io.BytesIO(fetch(name, version, integrity))) as archive:
            contents = [(archive.extractfile(member).read(), target) for member, target in members]
        for content, target in contents:
            path = ROOT / target
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)  # never a half-written file where the pages look
            print(f"{target}: {name} {version}", file=sys.stderr)


if __name__ == "__main__":
    main()
