# `make run`, `make test` and `make lint` each set up everything they need, from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/models.yaml
# The pair CI tests; pyproject.toml's floor (2.13 + 0.28) is the oldest the tests passed on.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup tools browser run fleet test train-more bench soak hostile gpu-kit lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $@

# Tests drive rsync against the daemon, and nginx in front of a fleet; install them where they are missing.
tools:
	@command -v rsync >/dev/null || { (apt-get update -qq && apt-get install -y -qq rsync >/dev/null) || sudo apt-get install -y -qq rsync; }
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { (apt-get update -qq && apt-get install -y -qq nginx >/dev/null) || sudo apt-get install -y -qq nginx; }

# The browser tests drive Debian's chromium through chromedriver; install both where they are missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || sudo apt-get install -y -qq chromium chromium-driver; }

run: setup
	@ls checkpoints/shapes/*.pt >/dev/null 2>&1 || $(PY) -m examples.shapes.train --epochs 1
	$(VENV)/bin/reloader serve --config $(CONFIG)

# A fleet on one machine: moto's S3 server holding the demo's checkpoints, 3 replicas, nginx in front on :8080
# (examples/fleet.py). Ctrl-C stops all of it.
fleet: setup tools
	@ls checkpoints/shapes/*.pt >/dev/null 2>&1 || $(PY) -m examples.shapes.train --epochs 1
	$(PY) -m examples.fleet --config $(CONFIG)

# Train more epochs while the daemon runs: each epoch lands as a new checkpoint and goes live.
train-more: setup
	$(PY) -m examples.shapes.train --epochs 5 --resume

# Most of a test's time is a daemon starting (importing torch takes 3-5 s of one core) or waiting on one, which
# leaves a core idle: two workers fill both cores of a CI machine and halve the run (1032 s -> 584 s on 2 cores).
TEST_WORKERS ?= 2

test: setup tools browser
	$(PY) -m pytest -n $(TEST_WORKERS)

# Section 9 runs a fleet behind nginx (tools installs it).
bench: setup tools
	$(PY) -m pip install -q -e '.[test,bench]' $(TORCH_PINS)
	$(PY) -m bench.run

# SOAK_S seconds (default 1800) of c=8 load while checkpoints, bad files, config edits and SIGHUPs churn
# (bench/soak.py); the results go to bench/SOAK.md. Run it alone, like bench.
soak: setup
	@ls checkpoints/shapes/*.pt >/dev/null 2>&1 || $(PY) -m examples.shapes.train --epochs 1
	$(PY) -m bench.soak

# Each hostile input of issue #13 (huge images, slow clients, bombs in files and configs) thrown at one daemon,
# one at a time: status, time, peak RSS, and whether the model still serves (bench/hostile.py); the results go
# to bench/HOSTILE.md. About 3 minutes; run it alone, like bench.
hostile: setup
	$(PY) -m bench.hostile

# What bench/gpu.sh needs on a GPU machine lent by this workplace's `device` tool: its image holds torch with
# CUDA, pytest, aiohttp and most of the daemon's dependencies, but not these, and it reaches no registry. Their
# wheels (the versions installed here, for the image's Python) go to .gpu/wheels, which the run carries:
# `make gpu-kit`, then run `bash bench/gpu.sh` there with carry [".gpu"] (README, "What was tested where").
GPU_PYTHON ?= 3.12
GPU_WHEELS := typing-extensions pydantic pydantic-core annotated-types typing-inspection starlette python-multipart uvicorn httptools watchdog

gpu-kit: setup
	rm -rf .gpu/wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
		$$($(PY) -c 'import sys, importlib.metadata as m; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))

# ruff, then mypy on reloader/ (its settings are [tool.mypy] in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check reloader tests examples bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache
