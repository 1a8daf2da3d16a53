# One command per job. `make test` works on a fresh clone: it creates .venv,
# installs the pinned dependencies and runs the fast test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install assets serve test test-all bench load soak screenshots results docker-test clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# htmx and uPlot are served from their npm packages (never a CDN), pinned and checksummed
# by package-lock.json; fetched with Python alone, so no Node is needed
VENDORED = static/vendor/htmx.min.js static/vendor/sse.js static/vendor/uPlot.iife.min.js \
	static/vendor/uPlot.min.css

assets: $(VENDORED)

$(VENDORED) &: package-lock.json scripts/vendor_assets.py
	$(PYTHON) scripts/vendor_assets.py

# The web app on the bundled models: http://localhost:7860
serve: $(STAMP) assets
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: $(STAMP) assets
	$(PY) -m pytest

test-all: $(STAMP) assets
	$(PY) -m pytest -m ""

# docs/screenshots/*.png from the bundled models (and experiments/'s records, where there are any)
screenshots: $(STAMP) assets
	FABLE_SCREENSHOTS=1 FABLE_SCREENSHOTS_CHECKPOINTS=checkpoints \
		$(PY) -m pytest tests/test_browser.py tests/test_browser_compare.py \
		tests/test_browser_model_page.py tests/test_browser_experiments.py -k screenshot -o addopts=""

results: $(STAMP)
	$(PY) benchmarks/results.py

bench: $(STAMP)
	$(PY) benchmarks/generation.py

# gunicorn on the bundled models under 1, 4, 16 and 64 concurrent clients
load: $(STAMP) assets
	$(PY) benchmarks/load.py

# five minutes at 32 clients (FABLE_SOAK_SECONDS to change it)
soak: $(STAMP) assets
	FABLE_SOAK_SECONDS=$${FABLE_SOAK_SECONDS:-300} $(PY) -m pytest tests/test_soak.py -m slow -o addopts="" -s

# The Space image: built with buildah from the Dockerfile, run as a Space runs it, checked
# (scripts/image_test.py; needs buildah and debootstrap, which .ci/run installs)
docker-test: assets
	$(PYTHON) scripts/image_test.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis static/vendor
