"""
`make smoke`: every full-scale stage at full size (GPT-2 124M, CLIP ViT-L/14, real-size JPEGs, T = 1024) for a
step or two, with the GPU-only branches on through their CPU analogues. Run here through the Makefile's own
rule, then the outputs are checked: what each stage wrote, and that the leak into Karpathy's test split was
refused.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("java") is None,
                    reason="needs make and Java")
def test_make_smoke_runs_every_full_scale_stage(tmp_path):
    smoke = tmp_path / "smoke"
    run = subprocess.run(["make", "-C", ROOT, "smoke-run", f"BIN={os.path.dirname(sys.executable)}",
                          f"SMOKE={smoke}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "smoke: every full-scale stage ran" in run.stdout

    # GPT-2 124M, T = 1024, bf16, fused AdamW; stopped after one step and resumed for the second
    lm = records(smoke / "lm" / "log.jsonl")
    starts = [r for r in lm if r.get("event") == "start"]
    assert [s["resume"] for s in starts] == [False, True]
    config = starts[-1]["config"]
    assert config["model"]["n_layer"] == 12 and config["model"]["n_embd"] == 768 and \
        config["model"]["vocab_size"] == 50304
    assert config["args"]["seq_len"] == 1024 and config["args"]["dtype"] == "bf16"
    # eager: a compile at this size costs minutes on a CPU; the Q-Former's step below is compiled at full
    # size, and tests/test_train_lm.py compiles the LM's training step
    assert not starts[0]["config"]["args"]["compile"]
    assert config["args"]["fused"] and config["grad_accum"] == 2
    assert [r["step"] for r in lm if "loss" in r] == [0, 1] and \
        all(r["tokens_per_s"] > 0 for r in lm if "loss" in r)
    assert [r["step"] for r in lm if "hellaswag" in r] == [0, 1] and \
        all(r["hellaswag_n"] == 4 for r in lm if "hellaswag" in r)
    assert load_checkpoint(str(smoke / "lm" / "ckpt_000002.pt"))["step"] == 2

    # the ViT-L/14 caches: 257 tokens pooled to 33 x 1024, every image of each split
    for split, count in [("train", 6), ("val", 3), ("karpathy_train", 5), ("karpathy_test", 2)]:
        manifest = json.load(open(smoke / "features" / split / "manifest.json"))
        features = manifest["visual_features"]
        assert (manifest["count"], manifest["tokens"], features["width"], features["image_size"]) == \
            (count, 33, 1024, 224)

    # every bridge on the 124M GPT-2 of the hub's layout, compiled (the Q-Former by inductor, then resumed
    # eager); their trained-on records
    for bridge in ("linear", "xattn", "qformer"):
        first = records(smoke / "caption" / bridge / "log.jsonl")[0]["config"]["args"]
        backend = "inductor" if bridge == "qformer" else "aot_eager"
        assert first["compile"] and first["compile_backend"] == backend
        ckpt = load_checkpoint(str(smoke / "caption" / bridge / "ckpt_final.pt"))
        assert ckpt["step"] == 2 and ckpt["lm"]["config"]["n_layer"] == 12 and \
            ckpt["visual_features"]["width"] == 1024
        assert len(ckpt["trained_on"]["image_ids"]) == 6
    assert load_checkpoint(
        str(smoke / "caption" / "karpathy" / "ckpt_final.pt"))["trained_on"]["karpathy_json"]

    result = json.load(open(smoke / "results" / "coco_val" / "results.json"))
    assert [r["bridge"] for r in result["rows"]][:4] == ["linear", "xattn", "qformer", "on-the-fly"]
    assert result["images"] == 3 and result["decoding"]["method"] == "beam"
    karpathy = json.load(open(smoke / "results" / "karpathy_test" / "results.json"))
    assert karpathy["images"] == 2 and karpathy["where"].startswith("Karpathy test")
    assert "was trained on 1 of the 2 images of Karpathy test" in (smoke / "leak.txt").read_text()
