"""The first minute on the bundled models: what a newcomer meets after ``make serve``.

Headless Chromium against the app serving ``checkpoints/``: the infill page offers only
the models trained to infill (and the API refuses the others), the pages start on the
best model with its suggested prompt, the picker ranks by bits per character, the Output
card sits at the top of its column and stays in view, and the admin page shows no
server path. Skips as tests/pages/browser.py says.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
import torch

from models_src.checkpoint import read_config, suggested_prompt
from models_src.infill import trained_to_infill
from models_src.records import TrainingSummary
from models_src.sampling_defaults import GENERATION_CONFIG, SamplingDefaults
from models_src.tokenization import Tokenizer
from tests.pages.browser import ROOT, TIMEOUT_MS, browser, fill_form, serve, sync_api  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.server]

CHECKPOINTS = ROOT / "checkpoints"
BUNDLED = sorted(p for p in CHECKPOINTS.iterdir() if p.is_dir() and not p.name.startswith("."))


def _infills(path) -> bool:
    return trained_to_infill(TrainingSummary.from_dict(read_config(path)["training"]), Tokenizer.load(path))


def _bits(path) -> float:
    return read_config(path)["evaluation"]["bits_per_char"]


def own_settings(name: str) -> str:
    """How a bundled model samples, in the words the pages use."""
    config = json.loads((CHECKPOINTS / name / GENERATION_CONFIG).read_text())
    return SamplingDefaults.from_hf(config).described()


INFILLERS = [p.name for p in BUNDLED if _infills(p)]
BEST = min(BUNDLED, key=_bits).name


@pytest.fixture(scope="module")
def url(app_config, tmp_path_factory):
    from app import create_app

    threads = torch.get_num_threads()
    # experiment records outside the working directory: the page may show only their name
    app = create_app({**app_config, "FABLE_CHECKPOINT_DIR": str(CHECKPOINTS),
                      "FABLE_EXPERIMENTS_DIR": str(tmp_path_factory.mktemp("records")),
                      "FABLE_DEFAULT_NEW_TOKENS": 40})
    with serve(app) as address:
        yield address
    torch.set_num_threads(threads)


@pytest.fixture
def page(browser):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def offered(page) -> list[str]:
    return page.locator("input[name=model]").evaluate_all("inputs => inputs.map(i => i.value)")


def test_the_bundled_models_split_into_infillers_and_others():
    # two story models infill, so that compare can set them side by side; the Shakespeare
    # and books models were never taught
    assert INFILLERS == ["tinystories-gpt", "tinystories-gpt-mini"]


def test_compare_fills_in_the_middle_with_the_bundled_models(page, url):
    page.goto(url + "/compare")
    for box in page.locator("input[name=models]").all():
        box.set_checked(box.get_attribute("value") in INFILLERS)
    infill = page.locator("input[name=mode][value=infill]")
    assert infill.is_enabled() and page.locator("#infill-unavailable").count() == 0
    infill.check()
    fill_form(page, {"first": "Tom had a red kite.", "last": "Tom smiled and went home.", "seed": "7"})
    page.click("#compare-submit")
    page.wait_for_function("() => document.querySelectorAll('.compare-column').length == 2 && Array.from("
                           "document.querySelectorAll('.compare-column')).every(c => c.querySelector("
                           "'.status .status-text:not(.is-streaming)'))", timeout=120_000)
    columns = page.locator(".compare-column")
    assert sorted(columns.nth(i).locator(".result-model").text_content() for i in (0, 1)) == INFILLERS
    for i in (0, 1):
        column = columns.nth(i)
        assert not column.locator(".stream-error-text").count()
        text = column.locator(".output[aria-live]").text_content()
        assert "Tom had a red kite." in text and "Tom smiled and went home." in text
        # the middle ends on a complete sentence, never run into the given ending
        assert re.search(r"[.!?][\"'”’)]*\s+Tom smiled and went home\.", text), text


def test_the_infill_page_offers_only_the_models_trained_to_infill(page, url):
    page.goto(url + "/infill")
    assert offered(page) == INFILLERS
    assert page.locator("input[name=model]:checked").get_attribute("value") == INFILLERS[0]
    page.goto(url + "/admin")
    tagged = page.locator("tr:has(.tag:text-is('infill')) th[scope=row]").all_text_contents()
    assert [name.replace("infill", "").strip() for name in tagged] == INFILLERS


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
def test_the_api_refuses_a_suffix_for_a_model_that_does_not_infill(url, path):
    other = next(p.name for p in BUNDLED if p.name not in INFILLERS)
    body = json.dumps({"model": other, "prompt": "Lily wanted to fly a kite.",
                       "suffix": "She was happy.", "stream": False}).encode()
    request = urllib.request.Request(url + path, body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    error = json.loads(refused.value.read())["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message == (f"model {other!r} was not trained to infill "
                       f"(models that do: {', '.join(INFILLERS)})")


def test_the_pages_start_on_the_best_model_with_its_suggested_prompt(page, url):
    page.goto(url + "/")
    assert page.locator("input[name=model]:checked").get_attribute("value") == BEST == "tinystories-gpt"
    prompt = page.locator("#field-prompt")
    assert prompt.input_value() == suggested_prompt(CHECKPOINTS / BEST)  # real text, not a placeholder
    for path in BUNDLED:  # choosing another model offers that model's prompt, while untouched
        page.check(f"input[name=model][value='{path.name}']")
        assert prompt.input_value() == suggested_prompt(path)
    assert suggested_prompt(CHECKPOINTS / "char-gpt-shakespeare") == "ROMEO:"
    prompt.fill("My own words")  # once edited, the text is the user's
    page.check(f"input[name=model][value='{BEST}']")
    assert prompt.input_value() == "My own words"


@pytest.mark.parametrize("path, button", [("/", "#generate-submit"), ("/infill", "#infill-submit")])
def test_a_first_click_writes_from_the_examples(page, url, path, button):
    """The examples are real text: the button works before anything is typed (the infill
    page used to answer a first click with "'first' is required")."""
    page.goto(url + path)
    page.click(button)
    page.wait_for_selector("#result .status .status-text:not(.is-streaming)", timeout=120_000)
    assert page.locator(".field-error").count() == 0
    text = page.locator("#result .output[aria-live]").text_content()
    example = ["Lily wanted to fly a kite.", "best friends."] if path == "/infill" \
        else [suggested_prompt(CHECKPOINTS / BEST)]
    assert all(part in text for part in example) and len(text) > 80, text


def test_the_picker_compares_models_by_bits_per_character(page, url):
    page.goto(url + "/")
    for path in BUNDLED:
        option = page.locator(f"label.model-option:has(input[value='{path.name}'])")
        evaluation = read_config(path)["evaluation"]
        assert option.locator(".model-score-value").text_content() == f"{evaluation['bits_per_char']:.3f}"
        assert option.locator(".model-score-label").text_content() == "bits/char"
        vocabulary = f"{read_config(path)['tokenizer']['vocab_size']:,} tokens"
        assert option.locator(".model-score-sub").text_content() == (
            f"ppl {evaluation['perplexity']:.2f} · {vocabulary}")


@pytest.mark.parametrize("kind", ["generate", "infill"])
def test_the_output_card_starts_at_the_top_and_stays_in_view(page, url, kind):
    page.goto(url + ("/" if kind == "generate" else "/infill"))

    def tops():
        return page.evaluate("""() => [document.querySelector('form.form-panel'),
                                        document.querySelector('.output-panel')]
                                       .map(e => e.getBoundingClientRect().top)""")

    form_top, output_top = tops()
    assert abs(form_top - output_top) <= 1
    fields = {"prompt": "Once upon a time"} if kind == "generate" else {
        "first": "Lily wanted to fly a kite.", "last": "From then on, Lily loved the wind."}
    fill_form(page, {**fields, "seed": "1", "max_new_tokens": "40"})
    page.click(f"#{kind}-submit")
    page.wait_for_selector(".status-text:not(.is-streaming)")
    assert 0 <= tops()[1] <= 100  # scrolled down to the button, the text is in view
    page.evaluate("window.scrollTo(0, 0)")
    form_top, output_top = tops()
    assert abs(form_top - output_top) <= 1  # the text in it did not move it down
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # at the Generate button
    _, output_top = tops()
    assert 0 <= output_top <= 100  # it followed: still in view at the top of the window


@pytest.mark.parametrize("path, button", [("/", "#generate-submit"), ("/infill", "#infill-submit")])
def test_the_button_is_in_view_with_the_sampling_options_folded_away(page, url, path, button):
    page.goto(url + path)
    assert page.locator("details.sampling").get_attribute("open") is None
    # the summary says how the chosen model samples, and follows the picker
    summary = page.locator("details.sampling > summary")
    assert own_settings(BEST) in summary.text_content()  # the story model's own
    if path == "/":
        page.check("input[name=model][value='char-lstm-shakespeare']")
        sync_api.expect(summary).to_contain_text(own_settings("char-lstm-shakespeare"))
        page.check("input[name=model][value='tinystories-gpt']")
    box = page.locator(button).bounding_box()
    assert box["y"] + box["height"] <= 900  # above the fold of a 1280 x 900 window
    page.click("details.sampling > summary")
    assert page.locator("#field-temperature").is_visible()
    # a value outside the schema's limits: refused, and the options open at the field
    page.fill("#field-temperature", "-1")
    page.locator("details.sampling > summary").click()  # folded again before sending
    page.click(button)
    page.wait_for_selector(".field-error")
    assert page.locator("details.sampling").get_attribute("open") is not None
    assert page.locator("#field-temperature").is_visible()


def test_the_admin_page_shows_no_server_path(page, url):
    page.goto(url + "/admin")
    html = page.content()
    assert str(ROOT) not in html and "/tmp/" not in html
    note = page.locator("#runs-heading ~ .panel-note code").text_content()
    assert note.startswith("records") and "/" not in note


def test_the_admin_table_fits_1280_px_with_dataset_names_and_one_size_convention(page, url):
    """The models table shows every column at 1280 px (the Health column was clipped),
    datasets by name, not as paths, and recurrent models by their hidden units, as README
    and the model pages give them."""
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(url + "/admin")
    wrap = page.locator(".table-wrap").first
    assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth")
    rows = {row.locator("th a").text_content(): row for row in wrap.locator("tbody tr").all()}
    for name, row in rows.items():
        cells = row.locator("td")
        dataset = cells.nth(3).text_content().strip()
        assert dataset in ("tinystories", "tinyshakespeare", "books"), (name, dataset)
        size = cells.nth(0).locator(".sub").text_content()
        config = read_config(CHECKPOINTS / name)["model"]
        if config["arch"] == "lstm":
            assert size == f"{config['n_layer']} × {config['n_hidden']} hidden", (name, size)
        else:
            assert size.startswith(f"{config['n_layer']} × {config['n_embd']} · context"), (name, size)


#: Where each .model-name's text wraps: the characters that end a line, but the last.
LINE_ENDS = """() => Array.from(document.querySelectorAll('.model-name')).map(name => {
  const text = name.firstChild, ends = [];
  let top = null;
  for (let i = 0; i < text.length; i++) {
    const range = document.createRange();
    range.setStart(text, i); range.setEnd(text, i + 1);
    const y = range.getBoundingClientRect().top;
    if (top !== null && y > top + 1) ends.push(text.data[i - 1]);
    top = y;
  }
  return [text.data, ends];
})"""


def test_a_phone_sees_whole_names_no_shortcut_and_a_pressed_token_view(browser, url):  # noqa: F811
    context = browser.new_context(viewport={"width": 375, "height": 800}, has_touch=True,
                                  is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(url + "/")
        for name, ends in page.evaluate(LINE_ENDS):
            assert all(end == "-" for end in ends), (name, ends)  # broken at hyphens only
        assert not page.locator(".shortcut-hint").first.is_visible()  # no Ctrl+Enter on a phone
        fill_form(page, {"prompt": "Once upon a time", "seed": "1", "max_new_tokens": "20"})
        page.click("#generate-submit")
        page.wait_for_selector(".status-text:not(.is-streaming)")
        toggle = page.locator(".token-toggle")
        before = toggle.evaluate("b => getComputedStyle(b).backgroundColor")
        toggle.click()
        assert toggle.get_attribute("aria-pressed") == "true"
        # it looks pressed (polled: the button's colours ease in)
        page.wait_for_function("before => getComputedStyle(document.querySelector('.token-toggle'))"
                               ".backgroundColor !== before", arg=before)
        # the models list fits the phone: its table scrolls inside its own box, the page not
        page.goto(url + "/models")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.locator(".models-table a.button").first.click()
        page.wait_for_url("**/?model=*")
        assert page.locator("#field-prompt").input_value()
    finally:
        context.close()


def test_an_empty_state_with_code_in_it_reads_as_one_sentence(page, url):
    """The empty records' note keeps its code span in the line it belongs to (as grid items,
    the text before it, the code and the rest each took a line of their own)."""
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(url + "/admin")
    state = page.locator(".empty-state", has=page.locator("code")).first
    same_line = state.evaluate("""p => {
        const range = document.createRange();
        range.setStart(p.firstChild, 0); range.setEnd(p.firstChild, 1);
        return Math.abs(range.getBoundingClientRect().top - p.querySelector('code').getBoundingClientRect().top) < 8;
    }""")
    assert same_line, state.text_content()


def test_the_model_page_reads_once_through(page, url):
    """The card is the page's body and holds the samples, read once; the per-layer table is
    folded away; the date is the training run's, not the clone's (it was 5,805 px tall)."""
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(url + f"/models/{BEST}")
    assert page.locator(".model-page-samples").count() == 0
    assert page.locator(".model-page-card blockquote").count() >= 3  # the card's samples
    run_id = read_config(CHECKPOINTS / BEST)["training"]["run_id"]
    day = f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}"
    assert f"trained {day}" in page.locator(".model-page-facts").first.text_content()
    assert not page.locator("#layer-table").is_visible()
    assert page.evaluate("document.documentElement.scrollHeight") < 4500
