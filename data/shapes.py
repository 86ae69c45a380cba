"""
The offline miniature world: a synthetic captioning data set in exactly COCO's format, made from a seed.

Every image holds two filled shapes on a grey background, side by side or one above the other, centred on the
corners of an 8 x 8 grid (GRID, below: why). A caption has to name each shape's size, colour and kind, and
where they are relative to each other, the left (or top) one first (FRAMES, below: why):

    a small red circle to the left of a large blue square
    a small red circle on the left and a large blue square on the right

What gets written (to --out):
    train2017/, val2017/                         the images (PNG), COCO file names
    annotations/captions_{train,val}2017.json    COCO caption files: 5 different captions per image
    scenes_{train,val}.json                      what was drawn, keyed by image id (for per-attribute scores)
    corpus.jsonl                                 {"text": ...} documents for pretraining the tiny LM
and, with --questions, added to a world already drawn (which it leaves as it is), VQAv2's files: questions
about the scenes, with their answers, none answerable from its words alone (Questions, below):
    annotations/v2_OpenEnded_shapes_{train,val}_questions.json    the questions
    annotations/v2_shapes_{train,val}_annotations.json            their answers (10 each, as VQAv2's)
    corpus_qa.jsonl     {"text": ...} documents that also teach the tiny LM to answer (qa_documents, below)

The corpus matters as much as the images. A frozen LM that has only seen single captions has no reason to
prefer "red" over "blue" after "a small": nothing in its context ever predicted the colour. So each corpus
document is 3-5 different captions of the SAME scene joined by ". ": to lower its loss the LM must learn to
copy the attributes it has already read. That copying is what a bridge's prefix exploits later: it puts the
image where the LM expects earlier captions. Corpus scenes are sampled on their own random stream, never from
the train/val images, and use every word the captions use (the LM keeps only the tokens its corpus uses).

parse_caption() reads a caption back into attributes and score_caption() compares it with the scene, so an
evaluation can report colour / shape / size / position / relation accuracy next to CIDEr, and the fraction of
images whose caption gets both objects (objects) and also their relation (scene) entirely right.

    python data/shapes.py --out data/shapes --train 10000 --val 500 --seed 0
    python data/shapes.py --out data/shapes --questions
"""
import argparse
import json
import os
import re
import sys
import time
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python data/shapes.py`
from common import atomic_open, int_at_least, positive_int, read_json, write_json  # noqa: E402
from data.coco import qa_prompt  # noqa: E402

# -----------------------------------------------------------------------------
# The world: a handful of attributes, each clearly visible at 64 px

COLOURS = {  # far apart in RGB, and all bright against the dark grey background
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
# filled, very different silhouettes (a random ViT must tell them apart)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.16, 0.21), "large": (0.36, 0.44)}  # the shape's extent, as a fraction of the image side
RELATIONS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}  # first object vs second
# where the first / second object is
REGIONS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
# Object centres lie on the corners of a GRID x GRID grid over the image, the patch grid of the demo's CLIP
# (64 px, 8-px patches), so a patch always holds the same part of a shape wherever the object is. Anywhere on
# the image, a shape is cut into different pieces at every position; CLIP's 500 steps then read shape little
# better than chance (linear probe 0.43 against 0.68 on the grid, seed 0), and no bridge can name what its
# encoder misses.
GRID = 8
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, so shape is more than a staircase of pixels
VERSION = 3  # of the drawing code, in info.json: a world drawn by other code is not reused
# (1: centres anywhere; 2: on the grid, captions in both orders; 3: captions in reading order)
QUESTIONS_VERSION = 3  # of the questions, in their files' info and make vqa's settings: old ones are refused
# (1: "is the red circle larger than the blue square?", yes/no; 2: "what is the larger shape?", by name;
# 3: "is there" answered no asks a pair crossed from the scene's objects)

# -----------------------------------------------------------------------------
# Scenes: what to draw


def sample_scene(rng, image_size=64):
    """
    A random scene: two objects, objects[0] left of (or above) objects[1], never overlapping.
    Positions are pixel centres on the grid (see GRID); the separation along the layout's axis always exceeds
    the offset across it, so "left of" or "above" is never a matter of opinion.
    """
    layout = ("horizontal", "vertical")[rng.integers(2)]
    while True:  # two objects that fit on the grid side by side (in a tiny image two large ones may not)
        objects = []
        while len(objects) < 2:
            size = ("small", "large")[rng.integers(2)]
            lo, hi = SIZES[size]
            obj = dict(colour=list(COLOURS)[rng.integers(len(COLOURS))],
                       shape=SHAPES[rng.integers(len(SHAPES))],
                       size=size, extent=round(float(rng.uniform(lo, hi)) * image_size, 1))
            # two identical objects would make "a red square below a red square" true both ways round
            if not objects or any(obj[a] != objects[0][a] for a in ("colour", "shape", "size")):
                objects.append(obj)
        centres = place(objects, rng, image_size)
        if centres is not None:
            break
    for obj, (along, across), region in zip(objects, centres, REGIONS[layout]):
        x, y = (along, across) if layout == "horizontal" else (across, along)
        obj.update(x=x, y=y, position=region)
    background = int(rng.integers(25, 75))
    return dict(layout=layout, relation=RELATIONS[layout][0], objects=objects, background=background)


def place(objects, rng, S):
    """(along, across) grid centres for the two objects: the first in the first half, the second in the
    second, apart by more than their radii and by more along the axis than across it; None if nothing fits."""
    r0, r1 = objects[0]["extent"] / 2, objects[1]["extent"] / 2
    grid = [k * S / GRID for k in range(1, GRID)]
    ranges = (r0 + 1, S / 2 - 1), (S / 2 + 1, S - r1 - 1), (r0 + 1, S - r0 - 1), (r1 + 1, S - r1 - 1)
    choices = [[p for p in grid if lo <= p <= hi] for lo, hi in ranges]  # along0, along1, across0, across1
    if not all(choices):
        return None
    for _ in range(100):  # rejection sampling: a handful of tries, unless no pair of grid points fits at all
        along0, along1, across0, across1 = (float(rng.choice(c)) for c in choices)
        if along1 - along0 >= r0 + r1 + 2 and abs(across1 - across0) <= 0.5 * (along1 - along0):
            return (along0, across0), (along1, across1)
    return None


def draw_scene(scene, image_size=64):
    """The scene as an RGB image: filled shapes on a plain grey background, anti-aliased."""
    S = image_size * SUPERSAMPLE
    image = Image.new("RGB", (S, S), (scene["background"],) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x, y, r = obj["x"] * SUPERSAMPLE, obj["y"] * SUPERSAMPLE, obj["extent"] * SUPERSAMPLE / 2
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif obj["shape"] == "square":
            s = 0.85 * r  # a square of the same extent looks bigger than the circle; shrink it a little
            draw.rectangle((x - s, y - s, x + s, y + s), fill=colour)
        else:  # an upward triangle, base at the bottom
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.BOX)

# -----------------------------------------------------------------------------
# Captions: a few sentence frames, always "size colour shape" for an object


def phrase(obj):
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


FRAMES = {  # {a} is the first (left / top) object, {b} the second: always named in reading order (see below)
    "horizontal": [
        "{a} to the left of {b}",
        "{a} is to the left of {b}",
        "{a} on the left and {b} on the right",
        "{a} on the left, {b} on the right",
        "there is {a} left of {b}",
        "two shapes, {a} on the left and {b} on the right",
    ],
    "vertical": [
        "{a} above {b}",
        "{a} is above {b}",
        "{a} at the top and {b} at the bottom",
        "{a} at the top, {b} at the bottom",
        "there is {a} above {b}",
        "two shapes, {a} at the top and {b} at the bottom",
    ],
}
# Why reading order: a caption that names an object first and places it afterwards ("a red circle on the right
# and ...", "... to the right of ...") asks the captioner to look up where the object it has just named sits,
# by what it looks like. The demo's cross-attention never learned that: with both orders in the captions
# (world version 2) it named the objects far more often than it placed them. In reading order, where an
# object sits decides when it is named, which attention reads directly, and CLIP learns shape better from such
# captions (the measurements: docs/miniature.md, "Why the captions name the objects in reading order").


def captions_of(scene, rng, n=5):
    """n different captions of one scene (different sentence frames, in random order)."""
    a, b = (phrase(o) for o in scene["objects"])
    frames = FRAMES[scene["layout"]]
    return [frames[i].format(a=a, b=b) for i in rng.permutation(len(frames))[:n]]


def vocabulary():
    """Every word a caption can use (a few dozen): the corpus must contain each of them."""
    words = {"a"} | set(COLOURS) | set(SHAPES) | set(SIZES)
    for frames in FRAMES.values():
        for frame in frames:
            words |= set(re.findall(r"[a-z]+", frame.replace("{a}", "").replace("{b}", "")))
    return sorted(words)

# -----------------------------------------------------------------------------
# Reading a caption back: attributes, and how many of them match the scene

POSITION_WORDS = {"left", "right", "top", "bottom"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# "above" -> "vertical"
LAYOUT_OF = {relation: layout for layout, pair in RELATIONS.items() for relation in pair}
REGION_OF = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
             "below": ("bottom", "top")}  # relation of mention 0 to mention 1 -> their regions


def parse_caption(text):
    """
    A caption's attributes, in the order the objects are mentioned:
        {"objects": [{"size", "colour", "shape", "position"}, ...], "relation": "left of" | ... | None}
    An attribute the caption leaves out is None. "relation" is the first mentioned object's relation to the
    second ("X to the right of Y" -> "right of"); "position" is an explicit "on the left" / "at the top".
    Words outside the vocabulary are ignored, so a half-right caption still scores its right parts.
    """
    words = re.findall(r"[a-z]+", text.lower())
    objects, relation, pending = [], None, {}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w in SIZES:
            pending["size"] = w
        elif w in COLOURS:
            pending["colour"] = w
        elif w in SHAPES:
            objects.append(dict(size=pending.get("size"), colour=pending.get("colour"), shape=w,
                                position=None))
            pending = {}
        elif w in ("left", "right") and nxt == "of":
            relation = relation or f"{w} of"
        elif w in ("above", "below"):
            relation = relation or w
        elif w in POSITION_WORDS and objects and objects[-1]["position"] is None:
            objects[-1]["position"] = w
    return dict(objects=objects, relation=relation)


def implied_regions(parsed):
    """
    Where the caption puts its first two objects: explicit position words, else what the relation implies.
    """
    regions = [o["position"] for o in parsed["objects"][:2]]
    if parsed["relation"] and len(parsed["objects"]) >= 2:
        implied = REGION_OF[parsed["relation"]]
        regions = [r or implied[i] for i, r in enumerate(regions)]
    return regions + [None] * (2 - len(regions))


def score_caption(text, scene):
    """
    Per-attribute correctness of one caption against the scene it describes, each in [0, 1]:
    colour, shape, size: fraction of the scene's two objects named with the right value;
    position: fraction of the two objects placed in the right region (left/right/top/bottom);
    layout: 1 if the caption puts them side by side, or one above the other, as they are
            (whatever their order);
    relation: 1 if the objects' spatial order is stated correctly.
    Mentions are matched to objects in whichever order agrees on more attributes, so "a large blue square to
    the right of a small red circle" is as right as "a small red circle to the left of a large blue square".
    """
    parsed = parse_caption(text)
    mentions = parsed["objects"][:2] + [dict(size=None, colour=None, shape=None, position=None)] * 2
    regions = implied_regions(parsed)
    objects = scene["objects"]
    stated = parsed["relation"]  # from mention 0 to mention 1
    if stated is None and None not in regions[:2] and regions[0] != regions[1]:
        stated = {("left", "right"): "left of", ("right", "left"): "right of",
                  ("top", "bottom"): "above", ("bottom", "top"): "below"}.get(tuple(regions[:2]))
    layout = float(len(parsed["objects"]) >= 2 and LAYOUT_OF.get(stated) == scene["layout"])
    best = None
    for order in permutations(range(2)):  # order[k]: the mention matched to object k
        scores = {a: sum(mentions[order[k]][a] == objects[k][a] for k in range(2)) / 2
                  for a in ("colour", "shape", "size")}
        scores["position"] = sum(regions[order[k]] == objects[k]["position"] for k in range(2)) / 2
        # the stated relation, turned into the scene's direction (object 0 to object 1)
        relation = OPPOSITE[stated] if stated is not None and order != (0, 1) else stated
        scores["relation"] = float(len(parsed["objects"]) >= 2 and relation == scene["relation"])
        # the matching that agrees on more attributes wins; on a tie, the kinder spatial reading
        key = (scores["colour"] + scores["shape"] + scores["size"], scores["position"] + scores["relation"])
        if best is None or key > best[0]:
            best = (key, scores)
    return {**best[1], "layout": layout}


def scene_level(scores):
    """
    Whole-scene correctness from one caption's score_caption() scores. Per-attribute means can be high while
    few captions are right as a whole: one caption misses a colour, the next a shape, a third puts the right
    colours on the wrong shapes (half right for both). So, per image:
    objects: 1 if both objects are named with the right size, colour and shape (the matching score_caption
             picked has all six right; the two objects always differ, so no other matching could);
    scene:   1 if, in addition, their relation (left of / right of / above / below) is right.
    """
    objects = float(all(scores[a] == 1 for a in ("colour", "shape", "size")))
    return dict(objects=objects, scene=float(objects == 1 and scores["relation"] == 1))


def attribute_accuracy(captions, scenes):
    """
    Mean scores over {image_id: caption} against {image_id: scene} (ids as str or int): the per-attribute ones
    (colour, shape, size, position, relation) and the scene-level fractions of images (objects, scene).
    """
    totals = {}
    for image_id, caption in captions.items():
        scores = score_caption(caption, scenes[str(image_id)])
        scores.update(scene_level(scores))
        for attribute, value in scores.items():
            totals[attribute] = totals.get(attribute, 0.0) + value
    return {attribute: total / max(len(captions), 1) for attribute, total in totals.items()}


# The columns evaluate.py adds to its table for this data set (evaluate.py ... --extra-scores data.shapes):
# the per-attribute accuracies, then the scene-level ones (scene_level)
SCORE_COLUMNS = ("colour", "shape", "size", "position", "layout", "relation", "objects", "scene")
ABOUT_SCORES = ("Against the drawn scenes: per-attribute accuracy (colour ... relation; layout = side by "
                "side or one above the other, as drawn, whatever the order); objects = fraction of images "
                "whose caption names both objects with the right size, colour and shape; scene = that, and "
                "their relation right too.")


def extra_scores(root, split):
    """evaluate.py's hook: (columns, score {image_id: caption} -> {column: value}, about), or None for a root
    that is not the miniature (nothing was drawn there to check a caption against)."""
    scenes = read_scenes(root, split)
    if scenes is None:
        return None
    return SCORE_COLUMNS, lambda captions: attribute_accuracy(captions, scenes), ABOUT_SCORES

# -----------------------------------------------------------------------------
# Writing the data set


SPLIT_ID_BASE = {"train": 0, "val": 1_000_000}  # COCO image ids are unique across splits; so are ours


def write_split(out, split, count, seed, image_size=64):
    """Draw `count` images of one split; write them, the COCO caption file and the scene file."""
    rng = np.random.default_rng([seed, 1 + list(SPLIT_ID_BASE).index(split)])  # one stream per split
    folder = os.path.join(out, f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    images, annotations, scenes = [], [], {}
    for i in tqdm(range(count), desc=f"{split} images", unit="img"):
        image_id = SPLIT_ID_BASE[split] + i + 1
        scene = sample_scene(rng, image_size)
        file_name = f"{image_id:012d}.png"
        draw_scene(scene, image_size).save(os.path.join(folder, file_name))
        images.append(dict(id=image_id, file_name=file_name, width=image_size, height=image_size))
        for caption in captions_of(scene, rng):
            annotations.append(dict(id=len(annotations) + 1 + SPLIT_ID_BASE[split] * 10, image_id=image_id,
                                    caption=caption))
        scenes[str(image_id)] = scene
    coco = dict(info=dict(description=f"shapes miniature, {split}, seed {seed}", version="1.0"), licenses=[],
                images=images, annotations=annotations)
    write_json(os.path.join(out, "annotations", f"captions_{split}2017.json"), coco)
    write_json(os.path.join(out, f"scenes_{split}.json"), scenes)


def read_scenes(root, split):
    """What was drawn in a split ({image id: scene}, from scenes_{split}.json), or None for a root that is not
    the miniature (real COCO has no scenes)."""
    path = os.path.join(root, f"scenes_{split}.json")
    return read_json(path, "scene file") if os.path.exists(path) else None


def corpus_documents(count, seed, image_size=64):
    """LM pretraining text: each document is 3-5 different captions of one scene, joined by '. '."""
    rng = np.random.default_rng([seed, 100])  # its own stream: these scenes are not the train/val images
    for _ in range(count):
        yield caption_document(sample_scene(rng, image_size), rng)


def caption_document(scene, rng):
    """3-5 different captions of one scene, joined by '. ': a document of the corpus."""
    return ". ".join(captions_of(scene, rng, n=int(rng.integers(3, 6)))) + "."


def write_corpus(path, count, seed, image_size=64):
    with atomic_open(path) as f:
        for doc in corpus_documents(count, seed, image_size):
            f.write(json.dumps({"text": doc}) + "\n")


def generate(out, train=10000, val=500, corpus_docs=20000, seed=0, image_size=64):
    """The whole miniature data set under `out`; returns seconds taken."""
    t0 = time.time()
    write_split(out, "train", train, seed, image_size)
    write_split(out, "val", val, seed, image_size)
    write_corpus(os.path.join(out, "corpus.jsonl"), corpus_docs, seed, image_size)
    write_json(os.path.join(out, "info.json"), dict(version=VERSION, seed=seed, train=train, val=val,
                                                    corpus_docs=corpus_docs, image_size=image_size,
                                                    vocabulary=vocabulary()))
    return time.time() - t0



def check_world(out, train, val, corpus_docs, seed, image_size=64):
    """
    None if `out` holds no world yet or exactly this one, else what differs. A world already drawn is reused
    as it is (make sees its info.json and skips the stage), so `make demo SHAPES_SEED=1 SHAPES=data/shapes`
    would otherwise train and score on seed 0's images while the user reads the table as seed 1's.
    """
    path = os.path.join(out, "info.json")
    if not os.path.exists(path):
        return None
    info = read_json(path, "world description")
    asked = dict(version=VERSION, seed=seed, train=train, val=val, corpus_docs=corpus_docs,
                 image_size=image_size)
    differ = [f"{k} {info.get(k)} (asked: {v})" for k, v in asked.items() if info.get(k) != v]
    return f"{out} holds a world drawn with other settings: " + ", ".join(differ) if differ else None

def check_run_folder(run_dir, out):
    """
    None if run_dir (make demo's DEMO) is new or was trained on the world in `out`, else why not. make reuses
    what a run folder holds (an LM, a bridge resumed with --resume auto) whenever its file targets exist, so a
    folder trained on another world would put that world's LM and bridges into this world's table. Every demo
    stage records the world in run_dir/world.json (a copy of its info.json: the Makefile's stage macro).
    """
    record, info = os.path.join(run_dir, "world.json"), os.path.join(out, "info.json")
    if os.path.exists(record):
        if os.path.exists(info) and \
                read_json(record, "run folder's world") != read_json(info, "world description"):
            return (f"{run_dir} was trained on another world than {out} holds "
                    f"(its world.json differs from {info})")
        return None
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {"times.txt"}:
        return (f"{run_dir} holds runs of a world it did not record "
                "(made before run folders recorded their world)")
    return None

# -----------------------------------------------------------------------------
# Questions: visual question answering about the same scenes, in VQAv2's format
#
# A VQA score measures seeing only as far as the question alone does not give the answer away (in VQA v1,
# "do you see a ...?" is mostly yes; VQAv2 pairs each question with images of different answers, and a
# model reading the question alone still answers many). The miniature chooses what to ask so that, for every
# question text, the answers are evenly spread; question_only_accuracy() measures what is left.

PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
QUESTIONS = {  # kind: (template, question_type = its opening words, as VQAv2 records them, answer_type)
    "colour": ("what color is the shape {place}?", "what color is the", "other"),  # VQAv2's spelling
    "shape": ("what shape is {place}?", "what shape is", "other"),
    "size": ("what size is the shape {place}?", "what size is the", "other"),
    "where": ("where is the {x}?", "where is the", "other"),
    "compare": ("what is the {than} shape?", "what is the", "other"),  # answered by name: "red circle"
    "exists": ("is there a {x}?", "is there a", "yes/no"),
    "count": ("how many {xs} are there?", "how many", "number"),
}
TYPE_ORDER = [question_type for _, question_type, _ in QUESTIONS.values()]
COMPARATIVES = ("larger", "smaller")
COUNTED = {"colour": (COLOURS, "{} shapes"), "shape": (SHAPES, "{}s")}  # "how many red shapes", "... circles"


def question(kind, answer, **slots):
    template, question_type, answer_type = QUESTIONS[kind]
    return dict(question=template.format(**slots), answer=str(answer), question_type=question_type,
                answer_type=answer_type)


def name(obj, other):
    """How a question names an object: by colour and shape, and by its size too when the other object shares
    both (a scene's two objects always differ somewhere)."""
    same = obj["colour"] == other["colour"] and obj["shape"] == other["shape"]
    return f"{obj['size']} {obj['colour']} {obj['shape']}" if same else f"{obj['colour']} {obj['shape']}"


def questions_of(scene, rng):
    """
    A few questions about one scene (3 to 6), each dict(question, answer, question_type, answer_type):
        what color is the shape on the left?      where is the red circle?
        what shape is at the top?                 what is the larger shape?  (red circle)
        what size is the shape on the right?      is there a green triangle?
        how many circles are there?               how many red shapes are there?
    For every question text the answers are evenly spread (the comments say how), so only the image tells.
    """
    a, b = objects = scene["objects"]
    asked = []
    # One attribute of the object at one place: each object's colour, shape and size are drawn evenly,
    # wherever it is.
    obj = objects[rng.integers(2)]
    attribute = ("colour", "shape", "size")[rng.integers(3)]
    asked.append(question(attribute, obj[attribute], place=PLACE[obj["position"]]))
    # Where an object is: the layout, and which object comes first, are drawn regardless of what the objects
    # look like, so every name is as often left as right, top or bottom.
    obj, other = (a, b) if rng.integers(2) == 0 else (b, a)
    asked.append(question("where", obj["position"], x=name(obj, other)))
    # Which of the two is larger (or smaller), answered by name: only when their sizes differ and so does
    # their colour or shape (else one name would fit both). "larger" or "smaller" is drawn at random; the
    # answer is then any colour and shape alike. (Asked as "is the red circle larger than the blue square?",
    # a yes/no, no LM or bridge here learned it: docs/miniature.md, the comparisons.)
    if a["size"] != b["size"] and (a["colour"], a["shape"]) != (b["colour"], b["shape"]):
        than = COMPARATIVES[rng.integers(2)]
        large, small = (a, b) if a["size"] == "large" else (b, a)
        obj, other = (large, small) if than == "larger" else (small, large)
        asked.append(question("compare", name(obj, other), than=than))
    asked.append(is_there(objects, rng))
    asked += [how_many(objects, kind, rng) for kind in COUNTED]
    return [q for q in asked if q is not None]


def is_there(objects, rng):
    """
    "is there a red circle?": first yes or no, with even odds, then the colour and shape. Yes: one object's.
    No: a pair crossed from the two objects (the first's colour with the second's shape, or the reverse), so
    that neither the colour nor the shape alone tells, only whether they belong to one object. (Asked about
    any absent pair, "yes whenever the shape is there" was right 3 times in 4, and a bridge learned that:
    docs/miniature.md.) When the two share a colour or a shape, no crossed pair is absent: then an absent pair
    sharing one of the scene's colours or shapes. Every pair is still answered yes as often as no.
    """
    if rng.integers(2):
        obj = objects[rng.integers(2)]
        return question("exists", "yes", x=f"{obj['colour']} {obj['shape']}")
    a, b = objects
    present = {(o["colour"], o["shape"]) for o in objects}
    absent = [p for p in ((a["colour"], b["shape"]), (b["colour"], a["shape"])) if p not in present]
    if not absent:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                  and (c in (a["colour"], b["colour"]) or s in (a["shape"], b["shape"]))]
    colour, shape = absent[rng.integers(len(absent))]
    return question("exists", "no", x=f"{colour} {shape}")


def how_many(objects, kind, rng):
    """
    "how many red shapes are there?" (kind "colour") or "how many circles are there?" ("shape"), or None.
    Left to chance, one colour's count is 0 in about 2 scenes of 3, and 2 in 1 of 30. So the answer is drawn
    first, then an X that many objects have (None if no X has). A count of 2 is possible only when both
    objects share the X (chance p: chance_shared), 1 only when they do not (1 - p), 0 always (there are more
    values than objects): drawing each answer in inverse proportion to how often it is possible makes every X
    as often 0 as 1 or 2.
    """
    values, words = COUNTED[kind]
    p = chance_shared(kind, objects[0]["size"] == objects[1]["size"])
    odds = np.array([1, 1 / (1 - p), 1 / p])
    count = int(rng.choice(3, p=odds / odds.sum()))
    candidates = [v for v in values if sum(o[kind] == v for o in objects) == count]
    if not candidates:
        return None
    return question("count", count, xs=words.format(candidates[rng.integers(len(candidates))]))


def chance_shared(kind, same_size):
    """
    The chance that a scene's two objects share their colour (kind "colour") or their shape, given whether
    they share their size. sample_scene draws the second object evenly among every size, colour and shape
    but the first's own (whether they fit depends on their sizes alone), so with the same size the second's
    colour and shape are one of the n * m - 1 other pairs, m - 1 of which share the first's colour (n colours,
    m shapes); with different sizes, any of the n * m.
    """
    n, m = (len(COLOURS), len(SHAPES)) if kind == "colour" else (len(SHAPES), len(COLOURS))
    return (m - 1) / (n * m - 1) if same_size else 1 / n


def question_vocabulary():
    """Every word a question or an answer can use: a corpus that teaches the LM to answer must hold each."""
    templates = [t for t, _, _ in QUESTIONS.values()] + list(PLACE.values()) + list(COMPARATIVES)
    counted = [words.format(v) for values, words in COUNTED.values() for v in values]
    words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(templates + counted))))
    answers = {"yes", "no", "0", "1", "2"} | set(PLACE) | set(COLOURS) | set(SHAPES) | set(SIZES)
    return sorted(words | answers)


def question_only_accuracy(train, val):
    """
    How much of each question type the question alone answers: {question_type: dict(prior, question_only,
    questions)} on `val` (lists of questions_of()'s dicts), both predictors fitted on `train`. prior answers
    every question of a type with the type's most common answer; question_only answers each question text with
    its own most common answer (the type's, for a text train never asked). question_only well above prior
    means the wording gives answers away. `python data/shapes.py --out W --questions` prints both for a world;
    measured on the demo's worlds: docs/miniature.md (questions about the scenes).
    """
    counts = {}  # (question_type, question text, or None for the whole type) -> {answer: count}
    for q in train:
        for key in ((q["question_type"], None), (q["question_type"], q["question"])):
            counts.setdefault(key, {}).setdefault(q["answer"], 0)
            counts[key][q["answer"]] += 1
    majority = {key: max(sorted(answers), key=answers.get) for key, answers in counts.items()}
    scores = {}
    for q in val:
        prior = majority.get((q["question_type"], None))
        guess = majority.get((q["question_type"], q["question"]), prior)
        s = scores.setdefault(q["question_type"], dict(prior=0.0, question_only=0.0, questions=0))
        s["prior"] += prior == q["answer"]
        s["question_only"] += guess == q["answer"]
        s["questions"] += 1
    for s in scores.values():
        s["prior"] /= s["questions"]
        s["question_only"] /= s["questions"]
    return scores


def write_questions(out):
    """
    Questions about the world already drawn in `out`, from its scenes and seed (on a random stream of their
    own: nothing the world holds changes), in VQAv2's two files per split next to the COCO caption files. The
    miniature's 10 "annotators" always agree: every answer is given 10 times. Returns {split: questions_of()'s
    dicts}.
    """
    seed = read_json(os.path.join(out, "info.json"), "world description")["seed"]
    asked = {}
    for index, split in enumerate(SPLIT_ID_BASE):
        scenes = read_json(os.path.join(out, f"scenes_{split}.json"), "scene file")
        rng = np.random.default_rng([seed, 200 + index])  # not the images', captions' or corpus' streams
        questions, annotations, asked[split] = [], [], []
        for image_id in sorted(scenes, key=int):
            for k, q in enumerate(questions_of(scenes[image_id], rng)):
                question_id = int(image_id) * 10 + k  # image ids are unique across splits; so are these
                questions.append(dict(image_id=int(image_id), question=q["question"],
                                      question_id=question_id))
                answers = [dict(answer=q["answer"], answer_confidence="yes", answer_id=i)
                           for i in range(1, 11)]
                annotations.append(dict(question_id=question_id, image_id=int(image_id),
                                        question_type=q["question_type"], answer_type=q["answer_type"],
                                        multiple_choice_answer=q["answer"], answers=answers))
                asked[split].append(q)
        info = dict(description=f"shapes miniature questions, {split}, seed {seed}",
                    version=f"{QUESTIONS_VERSION}.0")
        folder = os.path.join(out, "annotations")
        # compact, as VQAv2's own files are (ten answers a question)
        write_json(os.path.join(folder, f"v2_OpenEnded_shapes_{split}_questions.json"),
                   dict(info=info, task_type="Open-Ended", data_type="shapes", data_subtype=split,
                        questions=questions), indent=None)
        write_json(os.path.join(folder, f"v2_shapes_{split}_annotations.json"),
                   dict(info=info, data_type="shapes", data_subtype=split, annotations=annotations),
                   indent=None)
    return asked


def qa_documents(count, seed, image_size=64):
    """
    LM pretraining text that teaches answering as well as copying: yields (document, scene). Even documents
    are corpus_documents()'s, 3-5 captions of one scene; odd ones are the same, then, on a line of their
    own, 2-4 of its questions, answered: "Question: what shape is on the left? Answer: circle.
    Question: ...". To lower its loss on an answer the LM must look it up in the description earlier in its
    context, which is what a bridge's prefix stands in for later (as it stands in for earlier captions). The
    questions start a line because a prompt put after the prefix starts with "Question", a GPT-2 token other
    than " Question", and an LM trained with --vocab-subset reads only the tokens its corpus used.
    """
    rng = np.random.default_rng([seed, 300])  # not the images', captions', corpus' or questions' streams
    for i in range(count):
        scene = sample_scene(rng, image_size)
        captions = caption_document(scene, rng)
        if i % 2 == 0:
            yield captions, scene
            continue
        questions = questions_of(scene, rng)  # 3 to 6 of them
        asked = [questions[k] for k in rng.permutation(len(questions))[:int(rng.integers(2, 5))]]
        answered = [f"{qa_prompt(q['question'])} {q['answer']}." for q in asked]
        yield captions + "\n" + " ".join(answered), scene


def write_qa_corpus(out):
    """corpus_qa.jsonl for the world in `out`: as many documents as its corpus.jsonl, from its seed (a file
    added next to the others, which stay as they are). Returns how many documents it wrote."""
    info = read_json(os.path.join(out, "info.json"), "world description")
    with atomic_open(os.path.join(out, "corpus_qa.jsonl")) as f:
        for doc, _ in qa_documents(info["corpus_docs"], info["seed"], info["image_size"]):
            f.write(json.dumps({"text": doc}) + "\n")
    return info["corpus_docs"]


def balance_table(scores):
    """question_only_accuracy()'s scores as lines of text, one per question type."""
    lines = [f"{'question type':<20}{'questions':>10}{'prior':>8}{'question only':>15}"]
    for question_type, s in sorted(scores.items(), key=lambda item: TYPE_ORDER.index(item[0])):
        lines.append(f"{question_type:<20}{s['questions']:>10}{s['prior']:>8.3f}{s['question_only']:>15.3f}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Generate the offline miniature captioning data set (COCO format).")
    parser.add_argument("--out", default="data/shapes")
    parser.add_argument("--train", type=positive_int, default=10000, help="training images")
    parser.add_argument("--val", type=positive_int, default=500,
                        help="validation images (the miniature's evaluation set)")
    parser.add_argument("--corpus-docs", type=positive_int, default=20000,
                        help="LM pretraining documents in corpus.jsonl")
    parser.add_argument("--image-size", type=int_at_least(32), default=64,
                        help="pixels (>= 32: two shapes must fit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="draw nothing: stop with an error if --out already holds a world "
                             "of other settings")
    parser.add_argument("--run-dir",
                        help="with --check: also stop if this run folder was trained on another world")
    parser.add_argument("--questions", action="store_true",
                        help="draw nothing: add questions in VQAv2's format about the world already in --out "
                             "(from its own scenes and seed: the flags that describe a world are not read)")
    args = parser.parse_args()
    if args.questions:
        if args.check or args.run_dir:
            parser.error("--questions checks nothing: give --check and --run-dir without it")
        if not os.path.exists(os.path.join(args.out, "info.json")):
            parser.error(f"{args.out} holds no world to ask about: draw it first (without --questions)")
        t0 = time.time()
        asked = write_questions(args.out)
        documents = write_qa_corpus(args.out)
        print(balance_table(question_only_accuracy(asked["train"], asked["val"])), file=sys.stderr)
        print(f"wrote {len(asked['train'])} train + {len(asked['val'])} val questions to "
              f"{os.path.join(args.out, 'annotations')}; vocabulary of {len(question_vocabulary())} words",
              file=sys.stderr)
        print(f"wrote {documents} question-answer corpus documents to "
              f"{os.path.join(args.out, 'corpus_qa.jsonl')} ({time.time() - t0:.1f}s in all)",
              file=sys.stderr)
        sys.exit(0)
    problem = check_world(args.out, args.train, args.val, args.corpus_docs, args.seed, args.image_size)
    if problem:
        parser.error(f"{problem}. Draw this one into another folder (the Makefile's SHAPES and DEMO; "
                     f"`make demo SHAPES_SEED=<k>` picks data/shapes-<k> and runs/demo-<k> by itself), "
                     f"or delete {args.out} and the runs trained on it "
                     f"(`make demo-clean` deletes the demo's world and run folder)")
    problem = args.run_dir and check_run_folder(args.run_dir, args.out)
    if problem:
        parser.error(f"{problem}. Train into another folder (`make demo DEMO=runs/<new>`), "
                     f"or delete {args.run_dir} (`make demo-clean` deletes the demo's world and run folder)")
    if args.check:
        sys.exit(0)
    seconds = generate(args.out, args.train, args.val, args.corpus_docs, args.seed, args.image_size)
    print(f"wrote {args.train} train + {args.val} val images and {args.corpus_docs} corpus documents to "
          f"{args.out} in {seconds:.1f}s; vocabulary of {len(vocabulary())} words", file=sys.stderr)
