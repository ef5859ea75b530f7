# Quick start: `make pipeline` runs the whole pipeline on the embedded data; `make test` runs the tests.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install pipeline test ui clean-outputs

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	$(PY) -m pipelines.repro

test: $(STAMP)
	bash tests/services/run_tests.sh

ui: $(STAMP)
	$(VENV)/bin/vig-ui
