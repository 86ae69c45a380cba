"""
metrics.py: alignment by image id, tokenization on both sides, inputs that used to hang
the METEOR jar, and BLEU / CIDEr-D checked against implementations written here from their definitions.

One METEOR JVM (~15 s to start) is shared by the whole file through evaluate's singleton; the test that breaks
the jar on purpose runs last and pays for a second one.
"""
import math
import random
import shutil
import threading
from collections import Counter

import numpy as np
import pytest

import metrics
from pycocoevalcap.tokenizer import ptbtokenizer

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")

# Three images whose captions are already lower-case and unpunctuated, so the PTB tokenizer leaves them as
# they are and the hand-written metrics below can work on the same words. The n-grams "a", "on", "a brown" ...
# occur in the references of several images, so the idf weights of CIDEr are not all equal.
REFS = {
    1: ["a dog is running on the grass", "a brown dog on grass"],
    2: ["a man riding a horse", "a person on a brown horse"],
    3: ["two cats sleeping on a bed", "cats on a bed"],
}
PREDS = {1: "a dog is running on grass", 2: "a man rides a horse", 3: "two cats"}
WRONG = {1: "a red umbrella in the snow", 2: "an empty kitchen with a stove", 3: "a plane in the sky"}


def run_with_timeout(fn, seconds=60):
    """Run fn in a daemon thread: a hang fails the test instead of freezing the suite."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the test thread and re-raised there
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s: the evaluation hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def meteor():
    """Start the shared JVM once, outside the per-test timeouts."""
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    return metrics.get_meteor()


def corpus_scores(scores):
    return {k: v for k, v in scores.items() if isinstance(v, float)}


# -----------------------------------------------------------------------------
# sanitize, Java and the tokenizer directory


def test_sanitize_makes_one_clean_line():
    assert metrics.sanitize("  a dog\nruns\ton\r\nthe\u2028grass\u2029 \x85now\x00 ") == \
        "a dog runs on the grass now"
    assert metrics.sanitize("zero\u200bwidth\ufeff and\u00a0nbsp") == "zero width and nbsp"
    assert metrics.sanitize("lone \ud800 surrogate") == "lone surrogate"
    assert metrics.sanitize("café 🐶 ok") == "café 🐶 ok"  # ordinary non-ASCII text is kept
    assert metrics.sanitize("\n\t ") == ""
    with pytest.raises(TypeError):
        metrics.sanitize(None)


def test_check_java_explains_the_fix(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install default-jre-headless"):
        metrics.check_java()


@needs_java
def test_tokenizer_matches_pycocoevalcaps():
    # ptb_tokenize runs pycocoevalcap's jar with its command itself (to see the JVM's exit status and errors);
    # the tokens must be the ones pycocoevalcap's own wrapper gives
    captions = {1: ["A dog, running on the grass.", "Two cats -- one black!"], 2: ["It's a man's hat?"],
                "x": ["(left) a ``quoted'' word; and: more..."]}
    theirs = ptbtokenizer.PTBTokenizer().tokenize({k: [{"caption": c} for c in v]
                                                   for k, v in captions.items()})
    assert metrics.ptb_tokenize(captions) == theirs


@needs_java
def test_tokenizer_misalignment_is_detected(monkeypatch):
    # Without sanitize(), \u2028 is a line break to the Java tokenizer: one line too many, and every later
    # caption would land on the wrong image. The check inside ptb_tokenize must notice.
    monkeypatch.setattr(metrics, "sanitize", lambda caption: caption)
    with pytest.raises(RuntimeError, match="no longer aligned"):
        metrics.ptb_tokenize({1: ["a dog\u2028runs"], 2: ["a cat"]})


# -----------------------------------------------------------------------------
# inputs: ids, empty and broken captions


def test_missing_and_unknown_ids_are_errors():
    with pytest.raises(ValueError, match=r"unknown ids \[4\].*without a prediction \[\]"):
        metrics.score_captions({**PREDS, 4: "a cat"}, REFS)
    with pytest.raises(ValueError, match=r"unknown ids \[\].*without a prediction \[3\]"):
        metrics.score_captions({1: PREDS[1], 2: PREDS[2]}, REFS)
    with pytest.raises(ValueError, match="non-empty list of reference captions"):
        metrics.score_captions(PREDS, {**REFS, 3: []})
    with pytest.raises(ValueError, match="SPICE is not computed"):
        metrics.score_captions(PREDS, REFS, metrics=("bleu", "spice"))
    with pytest.raises(TypeError, match="image 2"):
        metrics.score_captions({**PREDS, 2: ["a list", "of captions"]}, REFS)


@needs_java
def test_scores_are_aligned_by_image_id_not_by_order(meteor):
    mixed = {1: PREDS[1], 2: WRONG[2], 3: PREDS[3]}
    a = run_with_timeout(lambda: metrics.score_captions(mixed, REFS))
    ids = list(REFS)
    random.Random(0).shuffle(ids)
    ids_b = list(reversed(ids))
    b = run_with_timeout(lambda: metrics.score_captions({i: mixed[i] for i in ids},
                                                         {i: REFS[i] for i in ids_b}))
    assert corpus_scores(a) == corpus_scores(b)
    assert a["image_ids"] == b["image_ids"] == [1, 2, 3]
    for name, values in a["per_image"].items():
        np.testing.assert_array_equal(values, b["per_image"][name])
        assert len(values) == 3
    # the wrong caption sits at image 2's position, and only there
    for name in ("BLEU-1", "METEOR", "ROUGE-L", "CIDEr"):
        assert np.argmin(a["per_image"][name]) == 1, name


@needs_java
def test_ptb_tokenization_on_both_sides(meteor):
    tokenized = metrics.ptb_tokenize({"x": ["A Dog, running!", "(Two) CATS..."]})
    # pycocoevalcap keeps lower-cased brackets
    assert tokenized == {"x": ["a dog running", "-lrb- two -rrb- cats"]}
    shouting = {1: "A Dog is Running, on GRASS.", 2: "a man, rides a horse!", 3: "Two cats..."}
    shouting_refs = {i: [r.upper() + " ." for r in refs] for i, refs in REFS.items()}
    plain = run_with_timeout(lambda: metrics.score_captions(PREDS, REFS))
    loud = run_with_timeout(lambda: metrics.score_captions(shouting, shouting_refs))
    assert corpus_scores(plain) == corpus_scores(loud)


@needs_java
def test_empty_prediction_scores_zero_without_hanging(meteor):
    preds = {1: "", 2: PREDS[2], 3: " ... "}  # the third becomes empty only after punctuation removal
    scores = run_with_timeout(lambda: metrics.score_captions(preds, REFS))
    for name, values in scores["per_image"].items():
        assert values[0] == 0 and values[2] == 0, name
        assert values[1] > 0, name
    assert all(math.isfinite(v) for v in corpus_scores(scores).values())
    # an empty reference is a data bug, not a caption to match (ROUGE-L would give "" a perfect 1.0 against
    # it)
    with pytest.raises(ValueError, match=r"empty after tokenization.*\[2\]"):
        metrics.score_captions(PREDS, {**REFS, 2: ["a man riding a horse", ". . ."]})


@needs_java
def test_control_characters_do_not_hang_and_score_as_sanitized(meteor):
    dirty = {1: "a dog\nruns on\r\nthe\u2028grass\x85", 2: "a man\trides\x00 a\u200bhorse",
             3: "two\x1bcats\n"}
    dirty_refs = {**REFS, 3: ["two cats sleeping\non a bed", "cats on\u2029a bed"]}
    clean = {i: metrics.sanitize(c) for i, c in dirty.items()}
    clean_refs = {i: [metrics.sanitize(r) for r in refs] for i, refs in dirty_refs.items()}
    got = run_with_timeout(lambda: metrics.score_captions(dirty, dirty_refs))
    want = run_with_timeout(lambda: metrics.score_captions(clean, clean_refs))
    assert corpus_scores(got) == corpus_scores(want)
    assert got["BLEU-1"] > 0.5  # the words survived: nothing was shifted onto another image


# -----------------------------------------------------------------------------
# BLEU and CIDEr-D against implementations written from their definitions


def ngram_counts(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def hand_bleu(preds, refs, max_n):
    """Corpus BLEU as the COCO server computes it: clipped n-gram matches and candidate n-grams summed over
    all images, brevity penalty from the summed lengths, each image contributing the length of its reference
    closest in length to the candidate (the shorter one on a tie)."""
    matched, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for i, pred in preds.items():
        cand, ref_words = pred.split(), [r.split() for r in refs[i]]
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            max_ref = Counter()
            for r in ref_words:
                max_ref |= ngram_counts(r, n)  # | keeps the max count of each n-gram over the references
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in ngram_counts(cand, n).items())
            total[n - 1] += max(0, len(cand) - n + 1)
    brevity = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len)
    return [brevity * math.prod(matched[k] / total[k] for k in range(n)) ** (1 / n)
            for n in range(1, max_n + 1)]


def hand_cider_d(preds, refs, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015, as in pycocoevalcap): per n = 1..4, tf-idf vectors with the document
    frequency counted over the images' reference sets; the candidate's weights clipped by the reference's;
    cosine-like similarity times a gaussian penalty on the length difference; averaged over references and n,
    times 10. (pycocoevalcap measures length in bigrams, which gives the same difference for non-empty
    captions.)"""
    num_images = len(refs)
    doc_freq = Counter()
    for ref_list in refs.values():
        doc_freq.update({g for r in ref_list for n in range(1, 5) for g in ngram_counts(r.split(), n)})

    def tfidf(words, n):
        # an n-gram in no reference gets df 1, i.e. the largest weight, log(N)
        return {g: c * math.log(num_images / max(1, doc_freq[g])) for g, c in ngram_counts(words, n).items()}

    scores = {}
    for i, pred in preds.items():
        cand = pred.split()
        per_n = []
        for n in range(1, 5):
            vc = tfidf(cand, n)
            norm_c = math.sqrt(sum(v * v for v in vc.values()))
            total = 0.0
            for r in refs[i]:
                ref = r.split()
                vr = tfidf(ref, n)
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                clipped_dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                cosine = clipped_dot / (norm_c * norm_r) if norm_c and norm_r else 0.0
                total += cosine * math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma ** 2))
            per_n.append(total / len(refs[i]))
        scores[i] = 10.0 * sum(per_n) / 4
    return scores


@needs_java
def test_bleu_and_cider_match_hand_computation(meteor):
    scores = run_with_timeout(lambda: metrics.score_captions(PREDS, REFS, metrics=("bleu", "cider")))
    want_bleu = hand_bleu(PREDS, REFS, max_n=4)
    # this example has a brevity penalty (and a tie on the closest length)
    assert hand_bleu(PREDS, REFS, 1)[0] < 1
    for n in range(4):
        assert scores[f"BLEU-{n + 1}"] == pytest.approx(want_bleu[n], rel=1e-6, abs=1e-9), n + 1
    want_cider = hand_cider_d(PREDS, REFS)
    np.testing.assert_allclose(scores["per_image"]["CIDEr"], [want_cider[i] for i in (1, 2, 3)],
                               rtol=0, atol=1e-6)
    assert scores["CIDEr"] == pytest.approx(np.mean(list(want_cider.values())), abs=1e-6)
    assert scores["CIDEr"] > 0.5


@needs_java
def test_perfect_captions_beat_wrong_ones(meteor):
    perfect = {i: refs[0] for i, refs in REFS.items()}
    good = run_with_timeout(lambda: metrics.score_captions(perfect, REFS))
    bad = run_with_timeout(lambda: metrics.score_captions(WRONG, REFS))
    assert good["BLEU-4"] > 0.9 and bad["BLEU-4"] < 1e-3
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert good[name] > bad[name], name
        assert np.all(good["per_image"][name] > bad["per_image"][name]), name
    assert good["ROUGE-L"] == pytest.approx(1.0)
    assert good["METEOR_mean"] > bad["METEOR_mean"] and good["METEOR_std"] >= 0
    assert good["CIDEr_ci"][0] <= good["CIDEr"] <= good["CIDEr_ci"][1]
    assert good["METEOR_ci"][0] <= good["METEOR_mean"] <= good["METEOR_ci"][1]


# -----------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(1).normal(loc=0.4, scale=0.15, size=400)
    low, high = metrics.bootstrap_ci(values, n=1000, seed=0)
    assert low < values.mean() < high
    assert metrics.bootstrap_ci(values, n=1000, seed=0) == (low, high)
    assert metrics.bootstrap_ci(values, n=1000, seed=1) != (low, high)
    # the width matches the normal approximation of the mean's 95% interval, 2 * 1.96 * std / sqrt(n)
    assert high - low == pytest.approx(2 * 1.96 * values.std() / math.sqrt(len(values)), rel=0.1)
    assert metrics.bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])


# -----------------------------------------------------------------------------
# last: breaks the shared JVM on purpose


@needs_java
def test_a_desynchronised_meteor_jar_raises_and_is_replaced(meteor):
    # Bypass sanitize(): a raw newline makes the jar answer the wrong request. pycocoevalcap alone would raise
    # with its lock held and then hang the interpreter at exit; we must raise, stop the jar, free the lock.
    with pytest.raises(RuntimeError, match="METEOR jar failed"):
        run_with_timeout(lambda: metrics._meteor_compute(meteor, {1: ["a dog"], 2: ["a cat"]},
                                                          {1: ["a\ndog"], 2: ["a cat"]}))
    assert meteor.meteor_p.poll() is not None and not meteor.lock.locked()
    assert metrics.get_meteor() is not meteor  # the next evaluation starts a fresh jar
    scores = run_with_timeout(lambda: metrics.score_captions(PREDS, REFS, metrics=("meteor",)))
    assert 0 < scores["METEOR"] < 1
