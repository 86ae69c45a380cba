"""
The bad-input catalogue: what a new user can get wrong, and what the project does about it. Each case is a
clear error (naming the file, the problem and the fix), a documented skip, or an exact resume; never a silent
wrong result. Cases handled earlier are tested beside their code and listed here, so this file is the one
index:

    unreadable / truncated / zero-byte / odd-mode images skipped and reported  tests/test_coco.py
    malicious pickles refused at every load (weights_only)                     tests/test_train_utils.py,
                                                                               test_gpt2.py
    Ctrl-C during feature caching resumes without recomputing                  tests/test_coco.py
    killed trainers resume bit-exactly                                         tests/test_train_lm.py,
                                                                               test_train_caption.py
    caches / checkpoints of other settings, LMs, bridges refused by name       tests/test_coco.py,
                                                                               test_train_caption.py
    a NaN loss stops the run, keeping the last good checkpoint                 tests/test_train_lm.py,
                                                                               test_train_caption.py
    corrupt shards, missing data, offline downloads                            tests/test_fineweb.py,
                                                                               test_train_lm.py, test_coco.py
    miniature/train_clip.py: another script's or another model's checkpoint,     tests/test_train_clip.py
      a caption longer than --text-tokens, a run folder in use, flags out of
      range

Continued in tests/test_bad_inputs_corpus.py (33: a corpus changed under its shards) and
tests/test_bad_inputs_eval.py (34-37, and 40 for evaluate.py: odd folders and file names, checkpoints on two
LMs, a one-image set, an --out it cannot write) and tests/test_bad_inputs_vqa.py (42-48: VQAv2 files in
another layout, a question's image missing, not 10 answers, empty questions, questions and answers that do not
pair up, repeated ids; 49-53 for training and evaluating on questions) and tests/test_bad_inputs_stage1.py
(54-56: BLIP-2's first stage for another Q-Former, bridge or file, on another split's cache, resumed with
other flags).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_caption
import train_lm
from bridges import load_captioner
from clip_loader import load_clip
from data import coco, feature_cache, fineweb, shapes
from gpt2 import SubsetTokenizer, get_tokenizer, load_lm
from tests.test_train_caption import args as caption_args
from tests.test_train_caption import records, world  # noqa: F401  (a pytest fixture)
from tests.test_train_lm import args as lm_args
from tests.test_train_lm import shards  # noqa: F401  (a pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER = "random-vit:tiny:seed0"


def usage_error(fn, argv, capsys, match):
    """fn(argv) must stop as argparse does: exit status 2 and a message naming the problem."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def small_world(path, train=12, val=4):
    shapes.generate(str(path), train=train, val=val, corpus_docs=4, seed=0, image_size=32)
    return str(path)

# -----------------------------------------------------------------------------
# 1. A feature cache killed while it finalizes (dropping unreadable rows) must not come back wrong


KILL_IN_FINALIZE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from data import coco, feature_cache
where = sys.argv[1]
if where == "copy":  # while the good rows are copied into features.fp16
    original = feature_cache.reserve
    def reserve(path, nbytes):
        original(path, nbytes)
        if path.endswith("features.fp16.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
    feature_cache.reserve = reserve
else:  # after features.fp16, ids and stats are written, before the manifest says complete
    feature_cache.sha256_of = lambda path: os.kill(os.getpid(), signal.SIGKILL)
feature_cache.build_feature_cache(coco.load_records(sys.argv[2], "train"), "random-vit:tiny:seed0",
                                  sys.argv[3], batch_size=4, pool_grid=(2, 2), num_workers=1)
"""


@pytest.mark.parametrize("where", ["copy", "manifest"])
def test_1_a_cache_killed_while_finalizing_is_rebuilt_right(tmp_path, where):
    root = small_world(tmp_path / "world")
    for name in sorted(os.listdir(os.path.join(root, "train2017")))[2:5]:  # three unreadable images to drop
        open(os.path.join(root, "train2017", name), "wb").write(b"not an image")
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_FINALIZE.format(root=ROOT))
    out = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, str(script), where, root, out], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    with pytest.raises(ValueError, match="incomplete"):
        feature_cache.FeatureCache(out)
    records = coco.load_records(root, "train")
    again = feature_cache.build_feature_cache(records, ENCODER, out, batch_size=4, pool_grid=(2, 2),
                                              num_workers=1)
    fresh = feature_cache.build_feature_cache(records, ENCODER, str(tmp_path / "fresh"), batch_size=4,
                                     pool_grid=(2, 2), num_workers=1)
    assert len(again) == len(fresh) == 9 and list(again.image_ids) == list(fresh.image_ids)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(fresh.features))
    assert sorted(os.listdir(out)) == [".lock", "features.fp16", "image_ids.npy", "manifest.json",
                                       "stats.npz"]

# -----------------------------------------------------------------------------
# 2. Training into a folder that already holds a run


def test_2_an_existing_run_folder_is_refused_without_resume_or_overwrite(shards, world,  # noqa: F811
                                                                         tmp_path, capsys):
    lm_run = tmp_path / "lm"
    train_lm.main(lm_args(shards, lm_run, "--max-steps", "4", "--ckpt-every", "2"))
    usage_error(train_lm.main, lm_args(shards, lm_run, "--max-steps", "2"), capsys, "already holds a run")
    train_lm.main(lm_args(shards, lm_run, "--max-steps", "2", "--overwrite"))
    # nothing of the first run is left
    assert sorted(os.listdir(lm_run)) == [".lock", "ckpt_000002.pt", "log.jsonl"]
    starts = [r for r in map(json.loads, open(lm_run / "log.jsonl")) if r.get("event") == "start"]
    assert len(starts) == 1
    caption_run = tmp_path / "caption"
    train_caption.main(caption_args(world, caption_run, "linear", "--max-steps", "2"))
    usage_error(train_caption.main, caption_args(world, caption_run, "linear"), capsys, "--resume auto")


def test_2_resume_auto_on_a_finished_run_changes_nothing(world, tmp_path, capsys):  # noqa: F811
    train_caption.main(caption_args(world, tmp_path, "linear", "--max-steps", "2"))
    before = {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)}
    train_caption.main(caption_args(world, tmp_path, "linear", "--max-steps", "2", "--resume", "auto"))
    assert "nothing left to train" in capsys.readouterr().out
    assert {name: open(tmp_path / name, "rb").read() for name in os.listdir(tmp_path)} == before


def test_2_a_finished_run_is_not_resumed_on_another_encoders_features(world, tmp_path):  # noqa: F811
    # `make demo` after the demo's encoder changed (its CLIP stage joined): the bridges' folders hold runs
    # trained on the old features, and --resume auto must say so, and how to start over, not train on or keep
    # the old bridge
    train_caption.main(caption_args(world, tmp_path / "run", "linear", "--max-steps", "2"))
    for split in ("train", "val"):
        feature_cache.build_feature_cache(coco.load_records(world["root"], split), "random-vit:tiny:seed1",
                                 str(tmp_path / f"other_{split}"), batch_size=16, num_workers=1)
    a = caption_args(world, tmp_path / "run", "linear", "--max-steps", "2", "--resume", "auto")
    a[a.index("--features") + 1], a[a.index("--val-features") + 1] = (str(tmp_path / "other_train"),
                                                                      str(tmp_path / "other_val"))
    with pytest.raises(ValueError, match=r"visual features .*random-vit:tiny:seed0.*--overwrite"):
        train_caption.main(a)

# -----------------------------------------------------------------------------
# 3, 4, 6, 16. Numbers out of range stop every script at once, as argparse does (exit status 2)


@pytest.mark.parametrize("argv, match", [
    (["-B", "-16"], "--batch-size: -16 is out of range"),
    (["-B", "0"], "--batch-size: 0 is out of range"),
    (["--total-batch", "0"], "--total-batch"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--lr", "nan"], "--lr"),
    (["--val-pairs", "0"], "--val-pairs"),
    (["--xattn-every", "0"], "--xattn-every"),
    (["--unfreeze-last", "-1"], "--unfreeze-last"),
    (["--epochs", "0"], "--epochs"),
])
def test_3_train_caption_refuses_numbers_out_of_range(argv, match, capsys):
    usage_error(train_caption.get_args, ["--bridge", "linear", *argv], capsys, match)


@pytest.mark.parametrize("argv, match", [
    (["-B", "0"], "-B"), (["-T", "0"], "-T"), (["--total-batch", "-5"], "--total-batch"),
    (["--n-head", "5", "--n-embd", "128"], "does not divide"),
    (["-T", "100", "--total-batch", "1050"], "whole number"),
    (["--val-steps", "0"], "--val-steps"), (["--lr", "-1"], "--lr"),
])
def test_16_train_lm_refuses_numbers_out_of_range(argv, match, capsys):
    usage_error(train_lm.get_args, ["--preset", "tiny", *argv], capsys, match)


@pytest.mark.parametrize("argv, match", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--length-penalty", "nan"], "--length-penalty"),
    (["--max-images", "0"], "--max-images"), (["--batch-size", "0"], "--batch-size"),
    (["--beam", "0"], "--beam"),
])
def test_6_evaluate_refuses_numbers_out_of_range(argv, match, capsys):
    usage_error(evaluate.parse_args, ["--checkpoints", "x.pt", *argv], capsys, match)


@pytest.mark.parametrize("script", [
    ["data/fineweb.py", "--data-files", "x.jsonl", "--shard-size", "0"],
    ["data/feature_cache.py", "--out", "x", "--batch-size", "-4"],
    ["data/shapes.py", "--train", "0"],
    ["data/hellaswag.py", "--limit", "0"],
    ["gpt2.py", "--model", "random:tiny", "--max-new-tokens", "0"],
])
def test_4_data_scripts_refuse_numbers_out_of_range(script, tmp_path):
    script = [os.path.join(ROOT, script[0]), *script[1:]]
    run = subprocess.run([sys.executable, *script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and "out of range" in run.stderr, run.stderr[-1000:]
    assert os.listdir(tmp_path) == []  # nothing was written


def test_4_the_library_functions_refuse_them_too(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        fineweb.prepare(str(tmp_path / "shards"), fineweb.describe_source(data_files=["x.jsonl"]),
                        shard_size=0)
    root = small_world(tmp_path / "world")
    with pytest.raises(ValueError, match="batch_size"):
        feature_cache.build_feature_cache(coco.load_records(root, "train"), ENCODER, str(tmp_path / "cache"),
                                 batch_size=-4)
    assert not os.path.exists(tmp_path / "cache")  # no cache marked complete with 0 images


@pytest.mark.parametrize("flags, match", [
    (["--qformer-heads", "5"], "--qformer-heads 5 does not divide --qformer-width 32"),
    (["--unfreeze-last", "99"], "--unfreeze-last 99: the LM has 2 blocks"),
    (["--xattn-heads", "3"], "--xattn-heads 3 does not divide the GPT's width 32"),
])
def test_16_flags_that_do_not_fit_the_model_stop_with_status_2(world, tmp_path, capsys,  # noqa: F811
                                                               flags, match):
    bridge = "xattn" if "--xattn-heads" in flags else "qformer"
    usage_error(train_caption.main, caption_args(world, tmp_path, bridge, *flags), capsys, match)

# -----------------------------------------------------------------------------
# 5. A resumed run uses the learning rate it is given (so "lower --lr and resume" after a NaN works)


def test_5_resume_applies_a_changed_learning_rate(world, tmp_path, capsys):  # noqa: F811
    train_caption.main(caption_args(world, tmp_path, "linear", "--stop-step", "3", "--warmup-steps", "0"))
    train_caption.main(caption_args(world, tmp_path, "linear", "--resume", "auto", "--lr", "1e-4",
                                    "--warmup-steps", "0"))
    assert "changed arguments" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in records(tmp_path, "lr")}
    # the first job's
    assert lrs[2] == pytest.approx(0.1 * 3e-3 + 0.5 * (1 + np.cos(np.pi * 2 / 6)) * 0.9 * 3e-3)
    # the new --lr
    assert lrs[3] == pytest.approx(0.1 * 1e-4 + 0.5 * (1 + np.cos(np.pi * 3 / 6)) * 0.9 * 1e-4)


def test_5_the_nan_message_names_a_resume_that_works():
    from train_utils import check_finite
    with pytest.raises(FloatingPointError, match=r"lower --lr.*--resume runs/x/ckpt_000004.pt"):
        check_finite(torch.tensor(float("nan")), 5, "runs/x/ckpt_000004.pt")

# -----------------------------------------------------------------------------
# 7. Annotation files that are not what they claim


def test_7_malformed_annotation_json_is_named(tmp_path):
    root = small_world(tmp_path / "world")
    path = os.path.join(root, "annotations", "captions_val2017.json")
    open(path, "w").write('{"images": [')  # cut off
    with pytest.raises(ValueError, match=r"captions_val2017.json is not valid JSON"):
        coco.load_records(root, "val")
    open(path, "w").write('{"info": {}}')
    with pytest.raises(ValueError, match=r"not a COCO caption file: it needs 'images' and 'annotations'"):
        coco.load_records(root, "val")
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text('{"dataset": "coco"}')
    with pytest.raises(ValueError, match="not Karpathy's dataset_coco.json"):
        coco.load_records(root, "test", karpathy_json=str(karpathy))

# -----------------------------------------------------------------------------
# 8, 9, 10. Checkpoints that are truncated, empty, moved, of the other kind, or a file where its folder is
#           meant


def test_8_truncated_or_empty_checkpoints_are_named(world, tmp_path):  # noqa: F811
    data = open(world["lm"], "rb").read()
    for name, content in [("truncated.pt", data[:len(data) // 2]), ("empty.pt", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(RuntimeError, match=f"LM checkpoint {path} is corrupt"):
            load_lm(str(path))
        with pytest.raises(RuntimeError, match=f"caption checkpoint {path} is corrupt"):
            load_captioner(str(path))


def test_9_a_moved_lm_is_a_missing_file_not_a_hub_id(tmp_path):
    for moved in [str(tmp_path / "runs" / "lm" / "ckpt_001500.pt"), "runs/moved-away/lm/ckpt_001500.pt",
                  "ckpt.pt"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_lm(moved)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "ckpt_000500.pt"])
def test_9_a_file_of_a_model_folder_names_the_folder(tmp_path, name):
    # --encoder runs/demo/clip/model.safetensors, or the CLIP's last training checkpoint beside it, for the
    # folder
    folder = tmp_path / "clip"
    folder.mkdir()
    for file in ("config.json", "model.safetensors", "ckpt_000500.pt"):
        (folder / file).write_text("{}")
    with pytest.raises(ValueError, match=f"{folder / name} is a file, .* pass the folder that holds it "
                                         f"with its config.json: {folder}$"):
        load_clip(str(folder / name))
    if name != "ckpt_000500.pt":  # a .pt file is read as a train_lm.py checkpoint (test 8)
        with pytest.raises(ValueError,
                           match=f"pass the folder that holds it with its config.json: {folder}$"):
            load_lm(str(folder / name))
    (folder / "config.json").unlink()  # weights with no config beside them
    with pytest.raises(ValueError, match="pass a folder holding config.json and model.safetensors$"):
        load_clip(str(folder / "model.safetensors"))


def test_10_train_lm_refuses_to_resume_a_caption_checkpoint(shards, world, tmp_path, capsys):  # noqa: F811
    train_caption.main(caption_args(world, tmp_path / "caption", "linear", "--max-steps", "2"))
    usage_error(train_lm.main, lm_args(shards, tmp_path / "lm", "--resume", str(tmp_path / "caption" /
                                                                             "ckpt_final.pt")),
                capsys, "is not a train_lm.py checkpoint (train_caption.py wrote it)")

# -----------------------------------------------------------------------------
# 11. Captions the LM cannot read, or that hold no words


def test_11_unusable_captions_are_left_out_counted_and_named(world, capsys):  # noqa: F811
    cache = feature_cache.FeatureCache(world["train"])
    ids = [int(i) for i in cache.image_ids[:3]]
    tokenizer = SubsetTokenizer(get_tokenizer().encode_ordinary("a red square") +
                                get_tokenizer().encode_ordinary("a red circle"))
    records_ = [dict(image_id=ids[0], captions=["a red square", "a zebra", ""]),
                dict(image_id=ids[1], captions=["  \u200b ", "\U0001F600\U0001F600", "a red circle"])]
    pairs, left_out = train_caption.make_pairs(records_, cache, tokenizer, 40)
    assert [(i, tokenizer.decode(t), complete, prompt) for i, t, complete, prompt in pairs] == \
        [(ids[0], "a red square", True, 0), (ids[1], "a red circle", True, 0)]
    assert [(c["image_id"], c["caption"]) for c in left_out] == \
        [(ids[0], "a zebra"), (ids[0], ""), (ids[1], "  \u200b "), (ids[1], "\U0001F600\U0001F600")]
    assert "zebra" in left_out[0]["reason"] and left_out[1]["reason"] == "no words"
    assert f"4 caption(s) left out, e.g. image {ids[0]}: 'a zebra'" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# 12, 13. A damaged feature cache, and a disk too small for one


@pytest.mark.parametrize("damage, match", [
    ("truncate features.fp16", "features.fp16 holds .* bytes, the manifest says"),
    ("corrupt stats.npz", "stats.npz is not the file this cache wrote"),
    ("corrupt image_ids.npy", "image_ids.npy is not the file this cache wrote"),
    ("corrupt manifest.json", "manifest.json is not valid JSON"),
    ("delete image_ids.npy", "image_ids.npy is missing"),
])
def test_12_a_damaged_cache_names_the_broken_file(tmp_path, damage, match):
    root = small_world(tmp_path / "world")
    out = str(tmp_path / "cache")
    feature_cache.build_feature_cache(coco.load_records(root, "train"), ENCODER, out, batch_size=4,
                                      pool_grid=(2, 2), num_workers=1)
    action, name = damage.split()
    path = os.path.join(out, name)
    if action == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    elif action == "corrupt":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        os.remove(path)
    with pytest.raises(ValueError, match=match) as e:
        feature_cache.FeatureCache(out)
    assert out in str(e.value) and ("build it again" in str(e.value) or "rebuild" in str(e.value))


def test_13_a_full_disk_fails_before_any_work_naming_the_bytes(tmp_path, monkeypatch):
    root = small_world(tmp_path / "world")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    model = feature_cache.clip_loader.load_clip(ENCODER)
    calls = []
    model.forward = lambda pixels: calls.append(1)
    with pytest.raises(OSError, match=r"cannot reserve .* \(3,840 bytes\) for .*rows.fp16: No space left"):
        feature_cache.build_feature_cache(coco.load_records(root, "train"), model, str(tmp_path / "cache"),
                                 batch_size=4, pool_grid=(2, 2))
    assert not calls and not os.path.exists(tmp_path / "cache" / "rows.fp16")

# -----------------------------------------------------------------------------
# 14. A tiny file that would become gigapixels in preprocessing


def test_14_a_needle_thin_image_is_skipped_not_resized_to_gigapixels(tmp_path):
    path = tmp_path / "needle.png"
    Image.new("RGB", (1, 5000), (255, 0, 0)).save(path)
    assert os.path.getsize(path) < 1000
    pixels, reason = feature_cache.load_pixels(str(path), 224)
    assert pixels is None and "1x5000" in reason and "aspect ratio 1:5000" in reason
    wide = tmp_path / "wide.png"
    Image.new("RGB", (900, 300), (0, 0, 255)).save(wide)  # a panorama is fine
    assert feature_cache.load_pixels(str(wide), 224)[0].shape == (224, 224, 3)

# -----------------------------------------------------------------------------
# 15. Logs and tables that count things twice


def test_15_a_resumed_run_does_not_repeat_step_records(world, tmp_path):  # noqa: F811
    train_caption.main(caption_args(world, tmp_path, "linear", "--ckpt-every", "2"))
    os.remove(tmp_path / "ckpt_final.pt")  # as if killed after step 5, past its last checkpoint (step 4)
    train_caption.main(caption_args(world, tmp_path, "linear", "--ckpt-every", "2", "--resume", "auto"))
    assert [r["step"] for r in records(tmp_path, "loss")] == list(range(6))
    assert [r["step"] for r in records(tmp_path, "val_loss")] == [0, 3, 6]


@pytest.mark.skipif(shutil.which("java") is None, reason="the metrics need Java")
def test_15_the_table_counts_only_the_images_it_scored(world, tmp_path):  # noqa: F811
    train_caption.main(caption_args(world, tmp_path / "run", "linear", "--max-steps", "1"))
    val = coco.load_records(world["root"], "val")
    open(val[0]["path"], "wb").write(b"broken")  # encoded on the fly (no --features): this one cannot be read
    try:
        result = evaluate.main(["--checkpoints", str(tmp_path / "run" / "ckpt_final.pt"),
                                "--coco-root", world["root"], "--out", str(tmp_path / "results"),
                                "--method", "greedy", "--max-new-tokens", "4", "--metrics", "bleu",
                                "--device", "cpu"])
    finally:
        shapes.draw_scene(json.load(open(os.path.join(world["root"],
                                                      "scenes_val.json")))[str(val[0]["image_id"])],
                          32).save(val[0]["path"])
    assert result["images"] == len(val) - 1 == result["rows"][0]["images"]
    assert [s["image_id"] for s in result["skipped"]] == [val[0]["image_id"]]
    assert open(tmp_path / "results" / "table.md").read().startswith(f"{len(val) - 1} images")

# -----------------------------------------------------------------------------
# 17. A world already drawn, asked for with other settings (make reuses a drawn world as it is)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_17_make_demo_refuses_a_world_drawn_with_other_settings(tmp_path):
    # seed 0, 12 / 4 images, 4 corpus documents
    world = small_world(tmp_path / "shapes")  # noqa: F811  (a local, not the fixture)
    same = ["TRAIN_IMAGES=12", "VAL_IMAGES=4", "CORPUS_DOCS=4"]
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"SHAPES={world}", f"DEMO={tmp_path / 'demo'}"]
    for target in ("demo", "clip"):  # `-o`: never (re)install .venv from a test
        run = subprocess.run(["make", "-C", ROOT, "-o", ".venv/.installed", target, *settings, *same,
                              "SHAPES_SEED=1"], capture_output=True, text=True)
        assert run.returncode != 0 and \
            f"{world} holds a world drawn with other settings: seed 0 (asked: 1)" in run.stderr
        assert not (tmp_path / "demo").exists()  # stopped before any stage
    assert shapes.check_world(world, 12, 4, 4, seed=0, image_size=32) is None  # the same world: reused
    assert "train 12 (asked: 5000)" in shapes.check_world(world, 5000, 4, 4, seed=0, image_size=32)
    info = json.load(open(os.path.join(world, "info.json")))
    info["version"] = 2  # a world whose captions name the objects in either order
    json.dump(info, open(os.path.join(world, "info.json"), "w"))
    assert "version 2 (asked: 3)" in shapes.check_world(world, 12, 4, 4, seed=0, image_size=32)
    del info["version"]  # a world that records no version at all is refused the same way
    json.dump(info, open(os.path.join(world, "info.json"), "w"))
    assert "version None (asked: 3)" in shapes.check_world(world, 12, 4, 4, seed=0, image_size=32)
    # so another seed gets folders of its own by default: data/shapes-2, runs/demo-2
    dry = subprocess.run(["make", "-C", ROOT, "-n", "-o", ".venv/.installed", "demo", "SHAPES_SEED=2"],
                         capture_output=True, text=True)
    assert "data/shapes.py --out data/shapes-2 " in dry.stdout and "runs/demo-2/" in dry.stdout, \
        dry.stdout[-2000:]

# -----------------------------------------------------------------------------
# 18. A run folder trained on another world (make would reuse its LM, shards and finished bridges as they are)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_18_make_demo_refuses_a_run_folder_of_another_world(tmp_path):
    world = str(tmp_path / "shapes")  # noqa: F811  (a local, not the fixture)
    # the demo's image size: the world check passes
    shapes.generate(world, train=12, val=4, corpus_docs=4, seed=0)
    demo = tmp_path / "demo"
    assert shapes.check_run_folder(str(demo), world) is None  # a new run folder
    (demo / "lm_shards").mkdir(parents=True)  # a run folder made before run folders recorded their world
    assert "holds runs of a world it did not record" in shapes.check_run_folder(str(demo), world)
    info = json.load(open(os.path.join(world, "info.json")))
    json.dump(info, open(demo / "world.json", "w"))
    assert shapes.check_run_folder(str(demo), world) is None  # trained on this very world: reused
    json.dump(dict(info, version=2), open(demo / "world.json", "w"))
    assert "was trained on another world" in shapes.check_run_folder(str(demo), world)
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"SHAPES={world}", f"DEMO={demo}",
                "TRAIN_IMAGES=12", "VAL_IMAGES=4", "CORPUS_DOCS=4"]
    run = subprocess.run(["make", "-C", ROOT, "-o", ".venv/.installed", "demo", *settings],
                         capture_output=True, text=True)
    assert run.returncode != 0 and f"{demo} was trained on another world than {world} holds" in run.stderr
    # stopped before any stage
    assert "make demo DEMO=runs/<new>" in run.stderr and not (demo / "times.txt").exists()

# -----------------------------------------------------------------------------
# 19. A phone's photo, stored sideways with an EXIF orientation tag that viewers apply


def test_19_exif_orientation_is_applied_wherever_an_image_is_read(tmp_path):
    # (H, W, 3): a wide picture, red on the left, blue on the right
    upright = np.zeros((40, 80, 3), dtype=np.uint8)
    upright[:, :40, 0], upright[:, 40:, 2] = 255, 255
    Image.fromarray(upright).save(tmp_path / "upright.png")
    # as a phone stores it: the sensor's pixels turned a quarter, and orientation 6 ("rotate 90 to show")
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    want, _ = feature_cache.load_pixels(str(tmp_path / "upright.png"), 32)
    # features, on-the-fly encoding, evaluate --images
    got, reason = feature_cache.load_pixels(str(tmp_path / "phone.jpg"), 32)
    # upright (JPEG: nearly equal)
    assert reason is None and np.abs(got.astype(int) - want.astype(int)).mean() < 8
    sideways = np.asarray(stored.resize((32, 64)).crop((0, 16, 32, 48)))
    assert np.abs(sideways.astype(int) - want.astype(int)).mean() > 60  # what reading it as stored would give

# -----------------------------------------------------------------------------
# 20. A caption file that lists one image id twice, with two files


def test_20_repeated_image_ids_are_refused_by_name(tmp_path):
    root = small_world(tmp_path / "shapes")
    path = os.path.join(root, "annotations", "captions_val2017.json")
    data = json.load(open(path))
    # id 1 again, other file
    data["images"].append(dict(data["images"][1], file_name=data["images"][0]["file_name"]))
    json.dump(data, open(path, "w"))
    repeated = data["images"][1]["id"]
    with pytest.raises(ValueError,
                       match=f"captions_val2017.json: image id {repeated} is listed more than once"):
        coco.load_records(root, "val")

# -----------------------------------------------------------------------------
# 21. A caption file whose file names lead outside the images' folder


@pytest.mark.parametrize("name", ["../../outside.png", "/etc/hostname"])
def test_21_file_names_outside_the_split_folder_are_refused(tmp_path, name):
    root = small_world(tmp_path / "shapes")
    path = os.path.join(root, "annotations", "captions_val2017.json")
    data = json.load(open(path))
    data["images"][2]["file_name"] = name
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match=f"file name '{name}' points outside"):
        coco.load_records(root, "val")

# -----------------------------------------------------------------------------
# 22. Files holding pickled objects: refused by name, and never a hint to unpickle them


def test_22_pickled_objects_are_refused_by_name_never_unpickled(tmp_path):
    import argparse

    from common import load_checkpoint
    path = str(tmp_path / "ckpt_final.pt")
    # a Python object: not loadable as weights
    torch.save(dict(model={}, args=argparse.Namespace(lr=1.0)), path)
    with pytest.raises(RuntimeError) as e:
        load_checkpoint(path)
    assert path in str(e.value) and "refused without being unpickled" in str(e.value)
    assert "weights_only=False" not in str(e.value)
    for name in ("image_ids.npy", "stats.npz"):
        path = str(tmp_path / name)
        objects = np.array([1, "a", None], dtype=object)
        np.save(path, objects) if name.endswith(".npy") else np.savez(path, mean=objects)
        with pytest.raises(ValueError, match=f"{path} holds pickled Python objects, not numbers"):
            feature_cache.load_numbers(path, "the feature cache's file")

# -----------------------------------------------------------------------------
# 23. A stale .venv: made by another Python, or its interpreter gone (make setup used to say nothing to do)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_23_a_stale_venv_is_named_with_its_fix(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(tmp_path / "python3.9-that-was-removed")  # a dangling interpreter
    (venv / ".installed").touch()  # newer than the requirements: make thinks the install is done
    run = subprocess.run(["make", "-C", ROOT, "setup", f"VENV={venv}"], capture_output=True, text=True)
    assert run.returncode != 0 and f"{venv} is stale" in run.stderr and "make clean-venv setup" in run.stderr

# -----------------------------------------------------------------------------
# 24. Paths with spaces, which make would split between arguments


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("variable", ["SHAPES", "DEMO", "STUDY"])
def test_24_make_refuses_paths_with_spaces_by_name(tmp_path, variable):
    run = subprocess.run(["make", "-C", ROOT, "-n", "demo", f"{variable}={tmp_path}/a b"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and f"{variable}='{tmp_path}/a b' has a space in it" in run.stderr

# -----------------------------------------------------------------------------
# 25. A finished demo asked for with other settings (make used to reuse it as it was: `make demo
#     CLIP_STEPS=1200` on a demo made with 600 printed the old table, rc 0)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_25_make_refuses_a_finished_stage_asked_for_with_other_settings(tmp_path):
    world = str(tmp_path / "shapes")  # noqa: F811  (a local, not the fixture)
    shapes.generate(world, train=12, val=4, corpus_docs=4, seed=0)
    demo = tmp_path / "demo"
    settings = [f"BIN={os.path.dirname(sys.executable)}", f"SHAPES={world}", f"DEMO={demo}",
                "TRAIN_IMAGES=12", "VAL_IMAGES=4", "CORPUS_DOCS=4"]
    # the cheapest stage; every stage runs through the same macro
    shards = demo / "lm_shards" / "manifest.json"  # noqa: F811  (a local, not the fixture)

    def make(*more):
        return subprocess.run(["make", "-C", ROOT, "-o", ".venv/.installed", str(shards), *settings, *more],
                              capture_output=True, text=True)

    first = make()
    assert first.returncode == 0 and "shards: done" in first.stdout, first.stdout + first.stderr
    made = shards.stat().st_mtime_ns
    again = make()
    assert again.returncode == 0 and "started" not in again.stdout  # the same settings: reused
    other = make("SHARD_SIZE=5000")
    assert other.returncode != 0 and "its stage shards finished with other settings" in other.stderr
    assert "then: data/fineweb.py" in other.stderr and "--shard-size 200000" in other.stderr
    assert "now:  data/fineweb.py" in other.stderr and "--shard-size 5000" in other.stderr
    assert "make demo-clean" in other.stderr and shards.stat().st_mtime_ns == made  # nothing touched
    (demo / "settings" / "shards.done").unlink()  # a folder made before stages recorded their settings
    legacy = make()
    assert legacy.returncode != 0 and "was made before stages recorded their settings" in legacy.stderr

    # every stage of the demo goes through it: each has a settings file its target depends on
    dry = subprocess.run(["make", "-C", ROOT, "-n", "-o", ".venv/.installed", "demo-table", *settings],
                         capture_output=True, text=True)
    from bridges import BRIDGES
    for stage in ["lm", "clip", "evaluate", "features-4x8-train", "features-none-val",
                  *(f"bridge-{b}" for b in BRIDGES)]:
        assert f"{demo}/settings/{stage}.txt" in dry.stdout, stage

# -----------------------------------------------------------------------------
# 26. Ctrl-C in `make demo` just as a stage writes its result (make deleted the finished checkpoint, and the
#     rerun trained the LM again)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_26_ctrl_c_as_a_stage_ends_keeps_its_finished_result(tmp_path):
    world = str(tmp_path / "shapes")  # noqa: F811  (a local, not the fixture)
    shapes.generate(world, train=12, val=4, corpus_docs=4, seed=0)
    demo = tmp_path / "demo"
    (demo / "lm_shards").mkdir(parents=True)
    # taken as made (make -o), so the LM stage runs next
    (demo / "lm_shards" / "manifest.json").write_text("{}")
    # a python whose train_lm.py writes its final checkpoint at once and is then slow to exit (a log, a last
    # sample)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"""#!/bin/sh
if [ "$1" = train_lm.py ]; then
  while [ "$1" != --out-dir ]; do shift; done; mkdir -p "$2"; echo whole > "$2/ckpt_000012.pt"; exec sleep 60
fi
exec {sys.executable} "$@"
""")
    (fake / "python").chmod(0o755)
    lm = demo / "lm" / "ckpt_000012.pt"
    shards = str(demo / "lm_shards" / "manifest.json")  # noqa: F811  (a local, not the fixture)
    make = subprocess.Popen(["make", "-C", ROOT, "-o", ".venv/.installed", "-o", shards, str(lm),
                             f"BIN={fake}", f"SHAPES={world}", f"DEMO={demo}", "TRAIN_IMAGES=12",
                             "VAL_IMAGES=4", "CORPUS_DOCS=4", "LM_STEPS=12"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a shell's background job (`pytest ... &`) starts with SIGINT ignored, and make
                            # would inherit that: restore what a terminal's make gets
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(300):
        if lm.exists():
            break
        time.sleep(0.1)
    assert lm.exists(), make.communicate(timeout=60)
    os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends: to make and its stage alike
    _, err = make.communicate(timeout=60)
    assert make.returncode != 0 and "Deleting file" not in err, err
    assert lm.read_text() == "whole\n"

# -----------------------------------------------------------------------------
# 27. Two processes writing one run folder or one feature cache (two `make demo`s at once): they interleaved
#     their checkpoints and logs, and two cache builders died on each other's .tmp files


def test_27_a_run_folder_or_cache_in_use_is_refused_naming_its_holder(tmp_path, shards):  # noqa: F811
    run, cache = tmp_path / "run", tmp_path / "cache"
    hold = ("import sys, time, common; [common.lock_folder(d, '--out-dir') for d in sys.argv[1:]]; "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run), str(cache)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "train_lm.py", *lm_args(shards, run, "--max-steps", "2")],
                                cwd=ROOT, capture_output=True, text=True)
        in_use = f"is in use by another process (pid {holder.pid})"
        assert second.returncode == 2 and f"--out-dir {run} {in_use}" in second.stderr
        assert sorted(os.listdir(run)) == [".lock"]  # it wrote nothing
        shapes.generate(str(tmp_path / "shapes"), train=4, val=2, corpus_docs=4, seed=0)
        builder = subprocess.run([sys.executable, "data/feature_cache.py",
                                  "--root", str(tmp_path / "shapes"), "--split", "val",
                                  "--encoder", "random-vit:tiny:seed0", "--out", str(cache)],
                                 cwd=ROOT, capture_output=True, text=True)
        assert builder.returncode != 0 and f"--out {cache} {in_use}" in builder.stderr
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
    # the kernel released the lock with the process: the folder is free again, nothing to remove by hand
    train_lm.main(lm_args(shards, run, "--max-steps", "2"))
    assert os.path.exists(run / "ckpt_000002.pt")

# -----------------------------------------------------------------------------
# 28. An interrupted --overwrite (train_clip.py deleted only the old run's checkpoints and log: killed before
#     its end, the folder held the old model's config.json and weights, which features and make took as
#     finished)


def test_28_an_interrupted_overwrite_leaves_no_old_model(tmp_path):
    from miniature import train_clip
    from tests.test_train_clip import TINY
    world = str(tmp_path / "shapes")  # noqa: F811  (a local, not the fixture)
    shapes.generate(world, train=48, val=16, corpus_docs=10, seed=5)
    out = str(tmp_path / "clip")
    args = ["--root", world, "--out-dir", out, *TINY]
    train_clip.main([*args, "--max-steps", "2"])
    assert {"config.json", "model.safetensors", "quality.json"} <= set(os.listdir(out))
    train_clip.main([*args, "--max-steps", "4", "--stop-step", "2", "--overwrite"])  # stopped, as if killed
    # the new run's only: no old model
    assert sorted(os.listdir(out)) == [".lock", "ckpt_000002.pt", "log.jsonl"]
    with pytest.raises(FileNotFoundError):
        load_clip(out)

# -----------------------------------------------------------------------------
# 29. gpt2.py --model on this project's own LM checkpoint (it said to pass a hub folder, which these files
#     are not)


def test_29_gpt2_cli_samples_from_the_projects_own_checkpoint(tmp_path, shards):  # noqa: F811
    from tests.test_train_lm import WORDS
    train_lm.main(lm_args(shards, tmp_path / "lm", "--max-steps", "2"))  # a --vocab-subset LM, as the demo's
    ckpt = str(tmp_path / "lm" / "ckpt_000002.pt")
    cli = [sys.executable, "gpt2.py", "--model", ckpt, "--num-samples", "2", "--max-new-tokens", "5",
           "--device", "cpu"]
    for prompt, start in [(WORDS[0], WORDS[0]), ("", "<|endoftext|>")]:
        run = subprocess.run([*cli, "--prompt", prompt], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        rows = [line for line in run.stdout.splitlines() if line.startswith("> ")]
        assert len(rows) == 2 and all(row[2:].startswith(start) for row in rows), run.stdout
    bad = subprocess.run([*cli, "--prompt", "Xylophones quantise zebras"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--prompt:" in bad.stderr and "vocabulary" in bad.stderr

# -----------------------------------------------------------------------------
# 30. A full disk while a trainer saves (torch said "[enforce fail at inline_container.cc:672] unexpected
#     pos ...")


def test_30_a_full_disk_at_a_checkpoint_is_named_and_loses_nothing(tmp_path, shards):  # noqa: F811
    run = tmp_path / "lm"
    train_lm.main(lm_args(shards, run, "--max-steps", "4", "--ckpt-every", "2", "--stop-step", "2"))
    before = (run / "ckpt_000002.pt").read_bytes()
    # every write to it fails with ENOSPC, as on a full disk
    os.symlink("/dev/full", run / "ckpt_000004.pt.tmp")
    with pytest.raises(OSError, match=r"no space left on the device for .*ckpt_000004.pt "
                                      r"\(about [\d,]+ MiB needed\)"
                                      r".*checkpoints written before it are intact.*--resume auto") as e:
        train_lm.main(lm_args(shards, run, "--max-steps", "4", "--ckpt-every", "2", "--resume", "auto"))
    assert e.value.errno == errno.ENOSPC
    assert (run / "ckpt_000002.pt").read_bytes() == before and not (run / "ckpt_000004.pt").exists()
    assert not os.path.lexists(run / "ckpt_000004.pt.tmp")

# -----------------------------------------------------------------------------
# 31. --max-steps shorter than --warmup-steps: the whole run trains below the asked learning rate, without
#     a word


def test_31_a_run_shorter_than_its_warmup_says_so(tmp_path, shards, capsys):  # noqa: F811
    train_lm.main(lm_args(shards, tmp_path / "short", "--max-steps", "2", "--warmup-steps", "8",
                          "--lr", "1e-3"))
    out = capsys.readouterr()
    note = "note: --max-steps 2 ends inside the 8-step warmup: the learning rate rises to 25% of --lr 0.001"
    assert note in out.out + out.err
    train_lm.main(lm_args(shards, tmp_path / "long", "--max-steps", "2", "--warmup-steps", "1"))
    out = capsys.readouterr()
    assert "warmup" not in out.out + out.err

# -----------------------------------------------------------------------------
# 32. evaluate.py --extra-scores naming a module that is not there, or one without the hook: a traceback after
#     every checkpoint was decoded, before this


@pytest.mark.parametrize("module, match", [
    ("data.nothing", "--extra-scores data.nothing: No module named 'data.nothing'"),
    ("data.coco", "--extra-scores data.coco: the module has no extra_scores(root, split)"),
])
def test_32_an_extra_scores_module_without_the_hook_is_a_flag_error(tmp_path, capsys, module, match):
    usage_error(evaluate.main, ["--checkpoints", str(tmp_path / "ckpt_final.pt"),
                                "--out", str(tmp_path / "out"), "--extra-scores", module], capsys, match)
    assert not (tmp_path / "out").exists()  # stopped before anything was written

# -----------------------------------------------------------------------------
# 38. Resuming on a CPU with another thread count: the continuation is not bit-exact (a CPU's float sums are
#     split over its threads), and nothing said so


def test_38_a_resume_with_another_thread_count_is_said_not_bit_exact(tmp_path, shards,  # noqa: F811
                                                                     capsys):
    threads = torch.get_num_threads()
    run = tmp_path / "lm"
    try:
        torch.set_num_threads(1)
        train_lm.main(lm_args(shards, run, "--max-steps", "4", "--ckpt-every", "2", "--stop-step", "2"))
        assert torch.load(run / "ckpt_000002.pt", weights_only=True)["threads"] == 1
        train_lm.main(lm_args(shards, run, "--max-steps", "4", "--ckpt-every", "2", "--stop-step", "3",
                              "--resume", "auto"))
        assert "thread" not in capsys.readouterr().out  # the same count: nothing to say
        torch.set_num_threads(2)
        train_lm.main(lm_args(shards, run, "--max-steps", "4", "--resume", "auto"))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert (f"note: {run / 'ckpt_000003.pt'} was trained with 1 CPU thread(s), this run has 2: it continues "
            "close to the uninterrupted run, but not bit for bit (for that: OMP_NUM_THREADS=1)") in out.out

# -----------------------------------------------------------------------------
# 39. A Java that cannot get its memory: the PTB tokenizer's failure was blamed on "a line break that
#     sanitize() missed?", and the JVM's own words (printed on its standard output) were not shown


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_39_a_jvm_that_cannot_start_is_reported_in_its_own_words(monkeypatch):
    import metrics
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xmx1k")  # every JVM started from here gets a heap too small
    with pytest.raises(RuntimeError, match=r"(?s)the PTB tokenizer's Java process failed \(exit status 1\); "
                                           r"Java said:\nError occurred during initialization of VM\n"
                                           r"Too small maximum heap") as e:
        metrics.score_captions({1: "a dog"}, {1: ["a dog runs"]}, metrics=("bleu",))
    assert "sanitize" not in str(e.value)
    # METEOR's JVM asks for -Xmx2G itself: a larger starting heap than that stops it just as well
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xms3G")
    monkeypatch.setattr(metrics, "_meteor", None)
    with pytest.raises(RuntimeError, match=r"the METEOR jar failed .*Java said:") as e:
        metrics.get_meteor()
    # (in the message's first line when METEOR's wrapper read it as a score, else after "Java said")
    assert "Initial heap size set to a larger value than the maximum heap size" in str(e.value)

# -----------------------------------------------------------------------------
# 40. Output folders that cannot be written: a raw OSError, and evaluate.py only after decoding and scoring


def unwritable(tmp_path, monkeypatch, how):
    """A folder no file can be created in. As root, permissions do not stop a write, so there the kernel's
    refusal is played by making file creation in it fail with EACCES, as it does for other users."""
    if how == "under a file":  # a path through a file: ENOTDIR, for every user
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "out"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        import common
        real = common.tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir).startswith(str(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(common.tempfile, "TemporaryFile", refuse)
    return folder / "out"


@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_40_an_unwritable_output_folder_stops_before_the_work(tmp_path, monkeypatch,
                                                              shards, capsys, how):  # noqa: F811
    out = unwritable(tmp_path, monkeypatch, how)
    reason = "Not a directory" if how == "under a file" else "Permission denied"
    usage_error(train_lm.main, lm_args(shards, out, "--max-steps", "2"), capsys,
                f"--out-dir {out}: cannot write there ({reason}): choose another --out-dir, or make it "
                "writable")
    images = small_world(tmp_path / "shapes", train=2, val=2)
    with pytest.raises(ValueError, match=rf"--out {out}: cannot write there \({reason}\)"):
        feature_cache.build_feature_cache(coco.load_records(images, "val"), load_clip(ENCODER), str(out))

# -----------------------------------------------------------------------------
# 41. --device cuda (or mps) on a machine without it, as copied from a GPU recipe: torch's AssertionError
#     ("Torch not compiled with CUDA enabled"), naming no flag, after the data and the model were loaded


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="needs a machine without CUDA and MPS")
@pytest.mark.parametrize("main", [train_lm.main, train_caption.main, evaluate.main])
def test_41_a_device_this_machine_lacks_is_a_flag_error(capsys, main):
    why = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
    usage_error(main, ["--device", "cuda"], capsys, f"argument --device: cuda: {why}")
    usage_error(main, ["--device", "mps"], capsys, "argument --device: mps: Apple's MPS is not available "
                                                   "here; leave --device out to use the best device present "
                                                   "(cpu here)")
    usage_error(main, ["--device", "gpu0"], capsys, "argument --device: 'gpu0' is not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["gpt2.py", "data/feature_cache.py"])
def test_41_the_scripts_without_main_refuse_it_too(script):
    run = subprocess.run([sys.executable, script, "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and "error: argument --device: cuda: " in run.stderr, run.stderr[-1000:]
