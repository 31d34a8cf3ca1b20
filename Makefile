# The Makefile is the only installer: `make test` on a bare Debian machine (as root) installs everything.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt venv test lint pytest demo bench clean

setup: apt $(VENV)/.installed

# Idempotent: apt runs only when one of the packages is missing.
apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	fi

# torch goes in first and alone so pip takes the CPU build that lies on disk, never a CUDA one.
$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check san training service bench tests
	$(VENV)/bin/ruff format --check san training service bench tests

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

bench: setup
	$(PY) bench/attention_overhead.py
	$(PY) bench/loader.py
	$(PY) bench/memory_format.py
	$(PY) bench/ray_overhead.py
	$(PY) bench/api_latency.py

clean:
	rm -rf $(VENV) build *.egg-info
