# The two commands a newcomer runs on a fresh machine:
#   make demo   - the main job end to end (data -> keys -> model -> signed bundle -> serve)
#                 (make demo-retrain: the retrain loop after a process shift, docs/retrain.md)
#   make test   - the test suite
# Each creates its own virtual environment and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo demo-retrain test lint bench clean

venv: $(STAMP)

# torch is installed first and exactly: a loose requirement lets pip take a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[optimize,dev,bench,controller]'
	touch $(STAMP)

demo: venv
	bash scripts/system-deps.sh mosquitto
	PYTHON=$(VENV)/bin/python bash scripts/build-tap.sh || echo "make: the agent runs the pure-Python log tap (no C compiler)"
	VENV=$(VENV) bash scripts/demo.sh

# The retrain loop (docs/retrain.md): a floor whose process shifts, drift alarm, labels,
# fleet collect, retrain, shadow and a label-gated canary through the controller.
demo-retrain: venv
	bash scripts/system-deps.sh mosquitto prometheus
	VENV=$(VENV) bash scripts/demo-retrain.sh

# gcc: tests build the C client example (examples/c/) and run it against a real agent, and
# the prediction log's tap in C (agent/_tapfast.c, scripts/build-tap.sh), tested beside the
# pure-Python one.
# pg_ctl: the state-store tests start a throwaway PostgreSQL (tests/postgres_support.py).
test: venv
	bash scripts/system-deps.sh mosquitto prometheus nginx gcc pg_ctl
	PYTHON=$(VENV)/bin/python bash scripts/build-tap.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(VENV)/bin/python bench/run_all.py

clean:
	rm -rf demo-out demo-retrain-out build bench/results .pytest_cache

# Deployment: the agent's container image, ARM64 tests, and the checks on docker/ and k3s/.
# Each installs what it needs (Debian packages as root, tools into build/). ARCH=amd64 builds
# the amd64 image instead of arm64.
.PHONY: image image-test test-arm64 check-manifests

image:
	bash scripts/image.sh all

image-test: venv
	bash scripts/image.sh test

test-arm64:
	bash scripts/test-arm64.sh

check-manifests:
	bash scripts/check-manifests.sh
