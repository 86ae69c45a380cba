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
"""
import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unicodedata

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

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
    unknown = sorted(set(predictions) - set(references), key=repr)
    missing = sorted(set(references) - set(predictions), key=repr)
    if unknown or missing:
        raise ValueError(
            f"predictions and references must cover the same images: {len(unknown)} predictions "
            f"for unknown ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''}, "
            f"{len(missing)} images without a prediction {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    if not references:
        raise ValueError("nothing to score: no images")
    empty = [i for i, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"every image needs a non-empty list of reference captions; "
                         f"not so for ids {empty[:10]}")
    try:
        return sorted(references)
    except TypeError as e:
        raise ValueError("image ids must be mutually comparable (all int or all str)") from e


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
    """METEOR and the PTB tokenizer are Java programs: fail early, with the fix, when there is no `java`."""
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
