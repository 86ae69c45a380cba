"""
The official COCO caption metrics, through pycocoevalcap 1.2 (the code of the COCO evaluation server, used by
BLIP-2/LAVIS and most captioning papers), so the numbers are comparable with published ones:

    BLEU-1..4   n-gram precision with clipping and a brevity penalty, at corpus level
    METEOR 1.5  unigram matching with stems, synonyms and paraphrases (a Java jar)
    ROUGE-L     longest common subsequence F-measure, averaged over images
    CIDEr       pycocoevalcap's `Cider` is CIDEr-D: tf-idf n-grams 1..4, clipped, with a length penalty, x10

SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 (a zip of several hundred MB) on
first use and asks for an 8 GB Java heap, and this project must run offline.

Before scoring, every caption is sanitized (control characters and line breaks become spaces) and then
lower-cased, split and stripped of punctuation by the Stanford PTB tokenizer that ships with pycocoevalcap,
for predictions and references alike: "A Dog." and "a dog" score the same.

Java (any JRE >= 8) must be on PATH: METEOR and the PTB tokenizer are jars
(`apt-get install default-jre-headless`).
The METEOR jar is a JVM that takes ~15 s to start and holds 1.1-1.5 GB of memory; one per process, reused.

Two things to keep in mind when reading the scores:
- CIDEr's idf comes from the references of the images being evaluated, so a CIDEr score is only comparable
  with one computed on the same image set (and on a single image every n-gram has idf 0: CIDEr is 0).
- The confidence intervals are percentile bootstraps over images, with the idf held fixed for CIDEr: they say
  how much the score would move with another sample of images, not with another training run.

    >>> s = score_captions({1: "a dog runs on grass"}, {1: ["A dog running on the grass.", "a brown dog"]})
    >>> s["BLEU-1"], s["METEOR"], s["per_image"]["METEOR"]  # doctest: +SKIP

score_captions comes first; the machinery behind it follows: cleaning and tokenizing captions, then the one
METEOR process per Python process.

VQA accuracy (the last section) is VQAv2's official metric, written here from the rules of the official code
(GT-Vision-Lab/VQA, vqaEval.py), quirks included, so the numbers are comparable with published ones: after the
official answer normalisation, a predicted answer scores min(#humans who gave it / 3, 1), averaged over the 10
ways of leaving one of the 10 human answers out (3 of 10 humans -> 0.9, not 1.0). score_vqa reports it per
answer type ("yes/no", "number", "other") and overall, with bootstrap intervals over questions. No Java.

    >>> s = score_vqa({7: "Two"}, [dict(question_id=7, answers=["2"] * 3 + ["3"] * 7, answer_type="number")])
    >>> s["accuracy"], s["per_answer_type"]["number"]["accuracy"]  # doctest: +SKIP
    (0.9, 0.9)                                                      # "Two" -> "2", which 3 of 10 humans said
"""
import atexit
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unicodedata

import numpy as np

try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer import ptbtokenizer
except ImportError as e:  # training and decoding need no scorers (a GPU machine's own Python may lack them)
    _NO_SCORERS = e
else:
    _NO_SCORERS = None

METRICS = ("bleu", "meteor", "rouge", "cider")

# -----------------------------------------------------------------------------
# Scoring a set of captions


def score_captions(predictions, references, metrics=METRICS):
    """Score predicted captions against references with the COCO metrics.

    predictions: {image_id: caption}; references: {image_id: [caption, ...]}; the same ids on both sides.
    metrics: any of "bleu", "meteor", "rouge", "cider".

    Returns a dict with
      corpus scores      "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (for the metrics asked)
      "image_ids"        the sorted ids, the order of every per-image array
      "per_image"        {metric name: np.array (num_images,)}
      "METEOR_mean", "METEOR_std"   mean and std of per-image METEOR ("0.412 ± 0.146"); METEOR itself is the
                         jar's corpus score, which pools the matching statistics and differs slightly
      "METEOR_ci", "CIDEr_ci"       95% bootstrap intervals over images, (low, high)
      "seconds"          {"tokenize" | metric: wall time}
    """
    unknown_metrics = [m for m in metrics if m not in METRICS]
    if unknown_metrics:
        hint = " (SPICE is not computed: it needs a CoreNLP download)" if "spice" in unknown_metrics else ""
        raise ValueError(f"unknown metrics {unknown_metrics}, choose from {METRICS}{hint}")
    image_ids = _align(predictions, references)
    for i in image_ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"prediction for image {i!r} must be one str, "
                            f"got {type(predictions[i]).__name__}")

    # One tokenizer run for both sides (keys tagged "ref"/"res") saves a JVM start; sanitize() happens inside.
    t0 = time.perf_counter()
    tokenized = ptb_tokenize({**{("ref", i): list(references[i]) for i in image_ids},
                              **{("res", i): [predictions[i]] for i in image_ids}})
    # pycocoevalcap's scorers take {id: [str, ...]} dicts and iterate over their keys in insertion order,
    # so inserting in sorted id order makes every per-image list follow image_ids.
    gts = {i: tokenized[("ref", i)] for i in image_ids}
    res = {i: tokenized[("res", i)] for i in image_ids}
    # An empty prediction is fine (it scores 0). An empty reference is a data bug, and pycocoevalcap's ROUGE-L
    # would even give an empty prediction a perfect 1.0 against it ("".split(" ") == [""] on both sides).
    empty_refs = [i for i in image_ids if "" in gts[i]]
    if empty_refs:
        raise ValueError(f"reference captions empty after tokenization (only punctuation or spaces?) "
                         f"for image ids {empty_refs[:10]}{' ...' if len(empty_refs) > 10 else ''}")
    out = {"image_ids": image_ids, "per_image": {}, "seconds": {"tokenize": time.perf_counter() - t0}}

    meteor = get_meteor() if "meteor" in metrics else None  # the JVM's start-up is not part of the timings
    for metric in metrics:
        t0 = time.perf_counter()
        if metric == "bleu":
            # corpus BLEU with the "closest" reference length for the brevity penalty, as the COCO server
            corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                out[f"BLEU-{n + 1}"] = float(corpus[n])
                out["per_image"][f"BLEU-{n + 1}"] = np.array(per_image[n])
        elif metric == "meteor":
            corpus, per_image = _meteor_compute(meteor, gts, res)
            per_image = np.array(per_image)
            out["METEOR"] = float(corpus)
            out["per_image"]["METEOR"] = per_image
            out["METEOR_mean"], out["METEOR_std"] = float(per_image.mean()), float(per_image.std())
            out["METEOR_ci"] = bootstrap_ci(per_image)
        elif metric == "rouge":
            corpus, per_image = Rouge().compute_score(gts, res)
            out["ROUGE-L"] = float(corpus)
            out["per_image"]["ROUGE-L"] = np.array(per_image)
        elif metric == "cider":
            # idf from these references; bootstrapping per-image scores keeps it fixed
            # (see the docstring above)
            corpus, per_image = Cider().compute_score(gts, res)
            out["CIDEr"] = float(corpus)
            out["per_image"]["CIDEr"] = np.array(per_image)
            out["CIDEr_ci"] = bootstrap_ci(per_image)
        out["seconds"][metric] = time.perf_counter() - t0
    return out


def bootstrap_ci(values, n=1000, seed=0, alpha=0.05):
    """Percentile bootstrap confidence interval (1 - alpha) for the mean of `values`, resampling them with
    replacement n times. Deterministic for a given seed. Returns (low, high)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array of values, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    # bounded memory: 5,000 images x 1,000 resamples is 40 MB at once
    chunk = max(1, 2_000_000 // len(values))
    for start in range(0, n, chunk):
        idx = rng.integers(0, len(values), size=(min(chunk, n - start), len(values)))  # (resamples, images)
        means[start:start + len(idx)] = values[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _align(predictions, references):
    """
    Image ids, sorted: the order of every per-image array. Any mismatch is an error, never a silent drop.
    """
    image_ids = _same_ids(predictions, references, "image")
    empty = [i for i in image_ids if isinstance(references[i], str) or len(references[i]) == 0]
    if empty:
        raise ValueError(f"every image needs a non-empty list of reference captions; "
                         f"not so for ids {empty[:10]}")
    return image_ids


def _same_ids(predictions, items, what):
    """
    The ids of items ({id: ...}), sorted; predictions must have exactly these ids. what: "image", "question".
    """
    unknown = sorted(set(predictions) - set(items), key=repr)
    missing = sorted(set(items) - set(predictions), key=repr)
    if unknown or missing:
        raise ValueError(
            f"predictions and {what}s must have the same ids: {len(unknown)} predictions "
            f"for unknown ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''}, "
            f"{len(missing)} {what}s without a prediction {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    if not items:
        raise ValueError(f"nothing to score: no {what}s")
    try:
        return sorted(items)
    except TypeError as e:
        raise ValueError(f"{what} ids must be mutually comparable (all int or all str)") from e


# -----------------------------------------------------------------------------
# Cleaning and tokenizing captions

# Unicode categories turned into spaces: Cc control characters (\n, \r, \t, \x85 ...), Cf format characters
# (zero-width space, BOM, ...), Cs lone surrogates (they cannot even be encoded to UTF-8), Zl/Zp the line and
# paragraph separators \u2028 and \u2029.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def sanitize(caption):
    """One line of plain text: control characters and line breaks become spaces, runs of spaces become one.

    Why this matters: both jars speak a line protocol. The PTB tokenizer splits on \\n, \\r, \\x85,
    \\u2028 ..., which silently shifts every later caption onto the wrong image; a newline sent to METEOR
    desynchronises its replies, pycocoevalcap's wrapper then fails while holding its lock, and the process
    hangs at exit.
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a str, got {type(caption).__name__}: {caption!r}")
    cleaned = "".join(" " if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in caption)
    # str.split() also takes care of every Unicode space (\u00a0, \u3000, ...)
    return " ".join(cleaned.split())


def check_java():
    """METEOR and the PTB tokenizer are Java programs from pycocoevalcap: fail early, with the fix, when
    there is no `java` or no pycocoevalcap."""
    if _NO_SCORERS is not None:
        raise RuntimeError(f"the COCO metrics need pycocoevalcap ({_NO_SCORERS}): "
                           "`pip install pycocoevalcap==1.2` (training and decoding run without it)")
    if shutil.which("java") is None:
        raise RuntimeError(
            "`java` was not found on PATH; "
            "METEOR and the PTB tokenizer (pycocoevalcap) need a Java runtime >= 8. "
            "Install one, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu), "
            "`brew install openjdk` (macOS) or `conda install -c conda-forge openjdk`."
        )


def ptb_tokenize(captions):
    """{key: [caption, ...]} -> {key: [tokenized caption, ...]}: sanitized, lower-cased, PTB-split,
    punctuation removed, exactly as the COCO evaluation server does.
    One JVM start (~0.3 s) per call, whatever the size."""
    check_java()
    cleaned = [sanitize(c) for caps in captions.values() for c in caps]
    lines = run_ptb_tokenizer(cleaned + ["end of captions"])  # a known last line, for the check below
    # The tokenizer answers line for line, so the captions are paired with their output by position: one line
    # too many or too few would move captions onto other images without any error. sanitize() prevents it; the
    # count and the known last line make sure.
    if lines[len(cleaned):] != ["end of captions"]:
        raise RuntimeError("the PTB tokenizer's output lines are no longer aligned with the captions "
                           "(a line break that sanitize() missed?)")
    lines = iter(lines)
    # each caption's words without punctuation, as pycocoevalcap's PTBTokenizer leaves them
    return {key: [" ".join(w for w in next(lines).rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
                  for _ in caps] for key, caps in captions.items()}


def run_ptb_tokenizer(lines):
    """
    Stanford's PTBTokenizer (the jar pycocoevalcap ships) over lines of text, one output line per input line:
    pycocoevalcap's command, run here instead of through its PTBTokenizer.tokenize, which ignores the JVM's
    exit status and error output (a JVM that could not get its memory looked like misaligned captions) and
    writes its temporary file into its own package folder (read-only in a system-wide install).
    """
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines))
    try:
        proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", f.name], capture_output=True)
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer's Java process failed (exit status {proc.returncode}); "
                           f"Java said:\n{_java_said(proc.stdout, proc.stderr)}")
    return proc.stdout.decode("utf-8").rstrip("\n").split("\n")


def _java_said(*outputs):
    """The end of what a JVM printed, as text: the first thing to read when it failed. A JVM that cannot
    start (too little memory for its heap, a broken install) says why on its standard output, not its error
    output."""
    said = "\n".join(out.decode(errors="replace").strip() for out in outputs if out.strip())
    return said[-2000:] or "(nothing)"


# -----------------------------------------------------------------------------
# One METEOR process per Python process

# A module-level singleton, on purpose: every Meteor() starts a JVM (seconds, and over a GB), and a training
# run that evaluates every epoch would otherwise pay that each time (or pile up JVMs until the machine swaps).
_meteor = None
METEOR_TIMEOUT_S = 120.0  # a watchdog kills the jar if one call takes longer than this plus...
METEOR_TIMEOUT_PER_IMAGE_S = 0.05  # ...this per image (far above what bench/bench_metrics.py measures)


def _stop(meteor):
    """End one Meteor instance's JVM and leave the object safe to garbage-collect."""
    proc = meteor.meteor_p
    try:
        proc.stdin.close()  # end of input: the jar exits by itself...
    except BrokenPipeError:
        pass  # ...or is already dead, and bytes left in our write buffer have nowhere to go
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()  # ...or is killed when it does not
        proc.wait()
    # pycocoevalcap's compute_score takes meteor.lock without try/finally: if it raised, the lock is still
    # held, and Meteor.__del__ (run when the object is collected, often at interpreter exit) would wait on it
    # forever: the "hangs at exit" bug. Nothing uses this instance any more, so giving the lock back is safe.
    if meteor.lock.locked():
        meteor.lock.release()


def close_meteor():
    """Stop the process's METEOR JVM, if one is running. Registered with atexit; safe to call twice."""
    global _meteor
    if _meteor is not None:
        meteor, _meteor = _meteor, None
        _stop(meteor)


def _meteor_compute(meteor, gts, res):
    """meteor.compute_score under a watchdog: if the jar stops answering, it is killed, the blocked read
    returns, and we raise instead of hanging. After any failure the protocol state is unknown, so the JVM is
    stopped and the next get_meteor() starts a fresh one."""
    global _meteor
    timeout = METEOR_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(gts)
    fired = threading.Event()

    def kill():
        fired.set()
        meteor.meteor_p.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        return meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:  # a reply that is not a number, or a broken pipe to a dead jar
        if _meteor is meteor:
            _meteor = None
        _stop(meteor)
        # the jar's last words, if any
        cause = f"no answer within {timeout:.0f} s, killed" if fired.is_set() else "its reply was not a score"
        said = _java_said(meteor.meteor_p.stdout.read(), meteor.meteor_p.stderr.read())
        raise RuntimeError(f"the METEOR jar failed ({cause}): {e}; Java said:\n{said}") from e
    finally:
        watchdog.cancel()


def get_meteor():
    """The process's METEOR scorer, started on first use. Returns once the JVM answers, so the start-up time
    (~15 s) is paid here and not inside the first timed evaluation."""
    global _meteor
    if _meteor is None:
        check_java()
        meteor = Meteor()  # Popen returns at once; the jar loads its paraphrase table before it answers
        _meteor = meteor
        # close_meteor is a no-op when already closed, so registering twice is fine
        atexit.register(close_meteor)
        _meteor_compute(meteor, {0: ["a dog"]}, {0: ["a dog"]})
    return _meteor


# -----------------------------------------------------------------------------
# VQA accuracy: VQAv2's official rules
#
# Written from the rules of the official evaluation code (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), not copied from it. Two versions of that code were in use:
#   "2021"  the repository as it is since commit a013f00 ("Fixed processing answers bug", March 2021)
#   "2016"  the code before it (commit 458a8b2, October 2016 to March 2021), the one LAVIS (BLIP-2) ships
# They differ only in which answers get normalised (see vqa_accuracy), which can move a score by a little: say
# which rules a number was computed with.

VQA_RULES = ("2021", "2016")

# The punctuation marks the official code deletes or turns into spaces. Not among them: the apostrophe (so
# "don't" keeps it, and the contractions table below can find it), the colon ("3:30" stays one word), and the
# period, which has a rule of its own.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period is deleted unless a digit follows it: "1.5" and ".5" keep theirs, "yes." and "5." lose it. (The
# official pattern looks as if it also spares a period after a digit, but what reads as a look-behind there is
# a look-ahead that always succeeds, so only the digit after the period counts.)
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) where re.sub expects its `count`: at most 32 periods are deleted.
_PERIODS_DELETED_AT_MOST = 32

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # "none" counts as 0
_ARTICLES = {"a", "an", "the"}

# The official contractions table maps a contraction written without one of its apostrophes to the full form:
# "dont" -> "don't", and for two apostrophes each spelling missing one of them: "couldnt've" and "couldn'tve"
# -> "couldn't've" (but not "couldntve"). Its entries for "I'm", "I've" and "I'd've" have capital keys, which
# never match a lower-cased word, so they are left out here; so are the two that map a form onto itself.
_CONTRACTED_FORMS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
    mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
    they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
    where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
    wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _CONTRACTED_FORMS
                 for i, ch in enumerate(form) if ch == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one backwards: reproduced


def score_vqa(predictions, questions, rules="2021"):
    """VQA accuracy of predicted answers, overall and per answer type, with 95% bootstrap intervals.

    predictions: {question_id: answer str}; questions: [{"question_id", "answers": [10 human answers],
    "answer_type"}, ...] (data.coco.load_vqa's records); the same question ids on both sides.
    rules: "2021" (the official repository today) or "2016" (the version before, which LAVIS ships).

    Returns a dict with
      "accuracy"         the mean per-question accuracy, in [0, 1] (papers print it x100: 0.652 is "65.2")
      "accuracy_ci"      its 95% percentile bootstrap interval over questions, (low, high)
      "per_answer_type"  {answer type: {"accuracy", "ci", "questions": how many}}
      "question_ids"     the sorted ids, the order of "per_question"
      "per_question"     np.array (num_questions,) of vqa_accuracy
    """
    if rules not in VQA_RULES:
        raise ValueError(f"unknown VQA rules {rules!r}: choose from {VQA_RULES}")
    by_id = {}
    for q in questions:
        if q["question_id"] in by_id:
            raise ValueError(f"question id {q['question_id']} is given twice: each question needs its own id")
        by_id[q["question_id"]] = q
    question_ids = _same_ids(predictions, by_id, "question")
    for i in question_ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"the prediction for question {i!r} must be one str, "
                            f"got {type(predictions[i]).__name__}")
    per_question = np.array([vqa_accuracy(predictions[i], by_id[i]["answers"], rules) for i in question_ids])
    types = np.array([by_id[i]["answer_type"] for i in question_ids])
    per_type = {}
    for t in sorted(set(types.tolist())):
        scores = per_question[types == t]
        per_type[t] = dict(accuracy=float(scores.mean()), ci=bootstrap_ci(scores), questions=len(scores))
    return {"accuracy": float(per_question.mean()), "accuracy_ci": bootstrap_ci(per_question),
            "per_answer_type": per_type, "question_ids": question_ids, "per_question": per_question}


def vqa_accuracy(prediction, answers, rules="2021"):
    """One question's VQA accuracy, in [0, 1]: the official rules, quirks included.

    A prediction that k humans gave is fully right when k >= 3: min(k / 3, 1). To use every human, the
    official code scores it against each set of 9 (one human left out in turn) and averages the 10 scores.
    With k of 10 humans agreeing with the prediction, the k sets missing one of them see k - 1, the other
    10 - k see k:
        k = 1: (1 x 0 + 9 x 1/3) / 10 = 0.3      k = 2: (2 x 1/3 + 8 x 2/3) / 10 = 0.6
        k = 3: (3 x 2/3 + 7 x 1) / 10 = 0.9      k >= 4: 1.0
    Matching is exact string equality after normalisation, and the quirk is which answers get normalised:
      "2021": line breaks and tabs become spaces and both ends are stripped, on both sides; the full
              normalisation (normalize_answer) is applied to the prediction and the human answers only when
              the humans do not all agree. When all 10 humans said "yes", "Yes" and "yes." score 0.
      "2016": the prediction is always fully normalised; the human answers only get the punctuation rule,
              and only when they do not all agree. When humans wrote "two", the prediction "two" (normalised
              to "2") matches none of them.
    While this was written, both versions of the official code (ported to Python 3) were run beside it on
    120,000 random questions: the same float each time.
    """
    if not answers:
        raise ValueError("VQA accuracy needs the human answers of the question; got none")
    if rules == "2021":
        prediction, answers = _one_line(prediction), [_one_line(a) for a in answers]
        if len(set(answers)) > 1:
            prediction = _digits_articles_contractions(_punctuation(prediction))
            answers = [_digits_articles_contractions(_punctuation(a)) for a in answers]
    elif rules == "2016":
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [_punctuation(a) for a in answers]
    else:
        raise ValueError(f"unknown VQA rules {rules!r}: choose from {VQA_RULES}")
    agree = sum(a == prediction for a in answers)
    # each human left out in turn: the others who agree are `agree` minus the one left out, if they agreed
    return sum(min(1, (agree - (a == prediction)) / 3) for a in answers) / len(answers)


def normalize_answer(answer):
    """The official normalisation of an answer, all of it: "The Two dogs." -> "2 dogs", "dont" -> "don't".

    1. line breaks and tabs become spaces; both ends are stripped
    2. punctuation (_punctuation): "1,000" -> "1000", "t-shirt" -> "t shirt", "yes." -> "yes", "1.5" kept
    3. word by word (_digits_articles_contractions): lower case, number words to digits ("two" -> "2",
       "none" -> "0"), articles dropped, contractions given their apostrophes ("dont" -> "don't"); runs of
       spaces become one
    """
    return _digits_articles_contractions(_punctuation(_one_line(answer)))


def _one_line(answer):
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}")
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text):
    """
    The official punctuation rule. Each mark is deleted when it touches a space somewhere in the text
    ("red, blue" -> "red blue") and turned into a space otherwise ("red,blue" -> "red blue", "t-shirt" ->
    "t shirt"); if the text has a comma between two digits anywhere, every mark is deleted ("1,000" ->
    "1000"). The test looks at the text as it came in, mark by mark, so one "- " makes every "-" disappear
    ("t-shirt - red" -> "tshirt red"). Then periods go, except before a digit.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIODS_DELETED_AT_MOST)


def _digits_articles_contractions(text):
    """Word by word, lower-cased: number words to digits, articles dropped, apostrophes put back."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)
