# gpt2-vision-language: `make demo` runs the offline miniature end to end, `make test` runs the tests.
# Needs only Python 3.11 and make; everything else goes into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test bench clean-venv

setup: $(VENV)/.installed

# Re-install whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python bench/bench_generate.py

clean-venv:
	rm -rf $(VENV)
