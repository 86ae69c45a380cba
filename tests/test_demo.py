"""
`make demo`, shortened: every stage through the Makefile's own rules and the same scripts, on a world small
enough for about a minute, then a second `make` that must find nothing left to do.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# longest first
STAGES = ["data", "shards", "lm", "clip", "features-none-train", "features-none-val", "bridge-qformer",
          "features-4x8-train", "features-4x8-val", "bridge-linear", "bridge-xattn", "evaluate"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("task, waits", [("captions", {"xattn": "linear"}), ("mix", {"xattn": "qformer"})])
def test_on_two_jobs_the_longest_bridge_has_a_core_of_its_own(tmp_path, task, waits):
    # the longest (make demo: the Q-Former; make vqa: the linear prefix's 48 slots) has a core of its own, and
    # the others wait for one another (order-only), so make -j2 starts it at once; left to make, it once
    # started it last
    def order_only(*flags):
        db = subprocess.run(["make", "-C", ROOT, "-pn", "--no-print-directory", f"RUN={tmp_path}",
                             f"TASK={task}", *flags, "--eval", "nothing: ;", "nothing"],
                            capture_output=True, text=True)
        assert db.returncode == 0, db.stderr[-2000:]
        rule = rf"^{tmp_path}/caption/(\w+)/ckpt_final.pt: \| {tmp_path}/caption/(\w+)/ckpt_final.pt$"
        return dict(re.findall(rule, db.stdout, flags=re.M))
    assert order_only() == waits
    assert order_only("JOBS=1") == {}  # one job: nothing to schedule


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("java") is None,
                    reason="needs make and Java")
def test_shortened_demo_runs_every_stage_and_reuses_them(tmp_path):
    demo = tmp_path / "demo"
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"DEMO={demo}", f"SHAPES={tmp_path / 'shapes'}",
                "TRAIN_IMAGES=192", "VAL_IMAGES=24", "CORPUS_DOCS=1200", "SHARD_SIZE=20000", "LM_STEPS=12",
                "CLIP_STEPS=3", "CLIP_FLAGS=-B 64 --warmup-steps 1 --val-every 0", "BRIDGE_STEPS=6",
                "VAL_PAIRS=48", "EVAL_FLAGS=--metrics bleu cider"]  # METEOR's JVM: tests/test_evaluate.py
    target = str(demo / "results" / "table.md")  # the file target: `demo` itself would also install .venv
    run = subprocess.run(["make", "-C", ROOT, target, *settings], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(demo / "results" / "results.json") as f:
        result = json.load(f)
    rows = [row["bridge"] for row in result["rows"]]
    assert rows == ["linear", "xattn", "qformer", "blind (frozen LM of linear, no image)"]
    assert result["images"] == 24 and all("BLEU-4" in row and "CIDEr" in row for row in result["rows"])
    attributes = {"colour", "shape", "size", "position", "layout", "relation", "objects", "scene"}
    assert all(set(row["attributes"]) == attributes for row in result["rows"])
    for name in ["val_loss.png", "grid_linear.png", "grid_xattn.png", "grid_qformer.png",
                 "attention_qformer.png"]:
        assert (demo / "results" / name).stat().st_size > 1000, name
    # the per-stage time summary: every stage ran once and was timed
    times = (demo / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == STAGES

    # the bridges read the CLIP the demo trained, in the hub's layout; its caches live in the run folder, one
    # per pooling, and stay finished (make must not delete their manifests as "intermediate" files)
    assert (demo / "clip" / "model.safetensors").exists() and (demo / "clip" / "quality.json").exists()
    for pooling in ("4x8", "none"):
        for split in ("train", "val"):
            with open(demo / "features" / pooling / split / "manifest.json") as f:
                manifest = json.load(f)
            grid = [4, 8] if pooling == "4x8" else [8, 8]  # none: the CLIP's own 8 x 8 patch grid
            assert (manifest["visual_features"]["encoder"] == str(demo / "clip")
                    and manifest["visual_features"]["grid"] == grid)
    # the CLIP's tokens are read as they are (standardising is for the untrained ViT: the Makefile's
    # STANDARDIZE), each bridge with its own pooling (POOL_<name>)
    for bridge, pooling in (("linear", "4x8"), ("xattn", "none"), ("qformer", "none")):
        ckpt = torch.load(demo / "caption" / bridge / "ckpt_final.pt", weights_only=True)
        assert ckpt["args"]["standardize"] is False and ckpt["visual_stats"] is None, bridge
        assert ckpt["visual_features"]["grid"] == ([4, 8] if pooling == "4x8" else [8, 8]), bridge
    # the run folder records its world, so that a later `make demo` can refuse a folder of another world
    assert json.load(open(demo / "world.json")) == json.load(open(tmp_path / "shapes" / "info.json"))
    # a second run reuses everything: make finds every target up to date
    # (make -q cannot say: each stage's settings file is rewritten, if it changed, on every make)
    again = subprocess.run(["make", "-C", ROOT, target, *settings], capture_output=True, text=True)
    assert again.returncode == 0 and "started" not in again.stdout, \
        "a finished stage ran again:\n" + again.stdout

    # make study, shortened to one seed of one world and its common recipe (the own recipe is the demo's
    # rules, run above): it reuses the world's LM, CLIP and caches, and trains every bridge with that seed,
    # into a run folder per recipe and seed
    study, demo_times = tmp_path / "study", (demo / "times.txt").read_text()
    run = subprocess.run(["make", "-C", ROOT, "study-world", *settings, f"STUDY={study}", "STUDY_SEEDS=5",
                          "STUDY_RECIPES=common"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # the world's stages were reused, none ran again
    assert (demo / "times.txt").read_text() == demo_times
    folder = study / "w0" / "common" / "s5"
    with open(folder / "results" / "results.json") as f:
        assert [row["seed"] for row in json.load(f)["rows"][:3]] == [5, 5, 5]
    stages = sorted(line.split()[0] for line in (folder / "times.txt").read_text().split("\n") if line)
    # (two at a time: any order)
    assert stages == ["bridge-linear", "bridge-qformer", "bridge-xattn", "evaluate"]
    assert all((folder / "logs" / f"{stage}.log").stat().st_size > 0 for stage in stages)
    # the common recipe: every bridge the same steps, features and learning rate
    for bridge in ("linear", "xattn", "qformer"):
        args = torch.load(folder / "caption" / bridge / "ckpt_final.pt", weights_only=True)["args"]
        assert (args["max_steps"], args["lr"], args["seed"]) == (6, 2e-3, 5), bridge
        assert "/none/" in args["features"], bridge

    # make vqa, shortened (the target's file, as above): the same world, CLIP and caches; the world's
    # questions and corpus_qa.jsonl, an LM pretrained on it and answer-tuned, the bridges on the mix, a table
    # with VQA scores
    target = str(demo / "mix" / "results" / "table.md")
    # (its bridges at a third of the steps: the last setting on make's command line wins)
    mix = [*settings, "TASK=mix", "TUNE_STEPS=4", "BRIDGE_STEPS=2"]
    run = subprocess.run(["make", "-C", ROOT, target, *mix], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    new = (demo / "times.txt").read_text()[len(demo_times):]
    assert [line.split()[0] for line in new.split("\n") if line] == ["questions", "shards-qa", "lm-qa",
                                                                     "lm-tuned"]
    with open(demo / "mix" / "results" / "results.json") as f:
        result = json.load(f)
    assert [row["bridge"] for row in result["rows"]][:3] == ["linear", "xattn", "qformer"]
    assert all(0.0 <= row["VQA"] <= 1.0 and row["questions"] > 0 for row in result["rows"])
    # on the mix every bridge trains 10x BRIDGE_STEPS (its captions share them with the questions) and reads
    # each question twice an epoch
    mixed = {b: torch.load(demo / "mix" / "caption" / b / "ckpt_final.pt", weights_only=True)["args"]
             for b in ("linear", "xattn", "qformer")}
    for bridge, steps, repeats in (("linear", 20, 2), ("xattn", 20, 2), ("qformer", 20, 2)):
        args = mixed[bridge]
        assert args["task"] == "mix" and args["lm"] == str(demo / "lm-tuned" / "ckpt_final.pt"), bridge
        assert (args["max_steps"], args["question_repeats"]) == (steps, repeats), bridge
    # the linear prefix writes the scene out in 48 slots (12 for captions alone: the dry run above)
    assert mixed["linear"]["prefix_len"] == 48
    # the Q-Former reads the question (the instruction-aware one) when the bridges learn questions
    assert mixed["qformer"]["qformer_instruction"]
    assert "VQA accuracy" in (demo / "mix" / "results" / "table.md").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_ablation_reads_an_untrained_vit_and_trains_no_clip(tmp_path):
    demo = tmp_path / "demo"
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"DEMO={demo}", f"SHAPES={tmp_path / 'shapes'}",
                "TRAIN_IMAGES=24", "VAL_IMAGES=8", "CORPUS_DOCS=100", "SHAPES_SEED=3",
                "ENCODER=random-vit:mini:seed0"]
    target = str(demo / "features" / "none" / "train" / "manifest.json")
    run = subprocess.run(["make", "-C", ROOT, target, *settings], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    times = (demo / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == ["data", "features-none-train"]  # no CLIP stage
    assert not (demo / "clip").exists()
    with open(demo / "features" / "none" / "train" / "manifest.json") as f:
        assert json.load(f)["visual_features"]["encoder"] == "random-vit:mini:seed0"
    with open(tmp_path / "shapes" / "info.json") as f:
        assert json.load(f)["seed"] == 3  # the world was drawn with SHAPES_SEED
    # every bridge's stage command line, from one dry run (it also shows the lines that record their settings)
    dry = subprocess.run(["make", "-C", ROOT, "-n", *(str(demo / "caption" / b / "ckpt_final.pt")
                                                      for b in ("linear", "xattn", "qformer")), *settings],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    stages = {b: [line for line in dry.stdout.splitlines() if "python train_caption.py" in line
                  and f"--bridge {b} " in line] for b in ("linear", "xattn", "qformer")}
    assert all(len(lines) == 1 for lines in stages.values()), dry.stdout[-2000:]
    # its bridges would standardise the untrained ViT's features (uneven channels), unlike the CLIP's
    assert all(" --standardize " in lines[0] for lines in stages.values())
    # per-bridge settings: the prefix bridges train 3x and 2x as many steps and read their input out whole (12
    # and 16 slots); the linear prefix reads the 4x8-pooled tokens, the others all 64 patches, positions
    # starting as a sin-cos
    for bridge, flags in [("linear", "4x8/train --val-features"), ("xattn", "none/train --val-features"),
                          ("linear", "--max-steps 1800 --lr 3e-3 --prefix-len 12"),
                          ("xattn", "--max-steps 600 --lr 3e-3 --vis-pos-grid"),
                          ("qformer", "--max-steps 1200 --lr 2e-3 --vis-pos-grid --prefix-len 16")]:
        assert flags in stages[bridge][0], (bridge, stages[bridge][0])
    # BLIP-2's first stage, asked for: it reads the Q-Former's caches as the Q-Former does (standardised
    # here), its queries start at the Q-Former's scale, and the Q-Former's run starts from it; without it, no
    # stage 1 at all
    dry = subprocess.run(["make", "-C", ROOT, "-n", str(demo / "caption" / "qformer" / "ckpt_final.pt"),
                          "STAGE1_STEPS=300", *settings], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    first = [line for line in dry.stdout.splitlines() if "python qformer_stage1.py" in line]
    second = [line for line in dry.stdout.splitlines() if "python train_caption.py" in line]
    assert len(first) == 1 and len(second) == 1, dry.stdout[-2000:]
    assert "none/train --val-features" in first[0] and " --standardize " in first[0] and \
        "--queries 16 -B 64" in first[0] and "--max-steps 300 --seed 0" in first[0]
    assert f"--qformer-init {demo}/stage1/ckpt_final.pt" in second[0]
    assert "--query-std 1.0" in first[0] and "--query-std 1.0" in second[0]  # the queries start as the demo's
    assert "qformer_stage1.py" not in "\n".join(stages["qformer"])
