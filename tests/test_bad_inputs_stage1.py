"""
The bad-input catalogue of tests/test_bad_inputs.py, continued for BLIP-2's two stages (qformer_stage1.py,
train_caption.py --qformer-init): a first stage for another Q-Former, another bridge or another file, a cache
of another split, a resume with other flags. The tiny world and its first stage: those of
tests/test_qformer_stage1.py.
"""
import pytest

import qformer_stage1
import train_caption
from tests.test_qformer_stage1 import SIZES, stage1, stage1_args  # noqa: F401 (fixture)
from tests.test_questions import world  # noqa: F401 (fixture)


def caption_args(world, out_dir, *extra):  # noqa: F811
    return ["--lm", world["lm"], "--coco-root", world["root"], "--features", world["train"], "--out-dir",
            str(out_dir), "-B", "8", "--total-batch", "8", "--max-steps", "1", "--device", "cpu", *extra]


def refused(argv, capsys):
    """The message train_caption.py exits with (status 2, a UsageError)."""
    with pytest.raises(SystemExit) as e:
        train_caption.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err

# -----------------------------------------------------------------------------
# 54. --qformer-init with a first stage of another Q-Former (width, queries, their starting scale, positions,
# features, standardisation): every difference named by its flag, nothing loaded


def test_54_a_first_stage_of_another_qformer_is_refused(world, stage1, tmp_path, capsys):  # noqa: F811
    init = ["--qformer-init", str(stage1 / "ckpt_final.pt")]
    other = ["--qformer-width", "16", "--qformer-heads", "2", "--queries", "3", "--no-vis-pos-grid"]
    err = refused(caption_args(world, tmp_path / "a", "--bridge", "qformer", *init, *other), capsys)
    assert f"--qformer-init {stage1 / 'ckpt_final.pt'} was trained for another Q-Former: " in err
    for named in ("--vis-pos-grid True there, False here", "--queries 4 there, 3 here",
                  "--qformer-width 32 there, 16 here"):
        assert named in err
    err = refused(caption_args(world, tmp_path / "b", "--bridge", "qformer", *init, *SIZES, "--standardize"),
                  capsys)
    assert "--standardize False there, True here" in err
    unit = ["--query-std", "1.0"]
    err = refused(caption_args(world, tmp_path / "q", "--bridge", "qformer", *init, *SIZES, *unit), capsys)
    assert "--query-std 0.02 there, 1.0 here" in err
    flags = caption_args(world, tmp_path / "c", "--bridge", "qformer", *init, *SIZES)
    flags[flags.index("--features") + 1] = str(tmp_path / "other")  # a cache of other features
    err = _with_other_features(world, tmp_path / "other", flags, capsys)
    assert "features: grid: stage 1 read (4, 8), expected (1, 1)" in err

# -----------------------------------------------------------------------------
# 55. --qformer-init on another bridge, or naming a file qformer_stage1.py did not write, or none


def test_55_qformer_init_names_what_is_wrong_with_the_file(world, stage1, tmp_path, capsys):  # noqa: F811
    init = ["--qformer-init", str(stage1 / "ckpt_final.pt")]
    err = refused(caption_args(world, tmp_path / "a", "--bridge", "linear", *init), capsys)
    assert "--qformer-init starts a Q-Former; this run trains --bridge linear" in err
    # a train_caption.py checkpoint is not a first stage
    train_caption.main(caption_args(world, tmp_path / "q", "--bridge", "qformer", *SIZES))
    caption_ckpt = str(tmp_path / "q" / "ckpt_final.pt")
    err = refused(caption_args(world, tmp_path / "b", "--bridge", "qformer", *SIZES, "--qformer-init",
                               caption_ckpt), capsys)
    assert f"--qformer-init {caption_ckpt} is not a checkpoint of qformer_stage1.py" in err
    with pytest.raises(FileNotFoundError, match="--qformer-init checkpoint nowhere.pt does not exist"):
        train_caption.main(caption_args(world, tmp_path / "c", "--bridge", "qformer", *SIZES,
                                        "--qformer-init", "nowhere.pt"))

# -----------------------------------------------------------------------------
# 56. qformer_stage1.py on a cache of another split (its images lack the captions' images), or resumed with
# other flags


def test_56_stage_1_on_another_split_or_resumed_otherwise(world, stage1, tmp_path, capsys):  # noqa: F811
    flags = stage1_args(world, tmp_path / "a", "--max-steps", "1")
    flags[flags.index("--features") + 1] = world["val"]
    with pytest.raises(ValueError, match=r"\d+ of the 40 images are not in the feature cache .*feat_val "
                                         r"\(e.g. .*train2017.*\): was it built from another split\?"):
        qformer_stage1.main(flags)
    with pytest.raises(SystemExit) as e:
        qformer_stage1.main(stage1_args(world, stage1, "--max-steps", "90", "--resume", "auto",
                                        "--text-layers", "3"))
    assert e.value.code == 2
    assert "cannot resume from" in capsys.readouterr().err


def _with_other_features(world, out, flags, capsys):  # noqa: F811
    """Build a cache of the same images pooled to one patch token, and train on it: the refusal's text."""
    from data import coco, feature_cache
    feature_cache.build_feature_cache(coco.load_records(world["root"], "train"), "random-vit:tiny:seed0",
                                      str(out), batch_size=16, num_workers=1, pool_grid=(1, 1))
    return refused(flags, capsys)
