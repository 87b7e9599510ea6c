# refjax: the two commands. `make demo` runs the main job, `make test` runs the test suite.
# Both create their own virtual environment and install what they need.
PY ?= python3
VENV ?= .venv
PYVER := $(shell $(PY) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
CONSTRAINTS := constraints/py$(PYVER).txt
# torch (CPU wheel) and torchscale exist for Python 3.11 only; the parity tests need them there.
WITH_TORCH ?= $(if $(filter 311,$(PYVER)),1,0)
PIP = $(VENV)/bin/python -m pip
# pytest-xdist workers: one per core of the 2-core CI machine (each test file stays on one worker).
TEST_WORKERS ?= 2

.PHONY: demo demo-ras test lint venv dev-venv clean

$(VENV)/.installed: requirements.txt $(CONSTRAINTS) pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements-dev.txt
ifeq ($(WITH_TORCH),1)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) torchscale==0.3.0 fairscale==0.4.0
endif
	touch $@

venv: $(VENV)/.installed
dev-venv: $(VENV)/.dev-installed

demo: $(VENV)/.installed
	$(VENV)/bin/python -m refjax demo --workdir $(or $(WORKDIR),runs/demo)

demo-ras: $(VENV)/.installed
	$(VENV)/bin/python -m refjax demo-ras --workdir $(or $(WORKDIR),runs/demo_ras)

test: $(VENV)/.dev-installed
	REFJAX_REQUIRE_TORCH=$(WITH_TORCH) $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv312
