# Every target below calls the `revq-pipe` CLI. With no arguments they run the embedded demo;
# CONFIG=configs/512T.yaml (and SET="--set key=value ...") selects another preset.
CONFIG ?= configs/demo.yaml
SET ?=
# Every generated cache, run and token store lands below ROOT (git-ignored).
ROOT ?= artifacts
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3

VENV := .venv
CLI := $(VENV)/bin/revq-pipe
ARGS := --config $(CONFIG) --set paths.root=$(ROOT) $(SET)
DEMO := $(filter configs/demo.yaml,$(CONFIG))

.PHONY: setup demo-images encode train eval tokenize tolerance demo prior test bench clean

setup: $(VENV)/.installed

# torch goes in first and alone, so that no other dependency can pull a different build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

# The demo's images are generated (deterministically) from photographs shipped in scikit-image.
demo-images: setup
	$(if $(DEMO),$(CLI) demo images $(ARGS),@true)

encode: setup demo-images
	$(CLI) encode --split train $(ARGS)
	$(CLI) encode --split val $(ARGS)

train: setup
	$(CLI) train $(ARGS)

eval: setup
	$(CLI) eval --split val $(ARGS)

tokenize: setup
	$(CLI) tokenize --split val $(ARGS)

tolerance: setup
	$(CLI) tolerance $(ARGS)

demo: encode train eval tokenize tolerance
	@echo "demo finished: report $(ROOT)/runs/demo/eval_val.json, grid $(ROOT)/runs/demo/eval_val_grid.png," \
	      "tolerance $(ROOT)/runs/demo/tolerance.json and .png, tokens $(ROOT)/runs/demo/tokens/val.zarr"

# --- the token prior (docs/generation.md) ----------------------------------------------------------------
# After `make demo` with the same ROOT: train tokens of every view (AUGMENT) beside the demo tokenizer's run,
# their .npy export, the demo prior, 32 samples (RUN/samples/) and its evaluation (RUN/prior_eval.json).
PRIOR_CONFIG ?= configs/prior-demo.yaml
AUGMENT ?= flip
PRIOR_ARGS := --config $(PRIOR_CONFIG) --set paths.root=$(ROOT) $(SET)
DEMO_TOKENS := $(ROOT)/runs/demo/tokens

prior: setup
	$(CLI) tokenize --split train --augment $(AUGMENT) --out '{run}/tokens/{split}-$(AUGMENT).zarr' $(ARGS)
	$(CLI) tokenize --split val $(ARGS)
	$(CLI) tokens export $(DEMO_TOKENS)/train-$(AUGMENT).zarr --format npy --out $(DEMO_TOKENS)/train-$(AUGMENT).npy
	$(CLI) prior train $(PRIOR_ARGS)
	$(CLI) prior sample --num 32 $(PRIOR_ARGS)
	$(CLI) prior eval $(PRIOR_ARGS)
# --- end of the token prior ------------------------------------------------------------------------------

test: setup
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python benchmarks/bench_train_step.py
	$(VENV)/bin/python benchmarks/bench_cache.py
	$(VENV)/bin/python benchmarks/bench_encode.py
	$(VENV)/bin/python benchmarks/bench_online_vs_cached.py

clean:
	rm -rf $(ROOT)
