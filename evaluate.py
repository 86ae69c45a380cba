"""
Evaluate captioners: decode captions for a set of images, score them, compare bridges in one table.

    # table.md, results.json, captions_*.json, val_loss.png, grid_*.png, attention_*.png
    python evaluate.py --checkpoints runs/caption/linear/ckpt_final.pt \
        runs/caption/xattn/ckpt_final.pt runs/caption/qformer/ckpt_final.pt \
        --coco-root data/shapes --split val --features data/cache/shapes_val \
        --extra-scores data.shapes --out results/
    python evaluate.py --images my_photos/ --checkpoint runs/caption/qformer/ckpt_final.pt   # your own images
    # questions too: a VQA column (VQAv2's accuracy), and answers for your own images
    python evaluate.py --checkpoints ... \
        --questions data/shapes/annotations/v2_OpenEnded_shapes_val_questions.json
    python evaluate.py --images my_photos/ --checkpoint ... --question "what color is the shape on the left?"

In this file: decoding a set of images (the methods, greedy, sampling and beam search, are decoding.py's),
where the visual tokens come from, the blind baseline, the comparison, and captioning a folder. The metrics
(BLEU, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap) are metrics.py's, the pictures plots.py's. A data set
may add score columns of its own (--extra-scores; the miniature's check each caption against the scene it
drew).

The table carries a blind baseline: a checkpoint's frozen LM with no image at all, decoded the same way (its
first sentence after <|endoftext|>): the LM's caption prior, one row per distinct LM among the checkpoints. A
bridge that does not beat its LM's row clearly has not learned to use the image. With --questions, every row
also answers VQAv2-format questions about the images (the blind row: the question alone), scored by VQA
accuracy per answer type.
"""
import argparse
import errno
import importlib
import os
import re
import stat
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

import clip_loader
import plots
from bridges import Captioner, load_captioner
from common import (UsageError, autocast, best_device, check_writable, device_flag, finite_float,
                    nonneg_float, positive_int, probability, resolve_dtype, write_json)
from data import coco, feature_cache
from decoding import decode_batch
from metrics import METRICS, score_captions, score_vqa

# -----------------------------------------------------------------------------
# Decoding every image of a set (the methods themselves: decoding.py), timed


def decode(captioner, tokenizer, batches, method="beam", beam=3, max_new_tokens=30, length_penalty=1.0,
           temperature=1.0, top_p=None, seed=0, desc="decoding", dtype="fp32"):
    """
    Caption every image of `batches`, an iterable of (image_ids, visual (B, S, C_vis)) (see batches() below).
    Returns ({image_id: caption text}, captions per second).
    Captions/s times the decoding only (conditioning included), not the reading or encoding of the images.
    Sampling draws from one generator seeded with `seed`: the same seed, batches and device give the same
    captions.
    dtype: the autocast dtype ("bf16" on a GPU; the KV cache then holds bf16 too).
    """
    device = next(captioner.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if method == "sample" else None
    captions, seconds, warm = {}, 0.0, False
    for image_ids, visual in tqdm(batches, desc=desc, unit="batch", leave=False):
        visual = visual.to(device)
        with autocast(device.type, dtype):
            if not warm:  # one untimed run first, so that warming up stays outside the timing
                _warm_up(captioner, visual, method, beam, max_new_tokens, length_penalty, temperature, top_p,
                         seed)
                warm = True
            _sync(device)
            t0 = time.perf_counter()
            token_lists = decode_batch(captioner, visual, method, beam, max_new_tokens, length_penalty,
                                       temperature, top_p, generator)
            _sync(device)
        seconds += time.perf_counter() - t0
        for image_id, caption_tokens in zip(image_ids, token_lists):
            # ids past the tokenizer's (vocabulary padded to 50,304) are never generated; never decoded either
            captions[image_id] = tokenizer.decode([t for t in caption_tokens
                                                   if t < tokenizer.n_vocab]).strip()
    return captions, len(captions) / max(seconds, 1e-9)


def _warm_up(captioner, visual, method, beam, max_new_tokens, length_penalty, temperature, top_p, seed):
    """
    An untimed decoding run: the allocator, the kernels and their caches warm up. On CUDA the whole first
    batch, since cuDNN's attention plans a kernel for every new shape (each step's cache length, at this batch
    size) and a cold pass is several times slower (docs/full-scale.md); elsewhere one image for two tokens.
    Its own generator: the timed run's samples are the same with or without it.
    """
    cuda = visual.device.type == "cuda"
    decode_batch(captioner, visual if cuda else visual[:1], method, beam, max_new_tokens if cuda else 2,
                 length_penalty, temperature, top_p, torch.Generator(device=visual.device).manual_seed(seed))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# -----------------------------------------------------------------------------
# Where the visual tokens come from: a feature cache of the images, or the checkpoint's own encoder


def check_features(cache, spec, ckpt_path):
    """ValueError unless the feature cache holds the features (spec) the checkpoint was trained on."""
    try:
        cache.check_compatible(spec)
    except ValueError as e:
        raise ValueError(f"{ckpt_path} was trained on other features than the cache holds: {e}. Build a "
                         f"cache of the checkpoint's features (python data/feature_cache.py --encoder "
                         f"{spec.encoder} --layer {spec.layer} --pool {spec.grid[0]}x{spec.grid[1]} ...), or "
                         f"drop --features to encode the images on the fly.") from e


def encoded_images(spec, records, device, dtype="fp32"):
    """The visual source a checkpoint's features describe: its encoder, pooled as it was trained."""
    images = feature_cache.EncodedImages(clip_loader.load_clip(spec.encoder, layer=spec.layer), spec.grid,
                                         records, device, dtype)
    if images.spec != spec:  # the encoder's folder now holds another model
        raise ValueError(f"the encoder {spec.encoder} no longer makes the features it was trained on: "
                         f"{'; '.join(images.spec.differences(spec))}")
    return images


def batches(source, image_ids, batch_size):
    """(image ids, visual tokens (B, S, C)) batches of a visual source; unreadable images are left out."""
    for i in range(0, len(image_ids), batch_size):
        ids, visual = source.tokens(image_ids[i:i + batch_size])
        if ids:
            yield ids, visual

# -----------------------------------------------------------------------------
# The blind baseline: the frozen LM with no image at all


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


def blind_of(captioner):
    """The blind baseline of a captioner: its frozen LM behind NoImage."""
    return Captioner(captioner.lm, NoImage(), captioner.eot, n_vocab=captioner.n_vocab).eval()


def blind_captions(captioner, tokenizer, image_ids, batch_size, decoding, dtype):
    """The blind baseline's captions of image_ids (its LM is the captioner's), and its captions/s."""
    blind = blind_of(captioner)
    nothing = torch.zeros(0, 0)  # (0, 0) per image: the blind captioner reads nothing
    chunks = ((image_ids[i:i + batch_size], nothing.expand(len(image_ids[i:i + batch_size]), 0, 0))
              for i in range(0, len(image_ids), batch_size))
    captions, captions_per_s = decode(blind, tokenizer, chunks, desc="blind", dtype=dtype, **decoding)
    return {i: first_sentence(c) for i, c in captions.items()}, captions_per_s

# -----------------------------------------------------------------------------
# Questions about the images: each answered after its question, greedily, scored by VQAv2's accuracy

ANSWER_TOKENS = 10  # VQAv2's answers are a word or three


def answer_of(text):
    """An answer as decoded, up to the end of its first sentence: the blind LM goes on to another question."""
    return re.split(r"\.(?:\s|$)|\n|Question:", text)[0].strip()


def answer_questions(captioner, tokenizer, questions, source, batch_size, dtype, desc="answering",
                     before=None):
    """
    ({question_id: answer}, answers per second) for data.coco.load_vqa's records; source None: no image (the
    blind row). Each batch holds questions of one prompt length, so every row reads its question at the same
    positions and no padding comes between a question and its answer. Timed as decode() times captions.
    before: {image_id: text} put before each question about that image (miniature/qa_probe.py's captions).
    """
    device = next(captioner.parameters()).device
    prompts = {q["question_id"]: question_tokens(tokenizer, q, before[q["image_id"]] if before else "")
               for q in questions}
    by_length = {}
    for q in sorted(questions, key=lambda q: q["image_id"]):  # an image's questions side by side: read once
        by_length.setdefault(len(prompts[q["question_id"]]), []).append(q)
    answers, seconds = {}, 0.0
    chunks = [group[i:i + batch_size] for group in by_length.values()
              for i in range(0, len(group), batch_size)]
    for chunk in tqdm(chunks, desc=desc, unit="batch", leave=False):
        if source is None:
            visual = torch.zeros(len(chunk), 0, 0)  # (B, 0, 0): the blind captioner reads nothing
        else:  # each image of the batch read (or encoded) once; unreadable images: left out
            kept, visual = source.tokens(sorted({q["image_id"] for q in chunk}))
            row = {image_id: i for i, image_id in enumerate(kept)}
            chunk = [q for q in chunk if q["image_id"] in row]
            visual = visual[[row[q["image_id"]] for q in chunk]]  # (B, S, C): one row per question
        prompt = torch.tensor([prompts[q["question_id"]] for q in chunk], device=device)  # (B, m)
        with autocast(device.type, dtype):
            _sync(device)
            t0 = time.perf_counter()
            token_lists = decode_batch(captioner, visual.to(device), "greedy", max_new_tokens=ANSWER_TOKENS,
                                       prompt=prompt)
            _sync(device)
        seconds += time.perf_counter() - t0
        for q, tokens in zip(chunk, token_lists):
            text = tokenizer.decode([t for t in tokens if t < tokenizer.n_vocab])
            answers[q["question_id"]] = answer_of(text)
    return answers, len(answers) / max(seconds, 1e-9)


def question_tokens(tokenizer, q, before=""):
    """The prompt's tokens (after `before`); a word the LM never saw (a --vocab-subset LM) is an error naming
    the question."""
    try:
        return tokenizer.encode_ordinary(before + coco.qa_prompt(q["question"]))
    except ValueError as e:
        raise ValueError(f"question {q['question_id']} ({q['question']!r}) cannot be put to this LM: {e}. "
                         f"Its LM must have read such questions: the miniature's is pretrained on "
                         f"corpus_qa.jsonl (data/shapes.py --questions)") from e


def vqa_row(answers, questions):
    """The VQA scores of a row: accuracy, its interval, per answer type, and per question type (results.json
    only: VQAv2 has 65 of them, the miniature 7)."""
    scores = score_vqa(answers, [q for q in questions if q["question_id"] in answers])
    kind = {q["question_id"]: q.get("question_type") for q in questions}
    by_kind = {}
    for question_id, accuracy in zip(scores["question_ids"], scores["per_question"].tolist()):
        by_kind.setdefault(kind[question_id], []).append(accuracy)
    return dict(VQA=scores["accuracy"], VQA_ci=list(scores["accuracy_ci"]), questions=len(answers),
                VQA_types={t: s["accuracy"] for t, s in scores["per_answer_type"].items()},
                VQA_question_types={str(k): sum(v) / len(v) for k, v in sorted(by_kind.items(), key=str)})

# -----------------------------------------------------------------------------
# The comparison: several bridge checkpoints on the same images, one table


def run_name(path, taken):
    """A short, unique name for a checkpoint: its run folder (runs/caption/<name>/ckpt_final.pt)."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "ckpt"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def evaluation_set(args):
    """
    The records to caption: ([{"image_id", "path", "captions"}, ...], split, a description of the split).
    """
    split = args.split or ("test" if args.karpathy_json else "val")
    records = coco.load_records(args.coco_root, split, args.karpathy_json)
    records = [r for r in records if r["captions"]]  # an image without references cannot be scored
    if args.max_images:
        records = records[:args.max_images]
    if not records:
        raise ValueError(f"no captioned images in {args.coco_root} split {split}")
    where = f"Karpathy {split} ({args.karpathy_json})" if args.karpathy_json else f"COCO-format {split}2017"
    return records, split, where


def in_cache(records, cache, path, where):
    """
    The records whose image the feature cache holds. Images it skipped as unreadable when it was built are
    left out (and said so); any other image missing means a cache of another split: an error, never a silent
    shrink (a Karpathy-test row scored on the 600 of its 5,000 images that happen to be in val2017 would be a
    lie).
    """
    missing = [r for r in records if r["image_id"] not in cache]
    absent = [r for r in missing if r["image_id"] not in cache.unreadable]
    if absent:
        raise ValueError(f"{len(absent)} of the {len(records)} images of {where} are not in the feature "
                         f"cache {path} (e.g. {absent[0]['path']}): it was built from another split. Build "
                         f"one from these images: python data/feature_cache.py --split ... (with the same "
                         f"--karpathy-json), or drop --features")
    if missing:
        print(f"{len(missing)} image(s) unreadable when the cache was built, left out: "
              f"{[r['path'] for r in missing[:5]]}", file=sys.stderr)
    return [r for r in records if r["image_id"] in cache]


KARPATHY_FIX = ("Karpathy's val and test images come from COCO 2014 val, and most of those are in train2017: "
                "for Karpathy-test numbers, cache features and train with --karpathy-json (his train split); "
                "to evaluate a model trained on all of train2017, use COCO 2017 val (no --karpathy-json).")
VQA_FIX = ("VQAv2's val questions are about COCO 2014 val images, and most of those are in train2017 (and in "
           "Karpathy's train split): to score VQAv2 val, train on VQAv2 train's questions alone (--task "
           "questions: COCO 2014 train images), not on COCO 2017's or Karpathy's train captions.")


def check_unseen(ckpt, image_ids, path, where, fix=KARPATHY_FIX):
    """ValueError if the checkpoint was trained on any image it is about to be scored on (a leak)."""
    trained_on = ckpt.get("trained_on")
    if trained_on is None:
        print(f"warning: {path} records no training images: cannot check that {where} was not trained on",
              file=sys.stderr)
        return
    seen = set(trained_on["image_ids"].tolist())
    image_ids = sorted(set(image_ids))
    overlap = [i for i in image_ids if i in seen]
    if overlap:
        raise ValueError(f"{path} was trained on {len(overlap)} of the {len(image_ids)} images of {where} "
                         f"(e.g. COCO id {overlap[0]}): scores on them measure memory, not seeing. {fix}")


def question_set(args, split, cache, records):
    """--questions' records (None without): about images the feature cache holds, when there is one, and with
    --max-images about those of `records` (evaluation_set's)."""
    if not args.questions:
        return None
    questions = coco.question_records(args.questions, args.answers, args.coco_root, split)
    if args.max_images:  # the questions about the images scored
        first = {r["image_id"] for r in records}
        questions = [q for q in questions if q["image_id"] in first]
    if cache is not None:
        questions = in_cache(questions, cache, args.features, f"the questions of {args.questions}")
    if not questions:
        raise ValueError(f"{args.questions}: no questions about the images evaluated")
    return questions


def write_answers(path, answers, questions):
    """Each question's answer beside the humans' (for reading, as captions_*.json are)."""
    by_id = {q["question_id"]: q for q in questions}
    write_json(path, {str(i): dict(question=by_id[i]["question"], answer=a, answers=by_id[i]["answers"])
                      for i, a in answers.items()})


def extra_scorer(module, root, split):
    """
    A data set's own score columns, beyond the reference captions (the miniature checks every caption against
    the scene it drew), or None. --extra-scores names a module whose extra_scores(root, split) returns None or
    (column names, score, about): score({image_id: caption}) -> {column: value}; about, a sentence for the
    table.
    """
    return importlib.import_module(module).extra_scores(root, split) if module else None


def score_row(name, captions, references, metrics, extra):
    """Metrics of one set of captions (and the data set's extra scores), as a table row."""
    scores = score_captions(captions, {i: references[i] for i in captions}, metrics)
    row = dict(bridge=name, images=len(captions))
    for key in ("BLEU-4", "METEOR", "METEOR_mean", "METEOR_std", "METEOR_ci", "ROUGE-L", "CIDEr", "CIDEr_ci"):
        if key in scores:
            row[key] = list(scores[key]) if isinstance(scores[key], tuple) else scores[key]
    if extra is not None:
        row["attributes"] = extra[1](captions)
    return row


def compare(args):
    """
    Evaluate every checkpoint (and the blind baseline) on one image set; write args.out (see the docstring).
    """
    check_writable(args.out, "--out")  # now, not after the decoding and scoring
    records, split, where = evaluation_set(args)
    cache = feature_cache.FeatureCache(args.features) if args.features else None
    questions = question_set(args, split, cache, records)
    if cache is not None:
        records = in_cache(records, cache, args.features, where)
    references = {r["image_id"]: r["captions"] for r in records}
    extra = extra_scorer(args.extra_scores, args.coco_root, split)
    decoding = dict(method=args.method, beam=args.beam, max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)
    print(f"evaluating {len(args.checkpoints)} checkpoint(s) on {len(records)} images of {where}; "
          f"decoding {decoding}", file=sys.stderr)

    # Decode every checkpoint first, then score: captions/s then times decoding with nothing else running in
    # the process (the METEOR JVM, started by the first scoring, would otherwise compete for the cores).
    runs, sources, names = [], {}, set()
    for path in args.checkpoints:
        captioner, tokenizer, ckpt = load_captioner(path, lm=args.lm, device=args.device)
        check_unseen(ckpt, [r["image_id"] for r in records], path, where)
        if questions:  # the images the questions are about (COCO 2014's, for VQAv2) must be unseen too
            check_unseen(ckpt, [q["image_id"] for q in questions], path, f"the questions of {args.questions}",
                         VQA_FIX)
        spec = clip_loader.VisualFeatures.from_dict(ckpt["visual_features"], path)
        if cache is not None:
            check_features(cache, spec, path)
            source = cache
        else:  # one encoder per distinct kind of features, shared by the checkpoints that read them
            source = sources[spec] = sources.get(spec) or encoded_images(spec, records, args.device,
                                                                         args.dtype)
        name = run_name(path, names)
        captions, captions_per_s = decode(captioner, tokenizer,
                                          batches(source, list(references), args.batch_size),
                                          desc=name, dtype=args.dtype, **decoding)
        runs.append(dict(name=name, path=path, captioner=captioner, tokenizer=tokenizer, ckpt=ckpt,
                         captions=captions, source=source, captions_per_s=captions_per_s))
        print(f"{name}: {captions_per_s:.1f} captions/s", file=sys.stderr)
        if questions:
            runs[-1]["answers"], answers_per_s = answer_questions(captioner, tokenizer, questions, source,
                                                                  args.batch_size, args.dtype, desc=name)
            print(f"{name}: {answers_per_s:.1f} answers/s", file=sys.stderr)
    # The blind baseline: if a bridge's scores are not clearly above its LM's row, the bridge has not learned
    # to use the image: everything it gets right, the LM guesses on its own. One row per distinct frozen LM:
    # bridges on two LMs have two priors to beat.
    blinds = []
    for first in first_run_of_each_lm(runs):
        captions, captions_per_s = blind_captions(first["captioner"], first["tokenizer"],
                                                  list(first["captions"]), args.batch_size, decoding,
                                                  args.dtype)
        blinds.append(dict(run=first, captions=captions, captions_per_s=captions_per_s))
        if questions:  # the question alone: what the LM answers without looking
            blinds[-1]["answers"], _ = answer_questions(blind_of(first["captioner"]), first["tokenizer"],
                                                        questions, None, args.batch_size, args.dtype,
                                                        desc="blind")

    clear_outputs(args.out)  # only now: a run refused above (a leak, other features) leaves the old results
    rows = []
    for run in runs:
        captioner, ckpt, captions = run["captioner"], run["ckpt"], run["captions"]
        row = score_row(run["name"], captions, references, args.metrics, extra)
        params = ckpt.get("params") or captioner.param_counts()
        row.update(kind=ckpt["bridge_config"]["kind"], checkpoint=run["path"], step=ckpt.get("step"),
                   params=params, trainable_params=sum(p["trainable"] for p in params.values() if p),
                   total_params=sum(p["total"] for p in params.values() if p),
                   train_seconds=ckpt.get("train_seconds"), captions_per_s=run["captions_per_s"],
                   val_loss=final_val_loss(ckpt, run["path"]), seed=ckpt.get("args", {}).get("seed"))
        if hasattr(captioner.bridge, "attention_maps"):
            row["query_similarity"] = query_similarity(captioner, run["source"], list(captions)[:100],
                                                       args.device)
        rows.append(row)
        write_json(os.path.join(args.out, f"captions_{run['name']}.json"),
                   {str(i): dict(caption=c, references=references[i]) for i, c in captions.items()})
        if questions:
            row.update(vqa_row(run["answers"], questions))
            write_answers(os.path.join(args.out, f"answers_{run['name']}.json"), run["answers"], questions)
        print(f"{run['name']}: CIDEr {row.get('CIDEr', float('nan')):.3f}", file=sys.stderr)
    for blind in blinds:
        first, captions = blind["run"], blind["captions"]
        row = score_row(f"blind (frozen LM of {first['name']}, no image)", captions, references, args.metrics,
                        extra)
        row.update(kind="blind", checkpoint=first["path"], lm=first["ckpt"]["lm"]["name"],
                   captions_per_s=blind["captions_per_s"], blind=True)
        rows.append(row)
        name = "blind.json" if len(blinds) == 1 else f"blind_{first['name']}.json"
        write_json(os.path.join(args.out, "captions_" + name),
                   {str(i): dict(caption=c, references=references[i]) for i, c in captions.items()})
        if questions:
            row.update(vqa_row(blind["answers"], questions))
            write_answers(os.path.join(args.out, "answers_" + name), blind["answers"], questions)

    pictures = draw_pictures(args, runs, records)
    skipped = {s["image_id"]: s for source in sources.values() for s in source.skipped}
    scored = len(runs[0]["captions"])  # images left out as unreadable are not in any row
    result = dict(split=split, where=where, images=scored, skipped=list(skipped.values()), decoding=decoding,
                  metrics=list(args.metrics), features=args.features, device=str(args.device), rows=rows,
                  pictures=[p for p in pictures if p], questions=args.questions)
    write_json(os.path.join(args.out, "results.json"), result)
    table = markdown_table(rows, decoding, where, scored, extra)
    if questions:
        table += vqa_table(rows, args.questions)
    note = single_image_cider_note(scored, args.metrics)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
        table += f"\n{note}\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return result


def first_run_of_each_lm(runs):
    """The first run on each distinct frozen LM (told apart by its weights' fingerprint), in order."""
    firsts = {}
    for run in runs:
        firsts.setdefault(run["ckpt"]["lm"]["fingerprint"], run)
    return list(firsts.values())


def single_image_cider_note(images, metrics):
    """
    Why every CIDEr is 0.000, when it is: CIDEr's idf comes from the references of the images scored, so on
    one image every n-gram is in all of them (1 of 1) and its idf is log(1) = 0. None otherwise.
    """
    if images != 1 or "cider" not in metrics:
        return None
    return ("CIDEr is 0.000 on every row because only one image was scored: its idf comes from the "
            "references of the images scored, and with one image every n-gram's is log(1) = 0. CIDEr needs "
            "at least two images: score more (e.g. drop --max-images 1).")


def clear_outputs(out):
    """
    Delete what an earlier comparison wrote into out (its table, JSON, captions and pictures): a folder reused
    for other checkpoints would otherwise keep an old bridge's captions and grids beside the new ones, in the
    table's folder but not in its table. Other files (and folder mode's captions_images.json) are left alone.
    """
    old = sorted(f for f in os.listdir(out) if f in ("table.md", "results.json", "val_loss.png") or
                 (f.startswith(("captions_", "answers_", "grid_", "attention_"))
                  and f.endswith((".json", ".png"))
                  and f != "captions_images.json"))
    for name in old:
        os.remove(os.path.join(out, name))
    if old:
        print(f"{out}: deleted {len(old)} file(s) of an earlier evaluation ({', '.join(old[:4])}"
              f"{' ...' if len(old) > 4 else ''})", file=sys.stderr)


@torch.no_grad()
def query_similarity(captioner, source, image_ids, device):
    """
    How alike the queries' attention maps are: the mean cosine similarity over pairs of queries of their
    last-layer attention over the visual tokens (heads averaged), over the images. 1.0: every query reads the
    same tokens (collapsed queries, or uniform attention); lower as they specialise. A number, so a collapse
    shows in the table.
    """
    _, visual = source.tokens(image_ids)
    weights = captioner.bridge.attention_maps(captioner.standardized(visual.to(device))).mean(1)  # (B, Q, S)
    w = F.normalize(weights.float(), dim=-1)
    sim = w @ w.transpose(1, 2)  # (B, Q, Q); its diagonal is all ones
    Q = sim.size(1)
    return ((sim.sum((1, 2)) - Q) / (Q * (Q - 1))).mean().item() if Q > 1 else 1.0


def draw_pictures(args, runs, records):
    """val_loss.png, a caption grid per run, and attention maps for every bridge that offers them."""
    pictures = [plots.plot_val_loss([r["path"] for r in runs], [r["name"] for r in runs],
                                    os.path.join(args.out, "val_loss.png"))]
    by_id = {r["image_id"]: r for r in records}
    for run in runs:
        shown = [by_id[i] for i in list(run["captions"])[:9]]
        pictures.append(plots.plot_grid(shown, run["captions"],
                                        os.path.join(args.out, f"grid_{run['name']}.png"), run["name"]))
        if hasattr(run["captioner"].bridge, "attention_maps"):
            shown = shown[:3]
            _, visual = run["source"].tokens([r["image_id"] for r in shown])
            pictures.append(plots.plot_attention(run["captioner"], visual, shown, run["source"].spec.grid,
                                                 os.path.join(args.out, f"attention_{run['name']}.png"),
                                                 run["name"]))
    return pictures


def final_val_loss(ckpt, path):
    """The checkpoint's own val loss, else the last one in the log beside it."""
    if ckpt.get("val_loss") is not None:
        return float(ckpt["val_loss"])
    losses = [r["val_loss"] for r in plots.read_log(os.path.join(os.path.dirname(path), "log.jsonl"))
              if "val_loss" in r]
    return float(losses[-1]) if losses else None


def _fmt_params(n):
    return "—" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def markdown_table(rows, decoding, where, images, extra=None):
    """The comparison as a markdown table, with what was measured and how written above it."""
    method = decoding["method"]
    how = {"greedy": "greedy",
           "beam": f"beam {decoding['beam']} (length penalty {decoding['length_penalty']})",
           "sample": f"sampling (temperature {decoding['temperature']}, top-p {decoding['top_p']}, "
                     f"seed {decoding['seed']})"}
    lines = [f"{images} images of {where}, {how[method]}, at most {decoding['max_new_tokens']} tokens.",
             "Params: trainable / total (encoder + bridge + LM). METEOR: corpus score, then "
             "per-image mean ± std. CIDEr (CIDEr-D) with its 95% bootstrap interval over images.",
             "A blind row is a checkpoint's frozen LM with no image at all (its first sentence after "
             "<|endoftext|>): what the LM guesses without looking; one per distinct LM, named after the "
             "first checkpoint trained on it. Captions/s: decoding alone, nothing else running. Query "
             "similarity (bridges with queries): mean cosine similarity of the queries' attention maps, "
             "1.0 = every query reads the same tokens."]
    columns = extra[0] if extra else ()
    if extra:
        lines.append(extra[2])
    lines.append("")
    header = ["bridge", "trainable / total params", "train time", "val loss", "BLEU-4", "METEOR",
              "METEOR mean ± std", "CIDEr [95% CI]", "captions/s", "query similarity", *columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seconds = row.get("train_seconds")
        cells = [row["bridge"],
                 "—" if row.get("blind") else (f"{_fmt_params(row['trainable_params'])} / "
                                               f"{_fmt_params(row['total_params'])}"),
                 "—" if seconds is None else f"{seconds / 60:.1f} min",
                 _fmt(row.get("val_loss")), _fmt(row.get("BLEU-4")), _fmt(row.get("METEOR")),
                 "—" if "METEOR_mean" not in row else f"{row['METEOR_mean']:.3f} ± {row['METEOR_std']:.3f}",
                 "—" if "CIDEr" not in row else (f"{row['CIDEr']:.3f} "
                                                 f"[{row['CIDEr_ci'][0]:.3f}, {row['CIDEr_ci'][1]:.3f}]"),
                 f"{row['captions_per_s']:.1f}", _fmt(row.get("query_similarity"), ".2f")]
        cells += [f"{row['attributes'].get(a, 0.0):.2f}" for a in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

def vqa_table(rows, path):
    """The VQA scores of every row as a second markdown table."""
    types = sorted({t for row in rows for t in row.get("VQA_types", {})})
    lines = ["", f"VQA accuracy (VQAv2's: min(humans who gave the answer / 3, 1), averaged over the 10 "
             f"leave-one-out sets, after its answer normalisation) on the questions of {path}, greedy, at "
             f"most {ANSWER_TOKENS} tokens, with its 95% bootstrap interval over questions. The blind row "
             f"answers the question alone.", "",
             "| bridge | questions | VQA [95% CI] | " + " | ".join(types) + " |",
             "|" + "---|" * (3 + len(types))]
    for row in rows:
        if "VQA" in row:
            low, high = row["VQA_ci"]
            cells = [row["bridge"], str(row["questions"]), f"{row['VQA']:.3f} [{low:.3f}, {high:.3f}]"]
            cells += [_fmt(row["VQA_types"].get(t)) for t in types]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# Captioning a folder of your own images

# Pillow reads them all; a GIF or a multi-page TIFF is captioned by its first frame
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def caption_folder(args):
    """Caption every image file in args.images with one checkpoint; print, and write a JSON file."""
    captioner, tokenizer, ckpt = load_captioner(args.checkpoint, lm=args.lm, device=args.device)
    check_writable(args.out, "--out")  # now, not after the decoding
    paths, passed_over = list_images(args.images)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files in {args.images}"
                                f"{'; ' + named(passed_over) if passed_over else ''}")
    spec = clip_loader.VisualFeatures.from_dict(ckpt["visual_features"], args.checkpoint)
    source = encoded_images(spec, [dict(image_id=p, path=p) for p in paths], args.device, args.dtype)
    decoding = dict(method=args.method, beam=args.beam, max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)
    captions, captions_per_s = decode(captioner, tokenizer, batches(source, paths, args.batch_size),
                                      dtype=args.dtype, **decoding)
    answers = {}
    if args.question:  # the same question about every image
        asked = [dict(question_id=p, image_id=p, question=args.question) for p in captions]
        answers, _ = answer_questions(captioner, tokenizer, asked, source, args.batch_size, args.dtype)
    for path, caption in captions.items():
        print(f"{one_line(path)}\t{one_line(caption)}" + (f"\t{one_line(answers[path])}" if answers else ""))
    skipped = source.skipped
    print(f"{len(captions)} image(s) captioned ({captions_per_s:.1f} captions/s), {len(skipped)} unreadable "
          f"skipped{': ' if skipped else ''}{', '.join(one_line(s['path']) for s in skipped)}; "
          f"{named(passed_over)}", file=sys.stderr)
    out_path = os.path.join(args.out, "captions_images.json")
    write_json(out_path, dict(checkpoint=args.checkpoint, decoding=decoding, captions=captions,
                              question=args.question, answers=answers,
                              skipped=[dict(path=s["path"], reason=s["reason"]) for s in skipped],
                              passed_over=passed_over, captions_per_s=captions_per_s))
    print(f"wrote {out_path}", file=sys.stderr)
    return dict(captions=captions, skipped=skipped, passed_over=passed_over, path=out_path)


def list_images(folder):
    """
    The image files directly in folder, sorted, and everything else there with the reason it is not captioned:
    ([path, ...], [{"path", "reason"}, ...]). Nothing is passed over in silence: a photo in a subfolder or
    behind a broken link would otherwise just be missing from the output.
    """
    paths, passed_over = [], []
    for name in sorted(os.listdir(folder)):
        # hidden files are the system's, not the user's photos (.DS_Store, .thumbnails/, and macOS's ._x.jpg
        # copies of a file's metadata, which carry an image's name but are not images): left out, not named
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        reason = not_an_image(path)
        if reason is None:
            paths.append(path)
        else:
            passed_over.append(dict(path=path, reason=reason))
    return paths, passed_over


def not_an_image(path):
    """Why path is not an image file to caption, or None if it is one."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to an image is an image
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling link" if os.path.islink(path) else f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder (subfolders are not searched)"
    if not stat.S_ISREG(mode):  # a named pipe would block the reader forever
        return "not a regular file"
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file extension"
    return None


def named(passed_over, shown=10):
    """'N passed over: path (reason), ...', naming the first `shown` (captions_images.json lists them all)."""
    listed = ", ".join(f"{one_line(p['path'])} ({p['reason']})" for p in passed_over[:shown])
    more = f" and {len(passed_over) - shown} more" if len(passed_over) > shown else ""
    return f"{len(passed_over)} passed over{': ' if passed_over else ''}{listed}{more}"


def one_line(text):
    """
    text as printed in a `path<TAB>caption` line: a file name may hold a newline or a tab, which would split
    one image over two lines or fields, so such a name is printed as Python's repr ('a\\nb.jpg'), quoted and
    escaped. The JSON file keeps the real name.
    """
    return text if text.isprintable() else repr(text)

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare bridge checkpoints (table, JSON, plots), "
                    "or caption a folder of your own images.",
        epilog="examples:\n"
               "  python evaluate.py --checkpoints runs/caption/{linear,xattn,qformer}/ckpt_final.pt "
               "--coco-root data/shapes --features data/cache/shapes_val --out results/\n"
               "  python evaluate.py --images my_photos/ --checkpoint runs/caption/qformer/ckpt_final.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+",
                        help="compare mode: bridge checkpoints (train_caption.py)")
    parser.add_argument("--images", default=None,
                        help="folder mode: caption the jpg/png/webp/bmp/gif/tif files in DIR "
                             "(not in its subfolders)")
    parser.add_argument("--checkpoint", default=None, help="folder mode: the checkpoint to caption with")
    parser.add_argument("--coco-root", default="data/coco",
                        help="a COCO-format root (COCO itself, or data/shapes)")
    parser.add_argument("--split", default=None,
                        help="val (default) or, with --karpathy-json, test (default)/val")
    parser.add_argument("--karpathy-json", default=None,
                        help="dataset_coco.json: evaluate on Karpathy's split")
    parser.add_argument("--features", default=None,
                        help="a feature cache of the split (else: encode on the fly)")
    parser.add_argument("--questions", default=None,
                        help="also answer these VQAv2-format questions about the split's images "
                             "(v2_OpenEnded_*_questions.json): a VQA column")
    parser.add_argument("--answers", default=None,
                        help="their annotations file (default: found next to --questions by VQAv2's naming)")
    parser.add_argument("--question", default=None, help="folder mode: also ask this about every image")
    parser.add_argument("--max-images", type=positive_int, default=None, help="only the first N images")
    parser.add_argument("--lm", default=None, help="path of the frozen LM, if it moved since training")
    parser.add_argument("--out", default="results")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--extra-scores", default=None, metavar="MODULE",
                        help="a module offering the data set's own score columns (the miniature: "
                             "data.shapes, which checks each caption against the scene it drew)")
    # decoding
    parser.add_argument("--method", default="beam", choices=["greedy", "beam", "sample"])
    parser.add_argument("--beam", type=positive_int, default=3, help="beam width (1 = greedy)")
    parser.add_argument("--length-penalty", type=finite_float, default=1.0,
                        help="beam score = logprob / length**this")
    parser.add_argument("--max-new-tokens", type=positive_int, default=30)
    parser.add_argument("--temperature", type=nonneg_float, default=1.0, help="sampling only (0: greedy)")
    parser.add_argument("--top-p", type=probability, default=None,
                        help="sampling only: nucleus size, e.g. 0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", type=device_flag, default=best_device(),
                        help="cuda / mps / cpu (default: the best present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype for encoding and decoding "
                             "(auto: bf16 on GPUs that have it, else fp32)")
    args = parser.parse_args(argv)
    if args.images is None and not args.checkpoints:
        parser.error("give --checkpoints (compare mode) or --images DIR --checkpoint CKPT (folder mode)")
    if args.images is not None and args.checkpoint is None:
        parser.error("--images needs --checkpoint")
    if args.question is not None and args.images is None:
        parser.error("--question is folder mode's (--images DIR); to score questions, --questions FILE")
    if args.questions and args.karpathy_json:
        parser.error("--questions with --karpathy-json: VQAv2's questions are about COCO 2014's own val "
                     "images; evaluate them without --karpathy-json")
    if args.extra_scores:  # a module that is not there, or offers no hook, is a mistyped flag: say so now
        try:
            hook = getattr(importlib.import_module(args.extra_scores), "extra_scores", None)
        except ImportError as e:
            parser.error(f"--extra-scores {args.extra_scores}: {e}")
        if not callable(hook):
            parser.error(f"--extra-scores {args.extra_scores}: the module has no extra_scores(root, split) "
                         f"(data.shapes is the miniature's)")
    args.device = torch.device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device.type)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        return caption_folder(args) if args.images is not None else compare(args)
    except UsageError as e:  # a flag that does not fit (an --out it cannot write): exit as argparse does
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
