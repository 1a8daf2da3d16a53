"""What the page tests share: a form, an event stream as a browser reads it, job tokens
read, signed or forged, a logged run, and ``pages_dir`` (the model pages' checkpoints,
one with a hostile card; tests/pages/conftest.py offers it as a fixture).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import zlib
from html import unescape
from pathlib import Path
from unittest import mock

import pytest
from itsdangerous import TimestampSigner

FORM = {"model": "endless", "prompt": "Once", "temperature": "0", "max_new_tokens": "6"}


# ---- helpers ----------------------------------------------------------------------------

def parse_sse(text: str) -> list[dict]:
    """Events as a browser's EventSource sees them: data lines joined with newlines;
    comments skipped. Each event: {"event", "data", "id"}."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        event = {"event": "message", "data": [], "id": None}
        lines = block.split("\n")
        if all(line.startswith((":", "retry:")) for line in lines):
            continue
        for line in lines:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                event["data"].append(value)
            elif name in ("event", "id"):
                event[name] = value
            else:
                assert name == "", f"unexpected SSE line {line!r}"
        event["data"] = "\n".join(event["data"])
        events.append(event)
    return events


def stream_url(html: str) -> str:
    match = re.search(r'sse-connect="([^"]+)"', html)
    assert match, html
    return unescape(match.group(1))


def token_of(client, url: str) -> dict:
    """What the job token in ``url`` carries, its signature checked with the app's key."""
    return client.application.extensions["fable.job_tokens"].loads(url.split("job=", 1)[1])


def make_token(client, body: dict, age_s: int = 0) -> str:
    """A job token signed with the app's key, as the server writes them, ``age_s`` old."""
    signer = client.application.extensions["fable.job_tokens"]
    with mock.patch.object(TimestampSigner, "get_timestamp",
                           lambda self: int(time.time()) - age_s):
        return signer.dumps(body)


def unsigned_token(body: dict) -> str:
    """A job token in the unsigned form the server once wrote (and anyone could)."""
    data = zlib.compress(json.dumps({"issued": int(time.time()), **body}).encode())
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def texts(events, kind="message") -> list[str]:
    return [e["data"] for e in events if e["event"] == kind]


INFILL = {"model": "endless", "first": "Lily saw a ball.", "last": "The end.",
          "temperature": "0", "max_new_tokens": "5"}


def log_run(root, experiment="exp-a", model="tiny-gpt", losses=((1, 3.0, 2.9), (2, 2.5, 2.4)),
            bits_per_char=None):
    from models_src.records import ExperimentLog
    log = ExperimentLog(root, experiment, config={"lr": 1e-3})
    for step, train, val in losses:
        log.log(model=model, architecture="gpt", parameters=16064, step=step, epoch=0.1 * step,
                train_loss=train, val_loss=val, val_perplexity=2.718281828 ** val,
                bits_per_char=bits_per_char, wall_time_s=float(step), kind="train_eval",
                split="validation")
    return log.run_id


# ---- the model pages' checkpoints ----------------------------------------------------

HOSTILE = "hostile"
ODD = "a<i>b&c"  # a directory name with markup in it: a model name like any other

CARD = """---
license: mit
secret_front_matter: do-not-show
widget:
- text: "Lily <b>said</b>"
---

# hostile

Raw HTML: <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2">.

<div onclick="alert(1)">a block of HTML</div>

[js link](javascript:alert(1)) [JS upper](JaVaScRiPt:alert(2))
[entity](&#106;avascript:alert(3)) [data link](data:text/html;base64,PHNjcmlwdD4=)
[vb](vbscript:msgbox) [file](file:///etc/passwd) [mail](mailto:someone@example.com)
<javascript:alert(4)> [ok](https://example.com/page) [relative](../other-model)

![tracking pixel](https://evil.example/pixel.png) ![local plot](plot.png)

## Evaluation

| metric | value |
| --- | ---: |
| bits per character | 1.807 |

## Samples (temperature 0.8, seeds 1, 2)

> Once upon a time <script>alert(5)</script>
> there was a dog.

> The second sample.

## Use

Nothing more.
"""

HEALTH = {"problems": ["layer <b>0</b> gradients vanish"], "checked": "2026-12-03T10:00:00",
          "measured_on": "8 x 64 tokens"}


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory, checkpoint_dir) -> Path:
    """tiny-gpt and tiny-lstm as in tests/app_support.py, ``hostile`` (tiny-gpt with a hostile card, a
    health report, BLEU in its evaluation, a hidden file, a subfolder and a link out of
    its folder) and ``a<i>b&c`` (tiny-lstm under a name with markup)."""
    root = tmp_path_factory.mktemp("model-pages")
    for name in ("tiny-gpt", "tiny-lstm"):
        shutil.copytree(checkpoint_dir / name, root / name)
    hostile = shutil.copytree(checkpoint_dir / "tiny-gpt", root / HOSTILE)
    (hostile / "README.md").write_text(CARD)
    (hostile / "health.json").write_text(json.dumps(HEALTH))
    config = json.loads((hostile / "config.json").read_text())
    config["evaluation"] = {"split": "validation", "tokens": 900, "characters": 1000,
                            "loss": 1.25, "perplexity": 3.49, "bits_per_char": 1.8,
                            "token_accuracy": 0.42, "bleu": 12.345,
                            "command": "python -m training.evaluate --checkpoint x",
                            "date": "2026-12-03"}
    (hostile / "config.json").write_text(json.dumps(config))
    (hostile / ".secret").write_text("hidden")
    (hostile / "extra").mkdir()
    (hostile / "extra" / "inner.txt").write_text("in a subfolder")
    (root / "outside.txt").write_text("outside the checkpoint")
    (hostile / "link.txt").symlink_to(root / "outside.txt")
    shutil.copytree(checkpoint_dir / "tiny-lstm", root / ODD)
    return root
