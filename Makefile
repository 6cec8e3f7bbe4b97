# Two entry points: `make demo` (set up, then run the whole chain on the default
# space) and `make test` (set up, then run the test suite). Both work on a fresh
# Debian machine (as root, for the apt step) with the system's own Python 3.11:
# everything Python goes into a virtual environment, .venv/, never the system
# interpreter (PEP 668).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPACE ?= search_spaces/lenet300_fashion.yaml
NAME ?= demo
# Test processes (pytest-xdist): the end-to-end tests wait on process starts and Ray as much as they compute,
# so three share two cores well.
TEST_WORKERS ?= 3

.PHONY: setup demo test bench lint clean-venv

setup: $(VENV)/.installed $(VENV)/.compiled

# Rebuilt when the project's dependencies change. Debian packages first: the
# Fashion-MNIST IDX files, venv support for the system Python, and PostgreSQL
# (a throwaway server is started by the tests themselves). torch and torchvision go in together, as
# the vision extra pins them (the tests run real torchvision and timm models): "===" takes the
# registry's own torch 2.13.0 (its CUDA 13 build, which runs on CPU-only machines too), never a local
# variant such as 2.13.0+cpu that a wheel folder may offer first and that torchvision 0.28.0 cannot
# load beside. That step takes about 2 minutes and 4.8 GB of disk (docs/vision.md).
$(VENV)/.installed: pyproject.toml
	@need=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || need="$$need dataset-fashion-mnist"; \
	$(SYSTEM_PYTHON) -c "import ensurepip, venv" 2>/dev/null || need="$$need python3-venv"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	if [ -n "$$need" ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
		else echo "setup: install$$need with your package manager, then run make again" >&2; exit 2; fi; \
	fi
	[ -x $(PY) ] || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=77"
	$(PY) -m pip install -q "torch===2.13.0" "torchvision==0.28.0"
	$(PY) -m pip install -q -e ".[test,vision,timm]"
	@touch $@

# The package's byte code, and the operator's numba kernels (compiled on a process' first call, some 20 s of CPU,
# and cached beside their source): made once here, so that the many processes of a test run or a search (Ray's
# trial workers among them) load them instead of each compiling them, also where PYTHONDONTWRITEBYTECODE is set.
$(VENV)/.compiled: $(VENV)/.installed $(wildcard clipq_search/*.py clipq_search/*/*.py)
	$(PY) -m compileall -q clipq_search
	$(PY) -c "import clipq_search; clipq_search.compile_cpu_kernels()"
	@touch $@

demo: setup
	$(PY) run_search.py demo $(SPACE) --name $(NAME)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

bench: setup
	$(PY) benchmarks/bench_overhead.py --floor
	$(PY) benchmarks/bench_storage.py
	$(PY) benchmarks/bench_orchestration.py --trials 16 --epochs 1

lint: setup
	$(VENV)/bin/ruff check clipq_search tests benchmarks run_search.py

clean-venv:
	rm -rf $(VENV)
