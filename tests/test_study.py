"""miniature/study.py: the study's table, bands and the check `make demo` prints, on results made up here."""
import json
import os
import statistics

import pytest

from miniature import study


def row(bridge, objects, scene, cider, **extra):
    return dict(bridge=bridge, CIDEr=cider, trainable_params=1000,
                attributes=dict(objects=objects, scene=scene), **extra)


def write_run(root, world, recipe, seed, rows):
    path = os.path.join(root, f"w{world}", recipe, f"s{seed}", "results", "results.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"rows": rows}, f)
    return path


@pytest.fixture
def finished_study(tmp_path):
    objects = [0.90, 0.96, 0.93]
    for seed, o in enumerate(objects):
        for recipe in ("own", "common"):
            write_run(tmp_path / "study", 0, recipe, seed,
                      [row("linear", o, o - 0.1, 5.0 + seed),
                       row("qformer", 1.0, 1.0, 7.0, query_similarity=0.5 + seed / 10),
                       row("blind (frozen LM)", 0.0, 0.0, 1.5, blind=True)])
    return tmp_path, objects


def test_report_gives_mean_std_min_max_per_bridge_and_writes_the_bands(finished_study):
    tmp_path, objects = finished_study
    bands_path = tmp_path / "bands.json"
    study.report(str(tmp_path / "study"), str(tmp_path / "out"), str(bands_path), "a test CPU, 2 cores")
    text = (tmp_path / "out" / "study.md").read_text()
    mean, std = statistics.fmean(objects), statistics.stdev(objects)
    assert f"{mean:.2f} ± {std:.2f} (0.90–0.96)" in text  # the linear bridge's objects over its 3 seeds
    assert "## World 0, own recipe" in text and "## World 0, common recipe" in text
    assert "| blind | — | 3 |" in text and "0.60 ± 0.10 (0.50–0.70)" in text  # blind row; query similarity
    assert (tmp_path / "out" / "study.png").stat().st_size > 0
    bands = json.loads(bands_path.read_text())
    linear = bands["worlds"]["0"]["linear"]["objects"]
    assert linear["low"] == pytest.approx(mean - 2 * std) and linear["high"] == pytest.approx(mean + 2 * std)
    qformer = bands["worlds"]["0"]["qformer"]["objects"]  # never varied: the floor, clipped to [0, 1]
    assert qformer["low"] == pytest.approx(1.0 - study.BAND_FLOOR["objects"]) and qformer["high"] == 1.0
    assert bands["machine"] == "a test CPU, 2 cores"


@pytest.fixture
def reported(finished_study):
    """(the finished study's folder, the bands its report wrote)."""
    tmp_path, _ = finished_study
    bands_path = str(tmp_path / "bands.json")
    study.report(str(tmp_path / "study"), str(tmp_path / "out"), bands_path, "a test CPU")
    return tmp_path, bands_path


def test_check_says_plainly_which_bridge_is_outside_its_band(reported, capsys):
    tmp_path, bands_path = reported
    inside = write_run(tmp_path / "demo", 0, "own", 0,
                       [row("linear", 0.93, 0.83, 6.0), row("qformer", 1.0, 1.0, 7.0)])
    assert study.check(inside, "0", bands_path) == []
    assert "Every bridge is inside its band" in capsys.readouterr().out
    outside = write_run(tmp_path / "demo", 0, "own", 1,
                        [row("linear", 0.40, 0.30, 6.0), row("qformer", 1.0, 1.0, 7.0)])
    assert study.check(outside, "0", bands_path) == [("linear", "objects"), ("linear", "scene")]
    out = capsys.readouterr().out
    assert "objects 0.400 in [" in out and "OUTSIDE" in out and "lscpu" in out and "report" in out


def test_check_with_floors_passes_better_captions_and_not_worse(reported, capsys):
    # make vqa's bridges train on an answer-tuned LM and on questions too: their captions must be no worse
    tmp_path, bands_path = reported
    better = write_run(tmp_path / "vqa", 0, "own", 0,
                       [row("linear", 0.99, 0.99, 7.5), row("blind", 0.0, 0.0, 1.0)])
    assert study.check(better, "0", bands_path) != []  # a window: above it is outside too
    assert study.check(better, "0", bands_path, floor=True) == []
    assert "objects 0.990 >= " in capsys.readouterr().out
    worse = write_run(tmp_path / "vqa", 0, "own", 1,
                      [row("linear", 0.40, 0.30, 6.0), row("blind", 0.5, 0.5, 1.0)])
    assert study.check(worse, "0", bands_path, floor=True) == [("linear", "objects"), ("linear", "scene"),
                                                               ("blind", "objects"), ("blind", "scene")]


def test_check_without_bands_or_for_another_world_says_so(finished_study, capsys):
    tmp_path, _ = finished_study
    results = write_run(tmp_path / "demo", 0, "own", 0, [row("linear", 0.93, 0.83, 6.0)])
    assert study.check(results, "0", str(tmp_path / "missing.json")) == []
    assert "make study" in capsys.readouterr().out
    bands_path = str(tmp_path / "bands.json")
    study.report(str(tmp_path / "study"), str(tmp_path / "out"), bands_path, "a test CPU")
    capsys.readouterr()
    assert study.check(results, "7", bands_path) == []
    assert "not on world 7" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="make study"):
        study.report(str(tmp_path / "empty"), str(tmp_path / "out"), bands_path, "a test CPU")


def test_committed_bands_cover_every_bridge_on_both_worlds():
    # make demo checks its run against these: a new bridge, or a changed recipe, needs `make study` again
    from bridges import BRIDGES
    with open(study.BANDS) as f:
        bands = json.load(f)
    assert set(bands["worlds"]) >= {"0", "1"} and bands["machine"]
    for world in bands["worlds"].values():
        assert set(world) == set(BRIDGES) | {"blind"}
        for bridge, measures in world.items():
            banded = study.BLIND_BANDED if bridge == "blind" else study.BAND_FLOOR
            assert set(measures) == set(banded) and all(m["n"] >= 5 for m in measures.values())


def test_a_blind_row_of_another_lm_is_judged_on_naming_the_scene_not_on_its_cider(finished_study, capsys):
    # the study's seeds share one LM, so its blind CIDEr never varied; another CPU's LM guesses other words
    tmp_path, _ = finished_study
    bands_path = str(tmp_path / "bands.json")
    study.report(str(tmp_path / "study"), str(tmp_path / "out"), bands_path, "a test CPU")
    other_lm = write_run(tmp_path / "demo", 0, "own", 0,
                         [row("blind (frozen LM)", 0.0, 0.0, 1.8, blind=True)])
    assert study.check(other_lm, "0", bands_path) == []
    sees = write_run(tmp_path / "demo", 0, "own", 1,
                     [row("blind (frozen LM)", 0.1, 0.1, 1.5, blind=True)])
    assert study.check(sees, "0", bands_path) == [("blind", "objects"), ("blind", "scene")]
