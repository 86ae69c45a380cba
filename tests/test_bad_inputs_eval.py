"""
The bad-input catalogue of tests/test_bad_inputs.py, continued for evaluate.py: what a user can hand the
evaluation (a folder of odd entries, odd file names, checkpoints on two LMs, a one-image set), and what it
says.
The world (a miniature val split, its feature cache, a tiny LM and bridge checkpoints) is test_evaluate.py's.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from PIL import Image

import evaluate
from bridges import build_captioner
from data import feature_cache
from gpt2 import GPT, load_lm
from tests.test_evaluate import SMALL, features_spec, save_checkpoint
from tests.test_evaluate import world  # noqa: F401  (a pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the metrics need Java")


def folder_mode(world, folder, out, capsys):  # noqa: F811
    """evaluate.py --images folder: (its result, its stdout, its stderr)."""
    result = evaluate.main(["--images", str(folder), "--checkpoint", world["checkpoints"]["linear"],
                            "--out", str(out), "--method", "greedy", "--max-new-tokens", "4",
                            "--device", "cpu"])
    printed = capsys.readouterr()
    return result, printed.out, printed.err


def compare_mode(world, checkpoints, out, *flags):  # noqa: F811
    return evaluate.main(["--checkpoints", *checkpoints, "--coco-root", world["root"], "--split", "val",
                          "--features", world["cache"], "--out", str(out), "--method", "greedy",
                          "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", *flags])

# -----------------------------------------------------------------------------
# 34. evaluate.py --images on a folder holding more than image files: a folder named like an image, a
#     subfolder, a symlink loop, a dangling link, a TIFF and a GIF were all passed over in silence


def test_34_every_entry_not_captioned_is_counted_and_named(world, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "mine"
    folder.mkdir()
    png = world["records"][0]["path"]
    shutil.copy(png, folder / "photo.png")
    Image.open(png).save(folder / "scan.tif")  # Pillow reads TIFF and GIF: they are images too
    Image.open(png).convert("P").save(folder / "anim.gif")
    (folder / "x.jpg").mkdir()  # a folder named like an image
    (folder / "holiday").mkdir()
    shutil.copy(png, folder / "holiday" / "beach.png")  # subfolders are not searched: said so
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("gone.png", folder / "dangling.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")  # the system's, not a photo: left out without a word
    with pytest.raises(OSError) as e:
        os.stat(folder / "loop.jpg")
    assert e.value.errno == errno.ELOOP
    result, out, err = folder_mode(world, folder, tmp_path / "out", capsys)
    assert sorted(result["captions"]) == [str(folder / n) for n in ("anim.gif", "photo.png", "scan.tif")]
    expected = [dict(path=str(folder / "dangling.png"), reason="a dangling link"),
                dict(path=str(folder / "holiday"), reason="a folder (subfolders are not searched)"),
                dict(path=str(folder / "loop.jpg"), reason="a symlink loop"),
                dict(path=str(folder / "notes.txt"), reason="not an image file extension"),
                dict(path=str(folder / "x.jpg"), reason="a folder (subfolders are not searched)")]
    assert result["passed_over"] == expected
    with open(result["path"]) as f:
        assert json.load(f)["passed_over"] == expected
    assert "3 image(s) captioned" in err and "0 unreadable skipped; 5 passed over: " in err
    assert f"{folder / 'loop.jpg'} (a symlink loop)" in err and f"{folder / 'x.jpg'} (a folder" in err
    assert ".DS_Store" not in err + out


def test_34_a_folder_with_no_image_says_what_it_passed_over(world, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "mine"
    (folder / "2024").mkdir(parents=True)  # the photos are one level down
    shutil.copy(world["records"][0]["path"], folder / "2024" / "photo.png")
    (folder / "photo.heic").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError) as e:
        folder_mode(world, folder, tmp_path / "out", capsys)
    assert str(e.value) == (f"no jpg/jpeg/png/webp/bmp/gif/tif/tiff files in {folder}; 2 passed over: "
                            f"{folder / '2024'} (a folder (subfolders are not searched)), "
                            f"{folder / 'photo.heic'} (not an image file extension)")

# -----------------------------------------------------------------------------
# 35. A file name holding a newline or a tab: its `path<TAB>caption` line broke in two


def test_35_a_file_name_with_a_newline_or_tab_is_printed_on_one_line(world, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "mine"
    folder.mkdir()
    names = ["plain.png", "two\nlines.png", "a\ttab.png"]
    for name in names:
        shutil.copy(world["records"][0]["path"], folder / name)
    result, out, err = folder_mode(world, folder, tmp_path / "out", capsys)
    lines = out.splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 for line in lines)
    printed = sorted(line.split("\t")[0] for line in lines)
    assert printed == sorted([str(folder / "plain.png"), repr(str(folder / "two\nlines.png")),
                              repr(str(folder / "a\ttab.png"))])
    with open(result["path"]) as f:  # the JSON file keeps the real names
        assert sorted(json.load(f)["captions"]) == sorted(str(folder / n) for n in names)

# -----------------------------------------------------------------------------
# 36. Comparing bridges trained on two different LMs: one blind row, of the first checkpoint's LM, stood for
#     both


def other_lm_checkpoint(world, folder):  # noqa: F811
    """
    folder/runs/other/ckpt_final.pt: a linear bridge on a second tiny LM (folder/lm_other.pt), test_evaluate's
    LM drawn with another seed.
    """
    lm, tok = load_lm(str(world["base"] / "lm.pt"))
    torch.manual_seed(1)
    other = GPT(lm.config)
    lm_path = str(folder / "lm_other.pt")
    torch.save(dict(model=other.state_dict(), config=asdict(other.config), vocab=tok.ids), lm_path)
    cache = feature_cache.FeatureCache(world["cache"])
    stats = dict(mean=torch.from_numpy(cache.mean), std=torch.from_numpy(cache.std))
    captioner, config = build_captioner(other, tok.eot_token, "linear", 32, 5, visual_stats=stats, **SMALL)
    path = str(folder / "runs" / "other" / "ckpt_final.pt")
    save_checkpoint(path, captioner, config, lm_path, other, tok.ids, features_spec(), [2.5], 30.0)
    return path


@needs_java
def test_36_bridges_on_two_lms_get_one_blind_row_each(world, tmp_path, monkeypatch):  # noqa: F811
    other = other_lm_checkpoint(world, tmp_path)
    checkpoints = [world["checkpoints"]["linear"], other, world["checkpoints"]["xattn"]]
    # every caption, the blind ones too, is decoded before anything is scored (captions/s time decoding alone)
    events, decode, score_row = [], evaluate.decode, evaluate.score_row
    monkeypatch.setattr(evaluate, "decode", lambda *a, **k: events.append("decode") or decode(*a, **k))
    monkeypatch.setattr(evaluate, "score_row", lambda *a, **k: events.append("score") or score_row(*a, **k))
    out = tmp_path / "results"
    result = compare_mode(world, checkpoints, out, "--metrics", "bleu", "--max-images", "4")
    assert events == ["decode"] * 5 + ["score"] * 5  # 3 bridges, 2 blind rows
    blind = [row for row in result["rows"] if row.get("blind")]
    assert [row["bridge"] for row in blind] == ["blind (frozen LM of linear, no image)",
                                                "blind (frozen LM of other, no image)"]
    assert [row["checkpoint"] for row in blind] == checkpoints[:2]
    assert blind[1]["lm"] == str(tmp_path / "lm_other.pt")
    captions = [json.load(open(out / f"captions_blind_{name}.json")) for name in ("linear", "other")]
    assert captions[0] != captions[1]  # two LMs, two priors
    assert not (out / "captions_blind.json").exists()
    table = open(out / "table.md").read()
    assert "| blind (frozen LM of other, no image) |" in table and "one per distinct LM" in table
    # one LM again, into the same folder: one captions_blind.json, and none of the two-LM files left
    result = compare_mode(world, checkpoints[:1], out, "--metrics", "bleu", "--max-images", "4")
    assert [row["bridge"] for row in result["rows"] if row.get("blind")] == \
        ["blind (frozen LM of linear, no image)"]
    assert sorted(f for f in os.listdir(out) if f.startswith("captions_blind")) == ["captions_blind.json"]

# -----------------------------------------------------------------------------
# 37. A one-image evaluation set: CIDEr 0.000 on every row, without a word why


@needs_java
def test_37_cider_on_one_image_says_why_it_is_zero(world, tmp_path, capsys):  # noqa: F811
    result = compare_mode(world, [world["checkpoints"]["linear"]], tmp_path / "one", "--max-images", "1",
                     "--metrics", "bleu", "cider")
    assert result["images"] == 1 and all(row["CIDEr"] == 0.0 for row in result["rows"])
    note = "CIDEr needs at least two images: score more (e.g. drop --max-images 1)."
    err = capsys.readouterr().err
    assert "note: CIDEr is 0.000 on every row because only one image was scored" in err and note in err
    assert open(tmp_path / "one" / "table.md").read().rstrip().endswith(note)
    # two images, or no CIDEr asked for: nothing to say
    compare_mode(world, [world["checkpoints"]["linear"]], tmp_path / "two", "--max-images", "2",
            "--metrics", "bleu", "cider")
    compare_mode(world, [world["checkpoints"]["linear"]], tmp_path / "bleu", "--max-images", "1",
            "--metrics", "bleu")
    assert "CIDEr needs" not in capsys.readouterr().err
    assert "CIDEr needs" not in open(tmp_path / "two" / "table.md").read()

# -----------------------------------------------------------------------------
# 40 (continued from tests/test_bad_inputs.py). An --out that cannot be written: evaluate.py decoded and
#     scored every checkpoint first, then died on a raw OSError


@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_40_evaluate_stops_before_decoding_if_out_is_unwritable(world, tmp_path,  # noqa: F811
                                                                monkeypatch, capsys, how):
    from tests.test_bad_inputs import unwritable
    out = unwritable(tmp_path, monkeypatch, how)
    decoded = []
    monkeypatch.setattr(evaluate, "decode", lambda *a, **k: decoded.append(1))
    reason = "Not a directory" if how == "under a file" else "Permission denied"
    for run in (lambda: compare_mode(world, [world["checkpoints"]["linear"]], out),
                lambda: folder_mode(world, tmp_path, out, capsys)):
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 2 and not decoded
        assert (f"evaluate.py: error: --out {out}: cannot write there ({reason}): choose another --out, or "
                "make it writable") in capsys.readouterr().err

# -----------------------------------------------------------------------------
# 57. A Python without pycocoevalcap (a GPU machine's own, which keeps its torch): evaluate.py could not
#     even be imported to decode, and bench/gpu_check.py failed at its imports; now only scoring needs it

HIDE_PYCOCOEVALCAP = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pycocoevalcap":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
import evaluate, metrics
try:
    metrics.score_captions({1: "a red circle"}, {1: ["a red circle"]})
except RuntimeError as e:
    print(e)
"""


def test_57_without_pycocoevalcap_only_scoring_stops_and_names_the_install(tmp_path):
    run = subprocess.run([sys.executable, "-c", HIDE_PYCOCOEVALCAP], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ("the COCO metrics need pycocoevalcap (No module named 'pycocoevalcap'): "
                                  "`pip install pycocoevalcap==1.2` (training and decoding run without it)")
