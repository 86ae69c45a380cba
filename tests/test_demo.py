"""
`make demo`, shortened: every stage through the Makefile's own rules and the same scripts, on a world small
enough for about a minute, then a second `make` that must find nothing left to do.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "shards", "lm", "features-train", "features-val", "bridge-linear", "bridge-xattn",
          "bridge-qformer", "evaluate"]


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("java") is None, reason="needs make and Java")
def test_shortened_demo_runs_every_stage_and_reuses_them(tmp_path):
    demo = tmp_path / "demo"
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"DEMO={demo}", f"SHAPES={tmp_path / 'shapes'}",
                f"CACHE={tmp_path / 'cache'}", "TRAIN_IMAGES=192", "VAL_IMAGES=24", "CORPUS_DOCS=1200",
                "SHARD_SIZE=20000", "LM_STEPS=12", "BRIDGE_STEPS=6", "VAL_PAIRS=48"]
    target = str(demo / "results" / "table.md")  # the file target: `demo` itself would also install .venv
    run = subprocess.run(["make", "-C", ROOT, target, *settings], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(demo / "results" / "results.json") as f:
        result = json.load(f)
    rows = [row["bridge"] for row in result["rows"]]
    assert rows == ["linear", "xattn", "qformer", "blind (frozen LM of linear, no image)"]
    assert result["images"] == 24 and all("METEOR" in row and "CIDEr" in row for row in result["rows"])
    assert all(set(row["attributes"]) == {"colour", "shape", "size", "position", "relation", "objects", "scene"}
               for row in result["rows"])
    for name in ["val_loss.png", "grid_linear.png", "grid_xattn.png", "grid_qformer.png", "attention_qformer.png"]:
        assert (demo / "results" / name).stat().st_size > 1000, name
    # the per-stage time summary: every stage ran once and was timed
    times = (demo / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == STAGES

    # the feature caches stay finished (make must not delete their manifests as "intermediate" files)
    assert all((tmp_path / "cache" / f"shapes_{split}" / "manifest.json").exists() for split in ("train", "val"))
    # a second run reuses everything: make finds every target up to date
    again = subprocess.run(["make", "-C", ROOT, "-q", target, *settings], capture_output=True, text=True)
    assert again.returncode == 0, "a finished stage would run again"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_demo_can_read_a_clip_that_make_clip_trains_first(tmp_path):
    demo = tmp_path / "demo"
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"DEMO={demo}", f"SHAPES={tmp_path / 'shapes'}",
                f"CACHE={tmp_path / 'cache'}", "TRAIN_IMAGES=192", "VAL_IMAGES=24", "CORPUS_DOCS=100",
                f"CLIP={tmp_path / 'clip'}", f"ENCODER={tmp_path / 'clip'}", "CLIP_STEPS=3", "CLIP_FLAGS=-B 64 --warmup-steps 1 --val-every 0"]
    target = str(tmp_path / "cache" / "shapes_train" / "manifest.json")
    run = subprocess.run(["make", "-C", ROOT, target, *settings], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    times = (demo / "times.txt").read_text().split("\n")
    assert [line.split()[0] for line in times if line] == ["data", "clip", "features-train"]
    assert (tmp_path / "clip" / "model.safetensors").exists() and (tmp_path / "clip" / "quality.json").exists()
    with open(tmp_path / "cache" / "shapes_train" / "manifest.json") as f:
        assert json.load(f)["encoder"] == str(tmp_path / "clip")  # the features are the trained CLIP's
