# Every target sets up .venv itself, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test bench bench-quick bench-accuracy lint clean

# The package and its own dependencies: all the demo needs.
$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e .
	touch $(CORE)

# Plus what the tests and the other targets use (the dev extra: the peer, the servers,
# the optional formats' libraries).
$(STAMP): $(CORE)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(CORE)
	DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

# TensorFlow writes the fixtures of the TFRecord tests (the code under test never imports
# it); where it cannot be installed those tests are skipped, saying why.
TF_STAMP := $(VENV)/.tf-tests
$(TF_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[tf-tests]' || echo "tensorflow-cpu could not be installed: the tests that need it will be skipped"
	touch $(TF_STAMP)

test: $(STAMP) $(TF_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Throughput, loader, eval speed and memory against the peer (smp); see BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py --quick

# The CamVid accuracy comparison: two 20-minute trainings side by side, one core each.
bench-accuracy: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py --accuracy

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
