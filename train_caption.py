"""
Train any bridge (see bridges.BRIDGES) between a frozen vision encoder and a frozen GPT, with one loop.

    # the real run: one epoch of COCO 2017 train on cached CLIP ViT-L/14 features, OpenAI's GPT-2 as the LM
    python train_caption.py --bridge qformer --lm gpt2 --coco-root data/coco \\
        --features data/cache/coco_train_L14 --val-features data/cache/coco_val_L14
    torchrun --standalone --nproc_per_node=4 train_caption.py --bridge xattn ...     # several GPUs
    # without a feature cache the encoder runs on every batch (slower; see bench/bench_caption.py)
    python train_caption.py --bridge linear --lm runs/lm/ckpt_019073.pt --coco-root data/coco --encoder openai/clip-vit-large-patch14

One example is one (image, caption) pair: COCO's ~118k train images x ~5 captions = ~590k examples per epoch.
Only the bridge trains (plus the last --unfreeze-last GPT blocks, if asked): the LM and the encoder are frozen,
so they get no gradient and no optimizer state.

Writes to --out-dir (default runs/caption/<bridge>): log.jsonl (config, then step, loss, lr, grad_norm,
samples_per_s, and val_loss records: evaluate.py plots them) and checkpoints ckpt_<step>.pt / ckpt_final.pt,
read by bridges.load_captioner and by --resume, which continues exactly where the run stopped.
"""
import argparse
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip_loader
from bridges import BRIDGES, BridgeConfig, build_captioner, caption_batch, lm_fingerprint
from common import autocast, natural_int, nonneg_float, positive_float, positive_int
from data import coco
from gpt2 import load_lm
from train_utils import (Checkpoints, JsonlLogger, add_run_flags, enable_speedups, find_resume, format_eta,
                         grad_scaler, launch, lr_at, micro_batches, optimizer_step, print0, restore_training_state,
                         rng_state)

# -----------------------------------------------------------------------------
# The training loop: one optimizer step = grad_accum micro-batches on each process


def train(args, dist):
    enable_speedups(dist.device_type)
    args.batch_size, grad_accum = micro_batches(args.total_batch, args.batch_size, dist.world_size, "pairs")
    lm, tokenizer = load_lm(args.lm)
    eot = tokenizer.eot_token  # <|endoftext|> in the LM's vocabulary: ends every caption
    fingerprint = lm_fingerprint(lm)  # before any block is unfrozen and trained
    train_records = coco.load_records(args.coco_root, "train", args.karpathy_json)
    visual, val_visual, stats = visual_sources(args, train_records, dist.device)
    ckpt_path, ckpt = find_resume(args.resume, args.out_dir, args.overwrite)

    torch.manual_seed(args.seed)  # the same fresh bridge on every rank
    S = visual.settings["tokens"]  # a class token + the pooled grid (pooling "none": the ViT's square patch grid)
    grid = clip_loader.parse_grid(visual.settings["pooling"]) or (math.isqrt(S - 1),) * 2
    captioner, bridge_config = build_captioner(lm, eot, args.bridge, visual.settings["width"], S, args.unfreeze_last,
                                               stats, grid, **bridge_overrides(args))
    check_resumable(ckpt, ckpt_path, bridge_config, fingerprint, visual.settings, args)
    captioner.to(dist.device)
    params = parameter_counts(captioner, visual.settings)
    optimizer, trained = build_optimizer(captioner, args)
    scaler = grad_scaler(dist.device_type, args.dtype)  # fp16 only: see train_utils.grad_scaler
    model = torch.compile(captioner) if args.compile else captioner
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)

    pairs, left_out = make_pairs(train_records, visual, tokenizer, args.max_caption_tokens)
    trained_on = {"split": "train", "karpathy_json": args.karpathy_json,  # evaluate.py refuses to score these images
                  "image_ids": torch.tensor(sorted({image_id for image_id, _, _ in pairs}), dtype=torch.long)}
    order = PairOrder(len(pairs), args.total_batch, args.seed, dist.rank, dist.world_size)
    max_steps = args.max_steps or max(1, int(args.epochs * order.steps_per_epoch))
    val_pairs = val_subset(args, val_visual, tokenizer)
    start_step, train_seconds, last_val = restore(ckpt, captioner, optimizer, args)
    del ckpt  # its optimizer state now lives in `optimizer`
    end_step = min(max_steps, args.stop_step or max_steps)
    if start_step >= end_step:
        print0(f"{ckpt_path} is at step {start_step}: nothing left to train up to step {end_step}")
        return captioner
    checkpoints = Checkpoints(args.out_dir, dist.master, last=ckpt_path)
    logger = JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), resume_step=start_step or None,
                         config={"args": vars(args), "bridge": dataclasses.asdict(bridge_config), "params": params,
                                 "pairs": len(pairs), "captions_left_out": {"count": len(left_out), "first": left_out[:10]},
                                 "max_steps": max_steps, "grad_accum": grad_accum,
                                 "world_size": dist.world_size}, device=dist.device) if dist.master else None
    print0(f"{args.bridge} bridge: {len(pairs):,} pairs, {order.steps_per_epoch:,} steps/epoch, {max_steps:,} steps of "
           f"{args.total_batch} = {args.batch_size} x {dist.world_size} process(es) x {grad_accum} accumulation")

    def state(step, train_seconds, last_val):  # a checkpoint: enough to rebuild the captioner and to resume exactly
        return {"kind": "caption", "step": step, "max_steps": max_steps, "bridge_config": dataclasses.asdict(bridge_config),
                "trainable": captioner.trainable_state(), "unfreeze_last": args.unfreeze_last, "visual_stats": stats,
                "lm": {"name": args.lm, "config": dataclasses.asdict(lm.config),
                       "vocab": getattr(tokenizer, "ids", None), "fingerprint": fingerprint},
                "features": visual.settings, "trained_on": trained_on, "params": params, "train_seconds": train_seconds,
                "val_loss": last_val,
                "optimizer": optimizer.state_dict(), "rng": rng_state(), "args": vars(args)}

    bar = tqdm(range(start_step, end_step), initial=start_step, total=max_steps, desc=args.bridge,
               disable=not dist.master, dynamic_ncols=True)
    captioner.train()
    run_seconds = 0.0  # training time of this job (the ETA comes from it)
    for step in bar:
        if val_pairs and args.val_every and step % args.val_every == 0:
            last_val = log_val_loss(captioner, val_pairs, val_visual, eot, args, dist, logger, step, bar.write)

        t0 = time.time()
        mine = order.indices(step)  # this process's share of the step's pairs
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=dist.device)
        for k in range(grad_accum):
            v, tokens, targets = batch_of(pairs, mine[k * args.batch_size:(k + 1) * args.batch_size], visual, eot,
                                          dist.device)
            sync = nullcontext() if not dist.ddp or k == grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(dist.device_type, args.dtype):
                    _, loss = model(v, tokens, targets)
                loss = loss / grad_accum  # backward() adds micro-batch gradients up: make the sum a mean
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        loss, norm = optimizer_step(  # each group's own learning rate (the bridge's, the unfrozen blocks')
            optimizer, scaler, trained, loss_accum, step, args.grad_clip, dist=dist, last_ckpt=checkpoints.last,
            lr_of=lambda group: lr_at(step, max_steps, args.warmup_steps, group["base_lr"], 0.1 * group["base_lr"]))
        dt = time.time() - t0
        train_seconds += dt
        run_seconds += dt

        record = dict(step=step, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=norm,
                      samples_per_s=args.total_batch / dt)
        if logger:
            logger.log(**record)
        if step % args.log_every == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}",
                            eta=format_eta(run_seconds / (step + 1 - start_step) * (end_step - step - 1)))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            checkpoints.save(f"ckpt_{step + 1:06d}.pt", state(step + 1, train_seconds, last_val), trained)
    bar.close()

    if end_step == max_steps and val_pairs:
        last_val = log_val_loss(captioner, val_pairs, val_visual, eot, args, dist, logger, end_step, print0)
    # the end of the run (ckpt_final.pt, what evaluate.py reads), or of this job (--stop-step, for --resume)
    name = "ckpt_final.pt" if end_step == max_steps else f"ckpt_{end_step:06d}.pt"
    path = checkpoints.save(name, state(end_step, train_seconds, last_val), trained)
    print0(f"saved {path} ({train_seconds:.0f} s of training so far)")
    if logger:
        logger.log(event="end", step=end_step, train_seconds=train_seconds)
        logger.close()
    return captioner

# -----------------------------------------------------------------------------
# Where the visual tokens come from: feature caches (fast), or the frozen encoder on every batch


def visual_sources(args, train_records, device):
    """(train source, val source or None, standardisation stats or None); see data.coco.FeatureCache."""
    if args.features:
        visual = coco.FeatureCache(args.features)
        if wants_on_device(args.preload_features, visual, device):
            visual.load_to(device)
    else:
        encoder = clip_loader.load_clip(args.encoder, layer=args.layer)
        visual = coco.EncodedImages(encoder, clip_loader.parse_grid(args.pool), train_records, device, args.dtype)
    stats = None
    if args.standardize:
        if not args.features:
            raise ValueError("--standardize needs --features (the train cache holds the statistics)")
        stats = {k: torch.from_numpy(v) for k, v in visual.stats.items()}
    val_visual = None
    if args.val_features:  # another cache, which must hold the same kind of features
        val_visual = coco.FeatureCache(args.val_features, expect=visual.settings)
    elif not args.features:
        val_records = coco.load_records(args.coco_root, "val", args.karpathy_json)
        val_visual = coco.EncodedImages(visual.model, visual.grid, val_records, device, args.dtype)
    return visual, val_visual, stats


def wants_on_device(preload, cache, device):
    """--preload-features auto: on a GPU whose free memory holds the cache twice over; yes / no: as told."""
    if preload != "auto":
        return preload == "yes"
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return 2 * cache.features.nbytes < free


def parameter_counts(captioner, features):
    """Total and trainable parameters per part (encoder, bridge, LM), printed as in the reference project's table."""
    params = captioner.param_counts()
    params["encoder"] = clip_loader.encoder_param_counts(features["encoder"])
    for part in ("encoder", "bridge", "lm"):
        c = params[part]
        counts = "unknown" if c is None else f"{c['total']:>13,} params, {c['trainable']:>11,} trainable"
        print0(f"{part:8s} {counts}")
    return params

# -----------------------------------------------------------------------------
# The examples: every (image, caption) pair, tokenized once, and which of them each step reads


def make_pairs(records, visual, tokenizer, max_tokens):
    """
    [(image_id, caption tokens, complete)] for the records whose image the visual source has (a cache skips
    unreadable files), cut at max_tokens (complete=False then). A caption without a single word (empty, spaces,
    emoji only) or with a token outside a --vocab-subset LM's vocabulary is left out, counted and named.
    """
    pairs, unreadable, absent, left_out = [], 0, [], []
    for r in records:
        if r["image_id"] not in visual:
            if r["image_id"] in visual.unreadable:  # skipped when the cache was built: reported there
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
            pairs.append((r["image_id"], tokens[:max_tokens], len(tokens) <= max_tokens))
    if absent:  # a cache of another split or image list: never train on less than was asked for, silently
        raise ValueError(f"{len(absent)} of the {len(records)} images are not in the feature cache (e.g. "
                         f"{absent[0]['path']}): was it built from another split? Build one from this split with "
                         f"`python data/coco.py features --split ...` (and the same --karpathy-json)")
    if unreadable:
        print0(f"note: {unreadable} of {len(records)} images were unreadable when the cache was built; "
               "their captions are left out")
    if left_out:
        first = "; ".join(f"image {c['image_id']}: {c['caption']!r} ({c['reason']})" for c in left_out[:3])
        print0(f"note: {len(left_out)} caption(s) left out, e.g. {first}")
    if not pairs:
        raise ValueError("no (image, caption) pairs: is the feature cache made from this split?")
    return pairs, left_out


def val_subset(args, val_visual, tokenizer):
    """The first --val-pairs pairs of the val split: a fixed subset, the same at every evaluation (None: no val)."""
    if val_visual is None:
        return None
    records = coco.load_records(args.coco_root, "val", args.karpathy_json)
    return make_pairs(records, val_visual, tokenizer, args.max_caption_tokens)[0][:args.val_pairs]


class PairOrder:
    """
    Which pairs each optimizer step reads. Every epoch is a permutation of all pairs, fixed by (seed, epoch) so a
    resumed run sees the same order; step k of an epoch reads its k-th slice of total_batch pairs, and each of the
    world_size processes takes its own contiguous share of that slice.
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


def batch_of(pairs, index, visual, eot, device):
    """Visual tokens (B, S, C), caption tokens and targets (B, T) of the pairs at `index`."""
    chosen = [pairs[i] for i in index]
    ids, v = visual.tokens([image_id for image_id, _, _ in chosen])
    if len(ids) < len(chosen):  # training data must be readable; a feature cache skips such files instead
        bad = visual.skipped[-1]
        raise ValueError(f"cannot read {bad['path']}: {bad['reason']} (data/coco.py features skips such files)")
    tokens, targets = caption_batch([t for _, t, _ in chosen], eot, [complete for _, _, complete in chosen])
    if torch.device(device).type == "cuda" and v.device.type == "cpu":
        # page-locked, so the copy to the GPU below does not wait for the GPU's queue; pinning is itself a host
        # copy (features preloaded on the GPU, --preload-features, avoid both)
        v = v.pin_memory()
    return v.to(device, non_blocking=True), tokens.to(device, non_blocking=True), targets.to(device, non_blocking=True)

# -----------------------------------------------------------------------------
# Model, optimizer, validation


def bridge_overrides(args):
    """The BridgeConfig fields given as flags (every field but those the data and the LM decide)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(BridgeConfig) if "help" in f.metadata}


def check_resumable(ckpt, ckpt_path, bridge_config, fingerprint, features, args):
    """ValueError unless the checkpoint was written by this very setup: same bridge, LM, features, unfreezing."""
    if ckpt is None:
        return
    if ckpt.get("kind") != "caption":
        raise ValueError(f"{ckpt_path} is not a train_caption.py checkpoint")
    problems = []
    saved = dataclasses.asdict(BridgeConfig(**ckpt["bridge_config"]))  # fields added since it was written: defaults
    if saved != dataclasses.asdict(bridge_config):
        problems.append(f"bridge config {saved} != {dataclasses.asdict(bridge_config)}")
    if ckpt["lm"]["fingerprint"] != fingerprint:
        problems.append(f"LM weights differ (checkpoint trained on {ckpt['lm']['name']!r}, now {args.lm!r})")
    if ckpt["features"] != features:
        problems.append(f"visual features {ckpt['features']} != {features}")
    if ckpt["unfreeze_last"] != args.unfreeze_last:
        problems.append(f"--unfreeze-last {ckpt['unfreeze_last']} != {args.unfreeze_last}")
    if problems:
        raise ValueError(f"cannot resume from {ckpt_path}: " + "; ".join(problems) +
                         ". Train into another --out-dir, or start this run over with --overwrite")


def restore(ckpt, captioner, optimizer, args):
    """
    Load a checkpoint's bridge, optimizer and RNG state; return (step, train_seconds, val_loss) to go on from.
    This run's --lr, --lm-lr and --weight-decay apply from here on (see train_utils.load_optimizer_state).
    """
    if ckpt is None:
        return 0, 0.0, None
    captioner.load_trainable_state(ckpt["trainable"])
    restore_training_state(ckpt, optimizer, args)
    return ckpt["step"], ckpt["train_seconds"], ckpt.get("val_loss")


def build_optimizer(captioner, args):
    """AdamW over the bridge, and any unfrozen GPT blocks at their own (smaller) learning rate; (optimizer, params)."""
    groups = []
    for params, lr in [(list(captioner.bridge.parameters()), args.lr),
                       ([p for p in captioner.lm.parameters() if p.requires_grad], args.lm_lr)]:
        if params:  # weight decay on matrices only, as for the GPT
            groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay, "base_lr": lr},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), **({"fused": True} if args.fused else {}))
    return optimizer, [p for g in groups for p in g["params"]]


@torch.no_grad()
def val_loss(captioner, val_pairs, val_visual, eot, batch_size, dist, dtype):
    """Mean caption loss over the fixed val subset (weighted by batch size; split over processes)."""
    captioner.eval()
    total = torch.zeros(2, device=dist.device)  # (loss sum, pairs)
    for start in range(dist.rank * batch_size, len(val_pairs), batch_size * dist.world_size):
        index = range(start, min(start + batch_size, len(val_pairs)))
        v, tokens, targets = batch_of(val_pairs, index, val_visual, eot, dist.device)
        with autocast(dist.device_type, dtype):
            _, loss = captioner(v, tokens, targets)
        total += torch.stack([loss.float() * len(index), torch.tensor(float(len(index)), device=dist.device)])
    if dist.ddp:
        torch_dist.all_reduce(total)
    captioner.train()
    return (total[0] / total[1]).item()


def log_val_loss(captioner, val_pairs, val_visual, eot, args, dist, logger, step, write):
    loss = val_loss(captioner, val_pairs, val_visual, eot, args.batch_size, dist, args.dtype)
    if logger:
        logger.log(step=step, val_loss=loss)
    if dist.master:
        write(f"step {step:6d} | val loss {loss:.4f}")
    return loss

# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bridge", required=True, choices=sorted(BRIDGES))
    p.add_argument("--lm", default="gpt2", help="a train_lm.py checkpoint (.pt), or gpt2 / a hub-format folder")
    p.add_argument("--coco-root", default="data/coco", help="COCO-format root (captions and images)")
    p.add_argument("--karpathy-json", default=None, help="Karpathy's dataset_coco.json: use his train/val split")
    p.add_argument("--features", default=None, help="feature cache of the train split (data/coco.py features)")
    p.add_argument("--val-features", default=None, help="feature cache of the val split")
    p.add_argument("--encoder", default="openai/clip-vit-large-patch14",
                   help="encode images on the fly with this encoder when no --features are given")
    p.add_argument("--layer", type=int, default=-1, help="encoder layer, on-the-fly encoding only")
    p.add_argument("--pool", default="4x8", help="patch pooling grid (or none), on-the-fly encoding only")
    p.add_argument("--preload-features", default="auto", choices=["auto", "yes", "no"],
                   help="copy the train cache to the device once (auto: on a GPU where it fits)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise visual tokens with the train cache's per-(token, channel) mean and std")
    p.add_argument("--out-dir", default=None, help="default runs/caption/<bridge>")
    p.add_argument("--seed", type=int, default=1337)
    # the bridge: one flag per field of bridges.BridgeConfig
    for f in dataclasses.fields(BridgeConfig):
        if "help" not in f.metadata:
            continue  # decided by the data and the LM
        name = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = positive_int if f.metadata["minimum"] == 1 else natural_int
            p.add_argument(name, type=kind, default=f.default, help=f.metadata["help"])
    p.add_argument("--unfreeze-last", type=natural_int, default=0, help="also train the last K GPT blocks")
    # optimisation
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over all (image, caption) pairs")
    p.add_argument("--max-steps", type=positive_int, default=None, help="length of the schedule (default: --epochs)")
    p.add_argument("--stop-step", type=positive_int, default=None, help="stop (and checkpoint) before this step")
    p.add_argument("-B", "--batch-size", type=positive_int, default=64, help="micro-batch of pairs per process")
    p.add_argument("--total-batch", type=positive_int, default=256, help="pairs per optimizer step (gradient accumulation)")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="bridge max learning rate (cosine to 10%%)")
    p.add_argument("--lm-lr", type=positive_float, default=1e-5, help="learning rate of the unfrozen GPT blocks")
    p.add_argument("--warmup-steps", type=natural_int, default=200)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.01)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--max-caption-tokens", type=positive_int, default=40, help="longer captions are cut (COCO: >99%% fit)")
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=natural_int, default=250)
    p.add_argument("--val-pairs", type=positive_int, default=2000, help="size of the fixed val subset (pairs)")
    p.add_argument("--ckpt-every", type=natural_int, default=1000)
    p.add_argument("--log-every", type=positive_int, default=10)
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", "caption", args.bridge)
    return args


def main(argv=None):
    return launch(train, get_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
