# gpt2-vision-language: `make demo` runs the offline miniature end to end, `make test` runs the tests.
# Needs only Python 3.11 and make; everything else goes into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup test bench smoke smoke-run demo demo-table demo-pictures demo-clean clip clip-run clean-venv

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
	$(BIN)/python bench/bench_lm_head.py

# ---------------------------------------------------------------------------------------------------------------
# make smoke: every full-scale stage at full size (GPT-2 124M, CLIP ViT-L/14 at 224 px, real-size JPEGs, T = 1024),
# for a step or two on a handful of items, through the same scripts and flags a GPU run uses, with the CUDA-only
# branches switched on through their CPU analogues (torch.compile with inductor, bf16 autocast, fused AdamW).
# The inputs are real-format stand-ins made offline by tests/fabricate.py (random weights in the hub's layouts).
# It proves that the full-scale paths run and fit together; not their speed, nor their numerics at scale.
SMOKE  := runs/smoke
WORLD  := $(SMOKE)/world
GPU_PATHS := --dtype bf16 --fused
LM_SMOKE := --preset gpt2-124m --data-dir $(SMOKE)/shards --out-dir $(SMOKE)/lm -B 1 -T 1024 --total-batch 2048 \
            --max-steps 2 --warmup-steps 1 --val-every 1 --val-steps 1 --hellaswag-every 1 --hellaswag-limit 4 \
            --hellaswag-dir $(WORLD)/hellaswag --sample-every 1 --ckpt-every 0 --log-every 1 --compile $(GPU_PATHS)
CAPTION_SMOKE := --lm $(WORLD)/gpt2 --coco-root $(WORLD)/coco -B 2 --total-batch 4 --max-steps 2 --warmup-steps 1 \
                 --val-every 1 --val-pairs 4 --log-every 1 --ckpt-every 0 $(GPU_PATHS)
EVAL_SMOKE := --coco-root $(WORLD)/coco --max-new-tokens 8 --batch-size 4 --metrics bleu cider

smoke: setup
	@$(MAKE) --no-print-directory smoke-run

smoke-run: $(WORLD)/done.json
	rm -rf $(SMOKE)/shards $(SMOKE)/lm $(SMOKE)/features $(SMOKE)/caption $(SMOKE)/results
	@echo "== FineWeb-Edu: parquet files in the hub dataset's layout -> GPT-2 token shards"
	$(BIN)/python data/fineweb.py --data-files $(WORLD)/fineweb/sample/10BT/*.parquet --out-dir $(SMOKE)/shards \
		--shard-size 100000 --workers 2
	@echo "== GPT-2 124M pretraining: one step, stopped, resumed for the second; val loss, HellaSwag, samples"
	$(BIN)/python train_lm.py $(LM_SMOKE) --stop-step 1
	$(BIN)/python train_lm.py $(LM_SMOKE) --resume auto
	@echo "== HellaSwag alone, on GPT-2 in the hub's layout (read as --lm gpt2 reads OpenAI's files)"
	$(BIN)/python data/hellaswag.py --model $(WORLD)/gpt2 --data-dir $(WORLD)/hellaswag --limit 4 --dtype bf16
	@echo "== CLIP ViT-L/14 features (224 px, 257 tokens pooled to 33): COCO 2017 train/val, Karpathy train/test"
	for split in train val; do $(BIN)/python data/coco.py features --root $(WORLD)/coco --split $$split \
		--encoder $(WORLD)/clip-vit-large-patch14 --out $(SMOKE)/features/$$split --batch-size 4 --dtype bf16 || exit 1; done
	for split in train test; do $(BIN)/python data/coco.py features --root $(WORLD)/coco --split $$split \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --encoder $(WORLD)/clip-vit-large-patch14 \
		--out $(SMOKE)/features/karpathy_$$split --batch-size 4 --dtype bf16 || exit 1; done
	@echo "== every bridge on GPT-2 124M: a step, stopped, resumed for the second (the Q-Former compiled)"
	for bridge in $(BRIDGES); do \
		flags="$(CAPTION_SMOKE) --bridge $$bridge --features $(SMOKE)/features/train --val-features $(SMOKE)/features/val \
		       --out-dir $(SMOKE)/caption/$$bridge $$([ $$bridge = qformer ] && echo --compile)"; \
		$(BIN)/python train_caption.py $$flags --stop-step 1 && $(BIN)/python train_caption.py $$flags --resume auto || exit 1; done
	@echo "== a bridge on the pretrained 124M LM, encoding the images on the fly; one on Karpathy's train split"
	$(BIN)/python train_caption.py $(CAPTION_SMOKE) --bridge linear --lm $(SMOKE)/lm/ckpt_000002.pt \
		--encoder $(WORLD)/clip-vit-large-patch14 --out-dir $(SMOKE)/caption/on-the-fly --max-steps 1
	$(BIN)/python train_caption.py $(CAPTION_SMOKE) --bridge qformer --karpathy-json $(WORLD)/coco/dataset_coco.json \
		--features $(SMOKE)/features/karpathy_train --out-dir $(SMOKE)/caption/karpathy --val-every 0
	@echo "== evaluation: COCO 2017 val (beam 3, cached features), Karpathy test (sampling, on the fly), the leak refused"
	$(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(foreach b,$(BRIDGES) on-the-fly,$(SMOKE)/caption/$(b)/ckpt_final.pt) \
		--features $(SMOKE)/features/val --out $(SMOKE)/results/coco_val --dtype bf16
	$(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/karpathy/ckpt_final.pt \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --method sample --top-p 0.9 --out $(SMOKE)/results/karpathy_test
	! $(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/qformer/ckpt_final.pt \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --features $(SMOKE)/features/karpathy_test \
		--out $(SMOKE)/results/leak 2> $(SMOKE)/leak.txt
	grep -q "was trained on 1 of the 2 images of Karpathy test" $(SMOKE)/leak.txt
	@echo "smoke: every full-scale stage ran"

$(WORLD)/done.json:
	$(BIN)/python tests/fabricate.py --out $(WORLD)

# ---------------------------------------------------------------------------------------------------------------
# make demo: the whole pipeline on the offline miniature, through the same scripts a full-scale run uses.
# Every stage is a file target, so a re-run reuses what is finished; train_lm / train_caption resume with
# --resume auto when interrupted. `make demo-clean` starts over. Stage times go to $(DEMO)/times.txt.
# Every size is a variable, so a shortened demo is one command line (tests/test_demo.py runs one).
# The world's seed: another seed draws other scenes, captions and corpus, into folders of its own (`make demo
# SHAPES_SEED=1`: data/shapes-1 and runs/demo-1), so two worlds never mix; the README shows seed 1's table.
SHAPES_SEED := 0
SEED_SUFFIX := $(if $(filter 0,$(SHAPES_SEED)),,-$(SHAPES_SEED))
DEMO    := runs/demo$(SEED_SUFFIX)
SHAPES  := data/shapes$(SEED_SUFFIX)
# The miniature has three trained parts, each trained here by the project's own code: the LM on the corpus
# (train_lm.py), CLIP on the train images and their captions (train_clip.py), then the bridges with both frozen.
# CLIP is saved in the Hugging Face CLIP layout, and the features read it as they read openai/clip-vit-large-patch14.
CLIP       := $(DEMO)/clip
# 600 steps of 128 pairs: shape is what CLIP learns last (seed-1 world: linear probe of its tokens for shape 0.74
# after 500 steps, 0.81 after 600; cross-attention on its features names both objects in 76% / 94% of images)
CLIP_STEPS := 600
CLIP_FLAGS := -B 128 --warmup-steps 30 --lr 2e-3 --val-every 0
# The frozen encoder of the bridges: that CLIP. The ablation, an untrained ViT of the same family:
# `make demo ENCODER=random-vit:mini:seed0 DEMO=runs/demo-random` (the README compares the two).
ENCODER := $(CLIP)
UNTRAINED := $(findstring random-vit:,$(ENCODER))
ENCODER_DEP := $(if $(UNTRAINED),,$(ENCODER)/config.json)
# How each bridge reads the patch tokens: POOL_<name>, else POOL. "none": CLIP's class token + its 64 patch tokens
# as they are; "4x8": patches averaged in vertical pairs (33 tokens, the full-scale default). Measured on the seed-0
# world (same LM and CLIP, the flags below): cross-attention, both objects named right 0.64 on 4x8 -> 0.98 on none
# (a pair mixes pieces of a shape with the background or each other, depending on where the shape sits); Q-Former
# 0.55 -> 0.63; the linear prefix 0.26 -> 0.07 (its prefix is one embedding per token: 65 word-like slots are too
# many for the tiny LM to read, and take 1.7x its training time).
POOL        := none
POOL_linear := 4x8
pool_of = $(or $(POOL_$(1)),$(POOL))
# Feature caches live in the run folder, one per pooling and split ($(CACHE)/none/train, ...), so another encoder or
# world (another DEMO) never meets this one's.
CACHE   := $(DEMO)/features
TRAIN_IMAGES := 5000
VAL_IMAGES   := 500
CORPUS_DOCS  := 20000
# The LM has learned to copy by step ~700 and its val loss flattens out after ~1,100 (0.314 after 1,200 steps, 0.308
# after 1,500), but the prefix bridges read the longer-trained LM far better: the Q-Former, on the same features,
# names both objects in 15% of images on the 1,200-step LM and in 85% on the 1,500-step one (seed 0).
LM_STEPS     := 1500
# 600 bridge steps (1.5 epochs of the 25,000 caption pairs): 300 left every bridge under-trained (CIDEr-D on the same
# LM and features, `make demo` with 300 -> 600 steps, on the world before the patch grid and the untrained ViT:
# linear 1.52 -> 2.02, xattn 3.32 -> 3.56, qformer 2.55 -> 3.12)
BRIDGE_STEPS := 600
# the Q-Former needs twice as many (the patch-grid world, seed 0: CIDEr-D 2.06 after 600 steps, 3.22 after 1,200;
# with the sin-cos start below, both objects named 0.60 / 0.58 after 1,000 steps and 0.89 / 0.93 after 1,200)
STEPS_qformer = $(shell echo $$(( 2 * $(BRIDGE_STEPS) )))
VAL_PAIRS    := 500
SHARD_SIZE   := 200000
LM      := $(DEMO)/lm/ckpt_$(shell printf %06d $(LM_STEPS)).pt
# Every bridge registered in bridges.py (its BRIDGES registry): a new bridge joins the demo by itself.
# (asked once per make, on first use: each ask imports torch)
BRIDGES = $(eval BRIDGES := $(shell $(BIN)/python -c "import bridges; print(*bridges.BRIDGES)"))$(BRIDGES)
# Standardising the features per token and channel with the train set's statistics (--standardize) is for the
# untrained ViT, whose channels have very uneven scales; the CLIP's tokens are read as they are. Measured on the
# CLIP's features, CIDEr-D with / without (seed 0, the world before the patch grid): linear 2.30 / 3.08, xattn
# 3.53 / 3.60, qformer 3.20 / 3.13.
STANDARDIZE := $(if $(UNTRAINED),--standardize,--no-standardize)
# --fused: AdamW's fused kernel, the default on a GPU, also on the CPU here (the linear prefix's 4.9M weights: its
# optimizer step 11.7 -> 3.0 ms, 5 s of the demo's 8 minutes).
CAPTION_FLAGS := -B 64 --total-batch 64 --warmup-steps 30 --val-every 150 --fused \
                 --val-pairs $(VAL_PAIRS) $(STANDARDIZE) --qformer-width 128 --qformer-heads 4 --queries 16
# Learning rate per bridge: LR_<name>, else LR (and steps: STEPS_<name>, else BRIDGE_STEPS). Cross-attention learns
# shape from the patch-grid world's CLIP only at 3e-3 (seed 0: shape 0.42 at 1e-3, 0.61 at 3e-3; both objects 0.15 /
# 0.37). The linear prefix, whole-image (below): seed 1, both objects 0.40 / 0.51 / 0.36 at 2e-3 / 3e-3 / 5e-3.
LR         := 1e-3
LR_linear  := 3e-3
LR_xattn   := 3e-3
# the Q-Former's loss sits on a plateau for its first 500-700 steps; at 2e-3 it leaves it sooner (both objects named:
# seed 0 0.63 -> 0.68, seed 1 0.09 -> 0.28 against 1e-3; 3e-3 on seed 1: 0.13)
LR_qformer := 2e-3
# More flags per bridge: FLAGS_<name>. Cross-attention's visual position embedding starts as a 2-D sin-cos of the
# grid (--vis-pos-grid): it then tells side by side from stacked (layout 0.54 -> 0.99 on seed 0, 0.72 -> 0.95 on
# seed 1) and gets the whole scene right twice as often (0.08 -> 0.15, 0.08 -> 0.12).
FLAGS_xattn := --vis-pos-grid
# The Q-Former's too (its queries read all 64 patches): both objects named 0.85 -> 0.89 on seed 0, 0.28 -> 0.93 on
# seed 1, where without it the loss sat on its plateau for most of the 1,200 steps (val loss 0.363 -> 0.191); these
# before --fused, with which the demo's table says 0.83 / 0.85.
FLAGS_qformer := --vis-pos-grid
# The linear prefix maps the whole image (all 33 tokens at once) to 12 prefix embeddings (--prefix-len, ClipCap's
# mapping in one layer) instead of one embedding per token: per token, each slot holds a piece of a shape and the
# 4-layer LM cannot assemble the object from them. Both objects named, seed 0 / seed 1: per token 0.15 / 0.06 (450
# steps at lr 3e-2); whole image, 600 steps at 3e-3: 12 slots 0.63 / 0.50, 16 slots 0.64 / 0.52 but 10 s slower.
FLAGS_linear := --prefix-len 12
# time one stage: run it, then append "<name> <seconds> s" to the summary. Every stage after the world's also
# records the world in the run folder (world.json): a later `make demo` or `make clip` refuses a DEMO of another world.
stage = @mkdir -p $(DEMO); [ ! -f $(SHAPES)/info.json ] || cp $(SHAPES)/info.json $(DEMO)/world.json; \
	start=$$(date +%s); $(2) && echo "$(1) $$(( $$(date +%s) - start )) s" >> $(DEMO)/times.txt

# Without this, make deletes the feature caches' manifest.json (pattern-rule "intermediate" files) after a run,
# and the next run would find the caches unfinished.
.SECONDARY:

# `demo` installs first, then runs the stages in a second make, which can ask bridges.py for the bridge list.
# A world already drawn is reused as it is: first check it is the one these variables ask for, and that the run
# folder (DEMO) was trained on it, if on anything.
demo: setup
	@$(CHECK_WORLD)
	@$(MAKE) --no-print-directory demo-table

demo-table: $(DEMO)/results/table.md
	@echo; echo "stage times (this run; reused stages are not listed):"; cat $(DEMO)/times.txt; rm -f $(DEMO)/times.txt
	@echo; cat $(DEMO)/results/table.md

WORLD_FLAGS := --out $(SHAPES) --train $(TRAIN_IMAGES) --val $(VAL_IMAGES) --corpus-docs $(CORPUS_DOCS) \
               --seed $(SHAPES_SEED)
CHECK_WORLD := $(BIN)/python data/shapes.py $(WORLD_FLAGS) --check --run-dir $(DEMO)

$(SHAPES)/info.json:
	$(call stage,data,$(BIN)/python data/shapes.py $(WORLD_FLAGS))

$(DEMO)/lm_shards/manifest.json: $(SHAPES)/info.json
	$(call stage,shards,$(BIN)/python data/fineweb.py --data-files $(SHAPES)/corpus.jsonl --out-dir $(DEMO)/lm_shards --shard-size $(SHARD_SIZE) --workers 2)

# lr 1e-3: the LM must learn to copy a scene's words from an earlier caption (what the bridges use), and on the
# seed-0 world it learned that late at 2e-3 (loss on a plateau near 0.63 until step 1,100; val loss 0.467 at the end),
# never at 4e-3 (0.607), and by step 700 at 1e-3 (0.308); a bridge on the late LM named both objects in 7% of images.
$(LM): $(DEMO)/lm_shards/manifest.json
	$(call stage,lm,$(BIN)/python train_lm.py --preset mini --data-dir $(DEMO)/lm_shards --vocab-subset --out-dir $(DEMO)/lm \
		--max-steps $(LM_STEPS) --warmup-steps 50 --lr 1e-3 -B 16 -T 128 --total-batch 2048 --val-every 500 \
		--sample-every 500 --ckpt-every 500 --log-every 100 --resume auto)

# A cache $(CACHE)/<pooling>/<split>: the stem is "none/train", "4x8/val", ...
$(CACHE)/%/manifest.json: $(SHAPES)/info.json $(ENCODER_DEP)
	$(call stage,features-$(subst /,-,$*),$(BIN)/python data/coco.py features --root $(SHAPES) --split $(notdir $*) \
		--encoder $(ENCODER) --pool $(patsubst %/,%,$(dir $*)) --out $(CACHE)/$*)

# A bridge needs the caches of its own pooling: $$* in the prerequisites is expanded a second time, with the stem.
.SECONDEXPANSION:
$(DEMO)/caption/%/ckpt_final.pt: $(LM) $$(CACHE)/$$(call pool_of,$$*)/train/manifest.json \
                                 $$(CACHE)/$$(call pool_of,$$*)/val/manifest.json
	$(call stage,bridge-$*,$(BIN)/python train_caption.py --bridge $* --lm $(LM) --coco-root $(SHAPES) \
		--features $(CACHE)/$(call pool_of,$*)/train --val-features $(CACHE)/$(call pool_of,$*)/val \
		--out-dir $(DEMO)/caption/$* $(CAPTION_FLAGS) \
		--max-steps $(or $(STEPS_$*),$(BRIDGE_STEPS)) --lr $(or $(LR_$*),$(LR)) $(FLAGS_$*) --resume auto)

# No --features: the bridges read caches of different poolings, so evaluate.py encodes the 500 val images once per
# pooling with the encoder each checkpoint records (a second or two here).
$(DEMO)/results/table.md: $(foreach b,$(BRIDGES),$(DEMO)/caption/$(b)/ckpt_final.pt)
	$(if $(BRIDGES),,$(error no bridges: `$(BIN)/python -c "import bridges"` failed; run `make setup`))
	$(call stage,evaluate,$(BIN)/python evaluate.py --checkpoints $^ --coco-root $(SHAPES) --split val \
		--out $(DEMO)/results --method greedy)

# make clip: the demo's CLIP stage alone: CLIP's contrastive pretraining by hand (train_clip.py) on the miniature's
# train images and captions, saved in the Hugging Face CLIP layout (config.json + model.safetensors), with its
# retrieval R@1 and linear probes in quality.json (variables above).

clip: setup
	@$(CHECK_WORLD)
	@$(MAKE) --no-print-directory clip-run

clip-run: $(CLIP)/config.json
	@if [ -f $(DEMO)/times.txt ]; then cat $(DEMO)/times.txt; rm $(DEMO)/times.txt; fi

$(CLIP)/config.json: $(SHAPES)/info.json
	$(call stage,clip,$(BIN)/python train_clip.py --root $(SHAPES) --out-dir $(CLIP) --max-steps $(CLIP_STEPS) \
		$(CLIP_FLAGS) --resume auto)

# The README's pictures are the demo's own: after `make demo`, this refreshes docs/ from runs/demo/results/.
demo-pictures: $(DEMO)/results/table.md
	mkdir -p docs
	cp $(DEMO)/results/grid_*.png $(DEMO)/results/attention_*.png $(DEMO)/results/val_loss.png docs/

demo-clean:
	rm -rf $(DEMO) $(SHAPES) $(CACHE)

clean-venv:
	rm -rf $(VENV)
