"""
The bad-input catalogue of tests/test_bad_inputs.py, continued for VQAv2's reader (data/coco.py's load_vqa):
what a user can hand it (files of another layout, a question without its image, its answers or its text,
files that disagree), and what it says: an error naming the file, the question id and the fix, or a counted
skip that names them for the caller to report. Never a silent drop.
The small VQAv2 split (4 questions on COCO 2014 images 42, 139, 285) is tests/test_vqa.py's.
"""
import json
import os
import shutil

import pytest

import evaluate
import train_caption
import tune_lm
from common import UsageError
from data import coco, feature_cache
from gpt2 import SubsetTokenizer, get_tokenizer, load_lm
from tests.test_questions import train_args, trained, world  # noqa: F401 (fixtures)
from tests.test_vqa import vqa_data, write_vqa


def load(root, questions=None, annotations=None):
    """load_vqa on root's split, written from vqa_data() or the contents given."""
    questions_json, annotations_json = write_vqa(root, questions, annotations)
    return coco.load_vqa(questions_json, annotations_json, coco.coco2014_image_paths(str(root), "val"))


def refusal(root, questions=None, annotations=None):
    """The message load() is refused with (a ValueError)."""
    with pytest.raises(ValueError) as e:
        load(root, questions, annotations)
    return str(e.value)


def files(root):
    return (str(root / "v2_OpenEnded_mscoco_val2014_questions.json"),
            str(root / "v2_mscoco_val2014_annotations.json"))

# -----------------------------------------------------------------------------
# 42. A file that is not in VQAv2's layout: a COCO caption file, the two files swapped, an entry missing a
#     key, answers that are not VQAv2's list of {"answer": ...}


def test_42_a_file_of_another_layout_says_which_file_and_what_to_pass(tmp_path):
    q, a = vqa_data()
    questions_json, annotations_json = files(tmp_path)
    with pytest.raises(ValueError) as e:  # COCO's caption file where the questions belong
        load(tmp_path, dict(images=[], annotations=[]), a)
    assert str(e.value) == (f"{questions_json} is not a VQAv2 questions file: it needs a 'questions' list "
                            f"of {{image_id, question, question_id}} (found ['annotations', 'images']) (are "
                            f"the two files swapped?); pass v2_OpenEnded_mscoco_{{split}}2014_questions.json "
                            f"from visualqa.org")
    with pytest.raises(ValueError) as e:
        load(tmp_path, q["questions"], a)  # the bare list, without the file's dict around it
    assert str(e.value).startswith(f"{questions_json} is not a VQAv2 questions file: ") and \
        "(found list)" in str(e.value)
    with pytest.raises(ValueError) as e:  # the two swapped
        coco.load_vqa(annotations_json, questions_json, coco.coco2014_image_paths(str(tmp_path), "val"))
    assert str(e.value).startswith(f"{annotations_json} is not a VQAv2 questions file") and \
        "(are the two files swapped?)" in str(e.value)


def test_42_an_entry_of_another_layout_is_named_by_its_question_id(tmp_path):
    q, a = vqa_data()
    _, annotations_json = files(tmp_path)
    del a["annotations"][2]["answers"]
    assert refusal(tmp_path, q, a) == (
        f"{annotations_json}: question 1390000 lacks answers: this is not VQAv2's "
        f"layout; pass v2_mscoco_{{split}}2014_annotations.json from visualqa.org, or "
        f"fix the entry")
    q, a = vqa_data()
    a["annotations"][1]["answers"] = ["yes"] * 10  # strings, not {"answer": ...}
    assert refusal(tmp_path, q, a).startswith(
        f"{annotations_json}: question 420001 has answers that are not a list of "
        f"{{\"answer\": str, ...}}")
    q, a = vqa_data()
    q["questions"][3]["question"] = None
    with pytest.raises(ValueError, match="question 2850000 has a question that is not a str"):
        load(tmp_path, q, a)
    q, a = vqa_data()
    del q["questions"][0]["question_id"]  # no id to name: its place in the list instead
    with pytest.raises(ValueError, match="questions.json: entry 0 of 'questions' lacks question_id"):
        load(tmp_path, q, a)

# -----------------------------------------------------------------------------
# 43. A question whose image is missing: not among the images given, or named there but not on disk


def test_43_a_question_whose_image_is_missing_names_the_question_and_the_image(tmp_path):
    questions_json, annotations_json = write_vqa(tmp_path)
    os.remove(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")  # both questions on image 42
    images = coco.coco2014_image_paths(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError) as e:
        coco.load_vqa(questions_json, annotations_json, images)
    assert str(e.value) == (f"{questions_json}: question 420000 is about image 42, and it is not among the 2 "
                            f"images given (and 1 more such questions): download the split's images (COCO "
                            f"2014's for VQAv2), or leave those questions out")
    # listed (by a caption file, say) but gone from the disk
    images[42] = str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    with pytest.raises(FileNotFoundError) as e:
        coco.load_vqa(questions_json, annotations_json, images)
    assert str(e.value).startswith(f"{questions_json}: question 420000 is about image 42, and its file "
                                   f"{images[42]} does not exist (and 1 more such questions): ")

# -----------------------------------------------------------------------------
# 44. An annotation without exactly 10 human answers: the leave-one-out accuracy would be another metric


@pytest.mark.parametrize("count", [9, 11, 0])
def test_44_an_annotation_without_ten_answers_is_refused(tmp_path, count):
    q, a = vqa_data()
    a["annotations"][2]["answers"] = [dict(answer="2", answer_confidence="yes", answer_id=k + 1)
                                      for k in range(count)]
    assert refusal(tmp_path, q, a) == (
        f"{files(tmp_path)[1]}: question 1390000 has {count} human answers instead of "
        f"10: VQA accuracy needs VQAv2's 10; restore the file, or remove the question "
        f"from both files")

# -----------------------------------------------------------------------------
# 45. An empty (or whitespace-only) question: nothing to ask; skipped, and counted with its id and file


def test_45_an_empty_question_is_skipped_and_reported(tmp_path):
    q, a = vqa_data()
    q["questions"][1]["question"] = ""
    q["questions"][3]["question"] = " \t\n"
    # a question that is skipped is skipped whatever else is wrong with it: here 9 answers, and no image
    a["annotations"][1]["answers"].pop()
    write_vqa(tmp_path, q, a)
    os.remove(tmp_path / "val2014" / "COCO_val2014_000000000285.jpg")
    records, skipped = coco.load_vqa(*files(tmp_path), coco.coco2014_image_paths(str(tmp_path), "val"))
    assert [r["question_id"] for r in records] == [420000, 1390000]
    questions_json = files(tmp_path)[0]
    assert skipped == [dict(question_id=420001, file=questions_json, reason="an empty question"),
                       dict(question_id=2850000, file=questions_json, reason="an empty question")]

# -----------------------------------------------------------------------------
# 46. A question with no annotation (an error: it cannot be scored), and an annotation with no question (a
#     questions file may be a subset of its split: skipped, and counted)


def test_46_a_question_without_answers_is_refused(tmp_path):
    q, a = vqa_data()
    del a["annotations"][3]
    questions_json, annotations_json = files(tmp_path)
    assert refusal(tmp_path, q, a) == (
        f"{questions_json}: question 2850000 has no answers in {annotations_json}: pass "
        f"the annotations of the same split (v2_mscoco_{{split}}2014_annotations.json "
        f"with v2_OpenEnded_mscoco_{{split}}2014_questions.json)")
    _, a = vqa_data()
    a["annotations"] = []  # another split's annotations: every question lacks its answers
    with pytest.raises(ValueError, match=r"question 420000 has no answers in .* \(and 3 more such questions"):
        load(tmp_path, q, a)


def test_46_an_annotation_without_its_question_is_skipped_and_reported(tmp_path):
    q, a = vqa_data()
    del q["questions"][0]
    records, skipped = load(tmp_path, q, a)
    assert [r["question_id"] for r in records] == [420001, 1390000, 2850000]
    questions_json, annotations_json = files(tmp_path)
    assert skipped == [dict(question_id=420000, file=annotations_json,
                            reason=f"an annotation whose question is not in {questions_json}")]

# -----------------------------------------------------------------------------
# 47. Repeated question ids, in either file: answers would be paired with either question, silently


def test_47_a_repeated_question_id_is_refused_in_either_file(tmp_path):
    q, a = vqa_data()
    q["questions"].append(dict(q["questions"][2], question="How many circles are there?"))
    questions_json, annotations_json = files(tmp_path)
    assert refusal(tmp_path, q, a) == (
        f"{questions_json}: question id 1390000 is listed more than once; every question "
        f"needs an id of its own: fix or remove the repeated entries")
    q, a = vqa_data()
    a["annotations"] += a["annotations"][:2]
    assert refusal(tmp_path, q, a) == (
        f"{annotations_json}: question id 420000 is listed more than once (and 1 more "
        f"repeated ids); every question needs an id of its own: fix or remove the "
        f"repeated entries")

# -----------------------------------------------------------------------------
# 48. A question and its annotation that disagree on the image: answers scored against the wrong picture


def test_48_question_and_annotation_on_different_images_are_refused(tmp_path):
    q, a = vqa_data()
    a["annotations"][2]["image_id"] = 285
    questions_json, annotations_json = files(tmp_path)
    assert refusal(tmp_path, q, a) == (
        f"{questions_json}: question 1390000 is about image 139, but {annotations_json} "
        f"answers it for image 285: the two files are not of one release; download both "
        f"again")


def test_the_files_written_here_are_read_without_complaint(tmp_path):
    # the baseline every case above changes one thing of
    records, skipped = load(tmp_path)
    assert len(records) == 4 and skipped == []
    assert json.load(open(files(tmp_path)[0]))["data_subtype"] == "val2014"

# -----------------------------------------------------------------------------
# 49-53. Training and evaluating on questions (the world, its LM and checkpoints: tests/test_questions.py's)


def test_49_a_question_task_without_questions_is_refused_at_once(world, tmp_path, capsys):  # noqa: F811
    for task in ("questions", "mix"):
        with pytest.raises(SystemExit) as e:
            train_caption.main(["--bridge", "linear", "--task", task])
        assert e.value.code == 2
        assert f"--task {task} needs --questions (a VQAv2-format questions file of the train split)" in \
            capsys.readouterr().err


def test_50_questions_about_images_the_features_lack_are_refused(world, tmp_path):  # noqa: F811
    flags = train_args(world, tmp_path, "questions")
    flags[flags.index("--features") + 1] = world["val"]  # the val split's cache, for train questions
    with pytest.raises(ValueError, match=r"of the \d+ questions of .*v2_OpenEnded_shapes_train_questions"
                                         r".json are about images the visual source does not have \(e.g. "
                                         r"question \d+, .*train2017.*\): build the feature cache from the"):
        train_caption.main(flags + ["--max-steps", "1", "--val-every", "0"])


def test_51_a_question_the_lm_never_read_is_named(world, capsys):  # noqa: F811
    captions_only = SubsetTokenizer(get_tokenizer().encode_ordinary("a red circle"))
    cache = feature_cache.FeatureCache(world["train"])
    asked = [dict(question_id=7, image_id=int(cache.image_ids[0]), question="what color is it?",
                  answers=["red"])]
    # training: left out, counted and named; nothing left: an error
    with pytest.raises(ValueError, match="no question could be read from q.json"):
        train_caption.question_pairs(asked, cache, captions_only, 40, "q.json")
    assert "1 of 1 questions of q.json left out, e.g. question 7 (" in capsys.readouterr().out
    # evaluation: an error naming the question and the fix
    with pytest.raises(ValueError, match=r"question 7 \('what color is it\?'\) cannot be put to this LM: "
                                         r".* corpus_qa.jsonl \(data/shapes.py --questions\)"):
        evaluate.question_tokens(captions_only, asked[0])


def test_52_question_flags_that_do_not_fit_are_refused(capsys):
    for flags, message in [(["--checkpoints", "c.pt", "--question", "why?"], "--question is folder mode's"),
                           (["--checkpoints", "c.pt", "--questions", "q.json", "--karpathy-json", "k.json"],
                            "--questions with --karpathy-json")]:
        with pytest.raises(SystemExit):
            evaluate.parse_args(flags)
        assert message in capsys.readouterr().err


def test_53_questions_about_trained_on_images_are_refused(world, trained, tmp_path):  # noqa: F811
    # VQAv2's val images are COCO 2014 val's, most of them in train2017: the leak refusal covers questions.
    # Here: questions about the world's train images, laid out as VQAv2 val on COCO 2014 file names.
    root = tmp_path / "coco"
    shutil.copytree(world["root"], root, symlinks=True)
    os.makedirs(root / "val2014")
    for r in coco.load_records(world["root"], "train"):
        os.symlink(r["path"], root / "val2014" / f"COCO_val2014_{r['image_id']:012d}.jpg")
    for kind, name in [("questions", "v2_OpenEnded_mscoco_val2014_questions.json"),
                       ("annotations", "v2_mscoco_val2014_annotations.json")]:
        opened = "_OpenEnded" if kind == "questions" else ""
        shutil.copy(root / "annotations" / f"v2{opened}_shapes_train_{kind}.json", root / name)
    with pytest.raises(ValueError, match=r"was trained on 40 of the 40 images of the questions of "
                                         r".*v2_OpenEnded_mscoco_val2014_questions.json .*VQAv2's val"):
        evaluate.main(["--checkpoints", trained[0], "--coco-root", str(root), "--out", str(tmp_path / "o"),
                       "--questions", str(root / "v2_OpenEnded_mscoco_val2014_questions.json"),
                       "--device", "cpu", "--metrics", "bleu"])

# -----------------------------------------------------------------------------
# 58. Answer tuning (tune_lm.py) on questions that do not go with the train split's captions


def test_58_answer_tuning_on_another_splits_questions_is_refused(world, tmp_path, capsys):  # noqa: F811
    val_questions = os.path.join(world["root"], "annotations", "v2_OpenEnded_shapes_val_questions.json")
    with pytest.raises(FileNotFoundError, match=r"v2_OpenEnded_shapes_val_questions.json: question \d+ is "
                                                r"about image \d+, and it is not among the \d+ images given"):
        tune_lm.main(["--lm", world["lm"], "--coco-root", world["root"], "--questions", val_questions,
                      "--out-dir", str(tmp_path / "tuned"), "--max-steps", "1", "--device", "cpu"])
    # an image the split lists with no caption to describe it: refused, naming the question
    lm, tokenizer = load_lm(world["lm"])
    records = coco.load_records(world["root"], "train")
    asked = dict(question_id=7, image_id=records[0]["image_id"], answers=["red"] * 10,
                 question="what color is the shape on the left?")
    with pytest.raises(UsageError, match=r"1 of 1 questions are about images with no caption in "
                                         r"--coco-root's train split \(e.g. question 7, image \d+\): pass "
                                         r"the questions"):
        tune_lm.examples([asked], [{**records[0], "captions": []}], tokenizer)

# -----------------------------------------------------------------------------
# 59. --question-repeats (how often the questions are read against the captions) without a mix of both


def test_59_question_repeats_without_a_mix_are_refused(capsys):
    for task in ("captions", "questions"):
        with pytest.raises(SystemExit) as e:
            train_caption.main(["--bridge", "linear", "--task", task, "--questions", "q.json",
                                "--question-repeats", "2"])
        assert e.value.code == 2
        assert ("--question-repeats weighs the questions against the captions: it needs --task mix, "
                f"not {task}") in capsys.readouterr().err
