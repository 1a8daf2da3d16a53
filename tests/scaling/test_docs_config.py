"""docs/scaling.md shows the nginx site and the torchrun command the scaling tests run,
word for word (with the docs' ports and host): a change to one must reach the other."""

from __future__ import annotations

from .cluster import ROOT, node_args, site

DOCS = ROOT / "docs" / "scaling.md"


def test_the_docs_show_the_nginx_site_the_tests_run():
    assert site([7861, 7862], "8080") in DOCS.read_text()


def test_the_docs_show_the_torchrun_command_the_tests_run():
    shown = "torchrun " + " ".join(node_args("node-a.internal:29400", "fable-run-1"))
    assert shown in DOCS.read_text()
