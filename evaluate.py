"""
Evaluation of the captioners: metrics first, then (in the sections below) decoding, the comparison table,
plots and the caption grid.

Metrics
-------
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

Java (any JRE >= 8) must be on PATH: METEOR and the PTB tokenizer are jars (`apt-get install default-jre-headless`).
The METEOR jar is a JVM that takes ~15 s to start and holds 1.1-1.5 GB of memory; one per process, reused.

Two things to keep in mind when reading the scores:
- CIDEr's idf comes from the references of the images being evaluated, so a CIDEr score is only comparable with
  one computed on the same image set (and on a single image every n-gram has idf 0: CIDEr is 0).
- The confidence intervals are percentile bootstraps over images, with the idf held fixed for CIDEr: they say how
  much the score would move with another sample of images, not with another training run.

    >>> s = score_captions({1: "a dog runs on grass"}, {1: ["A dog running on the grass.", "a brown dog"]})
    >>> s["BLEU-1"], s["METEOR"], s["per_image"]["METEOR"]  # doctest: +SKIP

Decoding, the comparison, pictures
----------------------------------
Greedy, beam search (beam 1 = greedy) and sampling, batched over images through the GPT's KV cache; then one
command to compare bridge checkpoints on the same images, and one to caption a folder of your own images:

    python evaluate.py --checkpoints runs/caption/linear/ckpt_final.pt runs/caption/xattn/ckpt_final.pt \
        runs/caption/qformer/ckpt_final.pt --coco-root data/shapes --split val --features data/cache/shapes_val \
        --out results/                    # table.md, results.json, captions_*.json, val_loss.png, grid_*.png,
                                          # qformer_attention.png; --karpathy-json dataset_coco.json for Karpathy's test
    python evaluate.py --images my_photos/ --checkpoint runs/caption/qformer/ckpt_final.pt   # -> results/captions_images.json

The table carries a blind baseline: the first checkpoint's frozen LM with no image at all, decoded the same way
(its first sentence after <|endoftext|>): the LM's caption prior. A bridge that does not beat it clearly has not
learned to use the image.
"""
import argparse
import atexit
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

import clip_loader
from bridges import Captioner, load_captioner
from data.coco import FeatureCache, load_pixels, load_records
from data.shapes import attribute_accuracy

# -----------------------------------------------------------------------------
# Metrics: cleaning and tokenizing captions

METRICS = ("bleu", "meteor", "rouge", "cider")

# Unicode categories turned into spaces: Cc control characters (\n, \r, \t, \x85 ...), Cf format characters
# (zero-width space, BOM, ...), Cs lone surrogates (they cannot even be encoded to UTF-8), Zl/Zp the line and
# paragraph separators \u2028 and \u2029.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def sanitize(caption):
    """One line of plain text: control characters and line breaks become spaces, runs of spaces become one.

    Why this matters: both jars speak a line protocol. The PTB tokenizer splits on \\n, \\r, \\x85, \\u2028 ...,
    which silently shifts every later caption onto the wrong image; a newline sent to METEOR desynchronises
    its replies, pycocoevalcap's wrapper then fails while holding its lock, and the process hangs at exit.
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a str, got {type(caption).__name__}: {caption!r}")
    cleaned = "".join(" " if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in caption)
    return " ".join(cleaned.split())  # str.split() also takes care of every Unicode space (\u00a0, \u3000, ...)


def check_java():
    """METEOR and the PTB tokenizer are Java programs: fail early, with the fix, when there is no `java`."""
    if shutil.which("java") is None:
        raise RuntimeError(
            "`java` was not found on PATH; METEOR and the PTB tokenizer (pycocoevalcap) need a Java runtime >= 8. "
            "Install one, e.g. `sudo apt-get install default-jre-headless` (Debian/Ubuntu), "
            "`brew install openjdk` (macOS) or `conda install -c conda-forge openjdk`."
        )


_checked_dirs = set()  # directories already known to be writable, so we probe each once per process


def _check_tokenizer_dir(dirname):
    """pycocoevalcap's PTBTokenizer writes its input to a temp file *inside its own package directory* (next to
    the jar) and fails with a bare PermissionError when site-packages is read-only (a system-wide install, a
    container run as another user). We try the same operation first and explain the fix."""
    if dirname in _checked_dirs:
        return
    try:
        with tempfile.NamedTemporaryFile(dir=dirname):
            pass
    except OSError as e:
        raise RuntimeError(
            f"pycocoevalcap's PTB tokenizer writes temporary files into its package directory {dirname}, "
            f"which this user cannot write to ({e.strerror}). Install pycocoevalcap into a virtual environment "
            f"you own (`make setup`), or make that directory writable."
        ) from e
    _checked_dirs.add(dirname)


_END_MARK = object()  # a key no caller can use, for the alignment check below


def ptb_tokenize(captions):
    """{key: [caption, ...]} -> {key: [tokenized caption, ...]}: sanitized, lower-cased, PTB-split, punctuation
    removed, exactly as the COCO evaluation server does. One JVM start (~0.3 s) per call, whatever the size."""
    check_java()
    _check_tokenizer_dir(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)))
    cleaned = {key: [{"caption": sanitize(c)} for c in caps] for key, caps in captions.items()}
    cleaned[_END_MARK] = [{"caption": "end of captions"}]  # dicts keep insertion order: this is the last line
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(cleaned)
    # The tokenizer pairs its output lines with the captions by position (zip), so one line too many or too few
    # moves captions onto other images without any error. sanitize() prevents it; a known last line and the
    # counts per key make sure.
    misaligned = tokenized.pop(_END_MARK, None) != ["end of captions"]
    misaligned |= any(len(tokenized.get(key, [])) != len(caps) for key, caps in captions.items())
    if misaligned:
        raise RuntimeError("the PTB tokenizer's output lines are no longer aligned with the captions "
                           "(a line break that sanitize() missed?)")
    return tokenized


# -----------------------------------------------------------------------------
# Metrics: one METEOR process per Python process

# A module-level singleton, on purpose: every Meteor() starts a JVM (~15 s, 1.1-1.5 GB), and a training run that
# evaluates every epoch would otherwise pay that each time (or pile up JVMs until the machine swaps).
_meteor = None
METEOR_TIMEOUT_S = 120.0  # a watchdog kills the jar if one call takes longer than this plus...
METEOR_TIMEOUT_PER_IMAGE_S = 0.05  # ...this per image (>10x the ~4 ms measured by bench/bench_metrics.py)


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
    """meteor.compute_score under a watchdog: if the jar stops answering, it is killed, the blocked read returns,
    and we raise instead of hanging. After any failure the protocol state is unknown, so the JVM is stopped and
    the next get_meteor() starts a fresh one."""
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
        stderr = meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:]  # the jar's last words, if any
        cause = f"no answer within {timeout:.0f} s, killed" if fired.is_set() else "its reply was not a score"
        raise RuntimeError(f"the METEOR jar failed ({cause}): {e}\n{stderr}") from e
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
        atexit.register(close_meteor)  # close_meteor is a no-op when already closed, so registering twice is fine
        _meteor_compute(meteor, {0: ["a dog"]}, {0: ["a dog"]})
    return _meteor


# -----------------------------------------------------------------------------
# Metrics: scoring a set of captions


def bootstrap_ci(values, n=1000, seed=0, alpha=0.05):
    """Percentile bootstrap confidence interval (1 - alpha) for the mean of `values`, resampling them with
    replacement n times. Deterministic for a given seed. Returns (low, high)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array of values, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    chunk = max(1, 2_000_000 // len(values))  # bounded memory: 5,000 images x 1,000 resamples is 40 MB at once
    for start in range(0, n, chunk):
        idx = rng.integers(0, len(values), size=(min(chunk, n - start), len(values)))  # (resamples, images)
        means[start:start + len(idx)] = values[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _align(predictions, references):
    """Image ids, sorted: the order of every per-image array. Any mismatch is an error, never a silent drop."""
    unknown = sorted(set(predictions) - set(references), key=repr)
    missing = sorted(set(references) - set(predictions), key=repr)
    if unknown or missing:
        raise ValueError(
            f"predictions and references must cover the same images: {len(unknown)} predictions for unknown ids "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}, {len(missing)} images without a prediction "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    if not references:
        raise ValueError("nothing to score: no images")
    empty = [i for i, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"every image needs a non-empty list of reference captions; not so for ids {empty[:10]}")
    try:
        return sorted(references)
    except TypeError as e:
        raise ValueError("image ids must be mutually comparable (all int or all str)") from e


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
            raise TypeError(f"prediction for image {i!r} must be one str, got {type(predictions[i]).__name__}")

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
        raise ValueError(f"reference captions empty after tokenization (only punctuation or spaces?) for image "
                         f"ids {empty_refs[:10]}{' ...' if len(empty_refs) > 10 else ''}")
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
            # idf from these references; bootstrapping per-image scores keeps it fixed (see the docstring above)
            corpus, per_image = Cider().compute_score(gts, res)
            out["CIDEr"] = float(corpus)
            out["per_image"]["CIDEr"] = np.array(per_image)
            out["CIDEr_ci"] = bootstrap_ci(per_image)
        out["seconds"][metric] = time.perf_counter() - t0
    return out


# -----------------------------------------------------------------------------
# Decoding: greedy, beam search and sampling, batched over images, through the GPT's KV cache
#
# Every method conditions on the image once (captioner.condition: the prefix and the cross-attention keys and
# values), then feeds one token per step to the LM, which keeps the keys and values of everything before.


@torch.no_grad()
def beam_search(captioner, visual, beam=3, max_new_tokens=30, length_penalty=1.0):
    """
    Beam search for a batch of images: visual (B, S, C_vis) -> B captions (lists of token ids, without the
    final <|endoftext|>). All B * beam hypotheses advance together, one LM call per step.

    A hypothesis ends when it emits <|endoftext|>; it is then scored by
        sum of its tokens' log-probabilities / length ** length_penalty      (length counts the <|endoftext|>)
    so length_penalty=0 ranks by total log-probability and 1 by the mean per token (longer captions are not
    punished for having more terms to sum). A hypothesis still running after max_new_tokens is scored the same
    way over its max_new_tokens tokens.

    Which ends count, and when to stop, follow the usual rule (Hugging Face's early_stopping=False): at each step
    the 2 * beam best continuations are ranked; an <|endoftext|> among the first `beam` of them is a finished
    hypothesis, and the best `beam` others are the next beams. An image is done when it holds `beam` finished
    hypotheses and none of its live beams scores better at its current length. With length_penalty=0 that is
    exact (a live beam's total can only fall); beam=1 is exactly greedy decoding.
    """
    lm, eot, K = captioner.lm, captioner.eot, beam
    B = visual.size(0)
    # Simplest correct way to give every beam its image: condition on each image repeated K times. Rows
    # b*K .. b*K+K-1 are image b's beams; the cross-attention keys/values follow the same layout, and since
    # beams are only ever reshuffled within an image, they never need reordering.
    prefix, cross = captioner.condition(visual.repeat_interleave(K, dim=0))  # (B*K, L, C)
    cache = lm.new_cache(B * K, prefix.size(1) + max_new_tokens)
    empty = torch.zeros(B * K, 0, dtype=torch.long, device=visual.device)  # (B*K, 0): no text yet
    logits, _ = lm(empty, prefix=prefix, cross=cross, cache=cache)  # prefill the prefix
    logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (B*K, V)
    V = logprobs.size(-1)

    # At the start all K beams of an image are the same empty caption: keep only the first alive, or the
    # first step would pick the same token K times.
    scores = torch.full((B, K), float("-inf"), device=visual.device)  # (B, K) total log-probability per beam
    scores[:, 0] = 0.0
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=visual.device)  # (B*K, t) each beam's caption so far
    finished = [[] for _ in range(B)]  # per image: (score, token list), best first, at most K
    done = [False] * B
    rows = torch.arange(B, device=visual.device)[:, None] * K  # (B, 1) first row of each image's beams

    def normalized(total, length):
        return total / length ** length_penalty

    for t in range(max_new_tokens):
        length = t + 1  # tokens in a hypothesis that ends (or stops) at this step
        candidates = (scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)  # (B, 2K), best first
        top_beam, top_token = top_index // V, top_index % V  # (B, 2K) which beam it extends, with which token
        is_eot = top_token == eot

        # finished hypotheses: <|endoftext|> among the first K candidates
        for b, j in (is_eot[:, :K] & torch.isfinite(top_scores[:, :K])).nonzero().tolist():
            if done[b]:
                continue
            caption = tokens[b * K + top_beam[b, j]].tolist()
            finished[b].append((normalized(top_scores[b, j].item(), length), caption))
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:K]

        # the next beams: the best K candidates that do not end (a stable sort keeps their rank order; there are
        # always at least K, since each beam contributes at most one <|endoftext|> to the 2K)
        keep = torch.argsort(is_eot.to(torch.int8), dim=-1, stable=True)[:, :K]  # (B, K) positions in the 2K
        scores = top_scores.gather(1, keep)  # (B, K)
        source = (rows + top_beam.gather(1, keep)).view(-1)  # (B*K,) the row each new beam continues
        new_tokens = top_token.gather(1, keep).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[source], new_tokens[:, None]], dim=1)  # (B*K, t + 1)
        cache.reorder(source)

        for b in range(B):
            if not done[b] and len(finished[b]) == K:
                best_alive = normalized(scores[b, 0].item(), length)  # scores are sorted: beam 0 is the best
                done[b] = best_alive <= finished[b][-1][0]
        if all(done) or t == max_new_tokens - 1:
            break
        logits, _ = lm(new_tokens[:, None], cross=cross, cache=cache)  # (B*K, 1, V): one position per beam
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (B*K, V)

    # images still running at max_new_tokens: their live beams compete as they are
    captions = []
    for b in range(B):
        hypotheses = list(finished[b])
        if not done[b]:
            for k in range(K):
                if torch.isfinite(scores[b, k]):
                    hypotheses.append((normalized(scores[b, k].item(), tokens.size(1)), tokens[b * K + k].tolist()))
        captions.append(max(hypotheses, key=lambda h: h[0])[1])
    return captions


@torch.no_grad()
def decode_batch(captioner, visual, method="beam", beam=3, max_new_tokens=30, length_penalty=1.0, temperature=1.0,
                 top_p=None, generator=None):
    """One batch of images (B, S, C_vis) -> B token lists, by greedy, beam search (beam 1 = greedy) or sampling."""
    if method == "greedy" or (method == "beam" and beam == 1):
        return captioner.generate(visual, max_new_tokens, temperature=0.0)
    if method == "beam":
        return beam_search(captioner, visual, beam, max_new_tokens, length_penalty)
    if method == "sample":
        return captioner.generate(visual, max_new_tokens, temperature=temperature, top_p=top_p, generator=generator)
    raise ValueError(f"unknown decoding method {method!r}: choose greedy, beam or sample")


def decode(captioner, tokenizer, batches, method="beam", beam=3, max_new_tokens=30, length_penalty=1.0,
           temperature=1.0, top_p=None, seed=0, desc="decoding"):
    """
    Caption every image of `batches`, an iterable of (image_ids, visual (B, S, C_vis)) (see cache_batches and
    image_batches). Returns ({image_id: caption text}, captions per second).
    Captions/s times the decoding only (conditioning included), not the reading or encoding of the images.
    Sampling draws from one generator seeded with `seed`: the same seed, batches and device give the same captions.
    """
    device = next(captioner.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if method == "sample" else None
    captions, seconds, warm = {}, 0.0, False
    for image_ids, visual in tqdm(batches, desc=desc, unit="batch", leave=False):
        visual = visual.to(device)
        if not warm:  # one untimed short run first: allocator, kernels and caches warm up outside the timing
            decode_batch(captioner, visual[:1], method, beam, 2, length_penalty, temperature, top_p,
                         torch.Generator(device=device).manual_seed(seed))
            warm = True
        _sync(device)
        t0 = time.perf_counter()
        token_lists = decode_batch(captioner, visual, method, beam, max_new_tokens, length_penalty, temperature,
                                   top_p, generator)
        _sync(device)
        seconds += time.perf_counter() - t0
        for image_id, caption_tokens in zip(image_ids, token_lists):
            captions[image_id] = tokenizer.decode(caption_tokens).strip()
    return captions, len(captions) / max(seconds, 1e-9)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# -----------------------------------------------------------------------------
# Visual input: rows of a feature cache, or images encoded on the fly by the checkpoint's encoder

# the manifest fields that decide what a bridge sees; a cache must agree with the checkpoint on all of them
FEATURE_FIELDS = ("encoder", "layer", "pooling", "tokens", "width")


def check_features(cache, ckpt, ckpt_path):
    """ValueError unless the feature cache was made the way the checkpoint's training features were."""
    trained = ckpt.get("features") or {}
    expected = {k: trained[k] for k in FEATURE_FIELDS if k in trained}
    if not expected:
        raise ValueError(f"{ckpt_path} records no feature settings ('features'): cannot check the cache against it")
    try:
        cache.check_compatible(expected)
    except ValueError as e:
        raise ValueError(f"{ckpt_path} was trained on other features than the cache holds: {e}. "
                         f"Build a cache with the checkpoint's settings (python data/coco.py features "
                         f"--encoder {trained.get('encoder')} --pool {trained.get('pooling')} ...), or drop "
                         f"--features to encode the images on the fly.") from e


def cache_batches(cache, image_ids, batch_size):
    """(ids, visual (B, S, C)) batches from a FeatureCache, in the order of image_ids."""
    for i in range(0, len(image_ids), batch_size):
        ids = image_ids[i:i + batch_size]
        yield ids, cache.batch([cache.row_of(image_id) for image_id in ids])


class Encoder:
    """The frozen image encoder a checkpoint was trained with, rebuilt from its 'features' manifest."""

    def __init__(self, features, device):
        self.model = clip_loader.load_clip(features["encoder"], layer=features.get("layer", -1)).to(device)
        self.grid = clip_loader.parse_grid(features.get("pooling", "4x8"))
        self.size = self.model.config.image_size
        self.device = device

    @torch.no_grad()
    def __call__(self, pixels):
        """(B, H, W, 3) uint8 pixels (data.coco.load_pixels) -> pooled tokens (B, S, C), float32 on the CPU:
        exactly what build_feature_cache stores (up to its fp16 rounding)."""
        x = clip_loader.normalize_pixels(torch.from_numpy(np.stack(pixels)).to(self.device))  # (B, 3, H, W)
        return clip_loader.pool_tokens(self.model(x), self.grid).float().cpu()  # (B, S, C)


def image_batches(encoder, items, batch_size, skipped):
    """
    (ids, visual) batches encoded from image files; items: [(image_id, path), ...]. An unreadable file is
    appended to `skipped` as {"image_id", "path", "reason"} and left out, never fatal.
    """
    for i in range(0, len(items), batch_size):
        good, pixels = [], []
        for image_id, path in items[i:i + batch_size]:
            array, reason = load_pixels(path, encoder.size)
            if array is None:
                tqdm.write(f"skipping {path}: {reason}", file=sys.stderr)
                skipped.append(dict(image_id=image_id, path=path, reason=reason))
            else:
                good.append(image_id)
                pixels.append(array)
        if good:
            yield good, encoder(pixels)


class NoImage(torch.nn.Module):
    """
    The blind baseline's "bridge": no prefix, no cross-attention. A Captioner built on it is the frozen LM
    alone, starting a new text after <|endoftext|>, i.e. the LM's own caption prior: what it guesses without
    looking. (Feeding a trained bridge one constant image instead is a weaker baseline than it
    sounds: a prefix bridge given an input it never saw drives the LM into non-captions.)
    """

    def forward(self, visual):
        return None, None


def first_sentence(text):
    """The blind baseline's caption: an LM pretrained on running text does not stop after one caption."""
    return text.split(".")[0].strip()


# -----------------------------------------------------------------------------
# The comparison: several bridge checkpoints on the same images, one table


ATTRIBUTES = ("colour", "shape", "size", "position", "relation")  # the miniature's per-attribute accuracies


def read_log(path):
    """The JSONL training log next to a checkpoint -> list of records ([] if there is none). A last line cut off
    by a run still writing it is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_name(path, taken):
    """A short, unique name for a checkpoint: its run folder (runs/caption/<name>/ckpt_final.pt)."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "ckpt"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def evaluation_set(args):
    """The records to caption: ([{"image_id", "path", "captions"}, ...], a description of the split)."""
    split = args.split or ("test" if args.karpathy_json else "val")
    records = load_records(args.coco_root, split, args.karpathy_json)
    records = [r for r in records if r["captions"]]  # an image without references cannot be scored
    if args.max_images:
        records = records[:args.max_images]
    if not records:
        raise ValueError(f"no captioned images in {args.coco_root} split {split}")
    where = f"Karpathy {split} ({args.karpathy_json})" if args.karpathy_json else f"COCO-format {split}2017"
    return records, split, where


def visual_batches(args, ckpt, records, cache, encoders, skipped):
    """Batches for one checkpoint: the cache's rows, or the images encoded by the checkpoint's own encoder."""
    if cache is not None:
        return cache_batches(cache, [r["image_id"] for r in records], args.batch_size)
    key = tuple(sorted((k, str(v)) for k, v in (ckpt.get("features") or {}).items() if k in FEATURE_FIELDS))
    if key not in encoders:  # one encoder per distinct setting, shared by the checkpoints that use it
        encoders[key] = Encoder(ckpt["features"], args.device)
    skipped.clear()  # the same files fail for every checkpoint: keep one list
    return image_batches(encoders[key], [(r["image_id"], r["path"]) for r in records], args.batch_size, skipped)


def score_row(name, captions, references, metrics, scenes, seconds_per_caption=None):
    """Metrics of one set of captions, as a table row."""
    scores = score_captions(captions, {i: references[i] for i in captions}, metrics)
    row = dict(bridge=name, images=len(captions))
    for key in ("BLEU-4", "METEOR", "METEOR_mean", "METEOR_std", "METEOR_ci", "ROUGE-L", "CIDEr", "CIDEr_ci"):
        if key in scores:
            row[key] = list(scores[key]) if isinstance(scores[key], tuple) else scores[key]
    if scenes is not None:
        row["attributes"] = attribute_accuracy(captions, scenes)
    return row


def compare(args):
    """Evaluate every checkpoint (and the blind baseline) on one image set; write results/ (see main's help)."""
    os.makedirs(args.out, exist_ok=True)
    records, split, where = evaluation_set(args)
    cache = FeatureCache(args.features) if args.features else None
    if cache is not None:
        cached = {int(i) for i in cache.image_ids}
        missing = [r for r in records if int(r["image_id"]) not in cached]
        if missing:  # images the cache skipped as unreadable when it was built, or a cache of another split
            print(f"{len(missing)} image(s) not in the feature cache, left out: {[r['path'] for r in missing[:5]]}",
                  file=sys.stderr)
            records = [r for r in records if int(r["image_id"]) in cached]
            if not records:
                raise ValueError(f"none of the {len(missing)} images is in the feature cache {args.features}: "
                                 f"a cache of another split?")
    references = {r["image_id"]: r["captions"] for r in records}
    scenes_path = os.path.join(args.coco_root, f"scenes_{split}.json")
    scenes = None
    if os.path.exists(scenes_path) and not args.karpathy_json:
        with open(scenes_path) as f:
            scenes = json.load(f)
    decoding = dict(method=args.method, beam=args.beam, max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(f"evaluating {len(args.checkpoints)} checkpoint(s) on {len(records)} images of {where}; decoding {decoding}",
          file=sys.stderr)

    rows, runs, encoders, skipped, names = [], [], {}, [], set()
    for path in args.checkpoints:
        captioner, tokenizer, ckpt = load_captioner(path, lm=args.lm, device=args.device)
        if cache is not None:
            check_features(cache, ckpt, path)
        name = run_name(path, names)
        batches = visual_batches(args, ckpt, records, cache, encoders, skipped)
        captions, captions_per_s = decode(captioner, tokenizer, batches, desc=name, **decoding)
        row = score_row(name, captions, references, args.metrics, scenes)
        params = ckpt.get("params") or captioner.param_counts()
        row.update(kind=ckpt["bridge_config"]["kind"], checkpoint=path, step=ckpt.get("step"), params=params,
                   trainable_params=sum(p["trainable"] for p in params.values()),
                   total_params=sum(p["total"] for p in params.values()),
                   train_seconds=ckpt.get("train_seconds"), captions_per_s=captions_per_s,
                   val_loss=final_val_loss(ckpt, path))
        rows.append(row)
        runs.append(dict(name=name, path=path, captioner=captioner, tokenizer=tokenizer, ckpt=ckpt, captions=captions))
        write_json(os.path.join(args.out, f"captions_{name}.json"),
                   {str(i): dict(caption=c, references=references[i]) for i, c in captions.items()})
        print(f"{name}: CIDEr {row.get('CIDEr', float('nan')):.3f}, {captions_per_s:.1f} captions/s", file=sys.stderr)

    # The blind baseline: the frozen LM with no image at all. If a bridge's scores are not clearly above this
    # row, the bridge has not learned to use the image: everything it gets right, the LM guesses on its own.
    first = runs[0]
    blind_captioner = Captioner(first["captioner"].lm, NoImage(), first["captioner"].eot).eval()
    image_ids = list(first["captions"])
    no_image = torch.zeros(0, 0)  # (0, 0) per image: the blind captioner reads nothing
    blind_batches = ((image_ids[i:i + args.batch_size], no_image.expand(len(image_ids[i:i + args.batch_size]), 0, 0))
                     for i in range(0, len(image_ids), args.batch_size))
    captions, captions_per_s = decode(blind_captioner, first["tokenizer"], blind_batches, desc="blind", **decoding)
    captions = {i: first_sentence(c) for i, c in captions.items()}
    blind = score_row(f"blind (frozen LM of {first['name']}, no image)", captions, references, args.metrics, scenes)
    blind.update(kind="blind", checkpoint=first["path"], captions_per_s=captions_per_s, blind=True)
    rows.append(blind)
    write_json(os.path.join(args.out, "captions_blind.json"),
               {str(i): dict(caption=c, references=references[i]) for i, c in captions.items()})

    # the pictures
    pictures = [plot_val_loss(args.checkpoints, [r["name"] for r in runs], os.path.join(args.out, "val_loss.png"))]
    by_id = {r["image_id"]: r for r in records}
    for run in runs:
        shown = [by_id[i] for i in list(run["captions"])[:9]]
        pictures.append(plot_grid(shown, run["captions"], os.path.join(args.out, f"grid_{run['name']}.png"), run["name"]))
    qformers = [run for run in runs if run["ckpt"]["bridge_config"]["kind"] == "qformer"]
    if qformers:
        run = qformers[0]
        shown = [by_id[i] for i in list(run["captions"])[:3]]
        if cache is not None:
            visual = cache.batch([cache.row_of(r["image_id"]) for r in shown])
        else:
            encoder = next(iter(encoders.values()))
            visual = encoder([load_pixels(r["path"], encoder.size)[0] for r in shown])
        pictures.append(plot_qformer_attention(run["captioner"], visual, shown, run["ckpt"]["features"],
                                               os.path.join(args.out, "qformer_attention.png"), run["name"]))

    result = dict(split=split, where=where, images=len(records), skipped=list(skipped), decoding=decoding,
                  metrics=list(args.metrics), features=args.features, device=str(args.device),
                  rows=[{k: v for k, v in row.items()} for row in rows],
                  pictures=[p for p in pictures if p])
    write_json(os.path.join(args.out, "results.json"), result)
    table = markdown_table(rows, decoding, where, len(records), scenes is not None)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return result


def final_val_loss(ckpt, path):
    """The checkpoint's own val loss, else the last one in the log beside it."""
    if ckpt.get("val_loss") is not None:
        return float(ckpt["val_loss"])
    losses = [r["val_loss"] for r in read_log(os.path.join(os.path.dirname(path), "log.jsonl")) if "val_loss" in r]
    return float(losses[-1]) if losses else None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _fmt_params(n):
    return "—" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def markdown_table(rows, decoding, where, images, with_attributes):
    """The comparison as a markdown table, with what was measured and how written above it."""
    method = decoding["method"]
    how = {"greedy": "greedy", "beam": f"beam {decoding['beam']} (length penalty {decoding['length_penalty']})",
           "sample": f"sampling (temperature {decoding['temperature']}, top-p {decoding['top_p']}, seed {decoding['seed']})"}
    lines = [f"{images} images of {where}, {how[method]}, at most {decoding['max_new_tokens']} tokens.",
             "Params: trainable / total (encoder + bridge + LM). METEOR: corpus score, then per-image mean ± std. "
             "CIDEr (CIDEr-D) with its 95% bootstrap interval over images.",
             "The blind row is the first checkpoint's frozen LM with no image at all (its first sentence after "
             "<|endoftext|>): what the LM guesses without looking.", ""]
    header = ["bridge", "trainable / total params", "train time", "val loss", "BLEU-4", "METEOR", "METEOR mean ± std",
              "CIDEr [95% CI]", "captions/s"] + [a for a in ATTRIBUTES if with_attributes]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seconds = row.get("train_seconds")
        cells = [row["bridge"],
                 "—" if row.get("blind") else f"{_fmt_params(row['trainable_params'])} / {_fmt_params(row['total_params'])}",
                 "—" if seconds is None else f"{seconds / 60:.1f} min",
                 _fmt(row.get("val_loss")), _fmt(row.get("BLEU-4")), _fmt(row.get("METEOR")),
                 "—" if "METEOR_mean" not in row else f"{row['METEOR_mean']:.3f} ± {row['METEOR_std']:.3f}",
                 "—" if "CIDEr" not in row else f"{row['CIDEr']:.3f} [{row['CIDEr_ci'][0]:.3f}, {row['CIDEr_ci'][1]:.3f}]",
                 f"{row['captions_per_s']:.1f}"]
        if with_attributes:
            cells += [f"{row['attributes'].get(a, 0.0):.2f}" for a in ATTRIBUTES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# Pictures (matplotlib, Agg backend: files only, no display needed)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_val_loss(checkpoints, names, out_path):
    """Validation loss against step, one line per run, from the log.jsonl beside each checkpoint."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = 0
    for path, name in zip(checkpoints, names):
        points = [(r["step"], r["val_loss"]) for r in read_log(os.path.join(os.path.dirname(path), "log.jsonl"))
                  if "val_loss" in r and "step" in r]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="o", markersize=3, label=name)
            plotted += 1
    if not plotted:
        plt.close(fig)
        print("no val_loss records in any log.jsonl beside the checkpoints: no val_loss.png", file=sys.stderr)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (caption tokens)")
    ax.set_title("validation loss per bridge")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def _open_rgb(path):
    with Image.open(path) as image:
        return clip_loader.to_rgb(image)


def plot_grid(records, captions, out_path, title):
    """A 3x3 grid: each image with the generated caption above its first reference caption."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(10, 12.5))
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records):
        try:
            ax.imshow(_open_rgb(record["path"]))
        except (OSError, ValueError) as e:  # the caption still shows; the picture says why the image does not
            ax.text(0.5, 0.5, f"unreadable image\n{type(e).__name__}", ha="center", va="center")
        generated = textwrap.fill(captions[record["image_id"]], 40)
        reference = textwrap.fill(record["captions"][0], 40)
        ax.set_title(f"{generated}\nref: {reference}", fontsize=8, loc="left")
    fig.suptitle(f"{title}: generated caption, then one reference")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def token_layout(features):
    """(rows, cols) of the patch grid behind tokens 1..S-1 (token 0 is CLS), from a features manifest."""
    grid = clip_loader.parse_grid(features.get("pooling", "4x8"))
    if grid is None:
        side = math.isqrt(features["tokens"] - 1)
        grid = (side, side)
    return grid


@torch.no_grad()
def plot_qformer_attention(captioner, visual, records, features, out_path, title, n_queries=4):
    """
    Where Q-Former queries look: the last layer's cross-attention (mean over heads) of a few queries, the patch
    part drawn over the image (each pooled token covers its cell of the rows x cols grid), the weight on the
    class token written above. The queries shown are the most focused ones (lowest entropy over the images).
    One colour scale for every panel (0 to the largest weight shown): uniform attention looks uniform.
    """
    plt = _pyplot()
    device = next(captioner.parameters()).device
    weights = captioner.bridge.attention_maps(captioner.standardized(visual.to(device)))  # (B, nh, Q, S)
    weights = weights.mean(dim=1).float().cpu()  # (B, Q, S)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(0)  # (Q,)
    queries = entropy.argsort()[:n_queries].tolist()
    rows, cols = token_layout(features)
    vmax = float(weights[:, queries, 1:].max())
    B = len(records)
    fig, axes = plt.subplots(B, len(queries) + 1, figsize=(2.6 * (len(queries) + 1), 2.8 * B), squeeze=False)
    for b, record in enumerate(records):
        image = np.asarray(_open_rgb(record["path"]).resize((224, 224)))
        axes[b, 0].imshow(image)
        axes[b, 0].set_title("image", fontsize=8)
        for j, q in enumerate(queries):
            ax = axes[b, j + 1]
            grid = weights[b, q, 1:].view(rows, cols).numpy()  # (rows, cols): attention on each pooled cell
            ax.imshow(image)
            heat = ax.imshow(grid, cmap="inferno", alpha=0.6, extent=(0, 224, 224, 0), interpolation="nearest",
                             vmin=0.0, vmax=vmax)
            ax.set_title(f"query {q}, CLS {weights[b, q, 0]:.2f}", fontsize=8)
        for ax in axes[b]:
            ax.axis("off")
    fig.suptitle(f"{title}: last-layer cross-attention of the {len(queries)} most focused queries "
                 f"(uniform = {1 / weights.size(-1):.3f} per token)")
    fig.tight_layout()
    fig.colorbar(heat, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="attention weight")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path

# -----------------------------------------------------------------------------
# Captioning a folder of your own images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def caption_folder(args):
    """Caption every image file in args.images with one checkpoint; print, and write a JSON file."""
    captioner, tokenizer, ckpt = load_captioner(args.checkpoint, lm=args.lm, device=args.device)
    paths = sorted(os.path.join(args.images, n) for n in os.listdir(args.images)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(args.images, n)))
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files in {args.images}")
    encoder = Encoder(ckpt["features"], args.device)
    skipped = []
    batches = image_batches(encoder, list(zip(paths, paths)), args.batch_size, skipped)  # the path is the id
    decoding = dict(method=args.method, beam=args.beam, max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    captions, captions_per_s = decode(captioner, tokenizer, batches, **decoding)
    for path, caption in captions.items():
        print(f"{path}\t{caption}")
    print(f"{len(captions)} image(s) captioned ({captions_per_s:.1f} captions/s), {len(skipped)} unreadable "
          f"skipped{': ' if skipped else ''}{', '.join(s['path'] for s in skipped)}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "captions_images.json")
    write_json(out_path, dict(checkpoint=args.checkpoint, decoding=decoding, captions=captions,
                              skipped=[dict(path=s["path"], reason=s["reason"]) for s in skipped],
                              captions_per_s=captions_per_s))
    print(f"wrote {out_path}", file=sys.stderr)
    return dict(captions=captions, skipped=skipped, path=out_path)

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare bridge checkpoints (table, JSON, plots), or caption a folder of your own images.",
        epilog="examples:\n"
               "  python evaluate.py --checkpoints runs/caption/{linear,xattn,qformer}/ckpt_final.pt "
               "--coco-root data/shapes --features data/cache/shapes_val --out results/\n"
               "  python evaluate.py --images my_photos/ --checkpoint runs/caption/qformer/ckpt_final.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", help="compare mode: bridge checkpoints (train_caption.py)")
    parser.add_argument("--images", default=None, help="folder mode: caption the jpg/png/webp/bmp files in DIR")
    parser.add_argument("--checkpoint", default=None, help="folder mode: the checkpoint to caption with")
    parser.add_argument("--coco-root", default="data/coco", help="a COCO-format root (COCO itself, or data/shapes)")
    parser.add_argument("--split", default=None, help="val (default) or, with --karpathy-json, test (default)/val")
    parser.add_argument("--karpathy-json", default=None, help="dataset_coco.json: evaluate on Karpathy's split")
    parser.add_argument("--features", default=None, help="a feature cache of the split (else: encode on the fly)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images")
    parser.add_argument("--lm", default=None, help="path of the frozen LM, if it moved since training")
    parser.add_argument("--out", default="results")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    # decoding
    parser.add_argument("--method", default="beam", choices=["greedy", "beam", "sample"])
    parser.add_argument("--beam", type=int, default=3, help="beam width (1 = greedy)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**this")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling only")
    parser.add_argument("--top-p", type=float, default=None, help="sampling only: nucleus size, e.g. 0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.images is None and not args.checkpoints:
        parser.error("give --checkpoints (compare mode) or --images DIR --checkpoint CKPT (folder mode)")
    if args.images is not None and args.checkpoint is None:
        parser.error("--images needs --checkpoint")
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    args.device = torch.device(args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.images is not None:
        return caption_folder(args)
    return compare(args)


if __name__ == "__main__":
    main()
