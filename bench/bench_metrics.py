"""
Metric speed: how long metrics.score_captions takes on a COCO-val-sized set (5,000 images x 5 references),
per stage, with the METEOR JVM's start-up timed on its own. The captions are synthetic, drawn from a small
vocabulary with a fixed seed; each prediction is one of its image's references with a few words changed, so
the scores land in a realistic range rather than at 0 or 1.

    python bench/bench_metrics.py                  # 5,000 images x 5 references
    python bench/bench_metrics.py --images 500     # quicker

The baseline is the JVM start itself: the reference project built a new Meteor() for every evaluation, so it
paid that start-up (and ~1.3 GB) each time; metrics.py pays it once per process.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402

ADJECTIVES = ["small", "large", "brown", "white", "black", "red", "young", "old", "wet", "happy"]
NOUNS = ["dog", "cat", "man", "woman", "horse", "bird", "car", "boat", "child", "train", "table", "field"]
VERBS = ["sitting", "standing", "running", "walking", "lying", "looking", "playing", "waiting"]
PLACES = ["on the grass", "in a field", "near the water", "on a street", "in the snow", "next to a building",
          "on a table", "under a tree", "at the beach", "in a kitchen"]


def synthetic_caption(rng):
    words = ["a", rng.choice(ADJECTIVES), rng.choice(NOUNS), "is", rng.choice(VERBS), rng.choice(PLACES)]
    if rng.random() < 0.5:
        words += ["with", "a", rng.choice(ADJECTIVES), rng.choice(NOUNS)]
    caption = " ".join(words)
    return caption[0].upper() + caption[1:] + "."  # as COCO references look: capital first letter, full stop


def perturbed(caption, rng, num_changes=2):
    words = caption.split()
    for _ in range(num_changes):
        words[rng.randrange(len(words))] = rng.choice(ADJECTIVES + NOUNS)
    return " ".join(words)


def jvm_rss_mb(proc):
    with open(f"/proc/{proc.pid}/status") as f:  # Linux only; the figure is informative, not needed
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images to score")
    parser.add_argument("--refs", type=int, default=5, help="reference captions per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    references = {i: [synthetic_caption(rng) for _ in range(args.refs)] for i in range(args.images)}
    predictions = {i: perturbed(rng.choice(refs), rng) for i, refs in references.items()}

    t0 = time.perf_counter()
    meteor = metrics.get_meteor()  # starts the JVM and waits for its first answer
    jvm_s = time.perf_counter() - t0
    print(f"METEOR JVM start: {jvm_s:.1f} s, {jvm_rss_mb(meteor.meteor_p):.0f} MB resident "
          "(once per process)")

    t0 = time.perf_counter()
    scores = metrics.score_captions(predictions, references)
    total_s = time.perf_counter() - t0
    print(f"\n{args.images} images x {args.refs} references, seconds per stage:")
    for stage, seconds in scores["seconds"].items():
        print(f"  {stage:<9} {seconds:7.2f}")
    print(f"  {'total':<9} {total_s:7.2f}   (+ {jvm_s:.1f} s JVM start on the first evaluation of a process)")
    print(f"METEOR jar after scoring: {jvm_rss_mb(meteor.meteor_p):.0f} MB resident")

    print("\nscores (synthetic captions: a sanity check, not a result):")
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        print(f"  {name:<8} {scores[name]:.3f}")
    print(f"  METEOR per image {scores['METEOR_mean']:.3f} ± {scores['METEOR_std']:.3f}, "
          f"95% CI {scores['METEOR_ci'][0]:.3f}-{scores['METEOR_ci'][1]:.3f}; "
          f"CIDEr 95% CI {scores['CIDEr_ci'][0]:.3f}-{scores['CIDEr_ci'][1]:.3f}")
