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

.PHONY: help setup train resume show list analyze fuse export bench test test-slow test-cluster lint slurm sweep sync dashboard report data plan clean

help:
	@echo "make train RECIPE=<name> [ARGS='key=value ...']   train a recipe (no RECIPE: list them, run tiny)"
	@echo "make resume RUN=<run_dir> [ARGS=...]              continue a run from its newest checkpoint"
	@echo "make show RECIPE=<name> [ARGS=...]                print the resolved config"
	@echo "make export RUN=<run_dir> | make analyze RUN=<run_dir> | MODEL=<hub id> | make fuse STAGE=<stage>"
	@echo "make slurm RECIPE=<name> NODES= GPUS= [PARTITION= TIME= CPUS= MEM= ...] | make sweep RECIPE= SWEEP= [SLURM=1]"
	@echo "make test | make test-slow | make lint | make bench | make sync | make clean"

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
	@test -n "$(RUN)$(MODEL)" || { echo "usage: make analyze RUN=runs/<recipe>/<run_id> | MODEL=<hub id | save_pretrained dir> [ARGS='key=value ...']"; exit 2; }
	$(PY) -m recipes analyze $(if $(MODEL),--model $(MODEL)) $(RUN) $(ARGS)

fuse: $(STAMP)
	$(PY) -m recipes fuse --stage $(or $(STAGE),all) $(ARGS)

export: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make export RUN=runs/<recipe>/<run_id>"; exit 2; }
	$(PY) -m recipes export $(RUN) $(ARGS)

show: $(STAMP)
	@$(PY) -m recipes show $(or $(RECIPE),tiny) $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "slow and not slurm_extra" $(PYTEST_ARGS)

test-cluster: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m slurm_extra tests/test_slurm_cluster.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	WANDB_MODE=disabled $(PY) -m bench $(ARGS)

# SLURM: `make slurm RECIPE=x NODES=2 GPUS=4 PARTITION=gpu TIME=24:00:00 CPUS=8 MEM=200G`; anything else
# through SBATCH_ARGS="--constraint=a100 ...", or sbatch's own SBATCH_* environment variables
# (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT, ...), which these override.
NODES ?= 1
GPUS ?= 1
PARTITION ?=
ACCOUNT ?=
QOS ?=
TIME ?=
CPUS ?=
MEM ?=
SBATCH_ARGS ?=
SWEEP ?=
SLURM ?=
SBATCH_FLAGS = --nodes=$(NODES) --ntasks-per-node=$(GPUS) $(if $(filter-out 0,$(GPUS)),--gres=gpu:$(GPUS)) \
  $(if $(PARTITION),--partition=$(PARTITION)) $(if $(ACCOUNT),--account=$(ACCOUNT)) $(if $(QOS),--qos=$(QOS)) \
  $(if $(TIME),--time=$(TIME)) $(if $(CPUS),--cpus-per-task=$(CPUS)) $(if $(MEM),--mem=$(MEM)) $(SBATCH_ARGS)

slurm: $(STAMP)
	@test -n "$(RECIPE)" || { echo "usage: make slurm RECIPE=<name> NODES=<n> GPUS=<g> [PARTITION= ACCOUNT= QOS= TIME= CPUS= MEM= SBATCH_ARGS=] [ARGS=...]"; exit 2; }
	@$(PY) -m recipes show $(RECIPE) $(ARGS) > /dev/null
	sbatch $(SBATCH_FLAGS) launch.sh $(RECIPE) $(ARGS)

sweep: $(STAMP)
	@test -n "$(RECIPE)" -a -n "$(SWEEP)" || { echo "usage: make sweep RECIPE=<name> SWEEP=<file.yaml> [SLURM=1 + the make slurm settings] [ARGS=...]"; exit 2; }
ifeq ($(SLURM),1)
	@n=$$($(PY) -m recipes sweep $(RECIPE) $(SWEEP) --count $(ARGS)) && \
	  echo "sbatch --array=0-$$((n - 1)): $$n points" && \
	  sbatch $(SBATCH_FLAGS) --array=0-$$((n - 1)) --export=ALL,SWEEP_FILE=$(abspath $(SWEEP)) launch.sh $(RECIPE) $(ARGS)
else
	$(PY) -m recipes sweep $(RECIPE) $(SWEEP) $(ARGS)
endif

sync: $(STAMP)
	$(PY) -m recipes sync $(RUN)

dashboard: $(STAMP)
	@test -n "$(RECIPE)" || { echo "usage: make dashboard RECIPE=<name> [PROJECT=<wandb project>] [ARGS=...]"; exit 2; }
	$(PY) -m recipes dashboard $(RECIPE) $(if $(PROJECT),--project $(PROJECT)) $(ARGS)

report: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make report RUN=<run_dir>"; exit 2; }
	$(PY) -m recipes report $(RUN) $(ARGS)

data: $(STAMP)
	$(PY) -m recipes data $(or $(RECIPE),tiny) $(ARGS)

plan: $(STAMP)
	@test -n "$(RECIPE)" || { echo "usage: make plan RECIPE=<name> NODES=<n> GPUS=<g> [ARGS=...]"; exit 2; }
	$(PY) -m recipes plan $(RECIPE) --nodes $(NODES) --gpus $(GPUS) $(ARGS)

clean:
	rm -rf runs .cache .pytest_cache bench/tmp
