# gpt2-vision-language: `make demo` runs the offline miniature end to end, `make test` runs the tests.
# Needs only Python 3.11 and make; everything else goes into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: FORCE setup test bench smoke smoke-run demo demo-table demo-pictures demo-clean clip clip-run study study-world \
        clean-venv gpu-check vqa

setup: $(VENV)/.installed
	@$(BIN)/python -c "import torch, tiktoken, PIL" 2>/dev/null || { echo "$(VENV) is stale: its Python cannot import \
	the requirements (made by another Python, or that Python is gone). Run \`make clean-venv setup\`." >&2; exit 1; }

# Re-install whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# the smoke test (one long test) runs beside the rest, each half on one thread (on two cores, two halves of two
# threads each would spin against each other); its report follows theirs
TEST_SMOKE_LOG := runs/test-smoke.log
test: setup
	$(BIN)/ruff check --quiet . || { echo "make test: ruff found the problems above (ruff.toml)" >&2; exit 1; }
	@mkdir -p $(dir $(TEST_SMOKE_LOG))
	@OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/test_smoke.py > $(TEST_SMOKE_LOG) 2>&1 & smoke=$$!; \
	echo "make test: tests/test_smoke.py runs beside the others (its report: $(TEST_SMOKE_LOG), shown at the end)"; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests --ignore=tests/test_smoke.py; rest=$$?; \
	wait $$smoke; smoke_status=$$?; cat $(TEST_SMOKE_LOG); \
	[ $$rest -eq 0 ] && [ $$smoke_status -eq 0 ]

bench: setup
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_train_lm.py
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_caption.py
	$(BIN)/python bench/bench_lm_head.py
	$(BIN)/python bench/bench_cpu.py

# make gpu-check: a GPU's check (bench/gpu_check.py): one table of what the full-scale times rest on, its
# JSON in GPU_CHECK_OUT. No setup: a GPU machine runs it with its own Python and torch (python3, unless .venv
# is there) and the other requirements (the script names any that are missing). GPU_CHECK_FLAGS: more flags,
# e.g. --work-dir runs/gpu_work, whose token shards are reused (made where `datasets` is installed).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_OUT    ?= runs/gpu_check.json
GPU_CHECK_FLAGS  ?=
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_FLAGS)

# ---------------------------------------------------------------------------------------------------------------
# make smoke: every full-scale stage at full size (GPT-2 124M, CLIP ViT-L/14 at 224 px, real-size JPEGs, T = 1024),
# for a step or two on a handful of items, through the same scripts and flags a GPU run uses, with the CUDA-only
# branches switched on through their CPU analogues (torch.compile, bf16 autocast, fused AdamW).
# The inputs are real-format stand-ins made offline by tests/fabricate.py (random weights in the hub's layouts).
# It proves that the full-scale paths run and fit together; not their speed, nor their numerics at scale.
SMOKE  := runs/smoke
WORLD  := $(SMOKE)/world
# bf16 autocast where the CPU computes in bf16 (avx512_bf16 or AMX); a CPU without either emulates it, many times
# slower than fp32 (docs/testing.md): there the smoke runs in fp32 and says so (the bf16 branches stay tested at
# small size: tests/test_gpu_paths.py)
SMOKE_DTYPE := $(if $(shell grep -qswE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo yes),bf16,fp32)
GPU_PATHS := --dtype $(SMOKE_DTYPE) --fused
LM_SMOKE := --preset gpt2-124m --data-dir $(SMOKE)/shards --out-dir $(SMOKE)/lm -B 1 -T 1024 --total-batch 1024 \
            --max-steps 2 --warmup-steps 1 --val-every 1 --val-steps 1 --hellaswag-every 1 --hellaswag-limit 4 \
            --hellaswag-dir $(WORLD)/hellaswag --sample-every 1 --ckpt-every 0 --log-every 1 $(GPU_PATHS)
CAPTION_SMOKE := --lm $(WORLD)/gpt2 --coco-root $(WORLD)/coco -B 2 --total-batch 4 --max-steps 2 --warmup-steps 1 \
                 --val-every 1 --val-pairs 4 --log-every 1 --ckpt-every 0 $(GPU_PATHS)
EVAL_SMOKE := --coco-root $(WORLD)/coco --max-new-tokens 8 --batch-size 4 --metrics bleu cider

smoke: setup
	@$(MAKE) --no-print-directory smoke-run

smoke-run: $(WORLD)/done.json
	rm -rf $(SMOKE)/shards $(SMOKE)/lm $(SMOKE)/features $(SMOKE)/caption $(SMOKE)/results $(SMOKE)/stage1
	@echo "== autocast dtype: $(SMOKE_DTYPE)$(if $(filter fp32,$(SMOKE_DTYPE)), (this CPU has no native bf16: \
	avx512_bf16 or AMX; SMOKE_DTYPE=bf16 forces it, slowly))"
	@echo "== FineWeb-Edu: parquet files in the hub dataset's layout -> GPT-2 token shards"
	$(BIN)/python data/fineweb.py --data-files $(WORLD)/fineweb/sample/10BT/*.parquet --out-dir $(SMOKE)/shards \
		--shard-size 100000 --workers 2
	@echo "== GPT-2 124M pretraining: one step, stopped, resumed for the second; val loss, HellaSwag, samples"
	$(BIN)/python train_lm.py $(LM_SMOKE) --stop-step 1
	$(BIN)/python train_lm.py $(LM_SMOKE) --resume auto
	@echo "== HellaSwag alone, on GPT-2 in the hub's layout (read as --lm gpt2 reads OpenAI's files)"
	$(BIN)/python data/hellaswag.py --model $(WORLD)/gpt2 --data-dir $(WORLD)/hellaswag --limit 4 --dtype $(SMOKE_DTYPE)
	@echo "== CLIP ViT-L/14 features (224 px, 257 tokens pooled to 33): COCO 2017 train/val, Karpathy test"
	for split in train val; do $(BIN)/python data/feature_cache.py --root $(WORLD)/coco --split $$split \
		--encoder $(WORLD)/clip-vit-large-patch14 --out $(SMOKE)/features/$$split --batch-size 4 --dtype $(SMOKE_DTYPE) || exit 1; done
	$(BIN)/python data/feature_cache.py --root $(WORLD)/coco --split test --karpathy-json $(WORLD)/coco/dataset_coco.json \
		--encoder $(WORLD)/clip-vit-large-patch14 --out $(SMOKE)/features/karpathy_test --batch-size 4 --dtype $(SMOKE_DTYPE)
	@echo "== every bridge on GPT-2 124M, two steps, compiled: traced forward and backward by aot_eager (inductor's \
	kernels at this size: minutes each on a CPU; tests/test_train_lm.py builds them for the tiny LM); the Q-Former \
	stopped after one step and resumed"
	for bridge in $(BRIDGES); do \
		flags="$(CAPTION_SMOKE) --bridge $$bridge --features $(SMOKE)/features/train --val-features $(SMOKE)/features/val \
		       --out-dir $(SMOKE)/caption/$$bridge --compile --compile-backend aot_eager"; \
		if [ $$bridge = qformer ]; then $(BIN)/python train_caption.py $$flags --stop-step 1 && \
			$(BIN)/python train_caption.py $$flags --resume auto --no-compile || exit 1; \
		else $(BIN)/python train_caption.py $$flags || exit 1; fi; done
	@echo "== BLIP-2's first stage at full size: the Q-Former (768 wide, 32 queries) against the captions (its second \
	stage, into GPT-2, is the VQAv2 run below)"
	$(BIN)/python qformer_stage1.py --coco-root $(WORLD)/coco --features $(SMOKE)/features/train \
		--val-features $(SMOKE)/features/val --out-dir $(SMOKE)/stage1 -B 2 --max-steps 2 --warmup-steps 1 \
		--val-every 1 --log-every 1 --ckpt-every 0 --text-layers 2 --text-width 128 --text-heads 4 --embed-dim 128 \
		$(GPU_PATHS)
	@echo "== a bridge on the pretrained 124M LM, on Karpathy's train split, encoding the images on the fly"
	$(BIN)/python train_caption.py $(CAPTION_SMOKE) --bridge linear --lm $(SMOKE)/lm/ckpt_000002.pt \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --encoder $(WORLD)/clip-vit-large-patch14 \
		--out-dir $(SMOKE)/caption/karpathy --max-steps 1 --val-every 0
	@echo "== evaluation: COCO 2017 val (beam 3, cached features), Karpathy test (sampling, on the fly), the leak refused"
	$(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(foreach b,$(BRIDGES),$(SMOKE)/caption/$(b)/ckpt_final.pt) \
		--features $(SMOKE)/features/val --out $(SMOKE)/results/coco_val --dtype $(SMOKE_DTYPE)
	$(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/karpathy/ckpt_final.pt \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --method sample --top-p 0.9 --out $(SMOKE)/results/karpathy_test
	! $(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/qformer/ckpt_final.pt \
		--karpathy-json $(WORLD)/coco/dataset_coco.json --features $(SMOKE)/features/karpathy_test \
		--out $(SMOKE)/results/leak 2> $(SMOKE)/leak.txt
	grep -q "was trained on 1 of the 2 images of Karpathy test" $(SMOKE)/leak.txt
	@echo "== VQAv2 (COCO 2014 images): the instruction-aware Q-Former, from the first stage, on captions and questions, \
	VQAv2 val answered (cached features), and its leak refused (val2014's questions about an image in train2017)"
	$(BIN)/python train_caption.py $(CAPTION_SMOKE) --bridge qformer --qformer-instruction --task mix \
		--qformer-init $(SMOKE)/stage1/ckpt_final.pt \
		--questions $(WORLD)/coco/v2_OpenEnded_mscoco_train2014_questions.json --features $(SMOKE)/features/train \
		--val-features $(SMOKE)/features/val --out-dir $(SMOKE)/caption/vqa
	$(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/vqa/ckpt_final.pt \
		--questions $(WORLD)/coco/v2_OpenEnded_mscoco_val2014_questions.json --features $(SMOKE)/features/val \
		--out $(SMOKE)/results/vqa --dtype $(SMOKE_DTYPE)
	! $(BIN)/python evaluate.py $(EVAL_SMOKE) --checkpoints $(SMOKE)/caption/vqa/ckpt_final.pt \
		--questions $(WORLD)/coco/leak/v2_OpenEnded_mscoco_val2014_questions.json \
		--out $(SMOKE)/results/leak_vqa 2> $(SMOKE)/leak_vqa.txt
	grep -q "was trained on 1 of the 4 images of the questions of" $(SMOKE)/leak_vqa.txt
	@echo "smoke: every full-scale stage ran"

$(WORLD)/done.json:
	$(BIN)/python tests/fabricate.py --out $(WORLD)

# ---------------------------------------------------------------------------------------------------------------
# make demo: the whole pipeline on the offline miniature, through the same scripts a full-scale run uses:
# world -> LM (train_lm.py) and CLIP (miniature/train_clip.py) -> feature caches -> every bridge -> evaluate.py.
# Why each setting is what it is, with the measurements and their commands: docs/miniature.md.
# Every stage is a file target: a re-run reuses what is finished, an interrupted trainer resumes (--resume auto).
# Stages that do not wait for each other run side by side, each writing its output to <run folder>/logs/<stage>.log.

# the world's seed: another draws other scenes, captions and corpus, into folders of its own (data/shapes-1, runs/demo-1)
SHAPES_SEED := 0
SEED_SUFFIX := $(if $(filter 0,$(SHAPES_SEED)),,-$(SHAPES_SEED))
SHAPES      := data/shapes$(SEED_SUFFIX)
# What the bridges learn: captions, or (make vqa) questions about the scenes too: TASK=mix (or questions alone).
# Then the LM is pretrained on corpus_qa.jsonl, which also holds answered questions (a corpus of captions alone
# never shows it a question), into lm-qa/ (QA = -qa); the CLIP and its caches stay the demo's.
TASK := captions
QA   := $(if $(filter captions,$(TASK)),,-qa)
# the world's trained parts (LM, CLIP, feature caches), and where the bridges and the table go (make study: elsewhere;
# make vqa: runs/demo/mix)
DEMO        := runs/demo$(SEED_SUFFIX)
RUN         := $(DEMO)$(if $(QA),/$(TASK))
# the training seed of every trained part; make study varies the bridges'
SEED        := 0
LM_SEED     := $(SEED)
CLIP_SEED   := $(SEED)
BRIDGE_SEED := $(SEED)
# The cores: nproc's, or OMP_NUM_THREADS where it is set (make test runs each half on one thread).
CORES   := $(or $(OMP_NUM_THREADS),$(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2))
# Stages side by side, each on its share of the cores, except the LM and the CLIP: each runs alone on every core
# (the demo trains the LM first, then the CLIP), since the CLIP has about twice the LM's work, and side by side the
# LM's core would idle while the CLIP finishes (docs/miniature.md)
JOBS    := 2
THREADS := $(shell echo $$(( $(CORES) / $(JOBS) > 1 ? $(CORES) / $(JOBS) : 1 )))
THREADS_lm   := $(CORES)
THREADS_lm-qa := $(CORES)
THREADS_lm-tuned := $(CORES)
THREADS_clip := $(CORES)
# the table is made alone too, after every bridge (make study runs it beside other runs' bridges: THREADS there)
THREADS_evaluate := $(CORES)

# make passes paths to the stages as words: a path with a space would be split, so it is refused up front
$(foreach v,SHAPES DEMO RUN STUDY,$(if $(word 2,$($(v))),$(error $(v)='$($(v))' has a space in it; make would split \
  it between arguments: choose a path without spaces)))

TRAIN_IMAGES := 5000
VAL_IMAGES   := 500
CORPUS_DOCS  := 20000
SHARD_SIZE   := 200000
# the LM: long enough that the prefix bridges can read it, not only that it copies text
LM_STEPS     := 1500
LM_PRETRAINED := $(DEMO)/lm$(QA)/ckpt_$(shell printf %06d $(LM_STEPS)).pt
# make vqa: the pretrained LM is answer-tuned (tune_lm.py: questions after two captions, the loss on the captions
# and the answer) before the bridges freeze it; pretrained alone, it answers little better with the scene described than without
# (docs/miniature.md). 6,000 steps: after 2,000 world 0's tuned LM answered a crossed "is there" from a caption at
# chance, and cross-attention on it did not learn to either, on two seeds; after 6,000 both seeds did
TUNE_STEPS  := 6000
LM          := $(if $(QA),$(DEMO)/lm-tuned/ckpt_final.pt,$(LM_PRETRAINED))
# CLIP, the bridges' frozen encoder, saved in the hub's CLIP layout; the ablation is an untrained ViT of the same
# family: `make demo ENCODER=random-vit:mini:seed0 DEMO=runs/demo-random`. Its steps: at 600 its tokens' quality
# swung with the seed and the world, and the prefix bridges with it; 1,200 steady it (docs/miniature.md)
CLIP_STEPS := 1200
CLIP_FLAGS := -B 128 --warmup-steps 30 --lr 2e-3 --val-every 0
CLIP       := $(DEMO)/clip
ENCODER    := $(CLIP)
UNTRAINED  := $(findstring random-vit:,$(ENCODER))
ENCODER_DEP := $(if $(UNTRAINED),,$(ENCODER)/config.json)
# standardising the tokens is for the untrained ViT's uneven channels; the CLIP's are read as they are
STANDARDIZE := $(if $(UNTRAINED),--standardize,--no-standardize)
# Feature caches in the run folder, one per pooling and split ($(CACHE)/none/train, ...), so no other world meets them
CACHE := $(DEMO)/features

# Every bridge registered in bridges.py joins the demo by itself: its @register("name") lines, read once per make
# (read, not imported: an import of bridges.py loads torch, seconds for every make the demo and the tests start).
BRIDGES = $(eval BRIDGES := $(shell sed -n 's/^@register("\([^"]*\)")$$/\1/p' bridges.py))$(BRIDGES)
# The bridges' recipe. Per bridge: POOL_<name>, STEPS_<name>, LR_<name>, FLAGS_<name> override POOL, BRIDGE_STEPS, LR
# (and QUESTION_REPEATS_<name> overrides QUESTION_REPEATS).
# "none": the class token + all 64 patch tokens; "4x8": patches averaged in vertical pairs (33 tokens).
POOL         := none
POOL_linear  := 4x8
BRIDGE_STEPS := 600
# the prefix bridges need more steps than cross-attention to learn on every seed (docs/miniature.md)
STEPS_linear  = $(or $(VQA_STEPS),$(shell echo $$(( 3 * $(BRIDGE_STEPS) ))))
STEPS_qformer = $(or $(VQA_STEPS),$(shell echo $$(( 2 * $(BRIDGE_STEPS) ))))
STEPS_xattn   = $(VQA_STEPS)
# make vqa: every bridge shares its steps between captions and questions, 10x BRIDGE_STEPS: at their caption steps
# the prefix bridges answered 0.64-0.79 and cross-attention's captions fell below the caption study's floors; at
# 10x (questions read twice) the Q-Former learned the binding "is there" asks for (docs/miniature.md)
VQA_STEPS     = $(if $(QA),$(shell echo $$(( 10 * $(BRIDGE_STEPS) ))))
LR           := 1e-3
LR_linear    := 3e-3
LR_xattn     := 3e-3
LR_qformer   := 2e-3
VAL_PAIRS    := 500
QFORMER_SIZES := --qformer-width 128 --qformer-heads 4 --queries 16
CAPTION_FLAGS := -B 64 --total-batch 64 --warmup-steps 30 --val-every 150 --fused --val-pairs $(VAL_PAIRS) \
                 $(STANDARDIZE) $(QFORMER_SIZES)
# the prefix bridges read their input out whole: every prefix slot is a Linear of the whole image (linear, ClipCap's
# mapping in one layer) or of all 16 queries' outputs (Q-Former), not one slot per token or query. The linear map
# starts at zero (--zero-init), so its seed changes only the batches' order: from a random start it swung with the
# seed (docs/miniature.md). make vqa: 48 slots, not 12. The linear prefix cannot read the question, so the frozen
# LM looks every answer up in the prefix, and more slots write the scene out in more ways: it answered more with
# 24 than 12, and more with 48, its stage then make vqa's longest (docs/miniature.md, "48 slots for the linear prefix")
LINEAR_SLOTS   = $(if $(QA),48,12)
FLAGS_linear  := --prefix-len $(LINEAR_SLOTS) --zero-init
# the attention bridges' visual positions start as a 2-D sin-cos of the patch grid
FLAGS_xattn   := --vis-pos-grid
# the Q-Former's queries start at unit scale (--query-std 1.0), not BLIP-2's 0.02: at 0.02 they collapse into one
# (docs/miniature.md, "BLIP-2's first stage for the Q-Former")
QUERY_STD     := 1.0
FLAGS_qformer := --vis-pos-grid --prefix-len 16 --query-std $(QUERY_STD)
# make vqa: the Q-Former reads the question (InstructBLIP's instruction-aware queries): on version 3's questions it
# answered more than the plain one on each of four tuned LMs (docs/miniature.md)
FLAGS_qformer += $(if $(QA),--qformer-instruction)
# On the mix each question is read QUESTION_REPEATS times an epoch, each caption once: twice, as the captions are
# learned long before the questions (docs/miniature.md)
QUESTION_REPEATS := 2
# make study's common recipe: every bridge the same steps (the Q-Former's 1200), features (all 64 patches) and
# learning rate (FLAGS stay: they make the bridge)
ifeq ($(RECIPE),common)
BRIDGE_STEPS  := 1200
STEPS_linear  :=
STEPS_qformer :=
STEPS_xattn   :=
POOL_linear   :=
LR            := 2e-3
LR_linear     :=
LR_xattn      :=
LR_qformer    :=
endif
# BLIP-2's first stage (qformer_stage1.py): the Q-Former trained against the captions for STAGE1_STEPS steps before
# its captioning run starts from it, its queries at the Q-Former's QUERY_STD (0: no first stage; docs/miniature.md
# measures it)
STAGE1_STEPS := 0
STAGE1_FLAGS := -B 64 --warmup-steps 30 --lr 1e-3 --val-every 100 --ckpt-every 0 --vis-pos-grid \
                --query-std $(QUERY_STD)
ifneq ($(STAGE1_STEPS),0)
FLAGS_qformer += --qformer-init $(RUN)/stage1/ckpt_final.pt
endif
pool_of = $(or $(POOL_$(1)),$(POOL))
POOLS = $(sort $(foreach b,$(BRIDGES),$(call pool_of,$(b))))

# Run one stage, $(1) named, in run folder $(2): `python $(3)`, its output to $(2)/logs/$(1).log and
# "<name> <seconds> s" to $(2)/times.txt; a failure shows the log's end. It also records the world in the folder (world.json), so that a
# later make refuses a folder trained on another world (data/shapes.py --check --run-dir), and its settings (next).
stage = @mkdir -p $(2)/logs; [ ! -f $(SHAPES)/info.json ] || cp $(SHAPES)/info.json $(2)/world.json; \
	$(call check_settings,$(1),$(2)); \
	echo "  $(1): started (log: $(2)/logs/$(1).log)"; start=$$(date +%s); \
	if OMP_NUM_THREADS=$(or $(THREADS_$(1)),$(THREADS)) $(BIN)/python $(3) > $(2)/logs/$(1).log 2>&1; then \
		cp $(2)/settings/$(1).txt $(2)/settings/$(1).done; \
		echo "$(1) $$(( $$(date +%s) - start )) s" >> $(2)/times.txt; \
		echo "  $(1): done in $$(( $$(date +%s) - start )) s"; \
	else tail -n 30 $(2)/logs/$(1).log; echo "$(1) failed: the whole log is $(2)/logs/$(1).log"; exit 1; fi

# Every stage's command (its arguments) is written to <run folder>/settings/<stage>.txt on every make, rewritten only
# when it changed, and each stage's target depends on it: a stage asked for with other settings (steps, seed, sizes,
# flags) is out of date. A stage that finished (settings/<stage>.done) under other settings, or that finished before
# stages recorded them, is then refused by name, never reused as it is or resumed into another recipe.
FORCE:
settings = $(1)/settings/$(2).txt
record = @mkdir -p $(dir $@); printf '%s\n' '$(strip $(1))' | cmp -s - $@ || printf '%s\n' '$(strip $(1))' > $@
check_settings = done=$(2)/settings/$(1).done; \
	if [ -f $$done ] && ! cmp -s $$done $(2)/settings/$(1).txt; then \
		printf '%s\n' "$(2): its stage $(1) finished with other settings:" "  then: $$(cat $$done)" \
		"  now:  $$(cat $(2)/settings/$(1).txt)" "Reused or resumed, it would not be what these settings make. To \
redo it: make demo-clean, or pass another DEMO= (RUN= for a bridge). To reuse it: the settings it was made with." \
		>&2; exit 1; \
	elif [ ! -f $$done ] && [ -e $@ ]; then \
		printf '%s\n' "$(2): its stage $(1) was made before stages recorded their settings, so make cannot tell whether \
it is what these settings make. To redo it: make demo-clean, or pass another DEMO= (RUN= for a bridge)." >&2; exit 1; fi

# Without this, make deletes the feature caches' manifest.json (pattern-rule "intermediate" files) after a run,
# and the next run would find the caches unfinished.
.SECONDARY:
# Ctrl-C as a stage ends must not cost its finished work: make deletes an interrupted recipe's target unless it is
# precious. These are written last and atomically by their trainers (a target that exists is whole); a manifest of
# shards or features is written first and completed as the work goes (make deletes it: the rerun resumes), and a
# table is quick to redo.
.PRECIOUS: $(LM_PRETRAINED) $(LM) $(CLIP)/config.json $(RUN)/caption/%/ckpt_final.pt

# `demo` installs first, then trains the LM alone (on every core: THREADS_lm), then runs the other stages in a
# third make, side by side (-j$(JOBS)): the CLIP first, alone, since every later stage reads it.
# A world already drawn is reused as it is: first check it is the one these variables ask for, and that the run
# folder (DEMO) was trained on it, if on anything.
demo: setup
	@$(CHECK_WORLD)
	@$(MAKE) --no-print-directory $(LM)
	@$(MAKE) --no-print-directory -j$(JOBS) demo-table

demo-table: $(RUN)/results/table.md
	@echo; echo "stage times (this run; reused stages are not listed):"
	@cat $(DEMO)/times.txt 2>/dev/null || echo "(every stage was reused)"; rm -f $(DEMO)/times.txt
	@echo; cat $(RUN)/results/table.md
	@$(BIN)/python -m miniature.study check $(RUN)/results/results.json --world $(SHAPES_SEED) $(if $(QA),--floor)

# make vqa: make demo with TASK=mix (TASK=questions: the bridges train on questions alone)
vqa:
	@$(MAKE) --no-print-directory demo TASK=$(if $(filter captions,$(TASK)),mix,$(TASK))

WORLD_FLAGS := --out $(SHAPES) --train $(TRAIN_IMAGES) --val $(VAL_IMAGES) --corpus-docs $(CORPUS_DOCS) \
               --seed $(SHAPES_SEED)
CHECK_WORLD := $(BIN)/python data/shapes.py $(WORLD_FLAGS) --check --run-dir $(DEMO)

# the world has a check of its own (CHECK_WORLD), and may serve several run folders
$(SHAPES)/info.json:
	@mkdir -p $(DEMO)/settings; printf '%s\n' '$(WORLD_FLAGS)' > $(DEMO)/settings/data.txt
	$(call stage,data,$(DEMO),data/shapes.py $(WORLD_FLAGS))

# the questions about the world's scenes, in VQAv2's files, and corpus_qa.jsonl (make vqa)
QUESTIONS_ARGS := data/shapes.py --out $(SHAPES) --questions
QUESTIONS = $(SHAPES)/annotations/v2_OpenEnded_shapes_$(1)_questions.json
$(SHAPES)/corpus_qa.jsonl: $(SHAPES)/info.json $(call settings,$(DEMO),questions)
	$(call stage,questions,$(DEMO),$(QUESTIONS_ARGS))
# (with the questions' version: questions drawn by older code are refused, not trained on as these)
QUESTIONS_VERSION := $(shell sed -n 's/^QUESTIONS_VERSION = \([0-9]*\).*/\1/p' data/shapes.py)
$(call settings,$(DEMO),questions): FORCE
	$(call record,$(QUESTIONS_ARGS) (questions version $(QUESTIONS_VERSION)))

CORPUS := $(SHAPES)/corpus$(subst -,_,$(QA)).jsonl
SHARDS_ARGS = data/fineweb.py --data-files $(CORPUS) --out-dir $(DEMO)/lm_shards$(QA) \
              --shard-size $(SHARD_SIZE) --workers 1
$(DEMO)/lm_shards$(QA)/manifest.json: $(SHAPES)/info.json $(if $(QA),$(CORPUS)) $(call settings,$(DEMO),shards$(QA))
	$(call stage,shards$(QA),$(DEMO),$(SHARDS_ARGS))
$(call settings,$(DEMO),shards$(QA)): FORCE
	$(call record,$(SHARDS_ARGS))

# lr 1e-3: the LM has to learn to copy a scene's words from an earlier caption, which is what the bridges use
LM_ARGS = train_lm.py --preset mini --data-dir $(DEMO)/lm_shards$(QA) --vocab-subset --out-dir $(DEMO)/lm$(QA) \
          --max-steps $(LM_STEPS) --warmup-steps 50 --lr 1e-3 -B 16 -T 128 --total-batch 2048 --val-every 500 \
          --sample-every 500 --ckpt-every 500 --log-every 100 --seed $(LM_SEED) --resume auto
$(LM_PRETRAINED): $(DEMO)/lm_shards$(QA)/manifest.json $(call settings,$(DEMO),lm$(QA))
	$(call stage,lm$(QA),$(DEMO),$(LM_ARGS))
$(call settings,$(DEMO),lm$(QA)): FORCE
	$(call record,$(LM_ARGS))

TUNE_ARGS = tune_lm.py --lm $(LM_PRETRAINED) --coco-root $(SHAPES) --questions $(call QUESTIONS,train) \
            --val-questions $(call QUESTIONS,val) --out-dir $(DEMO)/lm-tuned --max-steps $(TUNE_STEPS) \
            --seed $(LM_SEED) --resume auto
$(DEMO)/lm-tuned/ckpt_final.pt: $(LM_PRETRAINED) $(call settings,$(DEMO),lm-tuned)
	$(call stage,lm-tuned,$(DEMO),$(TUNE_ARGS))
$(call settings,$(DEMO),lm-tuned): FORCE
	$(call record,$(TUNE_ARGS))

CLIP_ARGS = -m miniature.train_clip --root $(SHAPES) --out-dir $(CLIP) --max-steps $(CLIP_STEPS) $(CLIP_FLAGS) \
            --seed $(CLIP_SEED) --resume auto
$(CLIP)/config.json: $(SHAPES)/info.json $(call settings,$(DEMO),clip)
	$(call stage,clip,$(DEMO),$(CLIP_ARGS))
$(call settings,$(DEMO),clip): FORCE
	$(call record,$(CLIP_ARGS))

# A cache $(CACHE)/<pooling>/<split>: the stem is "none/train", "4x8/val", ...
# A cache $(CACHE)/<pooling>/<split>; its settings file names it <pooling>-<split> (workers: not a setting)
features_args = data/feature_cache.py --root $(SHAPES) --split $(notdir $(1)) --encoder $(ENCODER) \
                --pool $(patsubst %/,%,$(dir $(1))) --out $(CACHE)/$(1)
# $$* in a rule's prerequisites is expanded a second time, with the stem
.SECONDEXPANSION:
$(CACHE)/%/manifest.json: $(SHAPES)/info.json $(ENCODER_DEP) $$(call settings,$(DEMO),features-$$(subst /,-,$$*))
	$(call stage,features-$(subst /,-,$*),$(DEMO),$(call features_args,$*) --workers $(THREADS))
$(DEMO)/settings/features-%.txt: FORCE
	$(call record,$(call features_args,$(subst -,/,$*)))

# A bridge needs the caches of its own pooling.
TASK_FLAGS = $(if $(QA),--task $(TASK) --questions $(call QUESTIONS,train))
repeats = $(if $(filter mix,$(TASK)),--question-repeats $(or $(QUESTION_REPEATS_$(1)),$(QUESTION_REPEATS)))
bridge_args = train_caption.py --bridge $(1) --lm $(LM) --coco-root $(SHAPES) $(TASK_FLAGS) $(call repeats,$(1)) \
              --features $(CACHE)/$(call pool_of,$(1))/train --val-features $(CACHE)/$(call pool_of,$(1))/val --out-dir $(RUN)/caption/$(1) $(CAPTION_FLAGS) \
              --seed $(BRIDGE_SEED) --max-steps $(or $(STEPS_$(1)),$(BRIDGE_STEPS)) --lr $(or $(LR_$(1)),$(LR)) \
              $(FLAGS_$(1)) --resume auto
$(RUN)/caption/%/ckpt_final.pt: $(LM) $$(CACHE)/$$(call pool_of,$$*)/train/manifest.json \
                                $$(CACHE)/$$(call pool_of,$$*)/val/manifest.json $$(call settings,$(RUN),bridge-$$*)
	$(call stage,bridge-$*,$(RUN),$(call bridge_args,$*))
$(RUN)/settings/bridge-%.txt: FORCE
	$(call record,$(call bridge_args,$*))

STAGE1_ARGS = qformer_stage1.py --coco-root $(SHAPES) --features $(CACHE)/$(call pool_of,qformer)/train \
              --val-features $(CACHE)/$(call pool_of,qformer)/val --out-dir $(RUN)/stage1 $(STANDARDIZE) \
              $(QFORMER_SIZES) $(STAGE1_FLAGS) --max-steps $(STAGE1_STEPS) --seed $(BRIDGE_SEED) --resume auto
ifneq ($(STAGE1_STEPS),0)
$(RUN)/caption/qformer/ckpt_final.pt: $(RUN)/stage1/ckpt_final.pt
endif
$(RUN)/stage1/ckpt_final.pt: $$(CACHE)/$$(call pool_of,qformer)/train/manifest.json \
                             $$(CACHE)/$$(call pool_of,qformer)/val/manifest.json $$(call settings,$(RUN),stage1)
	$(call stage,stage1,$(RUN),$(STAGE1_ARGS))
$(RUN)/settings/stage1.txt: FORCE
	$(call record,$(STAGE1_ARGS))

# EVAL_FLAGS: more evaluate.py flags (the tests' shortened demo: --metrics bleu cider).
# No --features: the bridges read caches of different poolings, so evaluate.py encodes the val images once per
# pooling with the encoder each checkpoint records.
# The bridges train longest first (side by side, the short ones then share the other core); the table keeps BRIDGES' order.
# (make vqa: the linear prefix's 48 slots are the longest, then the Q-Former's 10x, then cross-attention's)
LONG = $(if $(QA),linear qformer xattn,qformer linear)
LONGEST_FIRST = $(foreach b,$(LONG),$(filter $(b),$(BRIDGES))) $(filter-out $(LONG),$(BRIDGES))
# On two jobs the longest gets one core from the start and the others follow one another on the other: each waits
# (order-only) for the one before it. Left to make, the first two to start are whichever finish their settings
# records first: make vqa started the Q-Former and the linear prefix, and cross-attention, longer than both
# together, last.
chain = $(if $(word 2,$(1)),$(eval $(RUN)/caption/$(word 2,$(1))/ckpt_final.pt: | \
          $(RUN)/caption/$(word 1,$(1))/ckpt_final.pt)$(call chain,$(wordlist 2,$(words $(1)),$(1))))
ifeq ($(JOBS),2)
$(call chain,$(wordlist 2,$(words $(LONGEST_FIRST)),$(LONGEST_FIRST)))
endif
EVAL_ARGS = evaluate.py --checkpoints $(foreach b,$(BRIDGES),$(RUN)/caption/$(b)/ckpt_final.pt) --coco-root $(SHAPES) \
            --split val --out $(RUN)/results --method greedy --extra-scores data.shapes \
            $(if $(QA),--questions $(call QUESTIONS,val)) $(EVAL_FLAGS)
$(RUN)/results/table.md: $(foreach b,$(LONGEST_FIRST),$(RUN)/caption/$(b)/ckpt_final.pt) \
                         $(call settings,$(RUN),evaluate)
	$(if $(BRIDGES),,$(error no bridges: bridges.py has no @register("name") line))
	$(call stage,evaluate,$(RUN),$(EVAL_ARGS))
$(call settings,$(RUN),evaluate): FORCE
	$(call record,$(EVAL_ARGS))

# make clip: the demo's CLIP stage alone (variables above); its retrieval and probes are in $(CLIP)/quality.json.
clip: setup
	@$(CHECK_WORLD)
	@$(MAKE) --no-print-directory clip-run

clip-run: $(CLIP)/config.json
	@if [ -f $(DEMO)/times.txt ]; then cat $(DEMO)/times.txt; rm $(DEMO)/times.txt; fi

# The README's pictures are the demo's own: after `make demo`, this refreshes docs/ from runs/demo/results/.
demo-pictures: $(RUN)/results/table.md
	mkdir -p docs
	cp $(RUN)/results/grid_*.png $(RUN)/results/attention_*.png $(RUN)/results/val_loss.png docs/

demo-clean:
	rm -rf $(DEMO) $(SHAPES) $(CACHE)

# ---------------------------------------------------------------------------------------------------------------
# make study: the comparison as a distribution over seeds. On each world of STUDY_WORLDS the world's LM, CLIP and
# caches are the demo's (reused from its run folder, or made there), and every bridge trains with each seed of
# STUDY_SEEDS under two recipes: its own (the demo's) and the common one (RECIPE=common, above). One run folder
# per world, recipe and seed (runs/study/w0/own/s3, ...): an interrupted study resumes where it stopped. Then
# miniature/study.py writes runs/study/study.md and study.png, and the bands make demo checks its run against
# (miniature/bands.json, committed).
STUDY        := runs/study
STUDY_SEEDS  := 0 1 2 3 4
STUDY_WORLDS := 0 1
STUDY_RECIPES := own common
STUDY_RUNS = $(foreach r,$(STUDY_RECIPES),$(foreach s,$(STUDY_SEEDS),$(STUDY)/w$(SHAPES_SEED)/$(r)/s$(s)))

study: setup
	@for w in $(STUDY_WORLDS); do $(MAKE) --no-print-directory study-world SHAPES_SEED=$$w || exit 1; done
	$(BIN)/python -m miniature.study report $(STUDY)

study-world:
	@$(CHECK_WORLD)
	@$(MAKE) --no-print-directory $(LM)
	@$(MAKE) --no-print-directory -j$(JOBS) $(foreach run,$(STUDY_RUNS),$(run)/results/table.md) \
		THREADS_evaluate=$(THREADS)

# A study run: the demo's bridge and evaluate rules in another run folder, with the seed and recipe its path names.
$(STUDY)/w$(SHAPES_SEED)/%/results/table.md: $(LM) $$(foreach p,$$(POOLS),$(CACHE)/$$(p)/train/manifest.json \
                                                                       $(CACHE)/$$(p)/val/manifest.json)
	@$(MAKE) --no-print-directory $@ RUN=$(STUDY)/w$(SHAPES_SEED)/$* RECIPE=$(patsubst %/,%,$(dir $*)) \
		BRIDGE_SEED=$(patsubst s%,%,$(notdir $*))

clean-venv:
	rm -rf $(VENV)
