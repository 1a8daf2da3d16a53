"""The HTML pages, a blueprint each: the story pages (``/``, ``/infill``), ``/compare``,
``/models``, ``/experiments`` and ``/admin``; and what they share, which is no blueprint:
page jobs and their signed tokens (``jobs``), a job's event stream (``events``), the
comparison runner (``comparison``), the Jinja filters, the token view, model cards,
downloads and rendering helpers. They import app.serving and app.platform, never app.apis.
"""
