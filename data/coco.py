"""
COCO 2017 captions: download them, and read any COCO-format root as records. VQAv2's questions and answers.

    python data/coco.py --root data/coco          # download and unzip train, val and the annotations

A COCO-format root holds annotations/captions_{split}2017.json and the images in {split}2017/ (data/shapes.py
writes the offline miniature in this format). With --karpathy-json dataset_coco.json the split is Karpathy's
(train 113k incl. restval / val 5k / test 5k), the one published CIDEr numbers use; its images are found in
train2017/ or val2017/ by their COCO id. The frozen encoder's features of a split: data/feature_cache.py.

VQAv2 (visualqa.org/download.html) is two JSON files per split: the questions, and their 10 human answers each
(v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json). Its images are COCO
2014's, {split}2014/COCO_{split}2014_{image_id:012d}.jpg: the same photos as 2017's, under other names and
splits. load_vqa takes the images as a {image_id: path} mapping, so one reader serves VQAv2 on COCO 2014
(coco2014_image_paths) and questions about the images of any COCO-format root (its load_records).
"""
import argparse
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

# runnable as `python data/coco.py` from the repo root as well as `import data.coco`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import read_json  # noqa: E402

# -----------------------------------------------------------------------------
# Download (with resume), or use a COCO folder that is already there

COCO_URLS = {
    "train": "http://images.cocodataset.org/zips/train2017.zip",          # 118k images, 18 GB
    "val": "http://images.cocodataset.org/zips/val2017.zip",              # 5k images, 0.8 GB
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",  # 241 MB
}


def download(url, dest, chunk_size=1 << 20):
    """
    Fetch url to dest with a progress bar. An interrupted download leaves dest + ".part"; the next call asks
    the server only for the missing bytes (an HTTP Range request) and appends them. dest exists only when
    complete.
    """
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part file is already the whole file
            os.replace(part, dest)
            return dest
        raise RuntimeError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). Offline? Fetch it on a machine with internet, unzip it under "
            f"the COCO root (annotations/captions_{{train,val}}2017.json, train2017/, val2017/) and pass "
            f"that root; or run the offline miniature: python data/shapes.py --out data/shapes") from e
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                           unit_scale=True, unit_divisor=1024,
                                                           desc=os.path.basename(dest)) as bar:
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)
    return dest


def has_split(root, split):
    return (os.path.isfile(os.path.join(root, "annotations", f"captions_{split}2017.json"))
            and os.path.isdir(os.path.join(root, f"{split}2017")))


def ensure_coco(root, splits=("train", "val")):
    """COCO 2017 under root: used as it is when present, otherwise downloaded and unzipped there."""
    os.makedirs(root, exist_ok=True)
    wanted = ["annotations"] * (not all(
        os.path.isfile(os.path.join(root, "annotations", f"captions_{s}2017.json")) for s in splits))
    wanted += [s for s in splits if not os.path.isdir(os.path.join(root, f"{s}2017"))]
    for name in wanted:
        url = COCO_URLS[name]
        zip_path = download(url, os.path.join(root, os.path.basename(url)))
        print(f"unzipping {zip_path}", file=sys.stderr)
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(root)
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{zip_path} is not a valid zip ({e}); delete it and download again") from e
        os.remove(zip_path)  # 19 GB we no longer need
    return root

# -----------------------------------------------------------------------------
# Records: (image, its reference captions)


def load_records(root, split, karpathy_json=None):
    """
    [{"image_id": int, "path": str, "captions": [str, ...]}, ...] for one split, in the annotation file's
    order.
    Without karpathy_json: COCO's own split (annotations/captions_{split}2017.json, images in {split}2017/).
    With it: Karpathy's split; "train" includes his "restval" images, as every paper using it does.
    """
    if karpathy_json is not None:
        return load_karpathy_records(root, split, karpathy_json)
    path = os.path.join(root, "annotations", f"captions_{split}2017.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a COCO-format root (run `python data/coco.py "
                                f"--root {root}`, or `python data/shapes.py --out {root}` for the miniature)")
    coco = read_json(path, "COCO caption file")
    if not isinstance(coco, dict) or not {"images", "annotations"} <= set(coco):
        raise ValueError(f"{path} is not a COCO caption file: it needs 'images' and 'annotations' lists "
                         f"(found {sorted(coco) if isinstance(coco, dict) else type(coco).__name__})")
    captions = {}
    for a in coco["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    images_dir = os.path.join(root, f"{split}2017")
    records = [dict(image_id=im["id"], path=inside(images_dir, im["file_name"], path, im["id"]),
                    captions=captions.get(im["id"], [])) for im in coco["images"]]
    return unique_ids(records, path)


def inside(folder, name, source, image_id):
    """
    folder/name, refused if name leads out of folder (an absolute path, or ../): a caption file names its
    images.
    """
    path = os.path.normpath(os.path.join(folder, name))
    if os.path.isabs(name) or os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) != \
            os.path.abspath(folder):
        raise ValueError(f"{source}: image {image_id}'s file name {name!r} points outside {folder}; "
                         f"a COCO file names images inside its split's folder: fix the entry")
    return path


def unique_ids(records, source, key="image_id"):
    """
    Refuse a split that lists one image id twice: its captions would be paired with either file, silently.
    key="question_id" does the same for VQAv2's questions and answers.
    """
    seen, repeated = set(), []
    for r in records:
        if r[key] in seen:
            repeated.append(r[key])
        seen.add(r[key])
    what = key.removesuffix("_id")  # "image", "question"
    if repeated:
        raise ValueError(f"{source}: {what} id {repeated[0]} is listed more than once"
                         f"{and_more(repeated, 'repeated ids')}; "
                         f"every {what} needs an id of its own: fix or remove the repeated entries")
    return records


def load_karpathy_records(root, split, karpathy_json):
    """Karpathy's dataset_coco.json: images[] with filepath, filename, cocoid, split, sentences[].raw."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"Karpathy split {split!r}: use train, val or test")
    keep = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}[split]
    data = read_json(karpathy_json, "Karpathy split file")
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{karpathy_json} is not Karpathy's dataset_coco.json: it has no 'images' list")
    images = data["images"]
    records, missing = [], []
    for im in images:
        if im["split"] not in keep:
            continue
        # his paths are COCO 2014's (val2014/COCO_val2014_000000391895.jpg); 2017 holds the same images by id
        candidates = [os.path.join(root, im.get("filepath", ""), im["filename"])]
        candidates += [os.path.join(root, f"{s}2017", f"{im['cocoid']:012d}.jpg") for s in ("train", "val")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            missing.append(im["cocoid"])
            continue
        records.append(dict(image_id=im["cocoid"],
                            path=inside(root, os.path.relpath(path, root), karpathy_json, im["cocoid"]),
                            captions=[s["raw"].strip() for s in im["sentences"]]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of Karpathy's {split} split are not under {root} "
                                f"(e.g. COCO id {missing[0]}): expected train2017/ and val2017/ there")
    return unique_ids(records, karpathy_json)

# -----------------------------------------------------------------------------
# VQAv2: (image, question, its 10 human answers)

VQA_FILES = {"questions": "v2_OpenEnded_mscoco_{split}2014_questions.json",
             "annotations": "v2_mscoco_{split}2014_annotations.json"}
# How a question is put to the LM, the answer following it: BLIP-2's prompt for its frozen OPT models. The
# trainer, the evaluation and the miniature's question-answer corpus all write it through qa_prompt().
QA_PROMPT = "Question: {} Answer:"


def qa_prompt(question):
    """The text before the answer: 'Question: what color is the shape on the left? Answer:'."""
    return QA_PROMPT.format(" ".join(question.split()))


def context_of(caption):
    """A caption as text an answer is looked up in (tune_lm.py, miniature/qa_probe.py): its sentence ended, on
    a line of its own."""
    return caption.strip().rstrip(".") + ".\n"


def answers_file(questions_json):
    """
    The annotations file that goes with a questions file, by VQAv2's naming
    (v2_OpenEnded_mscoco_val2014_questions.json -> v2_mscoco_val2014_annotations.json; the miniature's
    v2_OpenEnded_shapes_val_questions.json -> v2_shapes_val_annotations.json), or None for another name.
    """
    folder, name = os.path.split(questions_json)
    m = re.fullmatch(r"v2_OpenEnded_(.+)_questions\.json", name)
    return os.path.join(folder, f"v2_{m.group(1)}_annotations.json") if m else None


def most_common_answer(answers):
    """The answer most of the humans gave (the first of them on a tie): what a model is trained to say."""
    return max(answers, key=answers.count)


def load_vqa(questions_json, annotations_json, image_paths):
    """
    (records, skipped) for one VQAv2 split, the records in the questions file's order:
      records  [{"question_id", "image_id", "path", "question", "answers": [10 str], "answer_type",
               "question_type"}, ...]; answer_type is "yes/no", "number" or "other", question_type the
               question's first words ("what color is the"; None where the file has none); the answers are as
               the humans typed them (the
               VQA accuracy in metrics.py normalises them by the official rules)
      skipped  [{"question_id", "file", "reason"}, ...]: entries left out, for the caller to report: an
               annotation whose question is not in the questions file (a questions file may be a subset of
               its split), a question whose text is empty
    image_paths: {image_id: path} of the images questions may be about: coco2014_image_paths(root, split) for
    VQAv2, {r["image_id"]: r["path"] for r in load_records(root, split)} for a COCO-format root.
    Anything else wrong is an error that names the file, the question id and the fix.
    """
    questions = vqa_entries(questions_json, "questions", ("image_id", "question", "question_id"))
    annotations = vqa_entries(annotations_json, "annotations",
                              ("question_id", "image_id", "answer_type", "answers"))
    unique_ids(questions, questions_json, key="question_id")
    unique_ids(annotations, annotations_json, key="question_id")
    answers = {a["question_id"]: a for a in annotations}
    asked = {q["question_id"] for q in questions}
    # set aside first, so that the checks below are about questions that will be asked
    skipped = [dict(question_id=q["question_id"], file=questions_json, reason="an empty question")
               for q in questions if not q["question"].strip()]
    questions = [q for q in questions if q["question"].strip()]
    skipped += [dict(question_id=a["question_id"], file=annotations_json,
                     reason=f"an annotation whose question is not in {questions_json}")
                for a in annotations if a["question_id"] not in asked]

    unanswered = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if unanswered:
        raise ValueError(f"{questions_json}: question {unanswered[0]} has no answers in {annotations_json}"
                         f"{and_more(unanswered, 'such questions')}: pass the annotations of the same split "
                         f"({VQA_FILES['annotations']} with {VQA_FILES['questions']})")
    # two files that disagree on a question's image: its answers would be scored against the wrong picture
    moved = [q for q in questions if q["image_id"] != answers[q["question_id"]]["image_id"]]
    if moved:
        q = moved[0]
        raise ValueError(f"{questions_json}: question {q['question_id']} is about image {q['image_id']}, but "
                         f"{annotations_json} answers it for image {answers[q['question_id']]['image_id']}"
                         f"{and_more(moved, 'such questions')}: the two files are not of one release; "
                         f"download both again")
    # the official accuracy leaves each of the 10 humans out in turn: with another count it is another metric
    miscounted = [q["question_id"] for q in questions if len(answers[q["question_id"]]["answers"]) != 10]
    if miscounted:
        raise ValueError(f"{annotations_json}: question {miscounted[0]} has "
                         f"{len(answers[miscounted[0]]['answers'])} human answers instead of 10"
                         f"{and_more(miscounted, 'such questions')}: VQA accuracy needs VQAv2's 10; restore "
                         f"the file, or remove the question from both files")
    asked_about = {q["image_id"] for q in questions}
    on_disk = {i: i in image_paths and os.path.isfile(image_paths[i]) for i in asked_about}  # one stat each
    missing = [q for q in questions if not on_disk[q["image_id"]]]
    if missing:
        q = missing[0]
        why = (f"its file {image_paths[q['image_id']]} does not exist" if q["image_id"] in image_paths else
               f"it is not among the {len(image_paths)} images given")
        raise FileNotFoundError(f"{questions_json}: question {q['question_id']} is about image "
                                f"{q['image_id']}, and {why}{and_more(missing, 'such questions')}: download "
                                f"the split's images (COCO 2014's for VQAv2), or leave those questions out")

    records = []
    for q in questions:
        a = answers[q["question_id"]]
        records.append(dict(question_id=q["question_id"], image_id=q["image_id"],
                            path=image_paths[q["image_id"]], question=q["question"].strip(),
                            answers=[x["answer"] for x in a["answers"]], answer_type=a["answer_type"],
                            question_type=a.get("question_type")))
    return records, skipped


def question_records(questions_json, answers_json, root, split):
    """
    load_vqa for a split's questions about the images under `root`: COCO 2014's ({split}2014/, VQAv2's images)
    where that folder is there, else a COCO-format root's {split}2017 images (the miniature's). answers_json
    None: the annotations file named after questions_json (answers_file). Skipped entries are said, not
    silent.
    """
    answers_json = answers_json or answers_file(questions_json)
    if answers_json is None:
        raise ValueError(f"{questions_json}: not named as VQAv2's questions files are "
                         f"({VQA_FILES['questions']}), so its answers file cannot be found: pass it too")
    if os.path.isdir(os.path.join(root, f"{split}2014")):
        paths = coco2014_image_paths(root, split)
    else:
        paths = {r["image_id"]: r["path"] for r in load_records(root, split)}
    records, skipped = load_vqa(questions_json, answers_json, paths)
    if skipped:
        print(f"note: {len(skipped)} entries of {questions_json} and {answers_json} left out, e.g. question "
              f"{skipped[0]['question_id']} ({skipped[0]['reason']})", file=sys.stderr)
    return records


def coco2014_image_paths(root, split):
    """
    {image_id: path} of a split's COCO 2014 images that are on disk (VQAv2's images):
    {root}/{split}2014/COCO_{split}2014_{image_id:012d}.jpg.
    """
    folder = os.path.join(root, f"{split}2014")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} not found: VQAv2's images are COCO 2014's; download "
                                f"http://images.cocodataset.org/zips/{split}2014.zip and unzip it under "
                                f"{root}")
    name = re.compile(rf"COCO_{split}2014_(\d{{12}})\.jpg")
    return {int(m.group(1)): os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if (m := name.fullmatch(f))}


def vqa_entries(path, kind, keys):
    """
    The list of a VQAv2 file (kind: "questions" or "annotations"), refused unless each entry has the keys
    the reader needs, with a str question or a list of {"answer": str, ...} answers.
    """
    what = f"VQAv2 {kind} file"
    data = read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get(kind), list):
        other = "annotations" if kind == "questions" else "questions"
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        swapped = " (are the two files swapped?)" if isinstance(data, dict) and other in data else ""
        raise ValueError(f"{path} is not a {what}: it needs a '{kind}' list of {{{', '.join(keys)}}} "
                         f"(found {found}){swapped}; pass {VQA_FILES[kind]} from visualqa.org")
    for i, entry in enumerate(data[kind]):
        lacks = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if lacks:
            problem = f"lacks {', '.join(lacks)}"
        elif kind == "questions" and not isinstance(entry["question"], str):
            problem = "has a question that is not a str"
        elif kind == "annotations" and not (isinstance(entry["answers"], list) and all(
                isinstance(x, dict) and isinstance(x.get("answer"), str) for x in entry["answers"])):
            problem = 'has answers that are not a list of {"answer": str, ...}'
        else:
            continue
        name = f"question {entry['question_id']}" if isinstance(entry, dict) and "question_id" in entry else \
            f"entry {i} of '{kind}'"
        raise ValueError(f"{path}: {name} {problem}: this is not VQAv2's layout; pass {VQA_FILES[kind]} "
                         f"from visualqa.org, or fix the entry")
    return data[kind]


def and_more(offenders, what):
    """' (and 3 more such questions)' after the first offender an error names; '' when it is the only one."""
    return f" (and {len(offenders) - 1} more {what})" if len(offenders) > 1 else ""

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="COCO 2017 captions: download and unzip (resumes interrupted downloads). "
                    "Feature caches: data/feature_cache.py.")
    parser.add_argument("--root", default="data/coco")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = parser.parse_args()
    ensure_coco(args.root, args.splits)
    print(f"COCO 2017 ready under {args.root}", file=sys.stderr)
