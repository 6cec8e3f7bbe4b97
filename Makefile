# Two entry points: `make demo` (set up, then run the whole chain on the default
# space) and `make test` (set up, then run the test suite). Both work on a fresh
# Debian machine with Python 3.11 as root; elsewhere run the same steps by hand.
PYTHON ?= python3
SPACE ?= search_spaces/lenet300_fashion.yaml
NAME ?= demo

.PHONY: setup demo test bench lint

setup:
	@if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

demo: setup
	$(PYTHON) run_search.py demo $(SPACE) --name $(NAME)

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_overhead.py
	$(PYTHON) benchmarks/bench_storage.py
	$(PYTHON) benchmarks/bench_orchestration.py --trials 16 --epochs 1

lint:
	ruff check clipq_search tests benchmarks run_search.py
