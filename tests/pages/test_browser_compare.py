"""The compare page and the token view in a real browser (headless Chromium driven by
Playwright, as tests/pages/test_browser.py; fixtures from tests/pages/browser.py): two columns streaming
side by side and finishing, each its own event stream; the token view's tooltip reached
by keyboard, with its alternatives and ARIA wiring; a phone's width; the app's CSP.

``FABLE_SCREENSHOTS=1`` also writes docs/screenshots/compare.png (the bundled models of
``FABLE_SCREENSHOTS_CHECKPOINTS``, four at most) and docs/screenshots/tokens.png (a
generated text in the token view, a tooltip open).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.app_support import ENDLESS_CHAR
# test_browser's module-level skips apply here too, through this import: no Chromium, no
# htmx in static/vendor/ or no Playwright skips this module as it skips that one
from tests.pages.browser import (ALL_DONE, TIMEOUT_MS, base_url, browser, experiments, fill_form,  # noqa: F401
                          page, screenshot_page, screenshots, served, sync_api, watch_csp)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.browser, pytest.mark.server]

#: Records each column's SSE messages as the page gets them: the column, the event, its
#: text's length then, whether the Compare button was disabled, and when.
RECORD_COLUMNS = """
window.__events = [];
document.addEventListener("htmx:sseMessage", function (e) {
  var column = e.target.closest(".compare-column");
  var columns = Array.prototype.slice.call(document.querySelectorAll(".compare-column"));
  var out = column.querySelector(".output-generated");
  var button = document.getElementById("compare-submit");
  window.__events.push({column: columns.indexOf(column), type: e.detail.type,
                        length: out.textContent.length, disabled: button.disabled,
                        t: performance.now()});
});
"""


def tick_models(page, names) -> None:
    for box in page.locator("input[name=models]").all():
        box.set_checked(box.get_attribute("value") in names)


def test_two_columns_stream_side_by_side_and_finish(page, base_url, script):
    script([ENDLESS_CHAR] * 30, delay=0.03, reason="length")  # slow enough to watch
    violations = watch_csp(page)
    page.add_init_script(RECORD_COLUMNS)
    page.goto(base_url + "/compare")
    tick_models(page, {"endless", "tiny-gpt"})
    fill_form(page, {"prompt": "Once", "temperature": "0", "max_new_tokens": "30", "seed": "4"})
    page.click("#compare-submit")
    page.wait_for_function("() => document.querySelectorAll('.compare-column "
                           ".output-generated').length == 2 && Array.from(document."
                           "querySelectorAll('.output-generated')).every(o => o.textContent)")
    assert page.locator("#compare-submit").is_disabled()  # while the columns stream
    page.wait_for_function(ALL_DONE)
    columns = page.locator(".compare-column")
    assert columns.count() == 2
    assert [columns.nth(i).locator(".result-model").text_content() for i in (0, 1)] == \
        ["endless", "tiny-gpt"]
    for i in (0, 1):
        column = columns.nth(i)
        assert column.locator(".output-generated").text_content() == ENDLESS_CHAR * 30
        assert "Cut at the token limit · 30 tokens" in column.locator(".status").text_content()
        assert "seed 4" in column.locator(".status").text_content()
        assert column.locator(".run-stat-value").count() == 3
    sync_api.expect(page.locator("#compare-submit")).to_be_enabled()
    sync_api.expect(page.locator("#compare-submit")).to_have_text("Compare")
    # the columns sit side by side at desktop width
    boxes = [columns.nth(i).bounding_box() for i in (0, 1)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]
    events = page.evaluate("window.__events")
    for i in (0, 1):
        mine = [e for e in events if e["column"] == i]
        messages = [e for e in mine if e["type"] == "message"]
        assert len(messages) >= 3, mine  # streamed in several pieces
        lengths = [e["length"] for e in messages]
        assert lengths == sorted(lengths) and lengths[0] < 30
        assert mine[-1]["type"] == "done"
    # both streamed at once: each column's first text came before the other's end
    ends = [max(e["t"] for e in events if e["column"] == i) for i in (0, 1)]
    starts = [min(e["t"] for e in events if e["column"] == i) for i in (0, 1)]
    assert starts[0] < ends[1] and starts[1] < ends[0]
    # the URL now holds the comparison: opened again, it fills the form in and starts
    assert "/compare?models=endless&models=tiny-gpt" in page.url and "seed=4" in page.url
    page.goto(page.url)
    page.wait_for_function(ALL_DONE)
    assert page.locator(".compare-column").count() == 2
    assert page.locator("#field-prompt").input_value() == "Once"
    assert not violations, violations


def test_token_view_shows_alternatives_by_keyboard(page, base_url):
    violations = watch_csp(page)
    page.goto(base_url + "/")
    fill_form(page, {"model": "tiny-gpt", "prompt": "Once", "temperature": "1",
                     "max_new_tokens": "12", "seed": "5"})
    page.click("#generate-submit")
    page.wait_for_selector(".status-text:not(.is-streaming)")
    text = page.locator(".output-generated").text_content()
    toggle = page.locator(".token-toggle")
    assert toggle.get_attribute("aria-pressed") == "false"
    toggle.focus()
    page.keyboard.press("Enter")
    assert toggle.get_attribute("aria-pressed") == "true"
    assert page.locator("#output-text").is_hidden()
    tokens = page.locator(".token-panel .token")
    assert tokens.count() == 12
    assert "".join(tokens.all_text_contents()) == text  # the tokens spell the text
    for token in tokens.all():
        assert re.fullmatch(r"token-band-[1-5]", token.get_attribute("class").split()[1])
        assert token.get_attribute("role") == "button"
        assert re.fullmatch(r"token '.*', probability (under 0\.01|\d+(\.\d+)?) %",
                            token.get_attribute("aria-label"), re.S)
    # one tab stop: Tab from the toggle reaches the copy button, then the first token
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.index") == "0"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    focused = page.locator(".token:focus")
    assert focused.get_attribute("data-index") == "2"
    assert [t.get_attribute("tabindex") for t in tokens.all()].count("0") == 1
    tip = page.locator("[role=tooltip]")
    assert tip.is_visible()
    assert focused.get_attribute("aria-describedby") == tip.get_attribute("id")
    assert page.locator(".token[aria-describedby]").count() == 1
    items = tip.locator("li")
    assert items.count() == 5
    for item in items.all():
        assert re.search(r"(under 0\.01|\d+(\.\d+)?) %", item.text_content())
    probabilities = [item.locator(".token-tip-prob").text_content() for item in items.all()]
    assert probabilities[0] != ""
    # the tooltip sits below the token, inside the page
    token_box, tip_box = focused.bounding_box(), tip.bounding_box()
    assert tip_box["y"] >= token_box["y"] + token_box["height"] - 1
    assert tip_box["x"] >= 0 and tip_box["x"] + tip_box["width"] <= 1280
    # Escape closes it (focus stays), moving on opens the next token's; End, Home
    page.keyboard.press("Escape")
    assert tip.is_hidden() and focused.get_attribute("aria-describedby") is None
    assert page.evaluate("document.activeElement.dataset.index") == "2"
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.index") == "11"
    assert tip.is_visible()
    page.keyboard.press("Home")
    assert page.evaluate("document.activeElement.dataset.index") == "0"
    # hovering shows a token's alternatives too
    page.keyboard.press("Escape")
    tokens.nth(5).hover()
    assert tip.is_visible() and tokens.nth(5).get_attribute("aria-describedby") == \
        tip.get_attribute("id")
    # back to the plain text; the copy button still copies it
    toggle.click()
    assert page.locator("#output-text").is_visible() and tip.is_hidden()
    assert not violations, violations


def test_compare_fits_a_phone(browser, base_url):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                  has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(base_url + "/compare?models=endless&models=tiny-gpt&models=tiny-lstm"
                             "&prompt=Once&temperature=1&max_new_tokens=20&seed=1")
        page.wait_for_function(ALL_DONE)  # started by itself, from the URL
        columns = page.locator(".compare-column")
        assert columns.count() == 3
        boxes = [columns.nth(i).bounding_box() for i in range(3)]
        assert len({round(b["x"]) for b in boxes}) == 1  # stacked
        assert all(b["x"] >= 0 and b["x"] + b["width"] <= 375 for b in boxes)
        assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scroll
        columns.nth(0).locator(".token-toggle").click()
        token = columns.nth(0).locator(".token").last
        token.focus()
        tip = columns.nth(0).locator("[role=tooltip]")
        box = tip.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    finally:
        context.close()


def test_compare_without_javascript_shows_the_finished_columns(browser, base_url):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(base_url + "/compare")
        tick_models(page, {"endless", "tiny-lstm"})
        fill_form(page, {"prompt": "Once", "temperature": "0", "max_new_tokens": "7"})
        page.click("#compare-submit")
        page.wait_for_load_state()
        assert "run=1" in page.url and "models=endless" in page.url
        columns = page.locator(".compare-column")
        assert columns.count() == 2
        assert columns.nth(0).locator(".output-generated").text_content() == ENDLESS_CHAR * 7
        assert columns.nth(1).locator(".run-stats").is_visible()
        assert page.locator(".token-toggle").count() == 0  # the token view needs JavaScript
    finally:
        context.close()


# ---- screenshots for the docs -------------------------------------------------------------

def test_screenshots(screenshots, browser, app_config, checkpoint_dir):  # noqa: F811
    env = {"checkpoints": str(checkpoint_dir), "prompt": "Once upon a time", "seed": "1"}
    env = {key: os.environ.get(f"FABLE_SCREENSHOTS_{key.upper()}", value)
           for key, value in env.items()}
    prompt, seed, out = env["prompt"], env["seed"], screenshots
    with served(app_config, FABLE_CHECKPOINT_DIR=env["checkpoints"], FABLE_DEFAULT_NEW_TOKENS=None,
                FABLE_REQUEST_TIMEOUT_S=60) as (app, url), screenshot_page(browser) as page:
        # the comparison the page opens on (the best two models), each at its own settings
        names = [m.name for m in app.extensions["fable.registry"].ranked()[:2]]
        model = app.extensions["fable.registry"].default().name
        query = "&".join(f"models={name}" for name in names)
        page.goto(f"{url}/compare?{query}&prompt={prompt}&seed={seed}")
        page.wait_for_function(ALL_DONE)
        page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
        page.mouse.move(1, 1)
        page.screenshot(path=str(out / "compare.png"), full_page=True)

        page.goto(url + "/")
        fill_form(page, {"model": model, "prompt": prompt, "seed": seed, "max_new_tokens": "60"})
        page.click("#generate-submit")
        page.wait_for_selector(".status-text:not(.is-streaming)")
        page.click(".token-toggle")
        page.locator(".token").nth(8).focus()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(out / "tokens.png"), full_page=True)
    assert all((out / f"{name}.png").stat().st_size > 10_000 for name in ("compare", "tokens"))
