# `make demo` and `make test` do all set-up themselves: they create .venv if it is missing and
# install the project with its test extra. Nothing else needs to be installed by hand.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two DDP workers under stock torchrun on the digits set; worker 1 is SIGKILLed once at step
# 77; torchrun restarts the group, which resumes from the newest committed checkpoint.
demo: $(STAMP)
	rm -rf runs/demo && mkdir -p runs
	$(VENV)/bin/torchrun --standalone --nproc-per-node=2 --max-restarts=1 --monitor-interval=0.1 \
	    train.py --ckpt-dir runs/demo --epochs 10 --inject kill:rank=1:step=77 2>&1 | tee runs/demo.log
	@echo; echo "== demo summary (full log: runs/demo.log) =="
	@grep -E "injecting|exitcode: -9|resumed from step|final test accuracy" runs/demo.log

test: $(STAMP)
	$(PY) -m pytest -v tests

clean:
	rm -rf runs .pytest_cache
