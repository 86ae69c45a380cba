"""
Train any bridge (see bridges.BRIDGES) between a frozen vision encoder and a frozen GPT, with one loop.

    # the real run: one epoch of COCO 2017 train on cached CLIP ViT-L/14 features, OpenAI's GPT-2 as the LM
    python train_caption.py --bridge qformer --lm gpt2 --coco-root data/coco \\
        --features data/cache/coco_train_L14 --val-features data/cache/coco_val_L14
    torchrun --standalone --nproc_per_node=4 train_caption.py --bridge xattn ...     # several GPUs
    # without a feature cache the encoder runs on every batch (slower; see bench/bench_caption.py)
    python train_caption.py --bridge linear --lm runs/lm/ckpt_019073.pt --coco-root data/coco

    # questions about the images (VQAv2's files; the answers file is found next to the questions by its name)
    python train_caption.py --bridge qformer --task mix \
        --questions data/vqa/v2_OpenEnded_mscoco_train2014_questions.json ...

One example is one (image, caption) pair: COCO's ~118k train images x ~5 captions = ~590k examples per epoch.
With --task questions or mix, an example may instead be (image, question, answer): the LM reads the question
after the image (data.coco.qa_prompt: "Question: ... Answer:") and the loss covers the answer alone.
Only the bridge trains (plus the last --unfreeze-last GPT blocks, if asked): the LM and the encoder are
frozen, so they get no gradient and no optimizer state. Writes to --out-dir (default runs/caption/<bridge>):
log.jsonl and checkpoints ckpt_<step>.pt / ckpt_final.pt, read by bridges.load_captioner and by --resume
(checkpoints.py).
"""
import argparse
import dataclasses
import os
import re
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip_loader
import qformer_stage1
from bridges import BRIDGES, BridgeConfig, build_captioner, caption_batch, lm_fingerprint
from checkpoints import RunFolder, rng_state
from common import UsageError, autocast, natural_int, nonneg_float, positive_float, positive_int, to_device
from data import coco, feature_cache
from gpt2 import decay_groups, load_lm
from train_utils import (add_run_flags, check_finite, enable_speedups, format_eta, grad_scaler, launch, lr_at,
                         mean_over_processes, micro_batches, print0)

# -----------------------------------------------------------------------------
# The training loop: one optimizer step = grad_accum micro-batches of pairs on each process


def train(args, dist):
    job = setup(args, dist)  # the captioner, its optimizer, its pairs, the run folder: see below
    captioner, model, optimizer, scaler, run = job.captioner, job.model, job.optimizer, job.scaler, job.run
    B, grad_accum, start_step, end_step, max_steps = args.batch_size, job.grad_accum, *job.steps
    if start_step >= end_step:
        print0(f"{run.resumed_from} is at step {start_step}: nothing left to train up to step {end_step}")
        return captioner
    bar = tqdm(range(start_step, end_step), initial=start_step, total=max_steps, desc=args.bridge,
               disable=not dist.master, dynamic_ncols=True)
    captioner.train()
    log = StepLog(job, args, dist, bar)  # each step's loss, gradient norm and time: see below
    for step in bar:
        if job.val_pairs and args.val_every and step % args.val_every == 0:
            job.val_loss = log_val_loss(job, args, dist, step, bar.write)

        log.start_step()
        mine = job.order.indices(step)  # this process's share of the step's pairs
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=dist.device)
        for k in range(grad_accum):
            v, tokens, targets, prompt = batch_of(job.pairs, mine[k * B:(k + 1) * B], job.source, job.eot,
                                                  dist.device)
            # DDP all-reduces gradients in backward: between micro-steps only accumulate, sync on the last
            sync = nullcontext() if not dist.ddp or k == grad_accum - 1 else model.no_sync()
            with sync:
                if args.compile:
                    # T, the batch's longest caption, changes from batch to batch: marked dynamic before the
                    # first trace, it gets one compiled graph for every length (padding T to a multiple of 8
                    # would keep shapes static, but compute the padding and still trace once per multiple)
                    for t in (tokens, targets):
                        torch._dynamo.maybe_mark_dynamic(t, 1)
                with autocast(dist.device_type, args.dtype):
                    _, loss = model(v, tokens, targets, prompt)  # v (B, S, C_vis); tokens, targets (B, T)
                loss = loss / grad_accum  # backward() adds micro-batch gradients up: make the sum a mean
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        mean_over_processes(loss_accum, dist)  # the loss to log: the whole step's, over all processes
        scaler.unscale_(optimizer)  # the true gradients, for clipping (a no-op but with fp16)
        norm = torch.nn.utils.clip_grad_norm_(job.trained, args.grad_clip)
        for group in optimizer.param_groups:  # each group's own rate: the bridge's, the unfrozen GPT blocks'
            group["lr"] = lr_at(step, max_steps, args.warmup_steps, group["base_lr"], 0.1 * group["base_lr"])
        scaler.step(optimizer)
        scaler.update()
        # The loss and norm stay on the device: reading a number back (.item(), float()) makes the CPU wait
        # until the GPU has done all the work queued so far, and then the GPU waits for the CPU.
        log.end_step(step, loss_accum, norm, optimizer.param_groups[0]["lr"])
        if log.due(step):  # every --log-every steps, and before a validation, a checkpoint or the end
            log.write()  # reads the numbers of the steps since the last write; stops at a NaN or inf
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            run.save(f"ckpt_{step + 1:06d}.pt", checkpoint(job, args, step + 1), job.trained)
    bar.close()

    if end_step == max_steps and job.val_pairs:
        job.val_loss = log_val_loss(job, args, dist, end_step, print0)
    # the end of the run (ckpt_final.pt, what evaluate.py reads), or of this job (--stop-step, for --resume)
    name = "ckpt_final.pt" if end_step == max_steps else f"ckpt_{end_step:06d}.pt"
    path = run.save(name, checkpoint(job, args, end_step), job.trained)
    print0(f"saved {path} ({job.train_seconds:.0f} s of training so far)")
    run.finish(step=end_step, train_seconds=job.train_seconds)
    return captioner

# -----------------------------------------------------------------------------
# Setting up: the LM, the visual tokens, a fresh bridge, the pairs, the optimizer, what --resume brings back


def setup(args, dist):
    """Everything the loop reads, as one namespace (job.captioner, job.pairs, ...)."""
    enable_speedups(dist.device_type)
    args.batch_size, grad_accum = micro_batches(args.total_batch, args.batch_size, dist.world_size, "pairs")
    lm, tokenizer = load_lm(args.lm)
    eot = tokenizer.eot_token  # <|endoftext|> in the LM's vocabulary: ends every caption
    fingerprint = lm_fingerprint(lm)  # before any block is unfrozen and trained
    train_records = coco.load_records(args.coco_root, "train", args.karpathy_json)
    source, val_source, stats = visual_sources(args, train_records, dist.device)
    run = RunFolder(args, dist, "train_caption.py")  # the checkpoint --resume names, if any

    torch.manual_seed(args.seed)  # the same fresh bridge on every rank
    captioner, bridge_config = new_captioner(args, lm, eot, source.spec, stats)
    if args.qformer_init:  # BLIP-2's second stage: the Q-Former starts where its first stage left it
        qformer_stage1.start_from(captioner.bridge, bridge_config, args.qformer_init, source.spec,
                                  args.standardize)
    check_resumable(run.ckpt, run.resumed_from, bridge_config, fingerprint, source.spec, args)
    captioner.to(dist.device)
    params = parameter_counts(captioner, source.spec.encoder)
    optimizer, trained = build_optimizer(captioner, args)
    scaler = grad_scaler(dist.device_type, args.dtype)  # fp16 only: see train_utils.grad_scaler
    model = torch.compile(captioner, backend=args.compile_backend) if args.compile else captioner
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)

    pairs, left_out = training_pairs(args, train_records, source, tokenizer)
    # evaluate.py refuses to score these images
    trained_on = {"split": "train", "karpathy_json": args.karpathy_json,
                  "image_ids": torch.tensor(sorted({pair[0] for pair in pairs}), dtype=torch.long)}
    order = PairOrder(len(pairs), args.total_batch, args.seed, dist.rank, dist.world_size)
    max_steps = args.max_steps or max(1, int(args.epochs * order.steps_per_epoch))
    ckpt = run.resume(optimizer, args)  # optimizer moments and RNGs; the bridge's weights next
    if ckpt is not None:
        captioner.load_trainable_state(ckpt["trainable"])
    start_step, end_step = ckpt["step"] if ckpt else 0, min(max_steps, args.stop_step or max_steps)
    if start_step < end_step:  # (a finished run's log stays as it is)
        run.start_log(start_step, {"args": vars(args), "bridge": dataclasses.asdict(bridge_config),
                                   "params": params, "pairs": len(pairs),
                                   "captions_left_out": {"count": len(left_out), "first": left_out[:10]},
                                   "max_steps": max_steps, "grad_accum": grad_accum,
                                   "world_size": dist.world_size}, dist.device)
    print0(f"{args.bridge} bridge, {args.task}: {len(pairs):,} pairs, {order.steps_per_epoch:,} steps/epoch, "
           f"{max_steps:,} steps of {args.total_batch} = {args.batch_size} x {dist.world_size} process(es) "
           f"x {grad_accum} accumulation")
    return SimpleNamespace(
        lm=lm, tokenizer=tokenizer, eot=eot, fingerprint=fingerprint, source=source, stats=stats, run=run,
        captioner=captioner, bridge_config=bridge_config, params=params, optimizer=optimizer, trained=trained,
        scaler=scaler, model=model, pairs=pairs, trained_on=trained_on, order=order, grad_accum=grad_accum,
        val_pairs=val_subset(args, val_source, tokenizer), val_source=val_source,
        steps=(start_step, end_step, max_steps),
        train_seconds=ckpt["train_seconds"] if ckpt else 0.0, val_loss=ckpt.get("val_loss") if ckpt else None)


def new_captioner(args, lm, eot, spec, stats):
    """A captioner with a fresh bridge for these visual tokens (spec: a clip_loader.VisualFeatures).
    bridges.py's errors name config fields (qformer_heads); here the user typed flags (--qformer-heads): the
    error says those."""
    overrides = bridge_overrides(args)
    try:
        return build_captioner(lm, eot, args.bridge, spec.width, spec.tokens, args.unfreeze_last, stats,
                               spec.grid, **overrides)
    except ValueError as e:
        fields = [*overrides, "unfreeze_last"]
        message = re.sub(r"\b(" + "|".join(fields) + r")\b", lambda m: "--" + m[1].replace("_", "-"), str(e))
        raise UsageError(message) from e


def checkpoint(job, args, step):
    """A checkpoint: enough to rebuild the captioner (bridges.load_captioner) and to resume exactly."""
    return {"trainer": "train_caption.py", "step": step, "max_steps": job.steps[2],
            "bridge_config": dataclasses.asdict(job.bridge_config),
            "trainable": job.captioner.trainable_state(),
            "unfreeze_last": args.unfreeze_last, "visual_stats": job.stats,
            "lm": {"name": args.lm, "config": dataclasses.asdict(job.lm.config),
                   "vocab": getattr(job.tokenizer, "ids", None), "fingerprint": job.fingerprint},
            "visual_features": job.source.spec.as_dict(), "trained_on": job.trained_on, "params": job.params,
            "train_seconds": job.train_seconds, "val_loss": job.val_loss,
            "optimizer": job.optimizer.state_dict(), "rng": rng_state(), "args": vars(args)}

# -----------------------------------------------------------------------------
# The log: each step's numbers, read back from the device every --log-every steps


class StepLog:
    """
    What the loop logs, read back from the device only at log steps: a GPU runs ahead of the host, and every
    number read back stops the host until the GPU has caught up. A step leaves its loss and gradient norm on
    the device, and its time as two CUDA events the GPU stamps as it passes them (elsewhere the wall clock:
    a CPU step is over when its Python returns; on MPS this times the host's side only). write() reads the
    steps since the last write all at once, logs each, and stops the run at the first non-finite loss or
    norm. So a NaN stops the run up to --log-every steps late, the steps in between training on NaN weights;
    but no checkpoint is written before write() has checked every step before it (see due()), and
    checkpoints.RunFolder.save refuses non-finite weights besides.
    """

    def __init__(self, job, args, dist, bar):
        self.job, self.args, self.bar = job, args, bar
        self.cuda = dist.device_type == "cuda"
        self.first, self.end = job.steps[0], job.steps[1]  # this job's first step and its end
        self.unread = []  # the steps since the last write: (step, lr, [loss, grad_norm] on the device, times)
        self.run_seconds = 0.0  # training time of this job (the ETA comes from it)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # stamped when the GPU reaches this point of its queue
        return event

    def seconds(self, start, stop):
        return start.elapsed_time(stop) / 1000 if self.cuda else stop - start  # (elapsed_time is in ms)

    def start_step(self):
        self.start = self.now()

    def end_step(self, step, loss, grad_norm, lr):
        numbers = torch.stack([loss.float(), grad_norm.float()])  # (2,), on the device
        self.unread.append((step, lr, numbers, self.start, self.now()))

    def due(self, step):
        """After the job's first step (a first number at once), every --log-every steps, and before what must
        not see unchecked weights: a validation, a checkpoint, the end."""
        done, a = step + 1, self.args
        every = (a.log_every, a.ckpt_every, a.val_every if self.job.val_pairs else 0)
        return step == self.first or done == self.end or any(n and done % n == 0 for n in every)

    def write(self):
        """Log the steps since the last write; FloatingPointError at the first non-finite loss or norm."""
        if self.cuda:
            self.unread[-1][-1].synchronize()  # the one wait: the GPU is past the last step's end
        numbers = torch.stack([n for _, _, n, _, _ in self.unread]).tolist()  # [[loss, grad_norm], ...]
        for (step, lr, _, start, stop), (loss, norm) in zip(self.unread, numbers):
            check_finite(loss, step, self.job.run.last)
            if not self.job.scaler.is_enabled():  # (with fp16 an overflow is the scaler's to skip)
                check_finite(norm, step, self.job.run.last)
            dt = self.seconds(start, stop)
            self.job.train_seconds += dt
            self.run_seconds += dt
            self.job.run.log(step=step, loss=loss, lr=lr, grad_norm=norm,
                             samples_per_s=self.args.total_batch / dt)
        left = self.run_seconds / (step + 1 - self.first) * (self.end - step - 1)
        self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{self.args.total_batch / dt:.0f}",
                             eta=format_eta(left))
        self.unread = []

# -----------------------------------------------------------------------------
# Where the visual tokens come from: feature caches (fast), or the frozen encoder on every batch


def visual_sources(args, train_records, device):
    """(train source, val source or None, standardisation stats or None); see
    data.feature_cache.FeatureCache."""
    if args.features:
        source = feature_cache.FeatureCache(args.features)
        if wants_on_device(args.preload_features, source, device):
            source.load_to(device)
    else:
        encoder = clip_loader.load_clip(args.encoder, layer=args.layer)
        source = feature_cache.EncodedImages(encoder, clip_loader.parse_grid(args.pool), train_records,
                                             device, args.dtype)
    stats = None
    if args.standardize:
        if not args.features:
            raise ValueError("--standardize needs --features (the train cache holds the statistics)")
        stats = {k: torch.from_numpy(v) for k, v in source.stats.items()}
    val_source = None
    if args.val_features:  # another cache, which must hold the same kind of features
        val_source = feature_cache.FeatureCache(args.val_features, expect=source.spec)
    elif not args.features:
        val_records = coco.load_records(args.coco_root, "val", args.karpathy_json)
        val_source = feature_cache.EncodedImages(source.model, source.spec.grid, val_records, device,
                                                 args.dtype)
    return source, val_source, stats


def wants_on_device(preload, cache, device):
    """--preload-features auto: on a GPU whose free memory holds the cache twice over; yes / no: as told."""
    if preload != "auto":
        return preload == "yes"
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return 2 * cache.features.nbytes < free


def parameter_counts(captioner, encoder):
    """Total and trainable parameters per part (encoder, bridge, LM), printed as in the reference project's
    table."""
    params = captioner.param_counts()
    params["encoder"] = clip_loader.encoder_param_counts(encoder)
    for part in ("encoder", "bridge", "lm"):
        c = params[part]
        counts = "unknown" if c is None else f"{c['total']:>13,} params, {c['trainable']:>11,} trainable"
        print0(f"{part:8s} {counts}")
    return params

# -----------------------------------------------------------------------------
# The examples: every (image, caption) pair, tokenized once, and which of them each step reads


def training_pairs(args, records, source, tokenizer):
    """The examples --task asks for: caption pairs, question pairs (--questions), or both in one list (each
    question --question-repeats times, so that a mix can weigh the questions against the captions)."""
    pairs, left_out = [], []
    if args.task != "questions":
        pairs, left_out = make_pairs(records, source, tokenizer, args.max_caption_tokens)
    if args.task != "captions":
        questions = coco.question_records(args.questions, args.answers, args.coco_root, "train")
        asked, skipped = question_pairs(questions, source, tokenizer, args.max_caption_tokens, args.questions)
        pairs, left_out = pairs + asked * args.question_repeats, left_out + skipped
    return pairs, left_out


def make_pairs(records, source, tokenizer, max_tokens):
    """
    [(image_id, caption tokens, complete, 0)] for the records whose image the visual source has (a cache
    skips unreadable files), cut at max_tokens (complete=False then). A caption without a single word (empty,
    spaces, emoji only) or with a token outside a --vocab-subset LM's vocabulary is left out, counted and
    named. (The 0: no prompt before the caption; question_pairs' examples have one.)
    """
    pairs, unreadable, absent, left_out = [], 0, [], []
    for r in records:
        if r["image_id"] not in source:
            if r["image_id"] in source.unreadable:  # skipped when the cache was built: reported there
                unreadable += 1
            else:
                absent.append(r)
            continue
        for caption in r["captions"]:
            if not any(ch.isalnum() for ch in caption):
                left_out.append(dict(image_id=r["image_id"], caption=caption, reason="no words"))
                continue
            try:
                tokens = tokenizer.encode_ordinary(caption.strip())
            except ValueError as e:  # SubsetTokenizer: a token this LM never saw
                left_out.append(dict(image_id=r["image_id"], caption=caption, reason=str(e)))
                continue
            pairs.append((r["image_id"], tokens[:max_tokens], len(tokens) <= max_tokens, 0))
    if absent:  # a cache of another split or image list: never train on less than was asked for, silently
        raise ValueError(f"{len(absent)} of the {len(records)} images are not in the feature cache (e.g. "
                         f"{absent[0]['path']}): was it built from another split? Build one from this split "
                         f"with `python data/feature_cache.py --split ...` (and the same --karpathy-json)")
    if unreadable:
        print0(f"note: {unreadable} of {len(records)} images were unreadable when the cache was built; "
               "their captions are left out")
    if left_out:
        first = "; ".join(f"image {c['image_id']}: {c['caption']!r} ({c['reason']})" for c in left_out[:3])
        print0(f"note: {len(left_out)} caption(s) left out, e.g. {first}")
    if not pairs:
        raise ValueError("no (image, caption) pairs: is the feature cache made from this split?")
    return pairs, left_out


def question_pairs(questions, source, tokenizer, max_tokens, path):
    """
    [(image_id, prompt + answer tokens, True, prompt length)] for data.coco.load_vqa's records: the answer is
    the one most of the humans gave. A question whose image the visual source lacks is an error, as in
    make_pairs; one the LM cannot read (a token outside a --vocab-subset LM's vocabulary) or too long for
    max_tokens is left out, counted and named. Returns (pairs, left out).
    """
    absent = [q for q in questions if q["image_id"] not in source and q["image_id"] not in source.unreadable]
    if absent:
        q = absent[0]
        raise ValueError(f"{len(absent)} of the {len(questions)} questions of {path} are about images the "
                         f"visual source does not have (e.g. question {q['question_id']}, {q['path']}): "
                         f"build the feature cache from the images the questions are about")
    pairs, left_out = [], []
    for q in questions:
        if q["image_id"] not in source:  # unreadable when the cache was built: reported there
            continue
        answer = coco.most_common_answer(q["answers"])
        try:
            prompt = tokenizer.encode_ordinary(coco.qa_prompt(q["question"]))
            tokens = prompt + tokenizer.encode_ordinary(" " + answer)
        except ValueError as e:  # SubsetTokenizer: a word this LM never saw
            left_out.append(dict(image_id=q["image_id"], question_id=q["question_id"], reason=str(e)))
            continue
        if len(tokens) > max_tokens:  # a question cut short would lose its answer
            left_out.append(dict(image_id=q["image_id"], question_id=q["question_id"],
                                 reason=f"{len(tokens)} tokens > --max-caption-tokens {max_tokens}"))
            continue
        pairs.append((q["image_id"], tokens, True, len(prompt)))
    if left_out:
        print0(f"note: {len(left_out)} of {len(questions)} questions of {path} left out, e.g. question "
               f"{left_out[0]['question_id']} ({left_out[0]['reason']})")
    if not pairs:
        raise ValueError(f"no question could be read from {path}: is the LM one that knows its words?")
    return pairs, left_out


def val_subset(args, val_source, tokenizer):
    """
    The first --val-pairs pairs of the val split: a fixed subset, the same at every evaluation (None: no val).
    The val split's captions; with --task questions, its questions (--val-questions; None without).
    """
    if val_source is None:
        return None
    if args.task == "questions":
        if not args.val_questions:
            return None
        questions = coco.question_records(args.val_questions, None, args.coco_root, "val")
        return question_pairs(questions, val_source, tokenizer, args.max_caption_tokens,
                              args.val_questions)[0][:args.val_pairs]
    records = coco.load_records(args.coco_root, "val", args.karpathy_json)
    return make_pairs(records, val_source, tokenizer, args.max_caption_tokens)[0][:args.val_pairs]


class PairOrder:
    """
    Which pairs each optimizer step reads. Every epoch is a permutation of all pairs, fixed by (seed, epoch)
    so a resumed run sees the same order; step k of an epoch reads its k-th slice of total_batch pairs, and
    each of the world_size processes takes its own contiguous share of that slice.
    """

    def __init__(self, n_pairs, total_batch, seed, rank=0, world_size=1):
        self.n, self.total_batch, self.seed = n_pairs, total_batch, seed
        self.share = total_batch // world_size  # pairs per process per step
        self.start = rank * self.share
        self.steps_per_epoch = n_pairs // total_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_pairs} pairs < one batch of --total-batch {total_batch}")
        self.epoch, self.order = None, None

    def indices(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self.epoch, self.order = epoch, torch.randperm(self.n, generator=g).numpy()
        batch = self.order[k * self.total_batch:(k + 1) * self.total_batch]  # the step's pairs, all processes
        return batch[self.start:self.start + self.share]


def batch_of(pairs, index, source, eot, device):
    """Visual tokens (B, S, C), caption tokens and targets (B, T), and how many tokens of each row are a
    question (B,), of the pairs at `index`."""
    chosen = [pairs[i] for i in index]
    ids, v = source.tokens([pair[0] for pair in chosen])
    if len(ids) < len(chosen):  # training data must be readable; a feature cache skips such files instead
        bad = source.skipped[-1]
        raise ValueError(f"cannot read {bad['path']}: {bad['reason']} "
                         "(data/feature_cache.py skips such files)")
    _, token_lists, complete, prompt = zip(*chosen)  # (image id, tokens, complete, prompt length) each
    tokens, targets = caption_batch(token_lists, eot, complete, prompt)
    if torch.device(device).type == "cuda" and v.device.type == "cpu":
        # page-locked, so the copy to the GPU below does not wait for the GPU's queue; pinning is itself a
        # host copy (features preloaded on the GPU, --preload-features, avoid both)
        v = v.pin_memory()
    # non-blocking on CUDA only: on MPS a non-blocking copy of these temporaries can read freed memory
    prompt = torch.tensor(prompt, dtype=torch.long)  # (B,)
    return tuple(to_device(t, device) for t in (v, tokens, targets, prompt))

# -----------------------------------------------------------------------------
# Model, optimizer, validation


def bridge_overrides(args):
    """The BridgeConfig fields given as flags (every field but those the data and the LM decide)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(BridgeConfig) if "help" in f.metadata}


def check_resumable(ckpt, ckpt_path, bridge_config, fingerprint, spec, args):
    """
    ValueError unless the checkpoint was written by this very setup: same bridge, LM, features, unfreezing.
    """
    if ckpt is None:
        return
    problems = []
    saved = dataclasses.asdict(BridgeConfig(**ckpt["bridge_config"]))
    if saved != dataclasses.asdict(bridge_config):
        problems.append(f"bridge config {saved} != {dataclasses.asdict(bridge_config)}")
    if ckpt["lm"]["fingerprint"] != fingerprint:
        problems.append(f"LM weights differ (checkpoint trained on {ckpt['lm']['name']!r}, now {args.lm!r})")
    trained = clip_loader.VisualFeatures.from_dict(ckpt["visual_features"], ckpt_path)
    if trained != spec:
        problems.append("visual features differ: " + "; ".join(trained.differences(spec, "checkpoint has")))
    if ckpt["unfreeze_last"] != args.unfreeze_last:
        problems.append(f"--unfreeze-last {ckpt['unfreeze_last']} != {args.unfreeze_last}")
    if problems:
        raise ValueError(f"cannot resume from {ckpt_path}: " + "; ".join(problems) +
                         ". Train into another --out-dir, or start this run over with --overwrite")


def build_optimizer(captioner, args):
    """AdamW over the bridge, and any unfrozen GPT blocks at their own (smaller) learning rate;
    (optimizer, params)."""
    groups = []
    for part, lr in [(captioner.bridge, args.lr), (captioner.lm, args.lm_lr)]:
        if any(p.requires_grad for p in part.parameters()):
            groups += decay_groups(part.parameters(), args.weight_decay, base_lr=lr)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                                  **({"fused": True} if args.fused else {}))
    return optimizer, [p for g in groups for p in g["params"]]


@torch.no_grad()
def val_loss(captioner, val_pairs, val_source, eot, batch_size, dist, dtype):
    """Mean caption loss over the fixed val subset (weighted by batch size; split over processes)."""
    captioner.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, pairs)
    for start in range(dist.rank * batch_size, len(val_pairs), batch_size * dist.world_size):
        index = range(start, min(start + batch_size, len(val_pairs)))
        v, tokens, targets, prompt = batch_of(val_pairs, index, val_source, eot, dist.device)
        with autocast(dist.device_type, dtype):
            _, loss = captioner(v, tokens, targets, prompt)
        total[0] += loss.float() * len(index)
        total[1] += len(index)  # (a Python number: no host-to-device copy to wait for)
    if dist.ddp:
        torch_dist.all_reduce(total)
    captioner.train()
    return (total[0] / total[1]).item()


def log_val_loss(job, args, dist, step, write):
    loss = val_loss(job.captioner, job.val_pairs, job.val_source, job.eot, args.batch_size, dist, args.dtype)
    job.run.log(step=step, val_loss=loss)
    if dist.master:
        write(f"step {step:6d} | val loss {loss:.4f}")
    return loss

# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bridge", required=True, choices=sorted(BRIDGES))
    p.add_argument("--lm", default="gpt2",
                   help="a train_lm.py checkpoint (.pt), or gpt2 / a hub-format folder")
    p.add_argument("--coco-root", default="data/coco", help="COCO-format root (captions and images)")
    p.add_argument("--karpathy-json", default=None,
                   help="Karpathy's dataset_coco.json: use his train/val split")
    p.add_argument("--features", default=None,
                   help="feature cache of the train split (data/feature_cache.py)")
    p.add_argument("--val-features", default=None, help="feature cache of the val split")
    p.add_argument("--encoder", default="openai/clip-vit-large-patch14",
                   help="encode images on the fly with this encoder when no --features are given")
    p.add_argument("--layer", type=int, default=-1, help="encoder layer, on-the-fly encoding only")
    p.add_argument("--pool", default=clip_loader.POOL_FLAG,
                   help="patch pooling grid (or none), on-the-fly encoding only")
    p.add_argument("--preload-features", default="auto", choices=["auto", "yes", "no"],
                   help="copy the train cache to the device once (auto: on a GPU where it fits)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise visual tokens with the train cache's per-(token, channel) mean and std")
    p.add_argument("--out-dir", default=None, help="default runs/caption/<bridge>")
    p.add_argument("--seed", type=int, default=1337)
    # what the bridge learns to do: caption the image, answer questions about it, or both at once
    p.add_argument("--task", default="captions", choices=["captions", "questions", "mix"],
                   help="train on the captions, on --questions, or on both (one list of examples)")
    p.add_argument("--questions", default=None,
                   help="VQAv2-format questions of the train split (v2_OpenEnded_*_questions.json)")
    p.add_argument("--answers", default=None,
                   help="their annotations file (default: found next to --questions by VQAv2's naming)")
    p.add_argument("--question-repeats", type=positive_int, default=1,
                   help="--task mix: each question is read this many times an epoch, each caption once")
    p.add_argument("--val-questions", default=None,
                   help="--task questions: val split questions for the val loss (answers found by name)")
    # the bridge: one flag per field of bridges.BridgeConfig
    for f in dataclasses.fields(BridgeConfig):
        if "help" not in f.metadata:
            continue  # decided by the data and the LM
        name = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        elif isinstance(f.default, float):
            p.add_argument(name, type=positive_float, default=f.default, help=f.metadata["help"])
        else:
            kind = positive_int if f.metadata["minimum"] == 1 else natural_int
            p.add_argument(name, type=kind, default=f.default, help=f.metadata["help"])
    p.add_argument("--qformer-init", default=None,
                   help="Q-Former: start from BLIP-2's first stage, a qformer_stage1.py checkpoint")
    p.add_argument("--unfreeze-last", type=natural_int, default=0, help="also train the last K GPT blocks")
    # optimisation
    p.add_argument("--epochs", type=positive_float, default=1.0,
                   help="passes over all (image, caption) pairs")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="length of the schedule (default: --epochs)")
    p.add_argument("--stop-step", type=positive_int, default=None,
                   help="stop (and checkpoint) before this step")
    p.add_argument("-B", "--batch-size", type=positive_int, default=64,
                   help="micro-batch of pairs per process")
    p.add_argument("--total-batch", type=positive_int, default=256,
                   help="pairs per optimizer step (gradient accumulation)")
    p.add_argument("--lr", type=positive_float, default=3e-4,
                   help="bridge max learning rate (cosine to 10%%)")
    p.add_argument("--lm-lr", type=positive_float, default=1e-5,
                   help="learning rate of the unfrozen GPT blocks")
    p.add_argument("--warmup-steps", type=natural_int, default=200)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.01)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--max-caption-tokens", type=positive_int, default=40,
                   help="longer captions are cut (COCO: >99%% fit)")
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=natural_int, default=250)
    p.add_argument("--val-pairs", type=positive_int, default=2000,
                   help="size of the fixed val subset (pairs)")
    p.add_argument("--ckpt-every", type=natural_int, default=1000)
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="steps between reads of the losses from the device: the steps are logged, and a "
                        "NaN stops the run, there")
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    if args.task != "captions" and not args.questions:
        p.error(f"--task {args.task} needs --questions (a VQAv2-format questions file of the train split)")
    if args.question_repeats > 1 and args.task != "mix":
        p.error(f"--question-repeats weighs the questions against the captions: it needs --task mix, "
                f"not {args.task}")
    args.out_dir = args.out_dir or os.path.join("runs", "caption", args.bridge)
    return args


def main(argv=None):
    return launch(train, get_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
