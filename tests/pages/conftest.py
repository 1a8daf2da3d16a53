"""The pages wing's fixtures (defined in tests/pages/page_helpers.py beside its helpers)."""

from tests.pages.page_helpers import pages_dir  # noqa: F401 (a fixture)
