"""The model pages (app/pages/models.py, app/pages/cards.py) through Flask's test client: what a
page shows, a hostile model card kept inert, the per-layer table, the checkpoint
downloads and every way of asking for a file outside them, 404s, and the training
curves shown to admins only."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.app_support import MODELS, SUMMARY
from tests.pages.page_helpers import HOSTILE, ODD, log_run

TOKEN = "s3cret-admin-token-for-tests"

@pytest.fixture
def pages_client(make_app, pages_dir):
    return make_app(FABLE_CHECKPOINT_DIR=str(pages_dir)).test_client()


def page_url(name: str) -> str:
    return "/models/" + quote(name, safe="")


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def card_html(html: str) -> str:
    start = html.index('<div class="model-page-card">')
    return html[start:html.index("</section>", start)]


# ---- the page -------------------------------------------------------------------------------

def test_model_page_shows_the_facts_the_table_and_the_files(client, app):
    from models_src.summary import count_parameters

    response = client.get("/models/tiny-gpt")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "<h1 class=\"model-page-title\">tiny-gpt" in html
    for shown in ("GPT", "characters", "16,064", "64 tokens", "float32",
                  f"{SUMMARY['bits_per_char']:.3f}", f"{SUMMARY['val_perplexity']:.2f}",
                  f"{SUMMARY['token_accuracy']:.3f}", "This checkpoint has no model card"):
        assert shown in html, shown
    # the per-layer table: one row per module with parameters, summing to the total
    with app.app_context():
        from app.serving.registry import get_registry
        model = get_registry().get("tiny-gpt").model
        modules = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    start = html.index('id="layer-table"')
    table = html[start:html.index("</table>", start)]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    names = re.findall(r'<th scope="row"><code>([^<]+)</code></th>', body)
    assert names == modules
    counts = [int(c.replace(",", "")) for c in re.findall(r'<td class="num">([\d,]+)</td>', body)]
    assert sum(counts) == count_parameters(model) == 16064
    assert "tied to wte.weight" in body and "×" in body  # shapes as 39×32
    # every file of the checkpoint, each a download link; the generate page preselected
    links = [a["href"] for a in Elements(html).all("a")]
    for filename in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"/models/tiny-gpt/files/{filename}" in links
    assert "/?model=tiny-gpt" in links  # no card, so no suggested prompt
    assert "/infill?model=tiny-gpt" in links  # its summary says it infills
    assert "Health" not in html  # no health.json
    assert ' style="' not in html and "<style" not in html


def test_a_recurrent_model_without_a_summary(client):
    html = client.get("/models/tiny-lstm").get_data(as_text=True)
    assert "LSTM" in html and "48 hidden units" in html and "unbounded" in html
    assert "No evaluation is stored with this checkpoint." in html
    assert "No samples are stored with this checkpoint." in html
    assert "/infill?model=tiny-lstm" not in html
    assert "Trained for" not in html


def test_the_card_is_rendered_and_kept_inert(pages_client):
    response = pages_client.get(page_url(HOSTILE))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    card = card_html(html)
    elements = Elements(card)
    # raw HTML is text: no element from the card's markup, its source shown escaped
    assert not elements.all("script") and not elements.all("img") and not elements.all("div")[1:]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in card
    assert "&lt;div onclick=" in card
    assert "onerror=" not in card.replace("onerror=&quot;", "")  # only as escaped text
    # links: http(s) and relative only, other sites' marked nofollow
    hrefs = {a.get("href") for a in elements.all("a")}
    assert hrefs == {"https://example.com/page", "../other-model"}
    assert all(not re.match(r"\s*(javascript|vbscript|data|file|mailto):", h or "", re.I)
               for a in Elements(html).all("a") for h in [a.get("href")])
    outbound = next(a for a in elements.all("a") if a["href"].startswith("https:"))
    assert "nofollow" in outbound["rel"] and "noopener" in outbound["rel"]
    assert "[js link](javascript:alert(1))" in card  # refused links stay as their text
    # images: dropped for their alt text
    assert "tracking pixel" in card and "local plot" in card and "evil.example" not in card
    # front matter never shown; the title heading dropped; headings under the page's
    assert "secret_front_matter" not in html and "license: mit" not in html
    assert "<h1>" not in card and "<h2>" not in card
    assert "<h3>Evaluation</h3>" in card
    # table alignment as a class (the CSP forbids style attributes)
    assert '<td class="align-right">1.807</td>' in card
    assert ' style="' not in html
    # the one place the page is not escaped by Jinja is this card: nothing else came through
    assert html.count("<script") == 1  # the page's own app.js


def test_samples_health_and_evaluation_from_the_checkpoint(pages_client):
    html = pages_client.get(page_url(HOSTILE)).get_data(as_text=True)
    # the card holds the samples: they are read there, once, escaped; no second panel
    assert "model-page-samples" not in html and html.count("The second sample.") == 1
    assert "&lt;script&gt;alert(5)&lt;/script&gt;" in html and "<script>alert(5)" not in html
    # the suggested prompt from the card's widget, escaped, and the link that preselects it
    assert "<q>Lily &lt;b&gt;said&lt;/b&gt;</q>" in html
    assert "/?model=hostile&amp;prompt=Lily+%3Cb%3Esaid%3C/b%3E" in html
    # health.json: its problem, escaped
    assert "1 problem" in html and "layer &lt;b&gt;0&lt;/b&gt; gradients vanish" in html
    assert "8 x 64 tokens" in html
    # the stored evaluation's figures win over the trainer's; BLEU where present
    assert "3.49" in html and "1.800" in html and "12.35" in html and "BLEU" in html
    assert "python -m training.evaluate --checkpoint x" in html and "2026-12-03" in html


def test_model_names_are_escaped_everywhere(pages_client):
    html = pages_client.get(page_url(ODD)).get_data(as_text=True)
    assert "a&lt;i&gt;b&amp;c" in html and "a<i>b" not in html
    links = [a["href"] for a in Elements(html).all("a")]
    assert "/models/a%3Ci%3Eb&c/files/config.json" in links  # in the URL's own quoting
    response = pages_client.get(f"{page_url(ODD)}/files/config.json")
    assert response.status_code == 200
    index = pages_client.get("/models").get_data(as_text=True)
    assert "a&lt;i&gt;b&amp;c" in index and "a<i>b" not in index


def test_models_index_and_admin_link_every_model(client):
    index = client.get("/models").get_data(as_text=True)
    admin = client.get("/admin").get_data(as_text=True)
    for name in MODELS:
        assert f'href="/models/{name}"' in index
        assert f'href="/models/{name}"' in admin  # a "model page" link in its row


def test_the_models_list_says_what_each_writes_and_offers_to_try_it(client):
    """As Ollama's and LM Studio's lists do: size, context, what it writes, a Try button."""
    from tests.app_support import INFILL_MODELS

    index = client.get("/models").get_data(as_text=True)
    rows = {row.split('href="/models/')[1].split('"')[0]: row for row in index.split("<tr>")[2:]}
    assert sorted(rows) == sorted(MODELS)
    for name, row in rows.items():
        assert f'href="/?model={name}' in row  # Try: the generate page on it
        writes = "continues and infills" if name in INFILL_MODELS else "continues"
        assert f"<td>{writes}</td>" in row
        assert (f'href="/infill?model={name}"' in row) == (name in INFILL_MODELS)
        assert "tokens</td>" in row or "unbounded (recurrent)" in row  # its context
    for heading in ("Writes", "Parameters", "Context", "Tokenizer", "Bits/char"):
        assert f">{heading}</th>" in index


# ---- downloads ------------------------------------------------------------------------------

def test_every_checkpoint_file_downloads_as_an_attachment(pages_client, pages_dir):
    html = pages_client.get(page_url(HOSTILE)).get_data(as_text=True)
    links = [a["href"] for a in Elements(html).all("a") if "/files/" in a["href"]]
    names = sorted(link.rsplit("/", 1)[1] for link in links)
    assert names == ["README.md", "config.json", "health.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]  # no hidden file, folder, link
    for link, name in zip(links, sorted(names)):
        with pages_client.get(link) as response:  # closed, as a server closes it: the slot frees
            assert response.status_code == 200, link
            disposition = response.headers["Content-Disposition"]
            assert disposition.startswith("attachment") and name in disposition
            assert response.get_data() == (pages_dir / HOSTILE / name).read_bytes()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    head = pages_client.head(f"/models/{HOSTILE}/files/config.json")
    assert head.status_code == 200 and not head.get_data()


def test_downloads_at_once_are_bounded_and_each_frees_its_slot(make_app, pages_dir):
    """FABLE_MAX_DOWNLOADS files go out at once; another download gets 503 with
    Retry-After until one of them is closed (its last byte written, or its client gone)."""
    client = make_app(FABLE_CHECKPOINT_DIR=str(pages_dir), FABLE_MAX_DOWNLOADS=2).test_client()
    url = f"/models/{HOSTILE}/files/config.json"
    first, second = client.get(url), client.get(url)
    busy = client.get(url)
    assert (first.status_code, second.status_code, busy.status_code) == (200, 200, 503)
    assert busy.headers["Retry-After"] == "1" and "downloads are under way" in busy.get_data(True)
    first.close()
    with client.get(url) as again:
        assert again.status_code == 200
    second.close()


@pytest.mark.parametrize("path", [
    "..", "%2e%2e", ".%2e", "..%2f..%2fnotes.txt", "%2e%2e%2foutside.txt", "..%5coutside.txt",
    "%2e%2e%252foutside.txt", "..%2ftiny-gpt%2fconfig.json", "../outside.txt",
    "../../outside.txt", "extra/inner.txt", "extra%2finner.txt", "extra", ".secret",
    "link.txt", "%2fetc%2fpasswd", "CONFIG.JSON", "config.json%00", "config.json%20",
    "config.json/", "", "model.safetensors.tmp",
])
def test_only_files_directly_in_the_checkpoint_are_served(pages_client, path):
    response = pages_client.get(f"/models/{HOSTILE}/files/{path}")
    assert response.status_code == 404, (path, response.status_code)
    assert b"outside the checkpoint" not in response.get_data()
    assert b"root:" not in response.get_data()


def test_unknown_models_and_files_are_404_in_the_apps_shape(client):
    for path in ("/models/nope", "/models/broken", "/models/.tiny-gpt.tmp-0",
                 "/models/nope/files/config.json", "/models/tiny-gpt/files/nope.json",
                 "/models/..%2fnotes.txt", "/models/%2e%2e", "/models/tiny-gpt/files/README.md"):
        html = client.get(path)
        assert html.status_code == 404, path
        assert html.mimetype == "text/html"
        data = client.get(path, headers={"Accept": "application/json"})
        assert data.status_code == 404 and data.is_json, path
        assert data.get_json() == {"error": f"not found: GET {data.request.path}"}
    page = client.get("/models/<i>nope").get_data(as_text=True)  # the name is escaped
    assert "<i>nope" not in page and "&lt;i&gt;nope" in page


# ---- training curves: admins only -----------------------------------------------------------

@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiments")
    for model in ("tiny-gpt", "tiny-lstm"):
        log_run(root, f"exp-{model}", model=model, losses=((10, 3.2, 3.3), (20, 2.6, 2.7)))
    return root


def test_curves_are_shown_with_the_admin_check_only(make_app, experiments):
    client = make_app(FABLE_EXPERIMENTS_DIR=str(experiments),
                      FABLE_ADMIN_TOKEN=TOKEN).test_client()
    anonymous = client.get("/models/tiny-gpt")
    assert anonymous.status_code == 200
    assert "Training curves" not in anonymous.get_data(as_text=True)
    assert "/admin/curves/" not in anonymous.get_data(as_text=True)
    assert "Authorization" in anonymous.headers["Vary"]
    admin = client.get("/models/tiny-gpt", headers={"Authorization": f"Bearer {TOKEN}"})
    html = admin.get_data(as_text=True)
    assert "Training curves" in html
    curves = [img["src"] for img in Elements(html).all("img")]
    assert len(curves) == 1 and curves[0].startswith("/admin/curves/")
    png = client.get(curves[0], headers={"Authorization": f"Bearer {TOKEN}"})
    assert png.status_code == 200 and png.mimetype == "image/png"
    # no token configured: everyone is admin, as on /admin
    open_client = make_app(FABLE_EXPERIMENTS_DIR=str(experiments)).test_client()
    assert "/admin/curves/" in open_client.get("/models/tiny-lstm").get_data(as_text=True)
    assert "No run of this model" in open_client.get("/models/endless").get_data(as_text=True)


def test_a_broken_experiment_store_does_not_take_the_page_down(make_app, tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.parquet").write_bytes(b"not parquet")
    client = make_app(FABLE_EXPERIMENTS_DIR=str(tmp_path)).test_client()
    response = client.get("/models/tiny-gpt")
    assert response.status_code == 200
    assert "No run of this model" in response.get_data(as_text=True)


# ---- the renderer on its own ----------------------------------------------------------------

@pytest.mark.parametrize("url, allowed", [
    ("https://example.com", True), ("http://example.com/a?b#c", True), ("HTTPS://X.Y", True),
    ("relative/path", True), ("../up", True), ("/absolute", True), ("#anchor", True),
    ("//example.com/x", True), ("javascript:alert(1)", False), (" JavaScript:alert(1)", False),
    ("data:text/html,x", False), ("vbscript:x", False), ("file:///etc/passwd", False),
    ("mailto:a@b.c", False), ("ftp://x", False),
])
def test_links_are_http_or_relative_only(url, allowed):
    from app.pages.cards import safe_link

    assert safe_link(url) is allowed


def test_a_card_too_big_or_not_utf8_is_not_rendered(tmp_path):
    from app.pages.cards import MAX_CARD_BYTES, render_card

    (tmp_path / "README.md").write_bytes(b"\xff\xfe not utf-8")
    assert "cannot be read" in render_card(tmp_path, "x").problem
    (tmp_path / "README.md").write_text("a" * (MAX_CARD_BYTES + 1))
    assert "over" in render_card(tmp_path, "x").problem
    (tmp_path / "README.md").write_text("---\nkey: [unclosed\n---\n\nBody *text*.\n")
    card = render_card(tmp_path, "x")  # front matter that is not YAML: still never shown
    assert card.problem is None and "unclosed" not in card.html and "<em>text</em>" in card.html



def test_a_sharded_checkpoint_lists_its_shards_and_index(make_app, checkpoint_dir, tmp_path,
                                                         monkeypatch):
    import models_src.checkpoint as checkpoint

    loaded = checkpoint.load_checkpoint(checkpoint_dir / "tiny-gpt")
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 8000)
    checkpoint.save_checkpoint(tmp_path / "sharded", loaded.model, loaded.tokenizer, SUMMARY)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    html = make_app(FABLE_CHECKPOINT_DIR=str(tmp_path)).test_client().get(
        page_url("sharded")).get_data(as_text=True)
    assert len(shards) >= 2
    for part, shard in enumerate(shards, 1):
        assert f"{shard}</a>" in html and f"the weights, part {part} of {len(shards)}" in html
    assert "which shard holds each weight" in html
