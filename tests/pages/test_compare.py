"""The compare page and the token view through Flask's test client: the form's validation,
a URL that fills the form in, the no-JS answer with finished columns, the htmx columns
and their streams (figures and token view in the last event), and escaping.

The browser side (columns streaming side by side, the token view's tooltip) is
tests/pages/test_browser_compare.py.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from html import unescape

import pytest

from tests.app_support import ENDLESS_CHAR, TEXT, hold_row
from tests.pages.page_helpers import FORM, INFILL, parse_sse, stream_url, texts, token_of

RUN = {"models": ["endless", "tiny-gpt"], "prompt": "Once", "temperature": "0",
       "max_new_tokens": "6", "seed": "3"}


def columns(html: str) -> list[str]:
    return re.findall(r'<article class="result compare-column".*?</article>', html, re.S)


def generated(column: str) -> str:
    return unescape(re.search(r'<span class="output-generated"[^>]*>(.*?)</span>', column,
                              re.S).group(1))


def figures(html: str) -> dict[str, float]:
    return {key: float(value) for key, value in
            re.findall(r'data-stat="(\w+)" data-value="([^"]+)"', html)}


def tokens_in(html: str) -> list:
    """The token view's data in a done event."""
    match = re.search(r'<span class="token-data" hidden data-tokens="([^"]*)"></span>', html)
    assert match, html[-500:]
    return json.loads(unescape(match.group(1)))


def error_of(html: str, field: str) -> str:
    return unescape(re.search(rf'<p class="field-error" id="error-{field}">(.*?)</p>', html,
                              re.S).group(1))


# ---- the form -----------------------------------------------------------------------------

def test_compare_page_is_a_get_form_with_a_checkbox_per_model(client):
    response = client.get("/compare")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'method="get" action="/compare"' in html and 'hx-get="/compare/start"' in html
    boxes = re.findall(r'<input type="checkbox" id="([\w-]+)" name="models" value="([\w-]+)"'
                       r'( checked)?', html)
    assert [name for _, name, _ in boxes] == ["endless", "tiny-gpt", "tiny-lstm"]
    assert [bool(c) for _, _, c in boxes] == [True, True, False]  # two to start with
    assert [i for i, _, _ in boxes] == ["field-models", "field-models-1", "field-models-2"]
    for i, _, _ in boxes:
        assert f'<label class="model-option" for="{i}">' in html
    assert html.count("· infills") == 2  # endless and tiny-gpt; tiny-lstm cannot
    assert 'name="mode" value="generate" checked' in html
    for field in ("prompt", "first", "last", "temperature", "max_new_tokens", "seed", "stop"):
        assert f'<label for="field-{field}">' in html
    assert '<button type="submit" id="compare-submit" name="run" value="1"' in html
    assert "data-autostart" not in html and "compare-column" not in html
    assert "/static/compare.js" in html and "/static/tokens.js" in html
    assert "<script>" not in html and "style=" not in html  # nothing inline (the CSP)


def test_a_url_fills_the_form_in_and_asks_the_script_to_start(client):
    html = client.get("/compare?models=tiny-lstm&models=endless&mode=generate&prompt=Hi%20%3Cb%3E"
                      "&temperature=0.5&seed=9&stop=The%20end.%5Cn").get_data(as_text=True)
    checked = re.findall(r'name="models" value="([\w-]+)" checked', html)
    assert checked == ["endless", "tiny-lstm"]
    assert re.search(r'<textarea id="field-prompt"[^>]*>\nHi &lt;b&gt;</textarea>', html)
    assert 'id="field-temperature" name="temperature" type="number" value="0.5"' in html
    assert 'name="seed" type="text" value="9"' in html
    assert 'value="The end.\\n"' in html  # the stop box as typed
    assert re.search(r'<form id="compare-form"[^>]*data-autostart', html)
    assert "compare-column" not in html  # nothing ran: the script starts it (or the user)
    infill = client.get("/compare?models=endless&models=tiny-gpt&mode=infill&first=A.&last=B.")
    assert 'name="mode" value="infill" checked' in infill.get_data(as_text=True)


@pytest.mark.parametrize("query, field, words", [
    ({"models": ["endless"]}, "models", "choose 2 to 4 models to compare; 1 is chosen"),
    ({"models": []}, "models", "none is chosen"),
    ({"models": ["endless", "endless"]}, "models", "1 is chosen"),  # each model counts once
    ({"models": ["endless", "tiny-gpt", "tiny-lstm", "a", "b"]}, "models", "5 are chosen"),
    ({"models": ["endless", "nope"]}, "models", "'nope' is not a loaded model"),
    ({"models": ["endless", "tiny-lstm"], "mode": "infill", "first": "A.", "last": "B."},
     "models", "'tiny-lstm' was not trained to infill"),
    ({"mode": "poem"}, "mode", "'mode' must be generate or infill, got 'poem'"),
    ({"top_p": "5"}, "top_p", "Top-p must be above 0 and at most 1, got 5"),
    ({"max_new_tokens": "100000"}, "max_new_tokens", "between 1 and 512"),
    ({"mode": "infill", "first": "A.", "last": " "}, "last", "Last sentence is required"),
])
def test_invalid_comparisons_are_refused_field_by_field(client, query, field, words):
    response = client.get("/compare", query_string={**RUN, **query, "run": "1"})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert words in error_of(html, field)
    assert 'class="error-summary" role="alert"' in html
    assert "compare-column" not in html  # nothing ran
    # htmx: the form again, in place, with the same message
    fragment = client.get("/compare/start", query_string={**RUN, **query})
    assert fragment.status_code == 200
    assert fragment.headers["HX-Retarget"] == "#compare-form"
    assert words in error_of(fragment.get_data(as_text=True), field)


def test_compare_starts_on_the_pages_model_and_the_next_best(make_app):
    def ticked(**settings):
        html = make_app(**settings).test_client().get("/compare").get_data(as_text=True)
        return re.findall(r'name="models" value="([\w-]+)" checked', html)
    # the fewest bits per character first (tiny-gpt is the only one with a figure here)
    assert ticked() == ["endless", "tiny-gpt"]  # in the picker's order
    assert ticked(FABLE_DEFAULT_MODEL="tiny-lstm") == ["tiny-gpt", "tiny-lstm"]


def test_errors_link_to_and_focus_the_first_field_in_error(client):
    html = client.get("/compare", query_string={**RUN, "models": "endless", "top_k": "0",
                                                "run": "1"}).get_data(as_text=True)
    assert "There are 2 problems" in html
    assert '<a href="#field-models">Models: choose 2 to 4' in html
    assert re.search(r'id="field-models"[^>]*checked autofocus', html)
    assert 'aria-describedby="error-models"' in html
    assert re.search(r'id="field-top_k"[^>]*aria-invalid="true"', html)


# ---- without JavaScript: the finished columns ----------------------------------------------

def test_no_js_comparison_answers_with_finished_columns_and_figures(client):
    response = client.get("/compare", query_string={**RUN, "run": "1"})
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    found = columns(html)
    assert len(found) == 2 and "sse-connect" not in html
    assert [re.search(r'class="result-model"[^>]*>([^<]+)<', c).group(1) for c in found] == \
        ["endless", "tiny-gpt"]
    assert generated(found[0]) == ENDLESS_CHAR * 6
    assert len(generated(found[1])) == 6  # random weights: six characters of something
    for column in found:
        assert "Cut at the token limit · 6 tokens" in column and "seed 3" in column
        assert '<span class="output-prompt">Once</span>' in column
        stats = figures(column)
        assert stats["tokens_per_s"] > 0 and stats["ttft_ms"] >= 0
        assert stats["logprob_per_char"] <= 0
        assert "token-data" not in column  # the token view needs JavaScript
    assert figures(found[0])["logprob_per_char"] > -0.01  # it always writes "o", surely
    assert 'name="models" value="endless" checked' in html  # the form as submitted


def test_no_js_comparison_with_the_same_seed_writes_the_same_texts(client):
    first, second = (client.get("/compare", query_string={**RUN, "temperature": "1", "run": "1"})
                     .get_data(as_text=True) for _ in range(2))
    assert [generated(c) for c in columns(first)] == [generated(c) for c in columns(second)]


def test_the_figures_are_the_completions_own(app):
    """Mean log-probability per character: the sum of the tokens' log-probabilities over
    the text's characters, the same as the completion's own log-probabilities give."""
    from werkzeug.datastructures import MultiDict

    from app.pages.comparison import read_comparison, run_comparison
    from models_src.sampling import SamplingParams

    args = MultiDict([("models", "tiny-gpt"), ("models", "tiny-lstm"), ("prompt", "Once"),
                      ("temperature", "1"), ("max_new_tokens", "40"), ("seed", "5")])
    service = app.extensions["fable.service"]
    with app.test_request_context():
        comparison = read_comparison(args)
        results = run_comparison(comparison)
        for job, result in zip(comparison.jobs, results):
            params = SamplingParams(**job.values, logprobs=0)
            completion = service.generate(job.model, "Once", params)
            assert completion.text == result.text
            expected = math.fsum(e.logprob for e in completion.logprobs) / len(completion.text)
            assert result.stats.logprob_per_char == pytest.approx(expected, abs=1e-9)
            assert result.stats.tokens == completion.completion_tokens
            assert result.stats.tokens_per_s > 0 and result.stats.ttft_ms > 0


@contextmanager
def rows_kept(service):
    """Rows given back inside the block are given back when it ends: a short generation
    that finishes meanwhile still holds its row, so a test of a full server does not race
    the decoding thread (6 tokens can end before the next column asks for its row)."""
    release, kept = service.scheduler.release, []

    def keep() -> None:
        if kept and kept[0] is None:  # the block has ended
            release()
        else:
            kept.append(1)
    service.scheduler.release = keep
    try:
        yield
    finally:
        service.scheduler.release = release
        for _ in kept:
            release()
        kept[:] = [None]


def test_no_js_comparison_reports_a_busy_column_and_runs_the_others(make_app):
    app = make_app(FABLE_MAX_BATCH=1, FABLE_QUEUE_TIMEOUT_S=0)
    service = app.extensions["fable.service"]
    with rows_kept(service):
        response = app.test_client().get("/compare", query_string={**RUN, "run": "1"})
    assert response.status_code == 200
    found = columns(response.get_data(as_text=True))
    assert generated(found[0]) == ENDLESS_CHAR * 6
    assert "server busy" in found[1] and generated(found[1]) == ""
    assert service.active == 0
    held = hold_row(service)
    try:  # no column could start: the page says why, with the status
        response = app.test_client().get("/compare", query_string={**RUN, "run": "1"})
    finally:
        held.close()
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert service.active == 0


def test_no_js_comparison_counts_each_column_against_the_rate_limit(make_app):
    client = make_app(FABLE_RATE_LIMIT=3).test_client()
    assert client.get("/compare", query_string={**RUN, "run": "1"}).status_code == 200
    response = client.get("/compare", query_string={**RUN, "run": "1"})  # 2 + 2 > 3
    assert response.status_code == 429
    assert "too many generation requests" in response.get_data(as_text=True)


def test_no_js_infill_comparison_marks_each_middle(client):
    query = {**RUN, "mode": "infill", "first": "Lily saw a ball.", "last": "The end.",
             "max_new_tokens": "5", "run": "1"}
    html = client.get("/compare", query_string=query).get_data(as_text=True)
    found = columns(html)
    assert len(found) == 2
    assert '<span class="story-first">Lily saw a ball.</span>' in found[0]
    assert f'<mark class="story-middle">{ENDLESS_CHAR * 5}</mark>' in found[0]
    assert '<span class="story-last">The end.</span>' in found[0]
    assert "the middle each model wrote" in html and "Grey text" not in html


# ---- htmx: a stream per column -------------------------------------------------------------

def test_htmx_start_opens_one_stream_per_column_and_pushes_the_shareable_url(client):
    response = client.get("/compare/start", query_string={**RUN, "seed": "", "stop": r"x\n"})
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    urls = [unescape(u) for u in re.findall(r'sse-connect="([^"]+)"', html)]
    assert len(urls) == 2 and all(u.startswith("/compare/generate/stream?job=") for u in urls)
    jobs = [token_of(client, u) for u in urls]
    assert [j["model"] for j in jobs] == ["endless", "tiny-gpt"]
    assert jobs[0]["seed"] == jobs[1]["seed"]  # one seed, picked once
    assert {k: v for k, v in jobs[0].items() if k != "model"} == \
        {k: v for k, v in jobs[1].items() if k != "model"}
    assert 'sse-swap="done"' in html and 'sse-swap="failed"' in html
    # the URL holds the whole comparison, its seed included
    pushed = response.headers["HX-Push-Url"]
    assert pushed == (f"/compare?models=endless&models=tiny-gpt&mode=generate&prompt=Once"
                      f"&temperature=0.0&max_new_tokens=6&seed={jobs[0]['seed']}&stop=x%5Cn")
    assert jobs[0]["stop"] == ["x\n"]
    # the form comes back out of band, its button busy, the seed left as typed (empty)
    assert re.search(r'<form id="compare-form"[^>]*hx-swap-oob="true"', html)
    assert re.search(r'id="compare-submit"[^>]*class="[^"]*is-busy[^"]*"\s*disabled>Comparing…',
                     html)
    assert 'name="seed" type="text" value=""' in html
    # the pushed URL fills the form in again, seed and all
    again = client.get(pushed).get_data(as_text=True)
    assert f'name="seed" type="text" value="{jobs[0]["seed"]}"' in again


def test_column_stream_carries_figures_and_token_view_in_its_last_event(client):
    # seed 5: tiny-gpt writes 12 tokens, two of them special ones (no text of their own)
    query = {**RUN, "temperature": "1", "seed": "5", "max_new_tokens": "12"}
    html = client.get("/compare/start", query_string=query).get_data(as_text=True)
    for url in (unescape(u) for u in re.findall(r'sse-connect="([^"]+)"', html)):
        response = client.get(url)
        assert response.mimetype == "text/event-stream"
        events = parse_sse(response.get_data(as_text=True))
        assert [e["event"] for e in events][-1] == "done" and not texts(events, "failed")
        text = unescape("".join(texts(events)))
        done = texts(events, "done")[0]
        assert "Cut at the token limit · 12 tokens" in done
        assert "hx-swap-oob" not in done  # the compare page's button is compare.js's
        assert done.startswith('<span class="status-text">')
        stats = figures(done)
        tokens = tokens_in(done)
        assert "".join(t[0] for t in tokens) == text  # the tokens spell the text
        assert len(tokens) == 12
        for piece, logprob, alternatives in tokens:
            assert logprob <= 0 and len(alternatives) == 5
            assert all(a <= 0 for _, a in alternatives)
            likelihoods = [a for _, a in alternatives]
            assert likelihoods == sorted(likelihoods, reverse=True)
            assert logprob <= alternatives[0][1] + 1e-3  # the likeliest is at least as likely
        mean = math.fsum(t[1] for t in tokens) / len(text)
        assert stats["logprob_per_char"] == pytest.approx(mean, abs=1e-3)


def test_infill_columns_stream_from_the_infill_endpoint(client):
    query = {**RUN, "mode": "infill", "first": "Lily saw a ball.", "last": "The end.",
             "max_new_tokens": "5"}
    html = client.get("/compare/start", query_string=query).get_data(as_text=True)
    assert html.count('<mark class="story-middle" sse-swap="message"') == 2
    urls = [unescape(u) for u in re.findall(r'sse-connect="([^"]+)"', html)]
    assert all(u.startswith("/compare/infill/stream?job=") for u in urls)
    events = parse_sse(client.get(urls[0]).get_data(as_text=True))
    assert "".join(texts(events)) == ENDLESS_CHAR * 5
    assert "".join(t[0] for t in tokens_in(texts(events, "done")[0])) == ENDLESS_CHAR * 5
    # an infill link is not a generate link
    wrong = client.get(urls[0].replace("/infill/", "/generate/")).get_data(as_text=True)
    assert "link is invalid" in wrong


def test_column_stream_of_a_bad_token_fails_then_ends(client):
    events = parse_sse(client.get("/compare/generate/stream?job=nope").get_data(as_text=True))
    assert [e["event"] for e in events] == ["failed", "done"]
    assert "link is invalid" in events[0]["data"] and "run-stats" not in events[1]["data"]
    assert client.get("/compare/poem/stream?job=x").status_code == 404


# ---- the token view on the generate and infill pages ---------------------------------------

def test_generate_and_infill_streams_end_with_the_token_view(client):
    # a seed, so the sampled text is the same each run: unseeded, about one run in fifty
    # drew the end at once and had no token to show
    for start, form in (("/generate/start", {**FORM, "model": "tiny-gpt", "temperature": "1", "seed": "11"}),
                        ("/infill/start", INFILL)):
        events = parse_sse(client.get(stream_url(client.post(start, data=form)
                                                 .get_data(as_text=True))).get_data(as_text=True))
        tokens = tokens_in(texts(events, "done")[0])
        assert len(tokens) > 1
        assert "".join(t[0] for t in tokens) == unescape("".join(texts(events)))
        assert all(len(t[2]) == 5 for t in tokens)


def test_no_js_pages_ask_for_no_log_probabilities(client, monkeypatch):
    from app.serving.service import GenerationService

    asked = []
    original = GenerationService._start

    def spy(self, loaded, prompt_ids, params, **kwargs):
        asked.append(params.logprobs)
        return original(self, loaded, prompt_ids, params, **kwargs)
    monkeypatch.setattr(GenerationService, "_start", spy)
    client.post("/", data=FORM)
    client.get("/compare", query_string={**RUN, "run": "1"})
    assert asked == [None, 0, 0]  # compare: each token's own, for its figure; no alternatives


# ---- the token view's data -----------------------------------------------------------------

def entries(tokenizer, text):
    from models_src.sampling import TokenLogprob
    return [TokenLogprob(i, -0.5, [(i, -0.5)]) for i in tokenizer.encode(text)]


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_tokens_spell_the_text_whatever_the_tokenizer(kind):
    from models_src.tokenization import Tokenizer

    from app.pages.token_view import token_pieces, tokens_of

    tokenizer = {"char": lambda: Tokenizer.train_char([TEXT]),
                 "word": lambda: Tokenizer.train_word([TEXT]),
                 "bpe": lambda: Tokenizer.train_bpe([TEXT], vocab_size=300)}[kind]()
    context = tokenizer.encode("Once")[-1:]
    body = " upon a time, there was a little girl named Lily."
    ids = tokenizer.encode(body)
    pieces = token_pieces(tokenizer, context, ids)
    text = "".join(pieces)  # as the stream wrote it (a word tokenizer adds the spaces)
    assert len(pieces) == len(ids)
    tokens = tokens_of(tokenizer, context, entries(tokenizer, body), text)
    assert "".join(t.text for t in tokens) == text and len(tokens) == len(ids)
    # a stop string cut the text short: the tokens past the cut are dropped
    cut = text[:text.index("little")]
    tokens = tokens_of(tokenizer, context, entries(tokenizer, body), cut)
    assert "".join(t.text for t in tokens) == cut
    # a text the tokens do not spell gets no token view rather than a wrong one
    assert tokens_of(tokenizer, context, entries(tokenizer, body), "something else") is None


def test_an_infilled_middle_loses_the_whitespace_at_its_ends_in_tokens_too():
    from models_src.tokenization import Tokenizer

    from app.pages.token_view import tokens_of

    tokenizer = Tokenizer.train_char([TEXT])
    tokens = tokens_of(tokenizer, [], entries(tokenizer, " \nLily ran. \n"), "Lily ran.",
                       stripped=True)
    assert [t.text for t in tokens] == list("Lily ran.")


def test_token_data_is_escaped_and_reads_back_as_the_text():
    from app.pages.token_view import Token, token_data

    nasty = '<script>alert("x")</script>\'&'
    html = str(token_data([Token(nasty, -0.25, [(nasty, -0.25), ("<eos>", -3.0)])]))
    assert "<script>" not in html and '"x"' not in html
    assert token_data(None) == "" and token_data([]) == ""
    assert tokens_in(html) == [[nasty, -0.25, [[nasty, -0.25], ["<eos>", -3.0]]]]


def test_generated_markup_stays_text_in_columns(client, script):
    script(["<img src=x onerror=alert(1)>", "\n<b>"])
    html = client.get("/compare", query_string={**RUN, "prompt": "<i>", "run": "1"}).get_data(
        as_text=True)
    for column in columns(html):
        assert "<img" not in column and "<b>" not in column and "<i>" not in column
        assert generated(column) == "<img src=x onerror=alert(1)>\n<b>"
    refused = client.get("/compare", query_string={**RUN, "models": ["<b>x</b>", "endless"],
                                                   "run": "1"}).get_data(as_text=True)
    assert "<b>x" not in refused
    assert "&#39;&lt;b&gt;x&lt;/b&gt;&#39; is not a loaded model" in refused
    fragment = client.get("/compare/start", query_string={**RUN, "prompt": "<i>"})
    body = fragment.get_data(as_text=True)
    assert "<i>" not in body and "&lt;i&gt;" in body
    events = parse_sse(client.get(unescape(re.findall(r'sse-connect="([^"]+)"', body)[0]))
                       .get_data(as_text=True))
    assert "<img" not in "".join(texts(events))


def test_fill_in_the_middle_is_offered_only_with_two_models_that_infill(make_app, checkpoint_dir,
                                                                          tmp_path):
    """With one model that infills (the bundled set today) the mode is shown disabled, with
    the reason; a URL or form that asks for it anyway gets the reason as its error."""
    import shutil

    folder = tmp_path / "checkpoints"
    for name in ("tiny-gpt", "tiny-lstm"):  # tiny-gpt infills, tiny-lstm does not
        shutil.copytree(checkpoint_dir / name, folder / name)
    client = make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client()
    html = client.get("/compare").get_data(as_text=True)
    assert 'name="mode" value="infill" disabled aria-describedby="infill-unavailable"' in html
    assert ("Not available here: filling in the middle needs 2 loaded models trained to "
            "infill; only tiny-gpt does.") in html
    query = {"models": ["tiny-gpt", "tiny-lstm"], "mode": "infill", "first": "A.", "last": "B.",
             "run": "1"}
    refused = client.get("/compare", query_string=query)
    assert refused.status_code == 400
    assert "filling in the middle needs 2 loaded models" in error_of(
        refused.get_data(as_text=True), "mode")
    both = make_app().test_client().get("/compare").get_data(as_text=True)  # endless, tiny-gpt
    assert 'value="infill" disabled' not in both and "Not available here" not in both
