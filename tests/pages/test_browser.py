"""The pages in a real browser: headless Chromium (Debian's ``chromium`` package) driven
by Playwright, against the app served by werkzeug on 127.0.0.1 in a thread.

Checks what only a browser shows: htmx posting the form, the SSE extension appending
text as it streams, the button disabled while it runs, the infilled middle marked,
generated markup staying text, focus moving to a field in error, and the forms working
with JavaScript off. Skips when Chromium, Playwright or the vendored htmx files are
missing (tests/pages/browser.py, whose fixtures these are).

``FABLE_SCREENSHOTS=1`` also writes docs/screenshots/{generate,infill,admin}.png
(desktop width) from the models in ``FABLE_SCREENSHOTS_CHECKPOINTS`` (default: the test
checkpoints) and the records in ``FABLE_SCREENSHOTS_EXPERIMENTS`` (default: experiments).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.app_support import ENDLESS_CHAR, MODELS, SUMMARY
from tests.pages.browser import (RECORD_EVENTS, ROOT, TIMEOUT_MS, base_url, browser, experiments,  # noqa: F401 (fixtures)
                                 fill_form, page, screenshot_page, screenshots, served, sync_api, watch_csp)

pytestmark = [pytest.mark.browser, pytest.mark.server]


# ---- generate -----------------------------------------------------------------------------

def test_generate_streams_text_into_the_page(page, base_url, script):
    # slow enough for the test to watch the page while the text streams
    script([ENDLESS_CHAR] * 40, delay=0.03, reason="length")
    page.add_init_script(RECORD_EVENTS)
    page.goto(base_url + "/")
    fill_form(page, {"model": "endless", "prompt": "Once", "temperature": "0",
                     "max_new_tokens": "40"})
    button = page.locator("#generate-submit")
    assert button.is_enabled()
    button.click()
    # while it streams: text visible before the end, the button disabled
    # (functions, not expressions: Playwright polls expressions with eval, which the CSP forbids)
    page.wait_for_function("() => document.querySelector('.output-generated') && "
                           "document.querySelector('.output-generated').textContent.length > 0")
    assert page.locator(".status-text.is-streaming").count() == 1
    assert page.locator("#generate-submit").is_disabled()
    page.wait_for_selector(".status-text:not(.is-streaming)")
    assert page.locator(".output-generated").text_content() == ENDLESS_CHAR * 40
    assert page.locator(".output-prompt").text_content() == "Once"
    assert "Cut at the token limit · 40 tokens" in page.locator(".status").text_content()
    expect = sync_api.expect
    expect(page.locator("#generate-submit")).to_be_enabled()
    expect(page.locator("#generate-submit")).to_have_text("Generate")
    events = page.evaluate("window.__events")
    messages = [e for e in events if e["type"] == "message"]
    assert len(messages) >= 3, events  # arrived in several pieces...
    lengths = [e["length"] for e in messages]
    assert lengths == sorted(lengths) and lengths[0] < 40  # ...the text growing, first early
    assert all(e["disabled"] for e in messages)  # the button stayed disabled meanwhile
    assert events[-1]["type"] == "done" and events[-1]["t"] > messages[0]["t"]


def test_a_cut_text_is_continued_with_one_click(page, base_url):
    page.goto(base_url + "/")
    fill_form(page, {"model": "endless", "prompt": "Once", "temperature": "0", "max_new_tokens": "5"})
    page.locator("#generate-submit").click()
    continue_button = page.locator(".continue-button")
    continue_button.wait_for()
    assert "Cut at the token limit" in page.locator(".status").text_content()
    continue_button.click()
    # the text so far is the new prompt, and the model writes on from it
    sync_api.expect(page.locator(".output-prompt")).to_have_text("Once" + ENDLESS_CHAR * 5)
    sync_api.expect(page.locator(".output-generated")).to_have_text(ENDLESS_CHAR * 5)


def test_generated_markup_is_shown_as_text_and_never_runs(page, base_url, script):
    pieces = ["<scr", "ipt>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned=2">',
              "\n<b>bold?</b>"]
    script(pieces)
    page.goto(base_url + "/")
    prompt = '<script>window.__pwned = 3</script>'
    fill_form(page, {"model": "tiny-gpt", "prompt": prompt, "max_new_tokens": "10"})
    page.click("#generate-submit")
    page.wait_for_selector(".status-text:not(.is-streaming)")
    assert page.locator(".output-generated").text_content() == "".join(pieces)
    assert page.locator(".output-prompt").text_content() == prompt
    assert page.locator("#output-text script, #output-text img, #output-text b").count() == 0
    page.wait_for_timeout(200)  # an onerror handler would have run by now
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_invalid_field_is_reported_inline_and_focused(page, base_url):
    page.goto(base_url + "/")
    fill_form(page, {"model": "tiny-gpt", "prompt": "Once", "top_p": "5"})
    page.click("#generate-submit")
    error = page.locator("#error-top_p")
    error.wait_for()
    assert "Top-p must be above 0 and at most 1, got 5" in error.text_content()
    assert page.locator("#field-top_p").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "field-top_p"
    assert page.locator(".error-summary").is_visible()
    assert page.locator("#generate-submit").is_enabled()
    assert page.locator("#result .output").count() == 0  # nothing was generated


def test_forms_work_without_javascript(browser, base_url):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(base_url + "/")
        fill_form(page, {"model": "endless", "prompt": "Once", "temperature": "0",
                         "max_new_tokens": "8"})
        page.click("#generate-submit")
        page.wait_for_load_state()
        assert page.url == base_url + "/"
        assert page.locator(".output-generated").text_content() == ENDLESS_CHAR * 8
        assert page.locator(".copy-button").is_hidden()  # needs JavaScript
        page.goto(base_url + "/infill")
        fill_form(page, {"model": "endless", "first": "Lily saw a ball.", "last": "The end.",
                         "temperature": "0", "max_new_tokens": "4"})
        page.click("#infill-submit")
        page.wait_for_load_state()
        assert page.locator("mark.story-middle").text_content() == ENDLESS_CHAR * 4
    finally:
        context.close()


def test_pages_run_under_the_apps_content_security_policy(page, base_url):
    """No inline script, style or eval anywhere: the pages work under the app's own strict
    CSP (app/platform/security.py) and the browser reports no violation."""
    from app.platform import security

    violations = watch_csp(page)
    page.on("pageerror", lambda error: violations.append(str(error)))
    for path, kind, fields in (
            ("/", "generate", {"prompt": "Once"}),
            ("/infill", "infill", {"first": "Lily ran.", "last": "The end."})):
        policy = page.goto(base_url + path).headers["content-security-policy"]
        assert policy == security.CONTENT_SECURITY_POLICY
        fill_form(page, {"model": "endless", **fields, "max_new_tokens": "5"})
        page.click(f"#{kind}-submit")
        page.wait_for_selector(".status-text:not(.is-streaming)")
        assert page.locator(f"#{kind}-submit").is_enabled()
    page.goto(base_url + "/admin")
    curve = page.locator(".curve img").first
    curve.scroll_into_view_if_needed()
    # (a function, not an expression: Playwright evaluates those without eval)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not curve.evaluate("image => image.complete && image.naturalWidth > 0"):
        assert time.monotonic() < deadline, "the curve image never loaded"
        time.sleep(0.05)
    assert not violations, violations


# ---- infill and admin ---------------------------------------------------------------------

def test_infill_shows_three_parts_with_the_middle_marked(page, base_url):
    page.goto(base_url + "/infill")
    fill_form(page, {"model": "endless", "first": "Lily saw a big red ball.",
                     "last": "They played all day.", "temperature": "0", "max_new_tokens": "12"})
    page.click("#infill-submit")
    page.wait_for_selector(".status-text:not(.is-streaming)")
    story = page.locator("#output-text")
    assert story.locator(".story-first").text_content() == "Lily saw a big red ball."
    assert story.locator("mark.story-middle").text_content() == ENDLESS_CHAR * 12
    assert story.locator(".story-last").text_content() == "They played all day."
    assert "Generated middle:" in story.locator(".visually-hidden").first.text_content()
    expect = sync_api.expect
    expect(page.locator("#infill-submit")).to_be_enabled()
    # the marked middle stands out: a background colour of its own
    background = page.evaluate("getComputedStyle(document.querySelector('mark.story-middle'))"
                               ".backgroundColor")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent")


def test_an_infill_never_shows_a_sentence_cut_into_the_ending(page, base_url, monkeypatch):
    """Both candidates run on into the ending mid-sentence (the engine faked, the choice and
    the cut real): the page shows the middle up to its last whole sentence, then the
    ending, and says that no candidate ended."""
    from app.serving.service import CandidatesTicket, GenerationService, GenerationStream, InfillStream
    from tests.app_support import ScriptedTicket

    def start(self, loaded, prompt_ids, rows, *, strip=False):
        common = {"deadline": float("inf"), "clock": lambda: 0.0, "prompt_tokens": len(prompt_ids),
                  "encode": loaded.tokenizer.encode, "decode": loaded.tokenizer.decode}
        streams = [GenerationStream(loaded.name, ScriptedTicket([text], delay=0.2, reason=reason),
                                    strip=strip, **common)
                   for text, reason in (("The bird sang. You were very kind and", "stop"),
                                        ("The bird flew up high and", "length"))]
        return InfillStream(loaded.name, ticket=CandidatesTicket(streams, prompt_ids, rows.pick,
                                                                 logprobs=False),
                            counted=False, **common)
    monkeypatch.setattr(GenerationService, "_start", start)
    page.goto(base_url + "/infill")
    fill_form(page, {"model": "endless", "first": "Lily saw a bird.", "candidates": "2",
                     "last": "The bird flew away.", "temperature": "0", "max_new_tokens": "12"})
    page.click("#infill-submit")
    page.wait_for_selector(".status-text.is-streaming")
    assert "Writing 2 candidate middles" in page.locator(".status-text").text_content()
    page.wait_for_selector(".status-text:not(.is-streaming)")
    story = page.locator("#output-text")
    assert story.locator("mark.story-middle").text_content() == "The bird sang."
    assert story.locator(".story-last").text_content() == "The bird flew away."
    assert "kind and" not in story.text_content()
    assert "none of the 2 candidate middles ended by itself" in page.locator(".status").text_content()


def test_admin_lists_models_and_perplexities(page, base_url):
    page.goto(base_url + "/admin")
    rows = page.locator("table").first.locator("tbody tr")
    assert rows.count() == len(MODELS)
    text = page.locator("table").first.text_content()
    for name in MODELS:
        assert name in text
    assert f"{SUMMARY['val_perplexity']:.2f}" in text
    assert "broken" in page.locator(".load-errors").text_content()
    image = page.locator(".curve img").first
    image.scroll_into_view_if_needed()
    page.wait_for_function("() => { const i = document.querySelector('.curve img');"
                           " return i.complete && i.naturalWidth > 0; }")


def test_copy_button_copies_the_story(browser, base_url):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    try:
        page = context.new_page()
        page.goto(base_url + "/")
        fill_form(page, {"model": "endless", "prompt": "Once", "temperature": "0",
                         "max_new_tokens": "5"})
        page.click("#generate-submit")
        page.wait_for_selector(".status-text:not(.is-streaming)")
        page.click(".copy-button")
        sync_api.expect(page.locator(".copy-button")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == "Once" + ENDLESS_CHAR * 5
    finally:
        context.close()


# ---- screenshots for the docs -------------------------------------------------------------

def test_screenshots(screenshots, browser, app_config, checkpoint_dir):
    out = screenshots
    checkpoints = os.environ.get("FABLE_SCREENSHOTS_CHECKPOINTS", str(checkpoint_dir))
    experiments = os.environ.get("FABLE_SCREENSHOTS_EXPERIMENTS", str(ROOT / "experiments"))
    model = os.environ.get("FABLE_SCREENSHOTS_MODEL")
    prompt = os.environ.get("FABLE_SCREENSHOTS_PROMPT", "Once upon a time")
    first = os.environ.get("FABLE_SCREENSHOTS_FIRST", "Lily wanted to fly a kite.")
    last = os.environ.get("FABLE_SCREENSHOTS_LAST", "From then on, the kite hung in her room.")
    seed = os.environ.get("FABLE_SCREENSHOTS_SEED", "1")
    # the pages as a visitor meets them: each model's own sampling settings and length
    with served(app_config, FABLE_CHECKPOINT_DIR=checkpoints, FABLE_EXPERIMENTS_DIR=experiments,
                FABLE_DEFAULT_NEW_TOKENS=None, FABLE_MAX_BATCH=16, FABLE_REQUEST_TIMEOUT_S=60) as (_, url), \
            screenshot_page(browser) as page:
        for kind, fields in (("generate", {"prompt": prompt}),
                             ("infill", {"first": first, "last": last})):
            page.goto(url + ("/" if kind == "generate" else "/infill"))
            if model:
                fields["model"] = model
            fill_form(page, {**fields, "seed": seed})
            page.click(f"#{kind}-submit")
            page.wait_for_selector(".status-text:not(.is-streaming)")
            page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
            page.evaluate("() => document.querySelectorAll('details.sampling').forEach(d => { d.open = false; })")
            page.mouse.move(1, 1)
            page.screenshot(path=str(out / f"{kind}.png"), full_page=True)
        page.goto(url + "/admin")
        for image in page.locator(".curve img").all():
            image.scroll_into_view_if_needed()
        page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(out / "admin.png"), full_page=True)
    assert all((out / f"{name}.png").stat().st_size > 10_000
               for name in ("generate", "infill", "admin"))

