# The Makefile is the only installer: `make test` on a bare Debian machine (as root) installs everything.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# One list of what gets installed, read here, by both Dockerfiles and by CI: deploy/apt-packages.txt (Debian) and
# deploy/requirements.lock (the exact Python versions tested together, applied as pip constraints).
APT_PACKAGES := $(shell deploy/packages.sh build data stack)
LOCK := deploy/requirements.lock
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt venv test lint pytest demo bench docs clean lock stack-up stack-down stack-status image

setup: apt $(VENV)/.installed

# Idempotent: apt runs only when one of the packages is missing.
apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	fi

# torch goes in first and alone so pip takes the CPU build that lies on disk, never a CUDA one.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -c $(LOCK) torch
	$(PIP) install -q -c $(LOCK) -e '.[dev]'
	touch $@

# Rewrite the lock from the working venv (after changing pyproject.toml and installing): exact versions, torch
# without its local build label so the CUDA image resolves the same version from its own index.
lock:
	{ echo "# Made by \`make lock\` from a working venv; installed with pip -c (see the Makefile). Do not edit."; \
	  $(PIP) freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

lint: setup
	$(VENV)/bin/ruff check san training service bench tests docs
	$(VENV)/bin/ruff format --check san training service bench tests docs

pytest: setup
	$(VENV)/bin/pytest -q

test: lint pytest

# Where the demo study's catalog name resolves (SAN_DATA_ROOT defaults to ./data).
DEMO_DATA := $(or $(SAN_DATA_ROOT),data)/fashion-mnist
# The demo's budget: 1 seed and 8 epochs keep the whole demo under 15 minutes on a 2-core machine (12 min measured);
# the full run is `SEEDS=3 EPOCHS=15 make demo`.
SEEDS ?= 1
EPOCHS ?= 8

# The most complete real run so far: the models table, the embedded Fashion-MNIST as FFCV files (built once), then
# the paper's Table IV (LeNet-5 with each attention module) as one study through the REST API: a Ray head, an
# mlflow server and the API started (and stopped) by deploy/study-demo.sh, the table printed beside the paper's.
demo: setup
	$(VENV)/bin/san models --table --input-size 28 --num-classes 10 --models lenet5
	$(VENV)/bin/san data list
	[ -f $(DEMO_DATA)/val.beton ] || $(VENV)/bin/san data build fashion-mnist --out $(DEMO_DATA)
	$(VENV)/bin/san data info $(DEMO_DATA)/train.beton
	deploy/study-demo.sh configs/studies/table4-fmnist.yaml --seeds $(SEEDS) --epochs $(EPOCHS)

# The deployed topology as processes here: Ray head + a second Ray node (1 CPU each), PostgreSQL, an mlflow server
# serving its artifacts, the API. `stack-down` stops exactly what `stack-up` started (by PID, never `ray stop`).
STACK_DIR ?= runs/stack
stack-up: setup
	$(VENV)/bin/san stack --dir $(STACK_DIR) up
stack-down:
	$(VENV)/bin/san stack --dir $(STACK_DIR) down
stack-status:
	$(VENV)/bin/san stack --dir $(STACK_DIR) status

# The CPU image, built with buildah from a debootstrapped Debian base (no registry, no Docker engine), then checked
# inside with `buildah run`: `san --version`, the imports, a 1-epoch job on a Fashion-MNIST slice.
image:
	deploy/build-image.sh

# Every benchmark, then results/BENCHMARKS.md (the machine, the commit, each command, each figure against its target);
# QUICK=1: the small sizes, under 10 minutes on 2 cores. Each benchmark's rows and output are kept in bench/results/.
QUICK ?=
bench: setup
	$(PY) bench/run_all.py $(if $(filter-out 0,$(QUICK)),--quick)

# The documentation (docs/): Sphinx + MyST, references generated from the code at build time (the JobSpec and
# StudySpec models, the API's OpenAPI document, the CLI's parsers, docstrings), the results pages including the files
# under results/. Warnings are errors; tests/test_docs.py builds it the same way.
docs: setup
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
