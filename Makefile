# One command per job. On a fresh clone `make serve` creates .venv with what serving needs
# (requirements.txt) and starts the app; `make test` adds the test tools
# (requirements-dev.txt), checks the code with ruff and runs the fast test suite. pip shows
# what it installs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed-test
TF4 := .venv-transformers4
TF4_STAMP := $(TF4)/.installed
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only torch from PyTorch's
# index, as the Dockerfile does; unset, pip takes PyPI's, which brings CUDA's libraries.
TORCH_INDEX ?=
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

.PHONY: install install-test assets data serve test quick test-all bench load soak screenshots results docker-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(SERVE_STAMP): requirements.txt | $(PY)
ifneq ($(strip $(TORCH_INDEX)),)
	$(PY) -m pip install --no-deps '$(TORCH_PIN)' --index-url '$(TORCH_INDEX)'
endif
	$(PY) -m pip install -r requirements.txt
	touch $@

$(STAMP): $(SERVE_STAMP) requirements-dev.txt $(TF4_STAMP)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# transformers 4.x beside .venv's 5.x, for the export tests (tests/interop/test_hf_interop.py): its own
# transformers, huggingface_hub and tokenizers; torch and the rest read from .venv (a .pth file)
$(TF4_STAMP): tests/interop/requirements-transformers4.txt | $(SERVE_STAMP)
	$(PYTHON) -m venv $(TF4)
	$(TF4)/bin/python -c "import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_path('purelib'), 'fable-venv.pth').write_text(sys.argv[1] + '\n')" "$$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))")"
	$(TF4)/bin/python -m pip install -r tests/interop/requirements-transformers4.txt
	touch $@

install: $(SERVE_STAMP)
install-test: $(STAMP)

# htmx and uPlot are served from their npm packages (never a CDN), pinned and checksummed
# by package-lock.json; fetched with Python alone, so no Node is needed
VENDORED = static/vendor/htmx.min.js static/vendor/sse.js static/vendor/uPlot.iife.min.js \
	static/vendor/uPlot.min.css

assets: $(VENDORED)

$(VENDORED) &: package-lock.json scripts/vendor_assets.py
	$(PYTHON) scripts/vendor_assets.py

# Every corpus the shipped configs train on, from its publisher, checked
# (training/corpora.py; FABLE_DATA_DIR says where, FABLE_DATA_MIRROR from where)
data: $(SERVE_STAMP)
	$(PY) -m training.corpora fetch --all

# The web app on the bundled models: http://127.0.0.1:7860 (FABLE_HOST=0.0.0.0 to be
# reachable from other machines; PORT for another port)
serve: $(SERVE_STAMP) assets
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: $(STAMP) assets
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The unit tests alone, in under a minute: no server, browser, training, child process,
# bundled model or property test; test by test to the two workers (no module here shares
# costly fixtures). schemathesis builds its fuzz tests while collecting (about 4 s in each
# worker), so its plugin and its one module stay out rather than being deselected.
quick: $(STAMP)
	$(PY) -m pytest --dist load -m "not slow and not server and not browser and not train \
		and not subprocess and not bundled and not interop and not fuzz" \
		-p no:schemathesis --ignore tests/apis/test_schema.py

test-all: $(STAMP) assets
	$(PY) -m pytest -m ""

# docs/screenshots/*.png from the bundled models (and experiments/'s records, where there are any)
screenshots: $(STAMP) assets
	FABLE_SCREENSHOTS=1 FABLE_SCREENSHOTS_CHECKPOINTS=checkpoints \
		$(PY) -m pytest tests/pages/test_browser.py tests/pages/test_browser_compare.py \
		tests/pages/test_browser_model_page.py tests/pages/test_browser_experiments.py \
		tests/pages/test_browser_train.py -k screenshot -o addopts=""

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
	rm -rf $(VENV) $(TF4) .pytest_cache .hypothesis static/vendor
