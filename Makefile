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

# Where the demo spec's catalog name resolves (SAN_DATA_ROOT defaults to ./data).
DEMO_DATA := data/fashion-mnist

# The most complete real job so far: the models table, the embedded Fashion-MNIST as FFCV files, then the
# paper's LeNet-5 + SAN-d setting trained on it by two Ray Train workers, tracked in MLflow (runs/mlflow.db);
# then the same job through the REST API (san serve with its own Ray head, san jobs submit --wait).
demo: setup
	$(VENV)/bin/san models --table --input-size 28 --num-classes 10 --models lenet5
	$(VENV)/bin/san models --table --input-size 32 --num-classes 10 --stem small --models vgg16,resnet18
	$(VENV)/bin/san data list
	$(VENV)/bin/san data build fashion-mnist --out $(DEMO_DATA)
	$(VENV)/bin/san data info $(DEMO_DATA)/train.beton
	$(VENV)/bin/san train configs/lenet5-fmnist.yaml --workers 2 --epochs 3
	deploy/api-demo.sh configs/lenet5-fmnist.yaml --workers 2 --epochs 3

bench: setup
	$(PY) bench/attention_overhead.py
	$(PY) bench/loader.py
	$(PY) bench/memory_format.py
	$(PY) bench/ray_overhead.py
	$(PY) bench/api_latency.py

clean:
	rm -rf $(VENV) build *.egg-info
