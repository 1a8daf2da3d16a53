"""The experiments page (``/experiments``) and its data (``/experiments/data``) through
Flask's test client: the run table, the filters in the URL, the chosen runs, the JSON
the chart draws, admin gating, an empty or broken store, bad input and hostile names.

The chart itself, in a browser, is tests/pages/test_browser_experiments.py.
"""

from __future__ import annotations

import base64
import math
import re
from html import unescape

import pytest

from app.platform import security

ADMIN_TOKEN = "test-admin-token-0123456789"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def record(root, experiment, model="tiny-gpt", architecture="gpt", parameters=16064,
           losses=((10, 3.0, 2.9), (20, 2.5, 2.4), (30, 2.2, 2.3)), **extra):
    """One run of ``experiment``: (step, train loss, val loss) evaluations; its id."""
    from models_src.records import ExperimentLog

    run = ExperimentLog(root, experiment, config={})
    for step, train, val in losses:
        perplexity = math.exp(val) if val is not None and math.isfinite(val) else None
        run.log(model=model, architecture=architecture, parameters=parameters, step=step,
                epoch=step / 100, train_loss=train, val_loss=val, val_perplexity=perplexity,
                tokens_per_s=100.0 * step, wall_time_s=float(step), kind="train_eval",
                split="validation", **extra)
    return run.run_id


@pytest.fixture
def store(tmp_path):
    """Three runs: two experiments, two models, two architectures; the LSTM's best
    evaluation is not its last."""
    root = tmp_path / "experiments"
    runs = {
        "gpt": record(root, "stories", bits_per_char=1.5, token_accuracy=0.4),
        "lstm": record(root, "stories", model="tiny-lstm", architecture="lstm",
                       parameters=3_461_575,
                       losses=((10, 3.1, 3.0), (20, 2.4, 2.2), (30, 2.0, 2.6))),
        "books": record(root, "books", model="word-lstm", architecture="lstm",
                        losses=((5, 6.0, 6.1), (10, 5.0, float("nan")))),
    }
    return root, runs


@pytest.fixture
def client(make_app, store):
    return make_app(FABLE_EXPERIMENTS_DIR=str(store[0])).test_client()


def page(client, query="", status=200, **params):
    """The page's HTML for ``query`` (or the parameters ``params``), checking its status."""
    response = client.get("/experiments" + query, query_string=params or None)
    assert response.status_code == status, response.get_data(as_text=True)[-2000:]
    return response.get_data(as_text=True)


def rows(html):
    """The run table's rows, each as {run id, checked, texts of its cells}."""
    body = re.search(r'<table class="data-table runs-table">.*?<tbody>(.*?)</tbody>', html, re.S)
    found = []
    for row in re.findall(r"<tr.*?</tr>", body.group(1) if body else "", re.S):
        cells = [re.sub(r"<[^>]+>", " ", cell)
                 for cell in re.findall(r"<t[hd]\b.*?</t[hd]>", row, re.S)]
        found.append({"run": re.search(r'name="run" value="([^"]+)"', row).group(1),
                      "checked": " checked" in re.search(r"<input[^>]*>", row).group(0),
                      "cells": [" ".join(unescape(c).split()) for c in cells]})
    return found


def data_url(html):
    found = re.search(r'data-src="([^"]+)"', html)
    return unescape(found.group(1)) if found else None


# ---- the table and the chosen runs ------------------------------------------------------

def test_lists_every_run_with_its_figures(client, store):
    _, runs = store
    html = page(client)
    table = rows(html)
    # newest first
    assert [row["run"] for row in table] == [runs["books"], runs["lstm"], runs["gpt"]]
    assert all(row["checked"] for row in table)  # up to four are drawn when none is chosen
    by_run = {row["run"]: row["cells"] for row in table}
    # draw, run, experiment; model, architecture, parameters; last step;
    # best val loss, val perplexity, bits/char, token accuracy, tokens/s
    assert by_run[runs["gpt"]] == [f"Draw run {runs['gpt']} stories", "tiny-gpt GPT · 16.1K",
                                   "30", "2.300", f"{math.exp(2.3):.2f}", "1.500", "0.400",
                                   "3,000"]
    # the LSTM's best validation loss is at step 20, not its last step
    assert by_run[runs["lstm"]][1:6] == ["tiny-lstm LSTM · 3.5M", "30", "2.200",
                                         f"{math.exp(2.2):.2f}", "–"]
    # a NaN loss is no figure; its model's only finite validation loss is the best
    assert by_run[runs["books"]][3] == "6.100"
    heads = re.findall(r'<th scope="col"', re.search(r"<thead>.*?</thead>", html, re.S).group(0))
    assert all(len(row["cells"]) == len(heads) for row in table)
    assert "3 of 3 runs" in html
    assert 'id="admin-only-note"' in html and "It is not set, so both are open." in html


def test_page_has_labels_and_nothing_inline(client):
    response = client.get("/experiments")
    html = response.get_data(as_text=True)
    assert response.headers["Content-Security-Policy"] == security.CONTENT_SECURITY_POLICY
    assert "style=" not in html and not re.search(r"<style", html)
    scripts = re.findall(r"<script\b([^>]*)>", html)
    assert scripts and all("src=" in attributes for attributes in scripts)
    assert '/static/experiments.js' in html and '/static/vendor/uPlot.iife.min.js' in html
    assert 'rel="stylesheet" href="/static/vendor/uPlot.min.css"' in html
    for control in re.findall(r"<(?:select|input)\b[^>]*>", html):
        ident = re.search(r'id="([^"]+)"', control).group(1)
        assert f'<label for="{ident}"' in html, control


def test_filters_narrow_the_table_and_stay_in_the_url(client, store):
    _, runs = store
    for query, expected in (("?experiment=stories", {"gpt", "lstm"}),
                            ("?model=tiny-lstm", {"lstm"}),
                            ("?architecture=lstm", {"lstm", "books"}),
                            ("?experiment=stories&architecture=lstm", {"lstm"}),
                            ("?experiment=&model=&architecture=", {"gpt", "lstm", "books"})):
        html = page(client, query)
        assert {row["run"] for row in rows(html)} == {runs[name] for name in expected}, query
        for name, value in re.findall(r"(\w+)=([\w-]+)", query):
            assert re.search(rf'<select id="filter-{name}" name="{name}">.*?'
                             rf'<option value="{value}" selected>', html, re.S), query
        # the chart's data carries the same selection
        url = data_url(html)
        assert url.startswith("/experiments/data?")
        for name, value in re.findall(r"(\w+)=([\w-]+)", query):
            assert f"{name}={value}" in url
    assert "2 of 3 runs match the filters" in page(client, "?architecture=lstm")


def test_chosen_runs_are_drawn_in_table_order(client, store):
    _, runs = store
    html = page(client, f"?run={runs['gpt']}&run={runs['books']}")
    checked = [row["run"] for row in rows(html) if row["checked"]]
    assert checked == [runs["books"], runs["gpt"]]
    assert 'run-swatch run-colour-0" aria-hidden="true"></span>' in html
    url = data_url(html)
    assert url.count("run=") == 2
    # a chosen run outside the filters is not drawn; when none is left, the newest are
    html = page(client, f"?experiment=books&run={runs['gpt']}&run={runs['books']}")
    assert [row["run"] for row in rows(html) if row["checked"]] == [runs["books"]]
    html = page(client, f"?experiment=stories&run={runs['books']}")
    assert [row["run"] for row in rows(html) if row["checked"]] == [runs["lstm"], runs["gpt"]]
    assert "not in the records" not in html


def test_data_endpoint_gives_each_drawn_runs_losses(client, store):
    _, runs = store
    response = client.get("/experiments/data?architecture=lstm")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["notes"] == []
    assert [(run["run_id"], run["colour"]) for run in body["runs"]] == [(runs["books"], 0),
                                                                        (runs["lstm"], 1)]
    books = body["runs"][0]
    assert books["model"] == "word-lstm" and books["architecture"] == "lstm"
    assert books["steps"] == [5, 10] and books["train_loss"] == [6.0, 5.0]
    assert books["val_loss"] == [6.1, None]  # NaN is no value (and no invalid JSON)
    one = client.get(f"/experiments/data?run={runs['gpt']}").get_json()["runs"]
    assert [run["run_id"] for run in one] == [runs["gpt"]]
    assert one[0]["val_loss"] == [2.9, 2.4, 2.3]


def test_at_most_eight_runs_are_drawn(make_app, tmp_path):
    root = tmp_path / "experiments"
    ids = [record(root, "many", losses=((1, 2.0, 2.1), (2, 1.5, 1.6))) for _ in range(10)]
    client = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client()
    html = page(client, "?" + "&".join(f"run={run}" for run in ids))
    assert sum(row["checked"] for row in rows(html)) == 8
    assert "At most 8 runs are drawn at once" in html
    runs = client.get("/experiments/data?" + "&".join(f"run={run}" for run in ids)).get_json()
    assert [run["colour"] for run in runs["runs"]] == list(range(8))


def test_without_javascript_the_admin_plots_stand_in(client, store, monkeypatch):
    from app.pages import experiments as experiments_page

    _, runs = store
    html = page(client, f"?run={runs['gpt']}")
    noscript = re.search(r"<noscript>(.*?)</noscript>", html, re.S).group(1)
    assert f'src="/admin/curves/{runs["gpt"]}.png"' in noscript
    assert client.get(f"/admin/curves/{runs['gpt']}.png").status_code == 200
    # without uPlot installed: the plots, no chart and no script for it
    monkeypatch.setattr(experiments_page, "uplot_ready", lambda: False)
    html = page(client, f"?run={runs['gpt']}")
    assert "<noscript>" not in html and f'src="/admin/curves/{runs["gpt"]}.png"' in html
    assert "uPlot" in html and "experiments.js" not in html and "data-src" not in html


# ---- admin gating -----------------------------------------------------------------------

def test_needs_the_admin_token_when_one_is_set(make_app, store, caplog):
    caplog.set_level("DEBUG")
    client = make_app(FABLE_ADMIN_TOKEN=ADMIN_TOKEN,
                      FABLE_EXPERIMENTS_DIR=str(store[0])).test_client()
    denied = client.get("/experiments?model=tiny-gpt")
    assert denied.status_code == 401
    assert denied.headers["WWW-Authenticate"].startswith("Basic ")
    html = denied.get_data(as_text=True)
    assert "Sign-in required" in html and "tiny-gpt" not in html and "<table" not in html
    data = client.get("/experiments/data")
    assert data.status_code == 401 and "admin token" in data.get_json()["error"]
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        assert client.get("/experiments", headers=headers).status_code == 401
    basic = "Basic " + base64.b64encode(f"me:{ADMIN_TOKEN}".encode()).decode()
    for authorization in (basic, f"Bearer {ADMIN_TOKEN}"):
        response = client.get("/experiments", headers={"Authorization": authorization})
        assert response.status_code == 200
        assert "tiny-gpt" in response.get_data(as_text=True)
        assert "Admin only" in response.get_data(as_text=True)
        assert "Authorization" in response.headers["Vary"]  # no cache may mix the answers
        assert client.get("/experiments/data", headers={"Authorization": authorization}
                          ).status_code == 200
    assert ADMIN_TOKEN not in caplog.text


# ---- empty or broken store, bad input ---------------------------------------------------

def test_an_empty_or_missing_store_is_an_empty_state(make_app, tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        client = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client()
        html = page(client)
        assert "No experiment has been recorded yet" in html and "<table" not in html
        assert client.get("/experiments/data").get_json() == {"runs": [], "notes": []}
        assert "No experiment has been recorded yet" in page(client, "?model=nobody")


def test_an_unreadable_store_is_a_message(make_app, tmp_path):
    root = tmp_path / "experiments"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "bad.parquet").write_bytes(b"not parquet")
    client = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client()
    html = page(client)
    alert = re.search(r'<p class="alert" role="alert">(.*?)</p>', html, re.S).group(1)
    assert "cannot be read" in alert and "exp/bad.parquet" in alert and str(tmp_path) not in alert
    body = client.get("/experiments/data").get_json()
    assert body["runs"] == [] and "exp/bad.parquet" in body["error"]


def test_unknown_filter_values_say_so(client):
    html = page(client, "?model=gpt-9&experiment=stories")
    assert rows(html) == []
    assert "No run in the records has the model “gpt-9”." in html
    assert '<option value="gpt-9" selected>gpt-9 (not in the records)</option>' in html
    assert "No run matches these filters" in html
    html = page(client, "?run=no-such-run&run=another")
    assert "2 of the chosen runs are not in the records." in html
    assert all(row["checked"] for row in rows(html))  # so the newest are drawn
    assert client.get("/experiments/data?model=gpt-9").get_json()["runs"] == []


@pytest.mark.parametrize("query", ["?model=a%00b", "?experiment=" + "x" * 201,
                                   "?architecture=%1b%5b31m", "?run=ok&run=bad%0aline"])
def test_bad_filter_values_are_a_clear_400(client, store, query):
    html = page(client, query, status=400)
    alert = re.search(r'<div class="alert experiments-problems" role="alert">(.*?)</div>', html,
                      re.S)
    assert alert and ("left out" in alert.group(1))
    assert len(rows(html)) >= 1  # the rest of the page is still there
    data = client.get("/experiments/data" + query)
    assert data.status_code == 400 and "left out" in data.get_json()["error"]


def test_repeated_and_odd_parameters_are_harmless(client, store):
    _, runs = store
    html = page(client, "?model=tiny-gpt&model=tiny-lstm&page=2&run=&run=%20")
    assert [row["run"] for row in rows(html)] == [runs["gpt"]]  # the first value counts


def test_hostile_names_are_escaped(make_app, tmp_path):
    root = tmp_path / "experiments"
    run_id = record(root, 'exp"><i>x', model=HOSTILE, architecture=HOSTILE)
    client = make_app(FABLE_EXPERIMENTS_DIR=str(root)).test_client()
    for params in ({}, {"model": HOSTILE}, {"experiment": HOSTILE}, {"run": HOSTILE}):
        html = page(client, **params)
        assert HOSTILE not in html and '"><i>x' not in html and "<script>alert" not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert rows(page(client, model=HOSTILE))[0]["run"] == run_id
    assert rows(page(client, architecture=HOSTILE))[0]["run"] == run_id
    runs = client.get("/experiments/data").get_json()["runs"]
    assert runs[0]["model"] == HOSTILE  # data for textContent, never markup
