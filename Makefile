# Two commands do all the set-up:
#   make run    install, then run the main job (the demo tour on the built-in simulated cluster, SQLite state)
#   make test   install, then lint, type-check and run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest test-pure test-k8s bench-light install browser clean

# Modules compiled with mypyc on install (listed in setup.py); editing one rebuilds them.
COMPILED := $(shell grep -o 'src/computegroups/[a-z_/]*\.py' setup.py)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py requirements/dev.lock $(COMPILED)
	$(BIN)/pip install --quiet -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/computegroups demo
	$(BIN)/computegroups discover

lint: install
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py

typecheck: install
	$(BIN)/mypy

# Debian's Chromium, for the dashboard's browser test (skipped without it, unless COMPUTEGROUPS_REQUIRE_BROWSER=1).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no chromium (apt-get install chromium): the dashboard's browser test will be skipped"

pytest: install browser
	$(BIN)/python -m pytest -q tests --ignore=tests/k8s

test: lint typecheck pytest test-pure

# The same tests on the interpreted modules (what an install without a C compiler runs).
test-pure: install
	rm -rf build/pure && mkdir -p build/pure && cp -r src/computegroups build/pure/
	find build/pure -name '*.so' -delete
	PYTHONPATH=build/pure $(BIN)/python -m pytest -q tests --ignore=tests/k8s -m "not slow"

test-k8s: install
	PYTHON=$(BIN)/python scripts/k8s-testenv/ci

bench-light: install
	$(BIN)/python -m bench --light

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
	find src -name '*.so' -delete
