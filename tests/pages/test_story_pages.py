"""The HTML pages through Flask's test client: generate, infill and admin; the no-JS form
posts, the htmx fragments, the job tokens and the server-sent event streams.

The browser side (htmx really streaming into the page) is tests/pages/test_browser.py.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
import time
import zlib
from html import unescape
from pathlib import Path

import pytest

from app.pages import jobs, render
from app.pages.jobs import JOB_TTL_S
from tests.app_support import ENDLESS_CHAR, MODELS, SUMMARY, hold_row
from tests.pages.page_helpers import (FORM, INFILL, log_run, make_token, parse_sse, stream_url, texts, token_of,
                                      unsigned_token)

ROOT = Path(__file__).resolve().parents[2]

ADMIN_TOKEN = "test-admin-token-0123456789"
# ---- the generate page ------------------------------------------------------------------

def test_generate_page_lists_models_with_kind_and_perplexity(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    for name in MODELS:
        assert f'value="{name}"' in html
    assert "broken" not in html  # not servable: listed on the admin page only
    assert f"{SUMMARY['val_perplexity']:.2f}" in html  # tiny-gpt's validation perplexity
    assert "GPT · characters" in html and "LSTM · characters" in html
    for field in ("prompt", "temperature", "max_new_tokens", "top_k", "top_p", "seed",
                  "repetition_penalty", "stop"):
        assert f'name="{field}"' in html
        assert f'<label for="field-{field}">' in html  # every control has a label
    # a plain form for browsers without JavaScript, htmx attributes for the others
    assert 'method="post" action="/"' in html
    assert 'hx-post="/generate/start"' in html
    assert "hx-disabled-elt=" in html
    assert 'aria-current="page"' in html
    assert "<script>" not in html and " on" + "click=" not in html  # no inline scripts


def test_root_answers_head_like_spaces_probe(client):
    response = client.head("/")
    assert response.status_code == 200
    assert response.get_data() == b""


def test_pages_reference_vendored_htmx_only_when_installed(make_app, tmp_path):
    app = make_app()
    html = app.test_client().get("/").get_data(as_text=True)
    with app.test_request_context():
        installed = render.vendor_ready()  # after `make assets` (npm ci + copy), or not
    assert ("/static/vendor/htmx.min.js" in html) == installed
    assert ("/static/vendor/sse.js" in html) == installed
    assert "unpkg.com" not in html and "cdn" not in html.lower()
    # without static/vendor/ the pages are plain forms: no htmx script tags at all
    app.static_folder = str(tmp_path)
    html = app.test_client().get("/").get_data(as_text=True)
    assert "vendor/htmx.min.js" not in html and "vendor/sse.js" not in html
    assert 'method="post" action="/"' in html


def test_no_js_generate_post_renders_the_whole_page_with_the_text(client):
    response = client.post("/", data=FORM)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert html.startswith("<!doctype html>")
    generated = re.search(r'<span class="output-generated">([^<]*)</span>', html).group(1)
    assert generated == ENDLESS_CHAR * 6
    assert "Cut at the token limit · 6 tokens" in html
    assert 'sse-connect' not in html  # finished, nothing to stream
    # the form keeps what was submitted
    assert re.search(r'<textarea id="field-prompt"[^>]*>\nOnce</textarea>', html)
    assert 'value="endless" checked' in html


def test_no_js_post_with_invalid_fields_shows_each_error_inline(client):
    response = client.post("/", data={**FORM, "model": "nope", "temperature": "hot",
                                       "top_p": "2", "max_new_tokens": "100000"})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert html.startswith("<!doctype html>")
    assert 'class="error-summary" role="alert"' in html
    assert "There are 4 problems" in html
    for field, label, words in (("temperature", "Temperature", "must be a number"),
                                ("top_p", "Top-p", "at most 1"),
                                ("max_new_tokens", "Max new tokens", "between 1 and 512"),
                                ("model", "&#39;model&#39;", "not loaded")):
        message = re.search(rf'<p class="field-error" id="error-{field}">(.*?)</p>', html).group(1)
        assert f"{label} {words}" in message or (label in message and words in message)
        assert message.count(label) == 1  # the field named once, by the label the page shows
    assert re.search(r'id="field-temperature"[^>]*aria-describedby="hint-temperature '
                     r'error-temperature" aria-invalid="true"', html)
    assert re.search(r'id="field-model-0"[^>]*autofocus', html)  # focus on the first error
    assert 'value="hot"' in html  # the values come back for correction
    assert "output-generated" not in html


def test_no_js_post_when_busy_is_a_503_page(make_app):
    app = make_app(FABLE_MAX_BATCH=1, FABLE_QUEUE_TIMEOUT_S=0)
    held = hold_row(app.extensions["fable.service"])
    try:
        response = app.test_client().post("/", data=FORM)
    finally:
        held.close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "server busy" in response.get_data(as_text=True)


def test_prompt_markup_is_escaped_in_pages_and_fragments(client):
    prompt = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    for url in ("/", "/generate/start"):
        html = client.post(url, data={**FORM, "prompt": prompt}).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html
        assert ("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
                "&lt;img src=x onerror=alert(1)&gt;") in html


def test_stop_box_understands_backslash_n(client):
    html = client.post("/generate/start", data={**FORM, "stop": r"The end.\n"}).get_data(
        as_text=True)
    assert token_of(client, stream_url(html))["stop"] == ["The end.\n"]


# ---- htmx: start, then stream -----------------------------------------------------------

def test_htmx_start_returns_a_fragment_that_opens_the_stream(client):
    response = client.post("/generate/start", data={**FORM, "seed": "42"},
                           headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert not html.lstrip().startswith("<!doctype")  # a fragment, not a page
    assert 'hx-ext="sse"' in html and 'sse-close="done"' in html
    assert 'sse-swap="message" hx-target="this" hx-swap="beforeend"' in html
    assert 'sse-swap="done"' in html and 'sse-swap="failed"' in html
    url = stream_url(html)
    assert url.startswith("/generate/stream?job=")
    assert len(url) < 4000  # fits gunicorn's default request line (4094 bytes)
    job, issued = client.application.extensions["fable.job_tokens"].loads(
        url.split("job=", 1)[1], return_timestamp=True)  # signed by this app's key
    assert abs(issued.timestamp() - time.time()) < 60  # it expires (JOB_TTL_S)
    assert job == {"kind": "generate", "model": "endless", "prompt": "Once", "temperature": 0.0,
                   "max_new_tokens": 6, "seed": 42}
    # the form comes back out of band: errors cleared, its button disabled while streaming
    assert re.search(r'<form id="generate-form"[^>]*hx-swap-oob="true"', html)
    assert re.search(r'<button type="submit" id="generate-submit" class="[^"]*is-busy[^"]*" '
                     r'disabled>Generating…</button>', html)


def test_htmx_start_with_errors_swaps_the_form_in_place(client):
    response = client.post("/generate/start", data={**FORM, "top_k": "0"})
    assert response.status_code == 200  # htmx swaps 2xx answers only
    assert response.headers["HX-Retarget"] == "#generate-form"
    assert response.headers["HX-Reswap"] == "outerHTML"
    html = response.get_data(as_text=True)
    assert "Top-k must be &gt;= 1, got 0" in html
    assert re.search(r'id="field-top_k"[^>]*aria-invalid="true" autofocus', html)
    assert "sse-connect" not in html and "hx-swap-oob" not in html


def test_seed_is_picked_when_empty_and_shown(client):
    html = client.post("/", data=FORM).get_data(as_text=True)
    assert re.search(r"seed \d+", html)
    url = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    assert isinstance(token_of(client, url)["seed"], int)


def test_stream_headers_framing_and_done_event(client):
    url = stream_url(client.post("/generate/start", data={**FORM, "max_new_tokens": "30"})
                     .get_data(as_text=True))
    response = client.get(url)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    events = parse_sse(response.get_data(as_text=True))
    assert "".join(texts(events)) == ENDLESS_CHAR * 30
    ids = [int(e["id"]) for e in events if e["event"] == "message"]
    assert ids == list(range(1, len(ids) + 1))
    assert [e["event"] for e in events][-1] == "done"
    assert not texts(events, "failed")
    done = texts(events, "done")[0]
    assert "Cut at the token limit · 30 tokens" in done
    # the done event hands the enabled button back, out of band
    assert ('<button type="submit" id="generate-submit" class="button button-primary" '
            'hx-swap-oob="true">Generate</button>') in done


def test_a_cut_text_offers_to_continue_it_and_one_that_ended_does_not(client, script):
    url = stream_url(client.post("/generate/start", data={**FORM, "stop": "\\n", "top_p": "0.9"})
                     .get_data(as_text=True))
    events = parse_sse(client.get(url).get_data(as_text=True))
    assert [e["event"] for e in events][-2:] == ["continue", "done"]
    offer = texts(events, "continue")[0]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', offer))
    assert fields == {"model": "endless", "prompt": "Once" + ENDLESS_CHAR * 6, "temperature": "0",
                      "max_new_tokens": "6", "top_p": "0.9", "stop": "\\n"}  # no seed: a fresh one
    assert 'hx-post="/generate/start"' in offer and "Continue the text" in offer
    # posted back, it writes on from where the text stopped
    html = client.post("/", data=fields).get_data(as_text=True)
    assert re.search(r'<span class="output-prompt">([^<]*)</span>', html).group(1) == fields["prompt"]
    script(["The end."])  # a text that ends by itself: nothing to continue
    events = parse_sse(client.get(stream_url(client.post("/generate/start", data=FORM)
                                             .get_data(as_text=True))).get_data(as_text=True))
    assert "continue" not in [e["event"] for e in events]
    assert "Ended by itself" in texts(events, "done")[0]


def test_no_js_a_cut_text_has_the_continue_form(client):
    html = client.post("/", data=FORM).get_data(as_text=True)
    assert 'class="continue-form"' in html and f'value="Once{ENDLESS_CHAR * 6}"' in html


def test_stream_escapes_generated_markup_and_frames_each_line(client, script):
    pieces = ["<scr", "ipt>alert(1)</script>", "\nline 2\r\nline 3 & <b>", "\n"]
    script(pieces)
    url = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    body = client.get(url).get_data(as_text=True)
    assert "<scr" not in body.split("event: done")[0]  # no raw markup before the done event
    events = parse_sse(body)
    received = "".join(texts(events))
    assert received == "&lt;script&gt;alert(1)&lt;/script&gt;\nline 2\nline 3 &amp; &lt;b&gt;\n"
    assert unescape(received) == "".join(pieces).replace("\r\n", "\n")
    # several lines are several data: lines, never a bare newline inside one
    for block in body.split("\n\n"):
        for line in block.split("\n"):
            assert line == "" or re.match(r"^(data|id|event): |^: ", line), repr(line)


def test_stream_of_a_forged_or_damaged_token_reports_an_error_event(client):
    # signed here, yet checked again: the limits may have changed since it was written
    over_limit = make_token(client, {"kind": "generate", "model": "endless", "prompt": "x",
                                     "max_new_tokens": 100000, "seed": 1})
    wrong_kind = make_token(client, {"kind": "infill", "model": "endless", "first": "a",
                                     "last": "b"})
    bomb = base64.urlsafe_b64encode(zlib.compress(b" " * 10_000_000)).decode().rstrip("=")
    stale = make_token(client, {"kind": "generate", "model": "endless", "prompt": "x"},
                       age_s=JOB_TTL_S + 1)
    unsigned = unsigned_token({"kind": "generate", "model": "endless", "prompt": "x"})
    cases = {over_limit: "&#39;max_new_tokens&#39; must be between 1 and 512",
             "not*base64": "link is invalid", wrong_kind: "link is invalid",
             bomb: "link is invalid", "": "link is invalid",
             stale: "this generation link has expired; submit the form again",
             unsigned: "link is invalid"}
    for token, message in cases.items():
        response = client.get(f"/generate/stream?job={token}")
        assert response.status_code == 200  # an EventSource would retry any other status
        events = parse_sse(response.get_data(as_text=True))
        assert [e["event"] for e in events] == ["failed", "done"], token
        assert message in events[0]["data"]


def test_stream_reconnect_is_told_the_stream_was_interrupted(client):
    url = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    events = parse_sse(client.get(url, headers={"Last-Event-ID": "3"}).get_data(as_text=True))
    assert [e["event"] for e in events] == ["failed", "done"]
    assert "interrupted" in events[0]["data"]


def test_stream_when_busy_reports_it_and_frees_nothing(make_app):
    app = make_app(FABLE_MAX_BATCH=1, FABLE_QUEUE_TIMEOUT_S=0)
    client = app.test_client()
    url = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    service = app.extensions["fable.service"]
    held = hold_row(service)
    try:
        events = parse_sse(client.get(url).get_data(as_text=True))
    finally:
        held.close()
    assert [e["event"] for e in events] == ["failed", "done"]
    assert "server busy" in events[0]["data"]
    assert service.active == 0


def test_stream_closed_early_gives_the_slot_back(app):
    client = app.test_client()
    url = stream_url(client.post("/generate/start", data={**FORM, "max_new_tokens": "500"})
                     .get_data(as_text=True))
    response = client.get(url, buffered=False)
    chunks = iter(response.response)
    while "data:" not in next(chunks).decode():
        pass
    service = app.extensions["fable.service"]
    assert service.active == 1
    response.close()  # what the WSGI server does when the browser goes away
    assert service.active == 0


def test_stream_error_mid_generation_is_an_event(client, script):
    script(["Hello"], error=RuntimeError("boom"))
    url = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    events = parse_sse(client.get(url).get_data(as_text=True))
    assert [e["event"] for e in events] == ["message", "failed", "done"]
    assert "Generation failed (RuntimeError)" in events[1]["data"]


def test_huge_incompressible_prompt_is_answered_without_streaming(client):
    rng = random.Random(0)
    prompt = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(4000))
    with client.application.app_context():  # the app's key signs it
        token = jobs.Job("generate", "endless", {"prompt": prompt}, {"seed": 1}).to_token()
    assert len(token) > jobs.MAX_JOB_CHARS
    response = client.post("/generate/start", data={**FORM, "prompt": prompt,
                                                    "max_new_tokens": "3"})
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "sse-connect" not in html
    assert f'<span class="output-generated">{ENDLESS_CHAR * 3}</span>' in html
    assert "Cut at the token limit" in html
    assert re.search(r'<button type="submit" id="generate-submit" '
                     r'class="button button-primary">Generate</button>', html)


# ---- infill -----------------------------------------------------------------------------



def test_the_pages_start_on_the_model_with_the_fewest_bits_per_character(client):
    # tiny-gpt is the only test model with the figure; the others come after it
    for path in ("/", "/infill"):
        assert 'value="tiny-gpt" checked' in client.get(path).get_data(as_text=True)


def test_the_pages_start_on_the_default_model_when_one_is_set(make_app, caplog):
    client = make_app(FABLE_DEFAULT_MODEL="tiny-lstm").test_client()
    html = client.get("/").get_data(as_text=True)
    assert 'value="tiny-lstm" checked' in html
    # a model without a card offers the fallback prompt
    assert re.search(r'<textarea id="field-prompt"[^>]*>\nOnce upon a time</textarea>', html)
    # the infill page cannot start on a model that does not infill: the best one that does
    assert 'value="tiny-gpt" checked' in client.get("/infill").get_data(as_text=True)
    client = make_app(FABLE_DEFAULT_MODEL="no-such-model").test_client()
    assert "FABLE_DEFAULT_MODEL=no-such-model is not loaded: the pages start on tiny-gpt" in caplog.text
    assert 'value="tiny-gpt" checked' in client.get("/").get_data(as_text=True)


def test_infill_page_renders(client):
    response = client.get("/infill")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for name in MODELS:  # only the models trained to infill are offered
        assert (f'value="{name}"' in html) == (name != "tiny-lstm")
    assert f"{SUMMARY['bits_per_char']:.3f}" in html and f"ppl {SUMMARY['val_perplexity']:.2f}" in html
    assert '<label for="field-first">' in html and '<label for="field-last">' in html
    assert 'hx-post="/infill/start"' in html and 'action="/infill"' in html


def test_no_js_infill_shows_three_parts_with_the_middle_marked(client):
    response = client.post("/infill", data=INFILL)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    story = re.search(r'<p id="output-text" class="output story"[^>]*>(.*?)</p>', html).group(1)
    assert '<span class="story-first">Lily saw a ball.</span>' in story
    assert f'<mark class="story-middle">{ENDLESS_CHAR * 5}</mark>' in story
    assert '<span class="story-last">The end.</span>' in story
    assert story.index("story-first") < story.index("story-middle") < story.index("story-last")
    assert '<span class="visually-hidden">Generated middle: </span>' in story


def test_infill_requires_both_sentences(client):
    response = client.post("/infill", data={**INFILL, "first": "  ", "last": ""})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "First sentence is required: how the story begins" in html
    assert "Last sentence is required: how it ends" in html


def test_infill_streams_the_middle(client):
    html = client.post("/infill/start", data=INFILL).get_data(as_text=True)
    assert '<mark class="story-middle" sse-swap="message"' in html
    assert '<span class="story-first">Lily saw a ball.</span>' in html
    url = stream_url(html)
    assert url.startswith("/infill/stream?job=")
    assert token_of(client, url)["kind"] == "infill"
    events = parse_sse(client.get(url).get_data(as_text=True))
    assert "".join(texts(events)) == ENDLESS_CHAR * 5
    assert 'id="infill-submit"' in texts(events, "done")[0]
    # a generate link is not an infill link
    response = client.get(url.replace("/infill/", "/generate/"))
    assert "link is invalid" in response.get_data(as_text=True)


# ---- admin ------------------------------------------------------------------------------

def test_admin_lists_models_facts_and_load_errors(make_app, tmp_path):
    client = make_app(FABLE_EXPERIMENTS_DIR=str(tmp_path / "none")).test_client()
    response = client.get("/admin")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for name in MODELS:
        assert f'<th scope="row"><a href="/models/{name}">{name}</a>' in html
    assert f"{SUMMARY['val_perplexity']:.2f}" in html and f"{SUMMARY['bits_per_char']:.3f}" in html
    assert "12.3K" in html  # tokens seen: SUMMARY's 12345
    assert "1.5 s" in html  # training time
    assert ">conftest.py<" in html  # its data source, by the dataset's name
    assert "broken" in html and "invalid JSON" in html  # the checkpoint that failed
    assert "No experiment has been recorded yet" in html  # an empty store: empty state


def test_admin_shows_each_models_saved_health_report(make_app, tmp_path, checkpoint_dir):
    """health.json (python -m training.inspect --save) is what the Health column shows:
    "healthy", the problems in words (escaped), or "not inspected" without one."""
    import shutil

    folder = tmp_path / "checkpoints"
    for name in ("tiny-gpt", "tiny-lstm", "endless"):
        shutil.copytree(checkpoint_dir / name, folder / name)
    (folder / "tiny-gpt" / "health.json").write_text(json.dumps(
        {"checked": "2026-12-03T10:00:00+00:00", "measured_on": "8 x 32 tokens", "problems": []}))
    (folder / "tiny-lstm" / "health.json").write_text(json.dumps(
        {"checked": "2026-12-03T10:00:00+00:00", "measured_on": "8 x 32 tokens",
         "problems": ["layers.0: 98% of its gate values are <saturated>"]}))
    html = make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client().get("/admin").get_data(
        as_text=True)
    rows = {name: html.split(f'<th scope="row"><a href="/models/{name}">{name}</a>', 1)[1].split("</tr>", 1)[0]
            for name in ("tiny-gpt", "tiny-lstm", "endless")}
    assert "healthy" in rows["tiny-gpt"] and ">2026-12-03<" in rows["tiny-gpt"]
    assert "1 problem<" in rows["tiny-lstm"] and "98% of its gate values are &lt;saturated&gt;" \
        in rows["tiny-lstm"]
    assert "not inspected" in rows["endless"]


def test_admin_shows_best_runs_and_curves(make_app, tmp_path):
    root = tmp_path / "experiments"
    run_id = log_run(root)
    other = log_run(root, "exp-b", model="tiny-lstm", losses=((5, 4.0, 3.9),))
    client = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client()
    html = client.get("/admin").get_data(as_text=True)
    assert run_id in html and other in html
    assert f"{2.718281828 ** 2.4:.2f}" in html  # the best validation perplexity of exp-a
    assert html.index(run_id) < html.index(other)  # best first
    assert f'src="/admin/curves/{run_id}.png"' in html
    assert f'src="/admin/curves/{other}.png"' not in html  # one step (an evaluation) is no curve
    png = client.get(f"/admin/curves/{run_id}.png")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.get_data().startswith(b"\x89PNG\r\n\x1a\n")
    again = client.get(f"/admin/curves/{run_id}.png",
                       headers={"If-None-Match": png.headers["ETag"]})
    assert again.status_code == 304
    for bad in ("nope", "..", ".hidden", "a*b"):
        assert client.get(f"/admin/curves/{bad}.png").status_code == 404


def columns_per_row(table_html):
    """The number of cells of each row of an HTML table, its header row first."""
    rows = re.findall(r"<tr>(.*?)</tr>", table_html, re.S)
    return [len(re.findall(r"<t[hd][ >]", row)) for row in rows]


def test_admin_tables_have_a_cell_under_every_heading(make_app, tmp_path):
    root = tmp_path / "experiments"
    log_run(root)
    html = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client().get("/admin").get_data(as_text=True)
    tables = re.findall(r"<table.*?</table>", html, re.S)
    assert len(tables) == 2
    for table in tables:
        counts = columns_per_row(table)
        assert len(counts) > 1 and len(set(counts)) == 1, counts


def test_admin_ranks_runs_by_bits_per_char_across_vocabularies(make_app, tmp_path):
    """A word model's perplexity is far above a character model's; bits per character is
    what compares them, and it sets the order."""
    root = tmp_path / "experiments"
    char = log_run(root, "char", losses=((1, 1.0, 1.1),), bits_per_char=1.9)
    word = log_run(root, "word", model="tiny-lstm", losses=((1, 5.0, 5.2),), bits_per_char=1.3)
    html = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client().get("/admin").get_data(as_text=True)
    assert html.index(word) < html.index(char)
    assert "Bits/char" in html and "1.300" in html and "1.900" in html


def test_admin_survives_an_unreadable_store(make_app, tmp_path):
    root = tmp_path / "experiments"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "bad.parquet").write_bytes(b"not parquet")
    response = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client().get("/admin")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    alert = re.search(r'<p class="alert" role="alert">(.*?)</p>', html, re.S).group(1)
    assert "The experiment records cannot be read" in alert and "exp/bad.parquet" in alert
    assert str(tmp_path) not in alert  # file names relative to the store


@pytest.mark.subprocess
def test_the_app_imports_no_trainer(checkpoint_dir, tmp_path):
    """The admin page reads the experiment records itself: serving it imports nothing from
    training/ (whose package sets THP_MEM_ALLOC_ENABLE), in a fresh interpreter."""
    root = tmp_path / "experiments"
    run_id = log_run(root)
    code = f"""if True:
        import json, os, sys
        from app import create_app
        app = create_app({{"FABLE_CHECKPOINT_DIR": {str(checkpoint_dir)!r}, "FABLE_DEVICE": "cpu",
                          "FABLE_EXPERIMENTS_DIR": {str(root)!r}, "FABLE_ADMIN_TOKEN": ""}})
        client = app.test_client()
        statuses = [client.get(path).status_code for path in
                    ("/admin", "/admin/curves/{run_id}.png", "/", "/openapi.json")]
        trainer = sorted(m for m in sys.modules if m == "training" or m.startswith("training."))
        print(json.dumps([statuses, trainer, "THP_MEM_ALLOC_ENABLE" in os.environ]))"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [[200, 200, 200, 200], [], False]


def test_admin_needs_the_token_when_one_is_set(make_app, tmp_path, caplog):
    caplog.set_level("DEBUG")
    root = tmp_path / "experiments"
    run_id = log_run(root)
    client = make_app(FABLE_ADMIN_TOKEN=ADMIN_TOKEN,
                      FABLE_EXPERIMENTS_DIR=str(root)).test_client()

    def basic(user, password):
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {credentials}"}

    denied = client.get("/admin")
    assert denied.status_code == 401
    assert denied.headers["WWW-Authenticate"].startswith("Basic ")
    assert "Sign-in required" in denied.get_data(as_text=True)
    for headers in (basic("admin", "wrong"), basic(ADMIN_TOKEN, ""),
                    {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
                    {"Authorization": f"Digest {ADMIN_TOKEN}"}):
        assert client.get("/admin", headers=headers).status_code == 401, headers
    assert client.get(f"/admin/curves/{run_id}.png").status_code == 401
    for headers in (basic("admin", ADMIN_TOKEN), basic("anyone", ADMIN_TOKEN),
                    {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        response = client.get("/admin", headers=headers)
        assert response.status_code == 200, headers
        assert "tiny-gpt" in response.get_data(as_text=True)
    assert client.get(f"/admin/curves/{run_id}.png",
                      headers=basic("x", ADMIN_TOKEN)).status_code == 200
    assert ADMIN_TOKEN not in caplog.text
    # the other pages stay open
    assert client.get("/").status_code == 200


def test_a_link_chooses_the_model_and_fills_the_text_without_running(client):
    """A model page's "try it" link: /?model=<name>&prompt=... opens the form that way."""
    other = MODELS[-1]
    html = client.get("/", query_string={"model": other, "prompt": "<b>Hi</b> there"}).get_data(as_text=True)
    assert re.search(rf'value="{other}"[^>]*checked', html)
    assert "&lt;b&gt;Hi&lt;/b&gt; there" in html and "<b>Hi</b>" not in html
    assert "output-generated" not in html  # nothing was generated
    default = client.get("/").get_data(as_text=True)
    unknown = client.get("/", query_string={"model": "nope"}).get_data(as_text=True)
    assert re.findall(r'value="([^"]+)"[^>]*checked', unknown) == re.findall(r'value="([^"]+)"[^>]*checked', default)


def test_the_sampling_boxes_take_their_limits_from_the_schema(make_app):
    from app.serving.schema import MAX_STOP_CHARS, MAX_TEMPERATURE, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

    html = make_app(FABLE_MAX_NEW_TOKENS=77).test_client().get("/").get_data(as_text=True)
    def box(name):
        return re.search(rf'<input id="field-{name}"[^>]*>', html).group(0)
    assert f'max="{MAX_TEMPERATURE}"' in box("temperature") and 'min="0"' in box("temperature")
    assert 'min="1"' in box("max_new_tokens") and 'max="77"' in box("max_new_tokens")
    assert f'min="{MIN_REPETITION_PENALTY}"' in box("repetition_penalty")
    assert f'max="{MAX_REPETITION_PENALTY}"' in box("repetition_penalty")
    assert 'min="0"' in box("min_p") and 'max="1"' in box("min_p") and 'max="1"' in box("top_p")
    assert f'maxlength="{MAX_STOP_CHARS}"' in box("stop") and 'maxlength="20"' in box("seed")
    assert "1 to 77;" in html  # the hint says the same


@pytest.mark.parametrize("path, words", [("/nope", "Not Found"),
                                         ("/models/nope", "No model called &#39;nope&#39; is loaded.")])
def test_a_missing_page_is_the_sites_own_with_its_navigation(client, path, words):
    response = client.get(path)
    html = response.get_data(as_text=True)
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert words in html and 'href="/infill"' in html and "<nav" in html
    assert client.get("/api/nope").json == {"error": "not found: GET /api/nope"}  # the APIs' JSON stays


def test_a_wrong_method_on_a_page_keeps_its_allow_header(client):
    response = client.delete("/infill")
    assert response.status_code == 405 and "GET" in response.headers["Allow"]
    assert "Method Not Allowed" in response.get_data(as_text=True)


@pytest.mark.parametrize("source, name", [
    ("../shared/data/tinystories", "tinystories"), ("tinyshakespeare/input.txt", "tinyshakespeare"),
    ("/home/someone/.cache/fable/data/wikitext-2/valid.txt", "wikitext-2"), ("my_text.txt", "my_text.txt"),
    ("/srv/corpora/novels", "novels"), ("roneneldan/TinyStories", "TinyStories"), (None, "–"),
])
def test_a_data_source_is_shown_by_its_dataset_s_name(source, name):
    from app.pages.filters import dataset

    assert dataset(source) == name
