"""
`make smoke`: every full-scale stage at full size (GPT-2 124M, CLIP ViT-L/14, real-size JPEGs, T = 1024) for a
step or two, with the GPU-only branches on through their CPU analogues. Run here through the Makefile's own
rule, then the outputs are checked: what each stage wrote, and that the leaks into Karpathy's test split and
into VQAv2 val's questions were refused. The fabricated VQAv2 files are also read alone, as VQAv2's.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from common import load_checkpoint, native_bf16_cpu
from data import coco
from tests import fabricate

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

    # GPT-2 124M, T = 1024, bf16 (fp32 on a CPU that would emulate it), fused AdamW; stopped after one step
    # and resumed for the second
    lm = records(smoke / "lm" / "log.jsonl")
    starts = [r for r in lm if r.get("event") == "start"]
    assert [s["resume"] for s in starts] == [False, True]
    config = starts[-1]["config"]
    assert config["model"]["n_layer"] == 12 and config["model"]["n_embd"] == 768 and \
        config["model"]["vocab_size"] == 50304
    assert config["args"]["seq_len"] == 1024
    assert config["args"]["dtype"] == ("bf16" if native_bf16_cpu() else "fp32")
    # eager: a compile at this size costs minutes on a CPU (tests/test_train_lm.py compiles the LM's training
    # step with inductor at the tiny preset); one sequence a step: gradient accumulation is tested there too
    assert not starts[0]["config"]["args"]["compile"]
    assert config["args"]["fused"] and config["grad_accum"] == 1
    assert [r["step"] for r in lm if "loss" in r] == [0, 1] and \
        all(r["tokens_per_s"] > 0 for r in lm if "loss" in r)
    assert [r["step"] for r in lm if "hellaswag" in r] == [0, 1] and \
        all(r["hellaswag_n"] == 4 for r in lm if "hellaswag" in r)
    assert load_checkpoint(str(smoke / "lm" / "ckpt_000002.pt"))["step"] == 2

    # the ViT-L/14 caches: 257 tokens pooled to 33 x 1024, every image of each split
    for split, count in [("train", 6), ("val", 3), ("karpathy_test", 2)]:
        manifest = json.load(open(smoke / "features" / split / "manifest.json"))
        features = manifest["visual_features"]
        assert (manifest["count"], manifest["tokens"], features["width"], features["image_size"]) == \
            (count, 33, 1024, 224)

    # every bridge on the 124M GPT-2 of the hub's layout, compiled (traced by aot_eager; the Q-Former then
    # resumed eager); their trained-on records
    for bridge in ("linear", "xattn", "qformer"):
        first = records(smoke / "caption" / bridge / "log.jsonl")[0]["config"]["args"]
        assert first["compile"] and first["compile_backend"] == "aot_eager"
        ckpt = load_checkpoint(str(smoke / "caption" / bridge / "ckpt_final.pt"))
        assert ckpt["step"] == 2 and ckpt["lm"]["config"]["n_layer"] == 12 and \
            ckpt["visual_features"]["width"] == 1024
        assert len(ckpt["trained_on"]["image_ids"]) == 6
    # a bridge on the pretrained LM, on Karpathy's train split, its images encoded on the fly
    karpathy = load_checkpoint(str(smoke / "caption" / "karpathy" / "ckpt_final.pt"))
    assert karpathy["trained_on"]["karpathy_json"] and len(karpathy["trained_on"]["image_ids"]) == 5
    assert karpathy["args"]["features"] is None and karpathy["args"]["lm"].endswith("lm/ckpt_000002.pt")
    assert karpathy["args"]["encoder"].endswith("clip-vit-large-patch14")
    # BLIP-2's first stage at full size (ViT-L/14's tokens, a 768-wide Q-Former of 32 queries), its R@1 on the
    # val images; the second stage (the VQAv2 run below) starts from it
    first = load_checkpoint(str(smoke / "stage1" / "ckpt_final.pt"))
    assert first["step"] == 2 and first["bridge_config"]["qformer_width"] == 768 and \
        first["bridge_config"]["queries"] == 32 and first["visual_features"]["width"] == 1024
    assert set(first["quality"]) == {"image_to_text_R@1", "text_to_image_R@1"}

    result = json.load(open(smoke / "results" / "coco_val" / "results.json"))
    assert [r["bridge"] for r in result["rows"]][:3] == ["linear", "xattn", "qformer"]
    assert result["images"] == 3 and result["decoding"]["method"] == "beam"
    karpathy = json.load(open(smoke / "results" / "karpathy_test" / "results.json"))
    assert karpathy["images"] == 2 and karpathy["where"].startswith("Karpathy test")
    assert "was trained on 1 of the 2 images of Karpathy test" in (smoke / "leak.txt").read_text()

    # VQAv2 on COCO 2014's images: the instruction-aware Q-Former, from the first stage, trained on
    # captions and questions at once at full size; VQAv2 val answered by it and by its blind LM; the
    # val2014 image in train2017 refused
    vqa = load_checkpoint(str(smoke / "caption" / "vqa" / "ckpt_final.pt"))
    assert vqa["step"] == 2 and vqa["args"]["task"] == "mix" and vqa["bridge_config"]["qformer_instruction"]
    assert vqa["args"]["qformer_init"].endswith("stage1/ckpt_final.pt")
    assert vqa["args"]["questions"].endswith("coco/v2_OpenEnded_mscoco_train2014_questions.json")
    assert vqa["lm"]["config"]["n_layer"] == 12 and vqa["visual_features"]["width"] == 1024
    # the captions' train2017 images, of which train2014's (the questions') are all but one
    assert sorted(vqa["trained_on"]["image_ids"].tolist()) == [391895 + 1000 * i for i in range(6)]
    pairs = records(smoke / "caption" / "vqa" / "log.jsonl")[0]["config"]["pairs"]
    assert pairs == 6 * 5 + 5 * 3  # 5 captions an image, 3 questions an image
    answered = json.load(open(smoke / "results" / "vqa" / "results.json"))
    rows = answered["rows"]
    assert [bool(r.get("blind")) for r in rows] == [False, True]
    for row in rows:
        assert row["questions"] == 9 and 0 <= row["VQA"] <= 1 and len(row["VQA_ci"]) == 2
        assert set(row["VQA_types"]) <= {"yes/no", "number", "other"} and row["VQA_types"]
    assert answered["images"] == 3
    leak = (smoke / "leak_vqa.txt").read_text()
    assert "was trained on 1 of the 4 images of the questions of" in leak and \
        "leak/v2_OpenEnded_mscoco_val2014_questions.json" in leak and \
        "VQAv2's val questions are about COCO 2014 val images" in leak


def test_fabricated_vqav2_is_read_as_vqav2(tmp_path):
    """The smoke's VQAv2 stand-ins: COCO 2014's file names and VQAv2's files, read by the real reader."""
    root = str(tmp_path / "coco")
    ids = fabricate.coco_world(root)
    vqa = fabricate.vqa_world(root, ids)
    leak = ids["train"][0]
    assert vqa == {"train2014": ids["train"][1:], "val2014": ids["val"] + [leak], "leak": [leak]}
    assert os.path.samefile(os.path.join(root, "val2014", f"COCO_val2014_{leak:012d}.jpg"),
                            os.path.join(root, "train2017", f"{leak:012d}.jpg"))
    train = coco.question_records(os.path.join(root, "v2_OpenEnded_mscoco_train2014_questions.json"), None,
                                  root, "train")
    val = coco.question_records(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), None,
                                root, "val")
    leaked = coco.question_records(os.path.join(root, "leak", "v2_OpenEnded_mscoco_val2014_questions.json"),
                                   None, root, "val")
    assert sorted({q["image_id"] for q in train}) == ids["train"][1:] and len(train) == 15
    assert sorted({q["image_id"] for q in val}) == ids["val"] and len(val) == 9
    assert {q["image_id"] for q in leaked} == set(ids["val"]) | {leak} and len(leaked) == 12
    assert val == [q for q in leaked if q["image_id"] != leak]
    assert train[0]["path"].endswith(f"train2014/COCO_train2014_{train[0]['image_id']:012d}.jpg")
    everything = train + leaked
    assert {q["answer_type"] for q in everything} == {"yes/no", "number", "other"}
    assert all(len(q["answers"]) == 10 for q in everything)
    assert any(len(set(q["answers"])) > 1 for q in everything)  # the humans sometimes disagree
    assert any(len(set(q["answers"])) == 1 for q in everything)
    # the real files' top-level keys
    questions = json.load(open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json")))
    annotations = json.load(open(os.path.join(root, "v2_mscoco_val2014_annotations.json")))
    assert set(questions) == {"info", "license", "task_type", "data_type", "data_subtype", "questions"}
    assert set(annotations) == {"info", "license", "data_type", "data_subtype", "annotations"}
    assert questions["data_subtype"] == "val2014" and questions["task_type"] == "Open-Ended"
    assert set(annotations["annotations"][0]) == {"question_id", "image_id", "question_type", "answer_type",
                                                   "multiple_choice_answer", "answers"}
    assert set(annotations["annotations"][0]["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
