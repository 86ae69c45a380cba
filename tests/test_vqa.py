"""
VQAv2: the official VQA accuracy (metrics.py) on examples worked out by hand from the official rules, and
data/coco.py's reader on a small VQAv2 split written here in the real layout (COCO 2014 file names, real
JPEGs).
The reader's bad inputs are tests/test_bad_inputs_vqa.py's.
"""
import json

import numpy as np
import pytest
from PIL import Image

import metrics
from data import coco
from metrics import normalize_answer, score_vqa, vqa_accuracy

# -----------------------------------------------------------------------------
# A small VQAv2 split in the real layout


def vqa_data(split="val"):
    """
    The contents of VQAv2's two files for 4 questions on 3 images: ({"questions": ...}, {"annotations": ...}),
    with the top-level keys and answer fields the real files have.
    """
    questions = [(42, 420000, "What color is the square?"), (42, 420001, "Is there a circle?"),
                 (139, 1390000, "How many triangles are there?"), (285, 2850000, " What is on the table? ")]
    answers = {420000: ("other", "what color is the", ["red"] * 8 + ["dark red"] * 2),
               420001: ("yes/no", "is there a", ["yes"] * 10),
               1390000: ("number", "how many", ["2"] * 6 + ["3"] * 3 + ["two"]),
               2850000: ("other", "what is on the", ["book"] * 3 + ["a book"] * 2 + ["laptop"] * 5)}
    common = dict(info={"description": "a small VQAv2 split", "version": "2.0"}, data_type="mscoco",
                  license={"name": "Creative Commons Attribution 4.0 International License"},
                  data_subtype=f"{split}2014")
    q = dict(common, task_type="Open-Ended",
             questions=[dict(image_id=i, question=text, question_id=qid) for i, qid, text in questions])
    a = dict(common, annotations=[
        dict(question_id=qid, image_id=i, question_type=answers[qid][1], answer_type=answers[qid][0],
             multiple_choice_answer=max(set(answers[qid][2]), key=answers[qid][2].count),
             answers=[dict(answer=text, answer_confidence="yes", answer_id=k + 1)
                      for k, text in enumerate(answers[qid][2])])
        for i, qid, _ in questions])
    return q, a


def write_vqa(root, questions=None, annotations=None, split="val"):
    """
    root/{split}2014/ with the 3 images, and root's two VQAv2 files (vqa_data's unless given):
    (questions_json, annotations_json).
    """
    default_q, default_a = vqa_data(split)
    folder = root / f"{split}2014"
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, color in ((42, "red"), (139, "blue"), (285, "green")):
        Image.new("RGB", (24, 16), color).save(folder / f"COCO_{split}2014_{image_id:012d}.jpg")
    paths = (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
             root / f"v2_mscoco_{split}2014_annotations.json")
    for path, data in zip(paths, (questions or default_q, annotations or default_a)):
        path.write_text(json.dumps(data))
    return str(paths[0]), str(paths[1])


# -----------------------------------------------------------------------------
# The accuracy of one question: min(#humans / 3, 1), averaged over the 10 leave-one-out sets


def test_accuracy_averages_the_ten_leave_one_out_scores():
    # k of the 10 humans said "cat", the others "dog". Leaving out one of the k "cat" humans leaves k - 1 of
    # them (k such sets); leaving out a "dog" human leaves all k (10 - k sets); each set scores min(n / 3, 1):
    expected = {
        0: 0.0,
        1: 0.3,  # (1 x min(0/3, 1) + 9 x min(1/3, 1)) / 10 = 3/10
        2: 0.6,  # (2 x 1/3 + 8 x 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        3: 0.9,  # (3 x 2/3 + 7 x 1) / 10 = (2 + 7) / 10: not 1.0, though 3 humans said it
        4: 1.0,  # (4 x 1 + 6 x 1) / 10: every set of 9 still holds 3 "cat"
        10: 1.0,
    }
    for k, accuracy in expected.items():
        answers = ["cat"] * k + ["dog"] * (10 - k)
        for rules in metrics.VQA_RULES:
            assert vqa_accuracy("cat", answers, rules) == pytest.approx(accuracy), (k, rules)
    assert vqa_accuracy("bird", ["cat"] * 5 + ["dog"] * 5) == 0.0  # nobody said it


@pytest.mark.parametrize("prediction, answers, accuracy", [
    ("Two", ["2"] * 3 + ["3"] * 7, 0.9),            # lower case, "two" -> "2": 3 humans agree -> 0.9
    ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),      # the article is dropped: 2 humans -> 0.6
    ("yes.", ["yes"] * 9 + ["no"], 1.0),            # the final period goes: 9 humans -> 1.0
    ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),      # the contractions table puts the apostrophe back
    ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9),     # a comma between digits: every mark is deleted
    ("1.5", ["1.5"] * 3 + ["2"] * 7, 0.9),          # a period before a digit stays...
    ("15", ["1.5"] * 3 + ["2"] * 7, 0.0),           # ...so "1.5" is not "15"
    ("The cat\n", ["cat"] * 4 + ["dog"] * 6, 1.0),  # line break and case and article: 4 humans -> 1.0
])
def test_accuracy_after_the_official_normalisation(prediction, answers, accuracy):
    # the humans disagree in every case here, so both rule sets normalise the prediction fully
    for rules in metrics.VQA_RULES:
        assert vqa_accuracy(prediction, answers, rules) == pytest.approx(accuracy), rules


@pytest.mark.parametrize("answer, normalised", [
    ("The Two dogs.", "2 dogs"),
    ("none", "0"),                     # "none" is a number word too
    ("red,blue", "red blue"),          # a mark that touches no space becomes one...
    ("red, blue", "red blue"),         # ...one that touches a space is deleted
    ("t-shirt", "t shirt"),
    ("t-shirt - red", "tshirt red"),   # one "- " anywhere: every "-" is deleted
    ("10,000 people?", "10000 people"),  # a comma between digits: every mark is deleted, "?" too
    ("5.", "5"),                       # only a digit after a period saves it...
    (".5", ".5"),                      # ...as here
    ("3:30", "3:30"),                  # the colon and the apostrophe are not punctuation here
    ("couldnt've", "couldn't've"),     # each spelling that misses one apostrophe...
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),        # ...but not both
    ("Im", "im"),                      # the official table's capital keys never match a lower-cased word
    ("somebody'd", "somebodyd"),       # the official table's one backwards entry
    ("  Yes\t", "yes"),
    ("." * 40, "." * 8),               # the official code deletes at most 32 periods
])
def test_normalize_answer(answer, normalised):
    assert normalize_answer(answer) == normalised


def test_which_answers_are_normalised_depends_on_the_rules():
    # All 10 humans agree: the 2021 rules normalise nothing, the 2016 rules still normalise the prediction.
    assert vqa_accuracy("yes", ["yes"] * 10, "2021") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, "2021") == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10, "2021") == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10, "2016") == 1.0
    # ...but 2021 always strips line breaks, tabs and spaces on both sides; 2016 leaves unanimous humans be
    assert vqa_accuracy("yes", [" yes\n"] * 10, "2021") == 1.0
    assert vqa_accuracy("yes", [" yes\n"] * 10, "2016") == 0.0
    # The humans disagree: 2021 normalises both sides fully; 2016 gives the humans only the punctuation rule,
    # so "two" (-> "2") matches no human who typed "two"
    answers = ["two"] * 3 + ["three"] * 7
    assert vqa_accuracy("two", answers, "2021") == pytest.approx(0.9)
    assert vqa_accuracy("two", answers, "2016") == 0.0
    assert vqa_accuracy("red", ["red."] * 3 + ["blue"] * 7, "2016") == pytest.approx(0.9)  # "red." -> "red"
    with pytest.raises(ValueError, match="unknown VQA rules '2015'"):
        vqa_accuracy("yes", ["yes"] * 10, "2015")


# -----------------------------------------------------------------------------
# Scoring a set of answers: per answer type and overall, with bootstrap intervals


def test_score_vqa_per_answer_type_and_overall():
    questions = [dict(question_id=4, answers=["2"] * 2 + ["3"] * 8, answer_type="number"),
                 dict(question_id=1, answers=["yes"] * 10, answer_type="yes/no"),
                 dict(question_id=2, answers=["yes"] * 7 + ["no"] * 3, answer_type="yes/no"),
                 dict(question_id=3, answers=["red"] * 3 + ["blue"] * 7, answer_type="other")]
    predictions = {1: "yes", 2: "no", 3: "red", 4: "two"}
    s = score_vqa(predictions, questions)
    # per question, by hand: 1 -> 1.0 (10 humans); 2 -> 0.9 ("no": 3 humans); 3 -> 0.9 (3 humans);
    # 4 -> 0.6 ("two" -> "2": 2 humans)
    assert s["question_ids"] == [1, 2, 3, 4]
    np.testing.assert_allclose(s["per_question"], [1.0, 0.9, 0.9, 0.6])
    assert s["accuracy"] == pytest.approx((1.0 + 0.9 + 0.9 + 0.6) / 4)  # 0.85
    assert s["per_answer_type"]["yes/no"]["accuracy"] == pytest.approx(0.95)  # (1.0 + 0.9) / 2
    assert s["per_answer_type"]["other"]["accuracy"] == pytest.approx(0.9)
    assert s["per_answer_type"]["number"]["accuracy"] == pytest.approx(0.6)
    counts = {t: v["questions"] for t, v in s["per_answer_type"].items()}
    assert counts == {"number": 1, "other": 1, "yes/no": 2}
    low, high = s["accuracy_ci"]
    assert 0.6 <= low <= s["accuracy"] <= high <= 1.0
    # one question: nothing to resample
    assert s["per_answer_type"]["other"]["ci"] == pytest.approx((0.9, 0.9))
    assert score_vqa(predictions, questions)["accuracy_ci"] == (low, high)  # deterministic


def test_score_vqa_ci_on_many_questions_contains_the_estimate():
    rng = np.random.default_rng(0)
    questions, predictions = [], {}
    for i in range(300):
        k = int(rng.integers(0, 11))  # k humans said "yes"
        questions.append(dict(question_id=i, answers=["yes"] * k + ["no"] * (10 - k),
                              answer_type=("yes/no", "number", "other")[i % 3]))
        predictions[i] = "yes"
    s = score_vqa(predictions, questions)
    for estimate, (low, high) in [(s["accuracy"], s["accuracy_ci"])] + \
            [(v["accuracy"], v["ci"]) for v in s["per_answer_type"].values()]:
        assert low < estimate < high and high - low < 0.25


def test_score_vqa_refuses_what_it_cannot_score():
    questions = [dict(question_id=1, answers=["yes"] * 10, answer_type="yes/no")]
    with pytest.raises(ValueError, match=r"1 predictions for unknown ids \[7\], 0 questions without"):
        score_vqa({1: "yes", 7: "no"}, questions)
    with pytest.raises(ValueError, match=r"1 questions without a prediction \[1\]"):
        score_vqa({}, questions)
    with pytest.raises(ValueError, match="question id 1 is given twice"):
        score_vqa({1: "yes"}, questions * 2)
    with pytest.raises(TypeError, match="the prediction for question 1 must be one str, got list"):
        score_vqa({1: ["yes"]}, questions)
    with pytest.raises(ValueError, match="unknown VQA rules"):
        score_vqa({1: "yes"}, questions, rules="2017")
    with pytest.raises(ValueError, match="nothing to score"):
        score_vqa({}, [])


# -----------------------------------------------------------------------------
# The reader: VQAv2 on COCO 2014's images, and questions on a COCO-format root


def test_load_vqa_reads_the_real_layout(tmp_path):
    questions_json, annotations_json = write_vqa(tmp_path)
    (tmp_path / "val2014" / "COCO_train2014_000000000007.jpg").write_bytes(b"")  # another split's name
    (tmp_path / "val2014" / "notes.txt").write_text("not an image")
    images = coco.coco2014_image_paths(str(tmp_path), "val")
    assert images == {i: str(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg") for i in (42, 139, 285)}
    records, skipped = coco.load_vqa(questions_json, annotations_json, images)
    assert skipped == []
    assert [r["question_id"] for r in records] == [420000, 420001, 1390000, 2850000]  # the file's order
    assert records[0] == dict(question_id=420000, image_id=42, path=images[42],
                              question="What color is the square?", answers=["red"] * 8 + ["dark red"] * 2,
                              answer_type="other", question_type="what color is the")
    assert records[3]["question"] == "What is on the table?"  # stripped
    assert records[3]["answers"] == ["book"] * 3 + ["a book"] * 2 + ["laptop"] * 5  # as the humans typed them
    assert [r["answer_type"] for r in records] == ["other", "yes/no", "number", "other"]
    assert Image.open(records[2]["path"]).size == (24, 16)


def test_load_vqa_then_score(tmp_path):
    records, _ = coco.load_vqa(*write_vqa(tmp_path), coco.coco2014_image_paths(str(tmp_path), "val"))
    predictions = {420000: "Red", 420001: "no", 1390000: "two", 2850000: "book"}
    s = score_vqa(predictions, records)
    # "Red" -> "red": 8 humans, 1.0; "no" against 10 "yes": 0.0; "two" -> "2": 6 humans, and the one who
    # typed "two" is normalised too, 7: 1.0; "book": 3 humans, and the 2 "a book" -> "book", 5: 1.0
    np.testing.assert_allclose(s["per_question"], [1.0, 0.0, 1.0, 1.0])
    assert s["per_answer_type"]["yes/no"]["accuracy"] == 0.0 and s["accuracy"] == pytest.approx(0.75)


def test_load_vqa_on_a_coco_format_root(tmp_path):
    # a future miniature: its images listed by a COCO-format caption file, questions about them by id
    root = tmp_path / "mini"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [dict(id=i, file_name=f"scene_{i}.png", width=16, height=16) for i in (42, 139, 285)]
    for im in images:
        Image.new("RGB", (16, 16), "white").save(root / "val2017" / im["file_name"])
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(dict(
        images=images, annotations=[dict(id=1, image_id=42, caption="a red square")])))
    image_paths = {r["image_id"]: r["path"] for r in coco.load_records(str(root), "val")}
    questions_json, annotations_json = write_vqa(tmp_path / "vqa")
    records, skipped = coco.load_vqa(questions_json, annotations_json, image_paths)
    assert skipped == [] and len(records) == 4
    assert records[0]["path"] == str(root / "val2017" / "scene_42.png")


def test_coco2014_image_paths_needs_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        coco.coco2014_image_paths(str(tmp_path), "val")
    assert str(e.value) == (f"{tmp_path / 'val2014'} not found: VQAv2's images are COCO 2014's; download "
                            f"http://images.cocodataset.org/zips/val2014.zip and unzip it under {tmp_path}")
