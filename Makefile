# One command runs the main job (`make run`), one runs the tests (`make test`); each sets up what it needs.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
RUN_PACKAGES  = dataset-fashion-mnist
TEST_PACKAGES = $(RUN_PACKAGES) chromium postgresql
ARGS   ?= --model resnet18 --budget 50
LINTED  = ranksearch tests benchmarks search_spaces setup.py

.PHONY: setup system-run system-test test run lint bench compare

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77"  # the build backend (tests/test_packaging.py builds without isolation)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,plot,onnx,dist,dashboard,timm,grpc]"
	touch $@

# Debian packages: the offline Fashion-MNIST files; the tests also need a browser (report) and PostgreSQL (workers).
system-run: PACKAGES = $(RUN_PACKAGES)
system-test: PACKAGES = $(TEST_PACKAGES)
system-run system-test:
	@missing=$$(for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	fi

# The suite on TEST_WORKERS processes (pytest-xdist, one module per process at a time), then the tests timed against the
# wall clock (marked serial) alone
TEST_WORKERS ?= 2
test: setup system-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m "not serial"
	$(PY) -m pytest -q -p no:xdist -m serial

run: setup system-run
	$(VENV)/bin/ranksearch run $(ARGS)

# ruff, then import-linter: the layer and no-cycle contracts in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) benchmarks/compress_speed.py

# the search against uniform, random, greedy, NSGA-II and the previous default over 3 seeds (over 10 h on 2 cores;
# one method and seed at a time: benchmarks/compare.py --seeds 0 --methods ranksearch uniform; see README)
compare: setup system-run
	$(PY) benchmarks/compare.py
