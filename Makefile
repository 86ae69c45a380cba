# gpt2-vision-language: `make demo` runs the offline miniature end to end, `make test` runs the tests.
# Needs only Python 3.11 and make; everything else goes into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test bench demo demo-table demo-pictures demo-clean clean-venv

setup: $(VENV)/.installed

# Re-install whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_train_lm.py
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_caption.py

# ---------------------------------------------------------------------------------------------------------------
# make demo: the whole pipeline on the offline miniature, through the same scripts a full-scale run uses.
# Every stage is a file target, so a re-run reuses what is finished; train_lm / train_caption resume with
# --resume auto when interrupted. `make demo-clean` starts over. Stage times go to $(DEMO)/times.txt.
# Every size is a variable, so a shortened demo is one command line (tests/test_demo.py runs one).
DEMO    := runs/demo
SHAPES  := data/shapes
CACHE   := data/cache
ENCODER := random-vit:mini:seed0
TRAIN_IMAGES := 5000
VAL_IMAGES   := 500
CORPUS_DOCS  := 20000
LM_STEPS     := 1500
BRIDGE_STEPS := 300
VAL_PAIRS    := 500
SHARD_SIZE   := 200000
LM      := $(DEMO)/lm/ckpt_$(shell printf %06d $(LM_STEPS)).pt
# Every bridge registered in bridges.py (its BRIDGES registry): a new bridge joins the demo by itself.
BRIDGES = $(shell $(BIN)/python -c "import bridges; print(*bridges.BRIDGES)")
CAPTION_FLAGS := -B 64 --total-batch 64 --max-steps $(BRIDGE_STEPS) --warmup-steps 30 --val-every 100 \
                 --val-pairs $(VAL_PAIRS) --standardize --qformer-width 128 --qformer-heads 4 --queries 16
# Learning rate per bridge: LR_<name>, else LR. One linear layer (21k parameters) needs a far larger step than
# the attention bridges (0.6-0.8M).
LR         := 1e-3
LR_linear  := 3e-2
# time one stage: run it, then append "<name> <seconds> s" to the summary
stage = @mkdir -p $(DEMO); start=$$(date +%s); $(2) && echo "$(1) $$(( $$(date +%s) - start )) s" >> $(DEMO)/times.txt

# Without this, make deletes the feature caches' manifest.json (pattern-rule "intermediate" files) after a run,
# and the next run would find the caches unfinished.
.SECONDARY:

# `demo` installs first, then runs the stages in a second make, which can ask bridges.py for the bridge list.
demo: setup
	@$(MAKE) --no-print-directory demo-table

demo-table: $(DEMO)/results/table.md
	@echo; echo "stage times (this run; reused stages are not listed):"; cat $(DEMO)/times.txt; rm -f $(DEMO)/times.txt
	@echo; cat $(DEMO)/results/table.md

$(SHAPES)/info.json:
	$(call stage,data,$(BIN)/python data/shapes.py --out $(SHAPES) --train $(TRAIN_IMAGES) --val $(VAL_IMAGES) \
		--corpus-docs $(CORPUS_DOCS) --seed 0)

$(DEMO)/lm_shards/manifest.json: $(SHAPES)/info.json
	$(call stage,shards,$(BIN)/python data/fineweb.py --data-files $(SHAPES)/corpus.jsonl --out-dir $(DEMO)/lm_shards --shard-size $(SHARD_SIZE) --workers 2)

$(LM): $(DEMO)/lm_shards/manifest.json
	$(call stage,lm,$(BIN)/python train_lm.py --preset mini --data-dir $(DEMO)/lm_shards --vocab-subset --out-dir $(DEMO)/lm \
		--max-steps $(LM_STEPS) --warmup-steps 50 --lr 2e-3 -B 16 -T 128 --total-batch 2048 --val-every 500 \
		--sample-every 500 --ckpt-every 500 --log-every 100 --resume auto)

$(CACHE)/shapes_%/manifest.json: $(SHAPES)/info.json
	$(call stage,features-$*,$(BIN)/python data/coco.py features --root $(SHAPES) --split $* --encoder $(ENCODER) --out $(CACHE)/shapes_$*)

$(DEMO)/caption/%/ckpt_final.pt: $(LM) $(CACHE)/shapes_train/manifest.json $(CACHE)/shapes_val/manifest.json
	$(call stage,bridge-$*,$(BIN)/python train_caption.py --bridge $* --lm $(LM) --coco-root $(SHAPES) \
		--features $(CACHE)/shapes_train --val-features $(CACHE)/shapes_val --out-dir $(DEMO)/caption/$* $(CAPTION_FLAGS) \
		--lr $(or $(LR_$*),$(LR)) --resume auto)

$(DEMO)/results/table.md: $(foreach b,$(BRIDGES),$(DEMO)/caption/$(b)/ckpt_final.pt)
	$(if $(BRIDGES),,$(error no bridges: `$(BIN)/python -c "import bridges"` failed; run `make setup`))
	$(call stage,evaluate,$(BIN)/python evaluate.py --checkpoints $^ --coco-root $(SHAPES) --split val \
		--features $(CACHE)/shapes_val --out $(DEMO)/results --method greedy)

# The README's pictures are the demo's own: after `make demo`, this refreshes docs/ from runs/demo/results/.
demo-pictures: $(DEMO)/results/table.md
	mkdir -p docs
	cp $(DEMO)/results/grid_*.png $(DEMO)/results/attention_*.png $(DEMO)/results/val_loss.png docs/

demo-clean:
	rm -rf $(DEMO) $(SHAPES) $(CACHE)/shapes_train $(CACHE)/shapes_val

clean-venv:
	rm -rf $(VENV)
