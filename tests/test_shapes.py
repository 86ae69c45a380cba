# data/shapes.py: deterministic, captions say what was drawn, the corpus covers every caption word, and the
# COCO loader reads what it writes.
import hashlib
import json
import os

import numpy as np
import pytest

from data import coco, shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(str(out), train=40, val=12, corpus_docs=300, seed=3)
    return str(out)


def digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(dirpath, name), "rb").read())
    return h.hexdigest()


def test_deterministic_for_a_seed(world, tmp_path):
    shapes.generate(str(tmp_path / "again"), train=40, val=12, corpus_docs=300, seed=3)
    shapes.generate(str(tmp_path / "other"), train=40, val=12, corpus_docs=300, seed=4)
    assert digest(world) == digest(tmp_path / "again")
    assert digest(world) != digest(tmp_path / "other")


def test_coco_loader_reads_it(world):
    train, val = coco.load_records(world, "train"), coco.load_records(world, "val")
    assert len(train) == 40 and len(val) == 12
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in val}
    for r in train + val:
        assert os.path.isfile(r["path"]) and len(r["captions"]) == 5 and len(set(r["captions"])) == 5


def test_drawn_pixels_match_the_scene(world):
    from PIL import Image
    scenes = json.load(open(os.path.join(world, "scenes_train.json")))
    for r in coco.load_records(world, "train"):
        scene = scenes[str(r["image_id"])]
        pixels = np.asarray(Image.open(r["path"]).convert("RGB")).astype(int)
        assert (pixels[0, 0] == scene["background"]).all() or (pixels[-1, -1] == scene["background"]).all()
        for obj in scene["objects"]:
            # the object's centre has its colour (every shape covers its own centre)
            centre = pixels[int(obj["y"]), int(obj["x"])]
            assert np.abs(centre - shapes.COLOURS[obj["colour"]]).max() <= 2, (r["path"], obj)
        a, b = scene["objects"]
        if scene["layout"] == "horizontal":
            assert a["x"] < b["x"] and abs(a["y"] - b["y"]) < b["x"] - a["x"]
        else:
            assert a["y"] < b["y"] and abs(a["x"] - b["x"]) < b["y"] - a["y"]


@pytest.mark.parametrize("image_size", [64, 32])
def test_objects_sit_on_the_grid_inside_the_image_apart(image_size):
    # centres on the GRID x GRID grid (the demo CLIP's patch corners), whole shapes inside, never touching; in
    # a tiny image two large objects may fit nowhere on the grid: such scenes are redrawn, never an endless
    # loop
    rng = np.random.default_rng(0)
    step = image_size / shapes.GRID
    for _ in range(2000):
        scene = shapes.sample_scene(rng, image_size)
        a, b = scene["objects"]
        for obj in (a, b):
            assert obj["x"] % step == 0 and obj["y"] % step == 0, obj
            assert obj["extent"] / 2 < min(obj["x"], obj["y"], image_size - obj["x"],
                                           image_size - obj["y"]), obj
        assert max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) >= (a["extent"] + b["extent"]) / 2 + 2


def test_captions_describe_the_scene(world):
    for split in ("train", "val"):
        scenes = json.load(open(os.path.join(world, f"scenes_{split}.json")))
        for r in coco.load_records(world, split):
            scene = scenes[str(r["image_id"])]
            for caption in r["captions"]:
                # every reference caption gets every attribute right
                right = dict(colour=1, shape=1, size=1, position=1, layout=1, relation=1)
                assert shapes.score_caption(caption, scene) == right, caption
                parsed = shapes.parse_caption(caption)
                described = [(o["size"], o["colour"], o["shape"]) for o in parsed["objects"]]
                # in reading order: the left (or top) object first, so where it sits decides when it is named
                assert described == [(o["size"], o["colour"], o["shape"]) for o in scene["objects"]], caption


def test_parse_and_score_wrong_captions():
    scene = dict(layout="horizontal", relation="left of", background=40, objects=[
        dict(colour="red", shape="circle", size="small", position="left"),
        dict(colour="blue", shape="square", size="large", position="right")])
    assert shapes.parse_caption("a small red circle to the left of a large blue square") == dict(
        objects=[dict(size="small", colour="red", shape="circle", position=None),
                 dict(size="large", colour="blue", shape="square", position=None)], relation="left of")
    swapped = shapes.score_caption("a small red circle to the right of a large blue square", scene)
    # right layout, wrong order
    assert swapped == dict(colour=1, shape=1, size=1, position=0, layout=1, relation=0)
    reversed_order = shapes.score_caption(
        "a large blue square on the right and a small red circle on the left", scene)
    assert reversed_order == dict(colour=1, shape=1, size=1, position=1, layout=1, relation=1)
    half = shapes.score_caption("a small green circle above a large blue triangle", scene)
    # stacked: wrong layout
    assert half == dict(colour=0.5, shape=0.5, size=1, position=0, layout=0, relation=0)
    assert shapes.score_caption("", scene) == dict(colour=0, shape=0, size=0, position=0, layout=0,
                                                   relation=0)
    acc = shapes.attribute_accuracy({1: "a small red circle left of a large blue square", "2": ""},
                                    {"1": scene, "2": scene})
    assert acc == dict(colour=0.5, shape=0.5, size=0.5, position=0.5, layout=0.5, relation=0.5, objects=0.5,
                       scene=0.5)


def test_corpus_repeats_scenes_and_covers_the_vocabulary(world):
    from gpt2 import get_tokenizer
    docs = [json.loads(line)["text"] for line in open(os.path.join(world, "corpus.jsonl"))]
    assert len(docs) == 300
    for doc in docs[:50]:
        parts = doc.rstrip(".").split(". ")
        assert 3 <= len(parts) <= 5 and len(set(parts)) == len(parts)
        # several captions of the SAME scene: the same two objects in each
        objects = [frozenset((o["size"], o["colour"], o["shape"]) for o in shapes.parse_caption(p)["objects"])
                   for p in parts]
        assert len(set(objects)) == 1
    words = set(" ".join(docs).replace(".", " ").replace(",", " ").split())
    assert words == set(shapes.vocabulary()) and len(words) < 40
    # the tiny LM keeps only the GPT-2 tokens its corpus uses: every caption's tokens must be among them
    enc = get_tokenizer()
    # each document on its own, as the LM reads them
    corpus_tokens = set().union(*(enc.encode_ordinary(doc) for doc in docs))
    for split in ("train", "val"):
        for r in coco.load_records(world, split):
            for caption in r["captions"]:
                assert set(enc.encode_ordinary(caption)) <= corpus_tokens, caption


SCENE = dict(layout="horizontal", relation="left of", background=40, objects=[
    dict(colour="red", shape="circle", size="small", position="left"),
    dict(colour="blue", shape="square", size="large", position="right")])


@pytest.mark.parametrize("caption, objects, scene", [
    ("a small red circle to the left of a large blue square", 1, 1),        # right
    ("a large blue square to the right of a small red circle", 1, 1),       # right, other order
    ("a large blue square on the right and a small red circle on the left", 1, 1),  # right, regions only
    ("a small red circle to the right of a large blue square", 1, 0),       # wrong relation
    ("a small red circle above a large blue square", 1, 0),                 # relation of the other layout
    ("a small red circle and a large blue square", 1, 0),                   # no relation at all
    ("a small blue circle to the left of a large red square", 0, 0),        # colours swapped between objects
    ("a small red square to the left of a large blue circle", 0, 0),        # shapes swapped
    ("a large red circle to the left of a small blue square", 0, 0),        # sizes swapped
    ("a small red circle to the left of a large green square", 0, 0),       # one colour wrong
    ("red circle to the left of a large blue square", 0, 0),                # a size left out
    ("a small red circle", 0, 0),                                           # one object only
    ("", 0, 0),
])
def test_scene_level_accuracy(caption, objects, scene):
    assert shapes.scene_level(shapes.score_caption(caption, SCENE)) == dict(objects=objects, scene=scene)


def test_per_attribute_means_hide_what_scene_level_shows():
    # three captions, each with one mistake of a different kind: high per-attribute means, no image entirely
    # right
    captions = {1: "a small green circle to the left of a large blue square",   # one colour wrong
                2: "a small red triangle to the left of a large blue square",   # one shape wrong
                3: "a small red circle to the right of a large blue square"}    # relation wrong
    acc = shapes.attribute_accuracy(captions, {str(i): SCENE for i in captions})
    assert acc["colour"] == acc["shape"] == pytest.approx(5 / 6) and acc["size"] == 1
    assert acc["objects"] == pytest.approx(1 / 3) and acc["scene"] == 0
