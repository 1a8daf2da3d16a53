"""The model page in headless Chromium (fixtures and skips from tests/pages/browser.py):
the card rendered and inert, the per-layer table, a download, no horizontal scroll at
phone width, no CSP violation, and the page without JavaScript.

``FABLE_SCREENSHOTS=1`` also writes docs/screenshots/model.png (desktop width): the page
of tinystories-gpt, else of the first model, in ``FABLE_SCREENSHOTS_CHECKPOINTS``
(default: the test checkpoints), with the records in ``FABLE_SCREENSHOTS_EXPERIMENTS``.
"""

from __future__ import annotations

import os

import pytest

# the module-level skips (no Chromium, Playwright or htmx) come with this import
from tests.pages.browser import (ROOT, TIMEOUT_MS, browser, screenshot_page,  # noqa: F401 (fixtures)
                          screenshots, served)
from tests.pages.page_helpers import HOSTILE

pytestmark = [pytest.mark.browser, pytest.mark.server]
PHONE = {"width": 375, "height": 740}


@pytest.fixture(scope="module")
def model_url(app_config, pages_dir):  # noqa: F811 (the imported fixture)
    with served(app_config, FABLE_CHECKPOINT_DIR=str(pages_dir)) as (_, url):
        yield url


@pytest.fixture
def watched(browser):  # noqa: F811
    """A context factory whose pages fail the test on a JavaScript error, an HTTP error or
    a CSP violation."""
    contexts, problems = [], []

    def open_page(**options):
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"JavaScript error: {error}"))
        page.on("console", lambda message: "Content Security Policy" in message.text
                and problems.append(message.text))
        page.on("response", lambda response: response.status >= 400 and problems.append(
            f"HTTP {response.status} for {response.url}"))
        return page
    yield open_page
    for context in contexts:
        context.close()
    assert not problems, problems


def test_model_page_shows_the_card_the_table_and_downloads(watched, model_url, pages_dir):
    page = watched(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.goto(f"{model_url}/models/{HOSTILE}")
    assert page.locator("h1").text_content().strip().startswith(HOSTILE)
    card = page.locator(".model-page-card")
    assert card.is_visible()
    assert card.locator("h3", has_text="Evaluation").is_visible()
    assert "<script>window.__pwned = 1</script>" in card.text_content()  # shown as text
    assert card.locator("script, img, [onclick], [onerror]").count() == 0
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert card.locator("a[href^='javascript'], a[href^='data']").count() == 0
    # the per-layer table, folded away until asked for
    page.click(".model-page-layers > summary")
    rows = page.locator("#layer-table tbody tr")
    assert rows.count() >= 3 and rows.first.locator("th").text_content() == "wte"
    assert page.locator("#layer-table tfoot td.num").text_content() == "16,064"
    # a download: the checkpoint's own bytes, under the file's name
    link = page.get_by_role("link", name="config.json", exact=True)
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "config.json"
    assert open(download.path(), "rb").read() == (pages_dir / HOSTILE / "config.json").read_bytes()


def test_model_page_fits_a_phone(watched, model_url):
    page = watched(viewport=PHONE, is_mobile=True, has_touch=True)
    for path in (f"/models/{HOSTILE}", "/models/tiny-lstm", "/models"):
        page.goto(model_url + path)
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (path, width)
    # wide content scrolls inside its own box, which the keyboard can reach
    region = page.locator(".table-wrap[role=region][tabindex='0']")
    page.goto(f"{model_url}/models/{HOSTILE}")
    assert region.count() == 1 and region.get_attribute("aria-labelledby") == "layers-heading"


def test_model_page_without_javascript(watched, model_url):
    page = watched(java_script_enabled=False)
    page.goto(f"{model_url}/models")
    page.click(f"text={HOSTILE}")
    page.wait_for_load_state()
    assert page.url.endswith(f"/models/{HOSTILE}")
    assert page.locator(".model-page-card").is_visible()
    assert not page.locator("#layer-table").is_visible()  # folded away, opened without script
    page.click(".model-page-layers > summary")
    assert page.locator("#layer-table").is_visible()
    assert page.locator(".model-page-card blockquote", has_text="The second sample.").count() == 1


# ---- the screenshot for the docs ------------------------------------------------------------

def test_screenshot_model_page(screenshots, browser, app_config, checkpoint_dir):  # noqa: F811
    out = screenshots
    checkpoints = os.environ.get("FABLE_SCREENSHOTS_CHECKPOINTS", str(checkpoint_dir))
    experiments = os.environ.get("FABLE_SCREENSHOTS_EXPERIMENTS", str(ROOT / "experiments"))
    with served(app_config, FABLE_CHECKPOINT_DIR=checkpoints,
                FABLE_EXPERIMENTS_DIR=experiments) as (app, url), \
            screenshot_page(browser) as page:
        names = app.extensions["fable.registry"].names()
        assert names, f"no model loads from {checkpoints}"
        name = "tinystories-gpt" if "tinystories-gpt" in names else names[0]
        page.goto(f"{url}/models/{name}")
        # the curves (admin records) load lazily: fetch and decode them all first
        page.locator(".curve img").evaluate_all(
            "images => Promise.all(images.map(image => {"
            " image.loading = 'eager'; return image.decode().catch(() => null); }))")
        page.screenshot(path=str(out / "model.png"), full_page=True)
    assert (out / "model.png").stat().st_size > 10_000
