# The two commands of the README: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= outputs/demo

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO)

test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)  # speed benchmarks (benchmarks/speed/), each rewrites its section of docs/speed.md
	$(BIN)/python benchmarks/speed/infer_latency.py
	$(BIN)/python benchmarks/speed/int8.py
	$(BIN)/python benchmarks/speed/runtimes.py
	$(BIN)/python benchmarks/speed/train_throughput.py
	$(BIN)/python benchmarks/speed/normal_scoring.py

clean:
	rm -rf outputs .pytest_cache
