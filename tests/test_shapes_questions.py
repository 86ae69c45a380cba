# data/shapes.py's questions: VQAv2's layout, answers right for the scene (checked against the drawn
# coordinates, not the generator's fields), deterministic, the world's own files untouched, and no question
# type answerable from its wording alone. And corpus_qa.jsonl, the LM's text for learning to answer.
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "val")
FILES = [f"annotations/v2_OpenEnded_shapes_{split}_questions.json" for split in SPLITS] + \
        [f"annotations/v2_shapes_{split}_annotations.json" for split in SPLITS] + ["corpus_qa.jsonl"]
WORLD = dict(train=40, val=12, corpus_docs=300, seed=3)  # corpus_docs: enough to hold every token


def digests(folder):
    """{path relative to folder: sha256 of its bytes} for every file under folder."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world, and its files' digests before `--questions` added the question files (by the CLI)."""
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.generate(out, **WORLD)
    before = digests(out)
    run = subprocess.run([sys.executable, "data/shapes.py", "--out", out, "--questions"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"wrote {WORLD['corpus_docs']} question-answer corpus documents" in run.stderr, run.stderr
    return out, before


def load(out, split):
    questions = json.load(open(os.path.join(out, f"annotations/v2_OpenEnded_shapes_{split}_questions.json")))
    annotations = json.load(open(os.path.join(out, f"annotations/v2_shapes_{split}_annotations.json")))
    return questions, annotations


# -----------------------------------------------------------------------------
# Answering from the scene, independently of the generator: objects found by their coordinates and by the
# words that name them, sizes compared by their drawn extent.

PLACE = r"(?:on|at) the (left|right|top|bottom)"


def at(place, scene):
    """The object at a place, from the coordinates (and the place must fit the layout)."""
    a, b = scene["objects"]
    axis = "x" if place in ("left", "right") else "y"
    assert (axis == "x") == (abs(a["x"] - b["x"]) > abs(a["y"] - b["y"])), (place, scene)
    first, second = sorted((a, b), key=lambda o: o[axis])
    return first if place in ("left", "top") else second


def named(words, scene):
    """The one object these words fit (each word one of its size, colour, shape)."""
    fits = [o for o in scene["objects"]
            if all(w in (o["size"], o["colour"], o["shape"]) for w in words.split())]
    assert len(fits) == 1, (words, scene)
    return fits[0]


def where(obj, scene):
    other = [o for o in scene["objects"] if o is not obj][0]
    if abs(obj["x"] - other["x"]) > abs(obj["y"] - other["y"]):
        return "left" if obj["x"] < other["x"] else "right"
    return "top" if obj["y"] < other["y"] else "bottom"


def answer(question, scene):
    """(answer, question_type, answer_type) of a question about a scene, worked out from its words."""
    objects = scene["objects"]
    if m := re.fullmatch(rf"what (color|size) is the shape {PLACE}\?", question):
        attribute = {"color": "colour", "size": "size"}[m[1]]
        return at(m[2], scene)[attribute], f"what {m[1]} is the", "other"
    if m := re.fullmatch(rf"what shape is {PLACE}\?", question):
        return at(m[1], scene)["shape"], "what shape is", "other"
    if m := re.fullmatch(r"where is the ([a-z ]+)\?", question):
        return where(named(m[1], scene), scene), "where is the", "other"
    if m := re.fullmatch(r"what is the (larger|smaller) shape\?", question):
        small, large = sorted(objects, key=lambda o: o["extent"])
        obj = large if m[1] == "larger" else small
        assert named(f"{obj['colour']} {obj['shape']}", scene) is obj  # the answer names one object only
        return f"{obj['colour']} {obj['shape']}", "what is the", "other"
    if m := re.fullmatch(r"is there a ([a-z]+) ([a-z]+)\?", question):
        present = any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects)
        return ("yes" if present else "no"), "is there a", "yes/no"
    if m := re.fullmatch(r"how many ([a-z]+) shapes are there\?", question):
        return str(sum(o["colour"] == m[1] for o in objects)), "how many", "number"
    if m := re.fullmatch(r"how many ([a-z]+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objects)), "how many", "number"
    raise AssertionError(f"a question of no known kind: {question!r}")


def sampled(count, seed):
    """questions_of() on `count` freshly sampled scenes (nothing drawn): [(question dict, scene)]."""
    rng, ask = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    pairs = []
    for _ in range(count):
        scene = shapes.sample_scene(rng)
        pairs += [(q, scene) for q in shapes.questions_of(scene, ask)]
    return pairs


@pytest.fixture(scope="module")
def many():
    """A few thousand scenes' questions: train and val of the balance measurement."""
    return sampled(4000, seed=1), sampled(3000, seed=2)

# -----------------------------------------------------------------------------


def test_files_are_in_vqav2_layout(world):
    out, _ = world
    ids = set()
    for split in SPLITS:
        questions, annotations = load(out, split)
        scenes = json.load(open(os.path.join(out, f"scenes_{split}.json")))
        assert set(questions) == {"info", "task_type", "data_type", "data_subtype", "questions"}
        assert (questions["task_type"], questions["data_type"], questions["data_subtype"]) == \
            ("Open-Ended", "shapes", split)
        assert set(annotations) == {"info", "data_type", "data_subtype", "annotations"}
        assert (annotations["data_type"], annotations["data_subtype"]) == ("shapes", split)
        assert len(questions["questions"]) == len(annotations["annotations"])
        for q, a in zip(questions["questions"], annotations["annotations"]):
            assert set(q) == {"image_id", "question", "question_id"}
            assert set(a) == {"question_id", "image_id", "question_type", "answer_type",
                              "multiple_choice_answer", "answers"}
            assert (q["question_id"], q["image_id"]) == (a["question_id"], a["image_id"])
            assert isinstance(q["question_id"], int) and isinstance(q["image_id"], int)
            assert str(q["image_id"]) in scenes and q["question"].startswith(a["question_type"] + " ")
            assert a["answer_type"] in ("yes/no", "number", "other")
            # the miniature's ten annotators agree
            assert a["answers"] == [dict(answer=a["multiple_choice_answer"], answer_confidence="yes",
                                         answer_id=i) for i in range(1, 11)]
            ids.add(q["question_id"])
        asked = Counter(q["image_id"] for q in questions["questions"])
        assert set(map(str, asked)) == set(scenes) and min(asked.values()) >= 3
    # unique across both splits
    assert len(ids) == sum(len(load(out, split)[0]["questions"]) for split in SPLITS)


def test_answers_are_right_for_the_scene(world, many):
    out, _ = world
    for split in SPLITS:
        questions, annotations = load(out, split)
        scenes = json.load(open(os.path.join(out, f"scenes_{split}.json")))
        for q, a in zip(questions["questions"], annotations["annotations"]):
            expected = answer(q["question"], scenes[str(q["image_id"])])
            assert expected == (a["multiple_choice_answer"], a["question_type"], a["answer_type"]), q
    # and on a few thousand scenes, every kind of question in every kind of scene
    train, _ = many
    for q, scene in train:
        assert answer(q["question"], scene) == (q["answer"], q["question_type"], q["answer_type"]), q


def test_deterministic_for_a_seed(world, tmp_path):
    out, _ = world
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    shapes.generate(again, **WORLD)
    shapes.generate(other, **{**WORLD, "seed": 4})
    for folder in (again, other):
        shapes.write_questions(folder)
        shapes.write_qa_corpus(folder)
    for path in FILES:
        assert open(os.path.join(out, path), "rb").read() == open(os.path.join(again, path), "rb").read()
        assert open(os.path.join(out, path), "rb").read() != open(os.path.join(other, path), "rb").read()


def test_the_world_itself_is_untouched(world):
    # images, captions, scenes, corpus and info.json byte for byte as drawn: runs made on the world stay valid
    out, before = world
    after = digests(out)
    assert sorted(set(after) - set(before)) == sorted(FILES)
    assert {path: after[path] for path in before} == before
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in WORLD.items()]
    run = subprocess.run([sys.executable, "data/shapes.py", "--out", out, *flags, "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_no_question_type_is_answered_by_its_words(many):
    train, val = ([q for q, _ in pairs] for pairs in many)
    scores = shapes.question_only_accuracy(train, val)
    assert set(scores) == set(shapes.TYPE_ORDER)
    for question_type, s in scores.items():
        assert s["questions"] >= 500, (question_type, s)
        assert abs(s["question_only"] - s["prior"]) <= 0.05, (question_type, s)
    # and the answers are even, not merely unguessable: "is there a ...?" yes half the time, "how many" not
    # mostly 1 (nor 0), "what is the larger shape?" any of the 5 colours x 3 shapes alike
    for question_type, answers in (("is there a", 2), ("what is the", 15), ("how many", 3)):
        assert scores[question_type]["prior"] <= 1 / answers + 0.05, (question_type, scores[question_type])
    # the measurement does see a give-away: answering "how many" questions from the words alone
    leaky = [dict(q, question=f"{q['question']} ({q['answer']})") for q in train + val]
    scores = shapes.question_only_accuracy(leaky[:len(train)], leaky[len(train):])
    assert scores["how many"]["question_only"] > scores["how many"]["prior"] + 0.5


def test_is_there_answered_no_crosses_the_scenes_objects(many):
    # "no" asks the first's colour with the second's shape (or the reverse), so neither alone tells; only
    # when they share a colour or a shape (no crossed pair absent), an absent pair sharing one of them
    crossed = shared = 0
    for q, scene in many[0]:
        if q["question_type"] != "is there a" or q["answer"] != "no":
            continue
        colour, shape = re.fullmatch(r"is there a ([a-z]+) ([a-z]+)\?", q["question"]).groups()
        a, b = scene["objects"]
        if a["colour"] != b["colour"] and a["shape"] != b["shape"]:
            assert (colour, shape) in {(a["colour"], b["shape"]), (b["colour"], a["shape"])}, (q, scene)
            crossed += 1
        else:
            assert colour in (a["colour"], b["colour"]) or shape in (a["shape"], b["shape"]), (q, scene)
            shared += 1
    assert crossed > 500 and shared > 100, (crossed, shared)


def test_vocabulary_covers_every_word(many):
    train, val = many
    used = set()
    for q, _ in train + val:
        used |= set(re.findall(r"[a-z0-9]+", q["question"] + " " + q["answer"]))
        assert re.fullmatch(r"[a-z0-9 ]+\?", q["question"]), q
        assert re.fullmatch(r"[a-z0-9]+( [a-z]+)?", q["answer"]), q  # one word, or a colour and a shape
    assert used == set(shapes.question_vocabulary())


def test_the_miniature_questions_read_back_through_the_vqav2_reader_and_score(world):
    # the two halves of the VQA data meet: data/coco.py's reader takes the miniature's files, its images by
    # the COCO-format caption file; the official accuracy gives the right answers 1.0, a blind guess far less
    from data import coco
    from metrics import score_vqa
    out, _ = world
    paths = {r["image_id"]: r["path"] for r in coco.load_records(out, "val")}
    records, skipped = coco.load_vqa(os.path.join(out, FILES[1]), os.path.join(out, FILES[3]), paths)
    assert records and skipped == []
    right = score_vqa({r["question_id"]: r["answers"][0] for r in records}, records)
    assert right["accuracy"] == 1.0 and set(right["per_answer_type"]) == {"yes/no", "number", "other"}
    assert score_vqa({r["question_id"]: "yes" for r in records}, records)["accuracy"] < 0.5


# -----------------------------------------------------------------------------
# corpus_qa.jsonl: caption documents and question documents, alternating

QA = r"Question: ([a-z0-9 ]+\?) Answer: ([a-z0-9]+(?: [a-z]+)?)\."


def qa_corpus(out):
    return [json.loads(line)["text"] for line in open(os.path.join(out, "corpus_qa.jsonl"))]


def split_document(doc):
    """(captions, [(question, answer)]) of a corpus_qa document; the whole document must be made of them."""
    described, _, asked = doc.partition("\n")
    assert described.endswith(".") and "Question" not in described, doc
    pairs = re.findall(QA, asked)
    assert " ".join(f"Question: {q} Answer: {a}." for q, a in pairs) == asked, doc
    return described[:-1].split(". "), pairs


def described_scene(captions):
    """The scene the captions describe (they must all agree), from their words alone: positions as
    coordinates, and a large object's extent larger than a small one's, for answer() above."""
    scenes = set()
    for caption in captions:
        parsed = shapes.parse_caption(caption)
        objects = tuple((o["size"], o["colour"], o["shape"], region)
                        for o, region in zip(parsed["objects"], shapes.implied_regions(parsed)))
        assert len(objects) == 2 and None not in sum(objects, ()), caption
        scenes.add(objects)
    assert len(scenes) == 1, captions
    at = {"left": (0, 0), "right": (1, 0), "top": (0, 0), "bottom": (0, 1)}
    return dict(objects=[dict(size=size, colour=colour, shape=shape, x=at[region][0], y=at[region][1],
                              extent={"small": 1, "large": 2}[size])
                         for size, colour, shape, region in scenes.pop()])


def test_qa_corpus_alternates_captions_and_questions(world):
    out, _ = world
    docs = qa_corpus(out)
    assert len(docs) == WORLD["corpus_docs"]
    for i, doc in enumerate(docs):
        captions, pairs = split_document(doc)
        described_scene(captions)  # one scene
        if i % 2 == 0:  # as corpus.jsonl's documents
            assert 3 <= len(captions) <= 5 and pairs == [], doc
        else:
            assert 3 <= len(captions) <= 5 and 2 <= len(pairs) <= 4 and len(set(pairs)) == len(pairs), doc
    # the even ones are made exactly as corpus_documents() makes its own
    assert all(re.fullmatch(r"[a-z ,]+(\. [a-z ,]+){2,4}\.", doc) for doc in docs[::2])


def test_qa_corpus_answers_are_right_for_the_described_scene(world):
    # every answer follows from the captions before it (read back with parse_caption), and from the drawn
    # scene the generator yields with the document (by its coordinates)
    out, _ = world
    for doc in qa_corpus(out)[1::2]:
        captions, pairs = split_document(doc)
        for q, a in pairs:
            assert answer(q, described_scene(captions))[0] == a, doc
    kinds = Counter()
    for doc, scene in shapes.qa_documents(2000, seed=5):
        captions, pairs = split_document(doc)
        assert all(set(shapes.score_caption(c, scene).values()) == {1.0} for c in captions), doc
        for q, a in pairs:
            assert answer(q, scene)[0] == a == answer(q, described_scene(captions))[0], doc
            kinds[answer(q, scene)[1]] += 1
    assert set(kinds) == set(shapes.TYPE_ORDER)  # every kind of question is asked


def test_qa_corpus_holds_every_token_of_the_questions_and_captions(world):
    # an LM trained on corpus_qa.jsonl alone (--vocab-subset) must read every question put to it, as the
    # trainer writes it, its answer, and every caption
    import gpt2
    from data.coco import qa_prompt
    out, _ = world
    enc = gpt2.get_tokenizer()
    tokenizer = gpt2.SubsetTokenizer({t for doc in qa_corpus(out) for t in enc.encode_ordinary(doc)})
    for split in SPLITS:
        questions, annotations = load(out, split)
        for q, a in zip(questions["questions"], annotations["annotations"]):
            tokenizer.encode_ordinary(qa_prompt(q["question"]) + " " + a["multiple_choice_answer"])
        captions = json.load(open(os.path.join(out, f"annotations/captions_{split}2017.json")))
        for c in captions["annotations"]:
            tokenizer.encode_ordinary(c["caption"])
