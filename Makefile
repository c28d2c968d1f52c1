# make demo / make test: each creates .venv with pip if missing, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
ARCH := $(shell uname -m)
# torch 2.14.1 + torchvision 0.29.1 are the pair that loads together on x86_64 (see docs/TOOLCHAIN notes in README)
TORCH_PINS := $(if $(filter x86_64,$(ARCH)),torch==2.14.1 torchvision==0.29.1,torch torchvision)
PYTEST_ARGS ?=

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arq-deploy demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest -m '' $(PYTEST_ARGS)

clean:
	rm -rf demo-out .pytest_cache
