"""What the browser tests share: a live server, a headless Chromium (Debian's ``chromium``
package, driven by Playwright), pages that fail on any JavaScript error or HTTP error, and
the form helpers. A test module that imports this skips when Chromium, Playwright or the
vendored htmx files (``static/vendor/``, ``make assets``) are missing.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FABLE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VENDOR = [ROOT / "static" / "vendor" / name for name in ("htmx.min.js", "sse.js")]
TIMEOUT_MS = 10_000

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if not all(path.is_file() for path in VENDOR):
    pytest.skip("htmx is not installed in static/vendor/ (npm ci, then copy: see Makefile)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


# ---- fixtures: a live server and a browser ------------------------------------------------

@contextmanager
def serve(app):
    """The app on a free port of 127.0.0.1, in a thread (one more per request); stopped after."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="fable-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def served(app_config: dict, **settings):
    """An app on ``app_config`` with ``settings`` over it, served on localhost: (app, url).
    torch's thread count, which create_app sets, is put back afterwards."""
    from app import create_app

    threads = torch.get_num_threads()
    try:
        app = create_app({**app_config, **settings})
        with serve(app) as url:
            yield app, url
    finally:
        torch.set_num_threads(threads)


def watch_csp(page) -> list[str]:
    """The violations of the app's CSP (served with every page: app/platform/security.py) that
    ``page`` reports from now on."""
    violations: list[str] = []
    page.on("console", lambda message: "Content Security Policy" in message.text
            and violations.append(message.text))
    return violations


@pytest.fixture
def screenshots() -> Path:
    """docs/screenshots/, when ``FABLE_SCREENSHOTS=1`` asks for them (else the test skips)."""
    if os.environ.get("FABLE_SCREENSHOTS") != "1":
        pytest.skip("set FABLE_SCREENSHOTS=1 to write docs/screenshots/")
    (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
    return ROOT / "docs" / "screenshots"


@contextmanager
def screenshot_page(browser):
    """A desktop-sized page (1280 x 900) with a patient timeout, for the docs."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    from models_src.records import ExperimentLog

    root = tmp_path_factory.mktemp("experiments")
    log = ExperimentLog(root, "tiny-stories", config={})
    for step, loss in ((10, 3.2), (20, 2.6), (30, 2.2)):
        log.log(model="tiny-gpt", architecture="gpt", parameters=16064, step=step, epoch=step / 30,
                train_loss=loss, val_loss=loss + 0.1, val_perplexity=2.718 ** (loss + 0.1),
                wall_time_s=float(step), kind="train_eval", split="validation")
    return root


@pytest.fixture(scope="module")
def base_url(app_config, experiments):
    with served(app_config, FABLE_EXPERIMENTS_DIR=str(experiments)) as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; Playwright gives it a fresh temporary profile."""
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"JavaScript error: {error}"))
    page.on("response", lambda response: response.status >= 400 and errors.append(
        f"HTTP {response.status} for {response.url}"))
    yield page
    context.close()
    assert not errors, errors


#: Every compare column has finished streaming.
ALL_DONE = ("() => document.querySelectorAll('.compare-column').length > 0 && Array.from("
            "document.querySelectorAll('.compare-column')).every(c => c.querySelector("
            "'.status .status-text:not(.is-streaming)'))")


#: Records each SSE message as the page gets it: the event, the text length then, whether
#: the submit button was disabled, and when.
RECORD_EVENTS = """
window.__events = [];
document.addEventListener("htmx:sseMessage", function (e) {
  var out = document.querySelector(".output-generated, .story-middle");
  var button = document.querySelector("button[type=submit]");
  window.__events.push({type: e.detail.type, length: out ? out.textContent.length : -1,
                        disabled: button ? button.disabled : null, t: performance.now()});
});
"""


def fill_form(page, fields: dict) -> None:
    page.evaluate("() => document.querySelectorAll('details.sampling').forEach(d => { d.open = true; })")
    for name, value in fields.items():
        if name == "model":
            page.check(f"input[name=model][value='{value}']")
        else:
            page.fill(f"#field-{name}", value)
