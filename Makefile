# make demo / make test: each creates .venv with pip if missing, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
ARCH := $(shell uname -m)
# torch 2.14.1 + torchvision 0.29.1 are the pair that loads together on x86_64 (other pairs fail to import torchvision's operators)
TORCH_PINS := $(if $(filter x86_64,$(ARCH)),torch==2.14.1 torchvision==0.29.1,torch torchvision)
PYTEST_ARGS ?=
# aarch64-under-qemu environment for the ARM tests (tests/test_targets_arm.py; see docs/targets.md)
AARCH64_ENV ?= $(or $(ARQ_AARCH64_ENV),.aarch64)
export ARQ_AARCH64_ENV := $(abspath $(AARCH64_ENV))
# in CI (CI set) a failed aarch64 setup fails the run; elsewhere it warns and the ARM tests skip
AARCH64_SETUP = $(MAKE) --no-print-directory aarch64-env || { if [ -n "$$CI" ]; then exit 1; fi; \
	echo "warning: make aarch64-env failed: the ARM (qemu) tests will be skipped"; }

# Debian's chromium for the report's browser tests (tests/test_report.py); the same rule: CI fails, elsewhere they skip
BROWSER_SETUP = $(MAKE) --no-print-directory browser-env || { if [ -n "$$CI" ]; then exit 1; fi; \
	echo "warning: make browser-env failed: the report's browser tests will be skipped"; }

.PHONY: install demo test test-all clean aarch64-env browser-env

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arq-deploy demo --out demo-out

test: $(STAMP)
	@$(AARCH64_SETUP)
	@$(BROWSER_SETUP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	@$(AARCH64_SETUP)
	@$(BROWSER_SETUP)
	$(VENV)/bin/pytest -m '' $(PYTEST_ARGS)

# qemu-user-static, the aarch64 cross compiler, an aarch64 Python + TVM in $(AARCH64_ENV)/ (idempotent)
aarch64-env: $(STAMP)
	bash .ci/aarch64-env.sh $(AARCH64_ENV) $(PY)

# headless chromium from Debian's packages (idempotent; apt-get as root, else through sudo)
browser-env:
	@command -v chromium >/dev/null 2>&1 || { sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "browser-env: apt-get install chromium"; $$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf demo-out .pytest_cache
