# make train: set up .venv (if missing) and train the tiny Stage-1 default on generated clips.
# make test:  set up .venv (if missing) and run the whole test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ivfast-installed
TSTAMP := $(VENV)/.ivfast-test-installed
CONFIG ?= configs/tiny.yaml
ARGS   ?=

.PHONY: install install-test train test lint bench clean

# The runtime (requirements.txt; what `make train` needs), then for `make test`, `make lint`,
# `make bench` the "test" extra (requirements-dev.txt) and the loggers' extras, whose tests read
# TensorBoard event files and W&B offline runs. GPU machines add .[gpu] (flash-attn, DALI) by hand.
$(STAMP): setup.py requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	@touch $(STAMP)

$(TSTAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q -e ".[test,tensorboard,wandb]"
	@touch $(TSTAMP)

install: $(STAMP)

install-test: $(TSTAMP)

train: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed --num_gpus 1 ivfast/train.py --config $(CONFIG) $(ARGS)

# The import contracts (.importlinter: the layers), then the suite. pytest exits 5 when it
# collects nothing: for this suite that is a failure, said plainly.
test: $(TSTAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m ivfast.compile_check --no-roofline
	@PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; exit $$rc

lint: $(TSTAMP)
	$(VENV)/bin/lint-imports

# Microbenchmarks (pytest-benchmark). On a GPU they write benchmarks/results/; on the CPU they
# run at small shapes to keep the harness honest.
bench: $(TSTAMP)
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' --benchmark-enable $(ARGS)

clean:
	rm -rf runs .pytest_cache
