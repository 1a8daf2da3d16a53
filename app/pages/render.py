"""What every page's rendering asks: whether the vendored scripts are installed, and a
problem reading the experiment store in one line.
"""

from __future__ import annotations

from pathlib import Path

from flask import current_app

VENDOR_FILES = ("htmx.min.js", "sse.js")


def vendor_ready(files: tuple[str, ...] = VENDOR_FILES) -> bool:
    """The vendored ``files`` (by default htmx and its SSE extension) are installed in
    static/vendor/ (``make assets``)."""
    folder = Path(current_app.static_folder or "static") / "vendor"
    return all((folder / name).is_file() for name in files)


def store_problem(e: Exception, root: Path) -> str:
    """What went wrong reading the store, in a line: file names relative to it (a page
    never shows the server's layout)."""
    message = (str(e) or type(e).__name__).strip().splitlines()[0]
    for prefix in {str(root.resolve()), str(root)}:
        message = message.replace(prefix + "/", "")
    return f"{type(e).__name__}: {message}"
