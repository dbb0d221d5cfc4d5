# Two commands do all set-up on a fresh Debian machine with Python 3.11: `make run` and `make test`.
# The system's Python 3 when it is >= 3.11 and can make venvs (Debian's python3.11 is built with
# PGO and LTO: ~20% faster than a plain source build), else whatever python3 is on PATH.
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
            $$p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
          done)
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Seconds of coverage-guided fuzzing per target: `make fuzz` (FUZZ_S=600 make fuzz for a long run),
# and the short run `make test` includes.
FUZZ_S ?= 60
TEST_FUZZ_S ?= 10
FUZZ_TARGETS := requests responses h2requests

.PHONY: install peers run test lint typecheck pytest pytest-pure fuzz fuzz-short conformance bench config clean

# `make install`: .venv with an editable install and the dev extras (tests, types, lint), then the
# data plane compiled with mypyc in place (gateway/native.py; pure Python where there is no C
# compiler), rebuilt whenever one of its sources changes.
install: $(VENV)/.installed $(VENV)/.native

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 with venv support is needed (Debian: apt-get install python3-venv)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; rm -rf $(VENV); exit 1; }
	GATEWAY_COMPILE=0 $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Every source of the package: compiled code also relies on what it inferred from the modules it
# imports. Old builds are removed first (a module no longer compiled, a build that falls back to pure
# Python). The stamp is left only by a compiled build: without a compiler, the next make tries again.
NATIVE_SRC := setup.py $(shell find gateway -name '*.py' -not -path '*/__pycache__/*')
$(VENV)/.native: $(VENV)/.installed $(NATIVE_SRC)
	find gateway \( -name '*.so' -o -name '_native.sha256' \) -delete
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@$(BIN)/python -c 'import sys; from gateway import native; n = len(native.status().compiled); \
	  print(f"data plane: compiled ({n} modules)" if n else "data plane: pure Python (to compile it: apt-get install gcc python3-dev, then make install)"); \
	  sys.exit(not n)' && touch $@ || true

# The gateway on 127.0.0.1:8080 and [::1]:8080 (admin 127.0.0.1:8081) with a local Redis and a demo
# sandbox. Ctrl-C stops all.
run: install
	$(BIN)/gateway serve $(ARGS)

# Test peers that are not Python packages: Autobahn|Testsuite (Python 2.7, when pyenv has it) and the
# npm packages of the Vite app (vite@7, playwright-core; the browser is the system Chromium).
WSTEST_HOME ?= $(HOME)/.cache/gateway-wstest
PY27 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/2.7.*/bin/python $(HOME)/.pyenv/versions/2.7.*/bin/python) $(shell command -v python2.7))
peers: $(WSTEST_HOME)/bin/wstest tests/e2e/vite-app/node_modules/.installed

$(WSTEST_HOME)/bin/wstest:
	@if [ -n "$(PY27)" ]; then \
	  PYTHONUSERBASE=$(WSTEST_HOME) $(PY27) -m pip install -q --user --disable-pip-version-check autobahntestsuite==0.8.2; \
	else echo "peers: no Python 2.7 (pyenv install 2.7.18): the Autobahn tests will skip (fail under CI)"; fi

tests/e2e/vite-app/node_modules/.installed: tests/e2e/vite-app/package.json
	@if command -v npm >/dev/null; then \
	  cd tests/e2e/vite-app && npm install --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "peers: no npm (apt-get install nodejs npm): the Vite tests will skip (fail under CI)"; fi

# The whole suite: lint, types, tests (real Redis, real sockets, real peers), a short fuzz run.
test: install peers lint typecheck pytest pytest-pure fuzz-short

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy --strict gateway

pytest: install
	$(BIN)/pytest $(PYTEST_ARGS)

# The unit tests (tables, properties, fuzz regressions) again on the pure Python modules, the
# reference a build without a C compiler runs (~1 min). (test_native.py is about the build itself.)
pytest-pure: install
	GATEWAY_PURE=1 $(BIN)/pytest -q tests/unit --ignore=tests/unit/test_native.py

# Coverage-guided fuzzing (atheris) of the framer and head analysis, both directions (tests/fuzz/).
# On the pure Python modules (GATEWAY_PURE=1): atheris sees coverage in bytecode, not in compiled code.
# A crash, a broken property or an input over 100 ms of CPU fails and prints the input.
fuzz: install
	@for t in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$t for $(FUZZ_S) s"; \
	  GATEWAY_PURE=1 $(BIN)/python -m tests.fuzz $$t $(FUZZ_S) || exit 1; \
	done

# The same, quietly, for make test: the log is shown only when a target fails.
fuzz-short: install
	@for t in $(FUZZ_TARGETS); do \
	  log=$$(mktemp); \
	  if GATEWAY_PURE=1 $(BIN)/python -m tests.fuzz $$t $(TEST_FUZZ_S) >$$log 2>&1; then \
	    echo "fuzz: $$t, $(TEST_FUZZ_S) s: $$(grep -o 'number_of_executed_units: *[0-9]*' $$log | grep -o '[0-9]*$$') inputs, no failure"; \
	    rm -f $$log; \
	  else tail -n 40 $$log; rm -f $$log; exit 1; fi; \
	done

# Autobahn|Testsuite with every case group, 9, 12 and 13 included (~15 min).
conformance: install peers
	GATEWAY_AUTOBAHN_ALL=1 $(BIN)/pytest tests/conformance $(PYTEST_ARGS)

# nginx, HAProxy and this gateway side by side, same backend and load (bench/referee; docs/development.md).
# Quick look: make bench BENCH_ARGS="--rounds 1 --duration 3". Needs apt: nginx haproxy wrk nghttp2-client.
bench: install
	$(BIN)/python bench/referee $(BENCH_ARGS)

# Regenerate config/gateway.toml from the settings declared in gateway/config.py.
config: install
	$(BIN)/python -c 'from gateway.config import example_toml; print(example_toml(), end="")' > config/gateway.toml
	$(BIN)/python -c 'from gateway.config import settings_markdown; print(settings_markdown(), end="")' > docs/settings.md

clean:
	find gateway \( -name '*.so' -o -name '_native.sha256' \) -delete
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/fuzz/found
