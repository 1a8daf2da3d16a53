"""The training page in a real browser, with the real training command: a text uploaded,
about twenty seconds of training watched (the curve gains points, a sample appears),
the run finished early and its model used on / and /compare; and the page at 375 px and
under the app's CSP. Skips as tests/pages/browser.py says."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from tests.pages.browser import (ALL_DONE, ROOT, browser, fill_form, page, screenshots, served,  # noqa: F401
                                 sync_api, watch_csp)

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.train]

WORDS = ("the fox ran to the old mill and saw a cat by the door . she said hello and "
         "they walked home under the tall trees while the sun went down .").split()


def story_text(chars: int = 40_000) -> str:
    """Prose-like text a character model learns quickly: a small vocabulary in shuffled
    sentences."""
    rng, sentences = random.Random(7), []
    while sum(map(len, sentences)) < chars:
        sentences.append(" ".join(rng.sample(WORDS, 9)).capitalize() + ".")
    return "\n".join(sentences) + "\n"


@pytest.fixture
def studio_url(app_config, checkpoint_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(checkpoint_dir / "tiny-gpt", models / "tiny-gpt")
    with served(app_config, FABLE_CHECKPOINT_DIR=str(models), FABLE_TRAIN_DIR=str(tmp_path / "runs"),
                FABLE_EXPERIMENTS_DIR=str(tmp_path / "experiments")) as (_, url):
        yield url


def start_from_form(page, url: str, text: Path, name: str, minutes: int = 1) -> None:
    """Upload ``text`` on the training page and start a char GPT run; on its page after."""
    page.goto(url + "/train")
    page.check("#text-upload")
    page.set_input_files("#field-upload", str(text))
    page.check("input[name=preset][value='char-gpt']")
    page.fill("#field-minutes", str(minutes))
    page.fill("#field-name", name)
    page.click("#train-submit")
    page.wait_for_url(f"**/train/{name}")


def chart_points(page, name: str = "data-points") -> int:
    return int(page.locator("#train-chart").get_attribute(name) or 0)


def test_a_text_trains_live_and_its_model_writes_on_the_story_and_compare_pages(page, studio_url, tmp_path):
    violations = watch_csp(page)
    text = tmp_path / "fox.txt"
    text.write_text(story_text())
    start_from_form(page, studio_url, text, "browser-fox")
    assert page.locator("#train-state").text_content() == "running"

    # about twenty seconds of training: validation points and a sample arrive
    page.wait_for_function("() => +(document.querySelector('#train-chart').dataset"
                           ".validationPoints || 0) >= 2 && document.querySelector("
                           "'#train-samples li')", timeout=90_000)
    before = chart_points(page)
    page.wait_for_function(f"() => +(document.querySelector('#train-chart').dataset.points"
                           f" || 0) > {before}", timeout=30_000)
    assert page.locator("#train-samples li pre").first.text_content().strip()
    assert page.locator("#train-chart canvas").count() == 1  # uPlot drew it
    assert float(page.locator("#figure-validation").text_content()) > 0
    assert page.locator("#train-progress").is_visible()

    # a second run is refused while this one trains
    page2 = page.context.new_page()
    page2.goto(studio_url + "/train")
    assert page2.locator("#train-submit").is_disabled()
    assert "browser-fox is training now" in page2.locator("#running-note").text_content()
    page2.close()

    page.click("#train-finish")  # stop now, keep the model
    # ?.: the click's POST and redirect load the page anew, and the predicate may run between
    page.wait_for_function("() => document.querySelector('#train-state')?.textContent === 'done'",
                           timeout=60_000)
    assert page.locator("#train-done").is_visible()
    assert page.locator("#train-actions").is_hidden()
    page.click("#model-page")  # its card, and its curves from the run's records
    page.wait_for_url("**/models/browser-fox")
    assert page.locator("#curves-heading").is_visible()
    assert page.locator("#curves-heading + p").text_content().count("1 most recent run") == 1
    page.go_back()

    page.click("#try-generate")
    page.wait_for_url("**/?model=browser-fox")
    assert page.locator("input[name=model][value='browser-fox']").is_checked()
    fill_form(page, {"prompt": "The fox", "max_new_tokens": "30"})
    page.click("#generate-submit")
    page.wait_for_selector(".status-text:not(.is-streaming)", timeout=30_000)
    assert page.locator(".output-generated").text_content()

    page.go_back()
    page.click("#try-compare")
    page.wait_for_function(ALL_DONE, timeout=30_000)
    models = [m.text_content() for m in page.locator(".compare-column .result-model").all()]
    assert "browser-fox" in models and len(models) == 2
    # its column wrote text (the other model, the tests' untrained tiny-gpt, may draw the
    # end of text at once from an empty prompt: its column can be empty)
    column = page.locator(".compare-column").nth(models.index("browser-fox"))
    assert column.locator(".output-generated").text_content()
    assert page.locator(".compare-column .stream-error-text").count() == 0
    assert not violations, violations


def test_without_javascript_a_run_starts_shows_its_figures_and_cancels(browser, studio_url, tmp_path):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        text = tmp_path / "fox.txt"
        text.write_text(story_text(20_000))
        start_from_form(page, studio_url, text, "no-script")
        assert page.locator("#train-state").text_content() == "running"
        deadline = time.monotonic() + 90
        while page.locator("#figure-step").text_content() == "–":  # what a refresh shows
            assert time.monotonic() < deadline
            time.sleep(1)
            page.reload()
        assert int(page.locator("#figure-step").text_content()) > 0
        page.click("#train-cancel")
        page.wait_for_url("**/train/no-script")
        assert page.locator("#train-state").text_content() == "cancelled"
        assert page.locator("#train-actions").count() == 0
    finally:
        context.close()


def test_the_form_fits_a_phone_and_says_what_is_wrong(browser, studio_url, tmp_path):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(studio_url + "/train")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        binary = tmp_path / "image.txt"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
        page.check("#text-upload")
        page.set_input_files("#field-upload", str(binary))
        page.fill("#field-name", "phone")
        page.click("#train-submit")
        assert "This is a binary file" in page.locator("#error-upload").text_content()
        assert page.locator(".error-summary").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()


def test_screenshot(screenshots, browser, app_config, tmp_path):
    """docs/screenshots/train.png: a run in progress, a minute into a 2-minute char GPT on
    Tiny Shakespeare (uploaded from ../shared when it is there, else generated prose)."""
    from tests.pages.browser import screenshot_page

    shakespeare = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    text = tmp_path / "input.txt"
    text.write_text(shakespeare.read_text()[:400_000] if shakespeare.is_file() else story_text())
    (tmp_path / "models").mkdir()
    with served(app_config, FABLE_CHECKPOINT_DIR=str(tmp_path / "models"),
                FABLE_TRAIN_DIR=str(tmp_path / "runs"),
                FABLE_EXPERIMENTS_DIR=str(tmp_path / "experiments")) as (_, url), \
            screenshot_page(browser) as page:
        start_from_form(page, url, text, "my-shakespeare", minutes=2)
        page.wait_for_function("() => +(document.querySelector('#train-chart').dataset"
                               ".validationPoints || 0) >= 4 && document.querySelectorAll("
                               "'#train-samples li').length >= 2", timeout=150_000)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(screenshots / "train.png"), full_page=True)
        page.click("#train-cancel")
    assert (screenshots / "train.png").stat().st_size > 10_000
