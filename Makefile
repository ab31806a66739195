# The front door. Every target sets up .venv from requirements.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPE ?=
ARGS ?=
RUN ?=
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup train resume show list analyze fuse export bench test test-slow slurm sync clean

help:
	@echo "make train RECIPE=<name> [ARGS='key=value ...']   train a recipe (no RECIPE: list them, run tiny)"
	@echo "make resume RUN=<run_dir> [ARGS=...]              continue a run from its newest checkpoint"
	@echo "make show RECIPE=<name> [ARGS=...]                print the resolved config"
	@echo "make test | make test-slow | make bench | make sync | make clean"

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@# Optional: DeepSpeed (trainer.strategy=deepspeed_stage_2/3). Built against the torch above, without
	@# build isolation so that it never pulls another torch; setup still succeeds where it cannot install.
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation deepspeed==0.19.8 \
	  || echo "deepspeed not installed: trainer.strategy=deepspeed_* unavailable, its tests skip"
	@touch $(STAMP)

setup: $(STAMP)

list: $(STAMP)
	@$(PY) -m recipes list

train: $(STAMP)
ifeq ($(strip $(RECIPE)),)
	@echo "No RECIPE given; the recipes are:"; $(PY) -m recipes list | sed 's/^/  /'; echo "Running 'tiny'."
	$(PY) -m recipes train tiny $(ARGS)
else
	$(PY) -m recipes train $(RECIPE) $(ARGS)
endif

resume: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make resume RUN=runs/<recipe>/<run_id>"; exit 2; }
	$(PY) -m recipes resume $(RUN) $(ARGS)

analyze: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make analyze RUN=runs/<recipe>/<run_id>"; exit 2; }
	$(PY) -m recipes.analyze $(RUN) $(ARGS)

fuse: $(STAMP)
	$(PY) -m recipes.fusechat --stage $(or $(STAGE),all) $(ARGS)

export: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make export RUN=runs/<recipe>/<run_id>"; exit 2; }
	$(PY) -m recipes.export $(RUN) $(ARGS)

show: $(STAMP)
	@$(PY) -m recipes show $(or $(RECIPE),tiny) $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	WANDB_MODE=disabled $(PY) -m bench $(ARGS)

NODES ?= 1
GPUS ?= 1
slurm: $(STAMP)
	@test -n "$(RECIPE)" || { echo "usage: make slurm RECIPE=<name> NODES=<n> GPUS=<g> [ARGS=...]"; exit 2; }
	@mkdir -p runs
	sbatch --nodes=$(NODES) --ntasks-per-node=$(GPUS) --gres=gpu:$(GPUS) launch.sh $(RECIPE) $(ARGS)

sync: $(STAMP)
	$(PY) -m recipes sync runs

clean:
	rm -rf runs .cache .pytest_cache bench/tmp
