"""The experiments page in a real browser (headless Chromium through Playwright, as
tests/pages/browser.py, whose fixtures and skips these share): uPlot drawing two runs
overlaid with a legend naming both, the filter form, a phone's width, the page without
JavaScript, and no Content-Security-Policy violation.

``FABLE_SCREENSHOTS=1`` also writes docs/screenshots/experiments.png from the records in
``FABLE_SCREENSHOTS_EXPERIMENTS`` (default: experiments/ in the repository), real runs
only: without records it skips.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

# test_browser's module-level skips (no Chromium, no Playwright, no htmx) apply here too
from tests.pages.browser import (TIMEOUT_MS, browser, page, screenshot_page,  # noqa: F401 (fixtures)
                          screenshots, served, watch_csp)

ROOT = Path(__file__).resolve().parents[2]
UPLOT = [ROOT / "static" / "vendor" / name for name in ("uPlot.iife.min.js", "uPlot.min.css")]
pytestmark = [pytest.mark.browser, pytest.mark.server]

if not all(path.is_file() for path in UPLOT):
    pytest.skip("uPlot is not installed in static/vendor/ (make assets)", allow_module_level=True)


def log_curve(root, experiment, model, architecture, parameters, steps, final_train, final_val,
              start, run_id=None, tokens_per_s=None, **final):
    """A run whose losses fall from ``start`` towards their final values at ``steps``;
    ``final`` figures (bits_per_char, token_accuracy) scale with the validation loss."""
    from models_src.records import ExperimentLog

    log = ExperimentLog(root, experiment, run_id, config={})
    last = steps[-1]
    for step in steps:
        fall = math.exp(-5 * step / last)
        train = final_train + (start - final_train) * fall
        val = final_val + (start - final_val) * fall
        scale = {"bits_per_char": val / final_val, "token_accuracy": final_val / val}
        log.log(model=model, architecture=architecture, parameters=parameters, step=step,
                epoch=step / last, train_loss=train, val_loss=val, val_perplexity=math.exp(val),
                wall_time_s=float(step), kind="train_eval", split="validation",
                tokens_per_s=tokens_per_s,
                **{name: value * scale[name] for name, value in final.items()})
    return log.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    runs = [log_curve(root, "shakespeare", "char-gpt", "gpt", 818_816, range(100, 1001, 100),
                      1.48, 1.73, 4.26, bits_per_char=2.5, token_accuracy=0.48),
            log_curve(root, "books", "word-lstm", "lstm", 2_674_861, range(50, 851, 50),
                      4.46, 4.40, 8.3, token_accuracy=0.21)]
    return root, runs


@pytest.fixture(scope="module")
def base_url(app_config, store):
    with served(app_config, FABLE_EXPERIMENTS_DIR=str(store[0])) as (_, url):
        yield url


def wait_for_chart(page, series: int) -> None:
    """Until uPlot has drawn ``series`` lines (functions, not expressions: Playwright
    polls expressions with eval, which the CSP forbids)."""
    page.wait_for_selector("#experiment-chart canvas")
    page.wait_for_function("(n) => document.getElementById('experiment-chart')"
                           ".getAttribute('data-series') === String(n)", arg=series)


def painted(page) -> int:
    """How many of the chart canvas's pixels are painted."""
    return page.locator("#experiment-chart canvas").evaluate(
        "canvas => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width,"
        " canvas.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0;"
        " return n; }")


# ---- the chart ----------------------------------------------------------------------------

def test_two_runs_are_overlaid_with_a_legend(page, base_url, store):
    _, runs = store
    violations = watch_csp(page)
    page.goto(base_url + "/experiments")
    wait_for_chart(page, 4)  # a training and a validation line per run
    assert painted(page) > 1000
    legend = page.locator("#experiment-chart .u-legend .u-series")
    assert legend.count() == 4  # the four lines
    text = page.locator("#experiment-chart .u-legend").text_content()
    for run in runs:
        assert f"{run} train" in text and f"{run} validation" in text
    # validation dashed, training solid; each run in its table mark's colour
    markers = [legend.nth(i).locator(".u-marker").evaluate(
        "m => [getComputedStyle(m).borderTopStyle, getComputedStyle(m).borderTopColor]")
        for i in range(4)]
    assert [style for style, _ in markers] == ["solid", "dashed", "solid", "dashed"]
    swatches = page.locator(".runs-table .run-swatch")
    assert swatches.count() == 2
    colours = [swatches.nth(i).evaluate("s => getComputedStyle(s).backgroundColor")
               for i in range(2)]
    assert colours[0] != colours[1]
    assert [colour for _, colour in markers] == [colours[0], colours[0], colours[1], colours[1]]
    assert page.locator(".runs-table tbody tr").count() == 2
    assert not violations, violations


def test_the_filter_form_narrows_the_runs_and_the_chart(page, base_url, store):
    _, runs = store
    violations = watch_csp(page)
    page.goto(base_url + "/experiments")
    wait_for_chart(page, 4)
    page.select_option("#filter-experiment", "books")
    page.click("#experiments-submit")
    page.wait_for_url("**/experiments?**")
    assert "experiment=books" in page.url  # the selection is in the URL, to share
    assert page.locator(".runs-table tbody tr").count() == 1
    wait_for_chart(page, 2)
    assert page.locator("#filter-experiment").input_value() == "books"
    # pick one run out of two: the checkboxes, then "Draw checked runs"
    page.goto(base_url + "/experiments")
    wait_for_chart(page, 4)
    page.uncheck(f"input[name=run][value='{runs[1]}']")
    page.click("#draw-submit")
    page.wait_for_url(f"**run={runs[0]}**")
    wait_for_chart(page, 2)
    assert runs[1] not in page.locator("#experiment-chart .u-legend").text_content()
    assert not violations, violations


def test_a_phone_width_resizes_the_chart_and_scrolls_only_the_table(page, base_url):
    page.goto(base_url + "/experiments")
    wait_for_chart(page, 4)
    wide = page.locator("#experiment-chart canvas").bounding_box()["width"]
    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_function("() => document.querySelector('#experiment-chart canvas')"
                           ".getBoundingClientRect().width < 375")
    chart = page.locator("#experiment-chart canvas").bounding_box()
    assert chart["width"] < wide and chart["x"] >= 0 and chart["x"] + chart["width"] <= 375
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375  # no page scroll
    table = page.locator(".runs-table-wrap")
    box = table.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    assert table.evaluate("t => t.scrollWidth > t.clientWidth")  # it scrolls in its own box
    for control in ("#filter-experiment", "#filter-model", "#filter-architecture",
                    "#experiments-submit"):
        right = page.locator(control).bounding_box()
        assert right["x"] + right["width"] <= 375, control


def test_without_javascript_the_table_and_plots_remain(browser, base_url, store):
    _, runs = store
    context = browser.new_context(java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(base_url + "/experiments")
        assert page.locator(".runs-table tbody tr").count() == 2
        images = page.locator(".experiment-pngs img")
        assert images.count() == 2 and images.first.is_visible()
        page.select_option("#filter-model", "char-gpt")
        page.click("#experiments-submit")
        page.wait_for_url("**model=char-gpt**")
        assert page.locator(".runs-table tbody tr").count() == 1
        assert runs[0] in page.locator(".runs-table").text_content()
    finally:
        context.close()


# ---- the screenshot for the docs ----------------------------------------------------------

def test_screenshot(screenshots, browser, app_config):  # noqa: F811
    out = screenshots
    records = Path(os.environ.get("FABLE_SCREENSHOTS_EXPERIMENTS", ROOT / "experiments"))
    if not any(records.glob("*/*.parquet")):
        pytest.skip(f"no experiment records in {records}: train something first, or set "
                    "FABLE_SCREENSHOTS_EXPERIMENTS")
    with served(app_config, FABLE_EXPERIMENTS_DIR=str(records)) as (_, url), \
            screenshot_page(browser) as page:
        page.goto(url + "/experiments")
        page.wait_for_selector("#experiment-chart canvas")
        page.mouse.move(1, 1)
        page.screenshot(path=str(out / "experiments.png"), full_page=True)
    assert (out / "experiments.png").stat().st_size > 10_000
