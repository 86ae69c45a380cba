"""
Train any bridge (linear | xattn | qformer) between a frozen vision encoder and a frozen GPT, with one loop.

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
import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip_loader
from bridges import build_captioner, caption_batch, lm_fingerprint
from data import coco
from gpt2 import load_lm
from train_utils import (JsonlLogger, all_finite, autocast, check_finite, enable_speedups, format_eta,
                         latest_checkpoint, load_checkpoint, lr_at, print0, rng_state, save_checkpoint, set_rng_state,
                         setup_distributed, teardown)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bridge", required=True, choices=["linear", "xattn", "qformer"])
    p.add_argument("--lm", default="gpt2", help="a train_lm.py checkpoint (.pt), or gpt2 / a hub-format folder")
    p.add_argument("--coco-root", default="data/coco", help="COCO-format root (captions and images)")
    p.add_argument("--karpathy-json", default=None, help="Karpathy's dataset_coco.json: use his train/val split")
    p.add_argument("--features", default=None, help="feature cache of the train split (data/coco.py features)")
    p.add_argument("--val-features", default=None, help="feature cache of the val split")
    p.add_argument("--encoder", default="openai/clip-vit-large-patch14",
                   help="encode images on the fly with this encoder when no --features are given")
    p.add_argument("--layer", type=int, default=-1, help="encoder layer, on-the-fly encoding only")
    p.add_argument("--pool", default="4x8", help="patch pooling grid (or none), on-the-fly encoding only")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise visual tokens with the train cache's per-(token, channel) mean and std")
    p.add_argument("--out-dir", default=None, help="default runs/caption/<bridge>")
    p.add_argument("--resume", default=None, help="a checkpoint, or 'auto' (the latest in --out-dir, if any)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=1337)
    # the bridge
    p.add_argument("--queries", type=int, default=32, help="Q-Former: learnable queries (= prefix length)")
    p.add_argument("--qformer-layers", type=int, default=2)
    p.add_argument("--qformer-width", type=int, default=768)
    p.add_argument("--qformer-heads", type=int, default=12)
    p.add_argument("--xattn-every", type=int, default=1, help="cross-attention in every k-th GPT block")
    p.add_argument("--xattn-heads", type=int, default=None, help="default: the GPT's number of heads")
    p.add_argument("--vis-pos", action=argparse.BooleanOptionalAction, default=True,
                   help="learned position embedding of the visual tokens inside the bridge")
    p.add_argument("--unfreeze-last", type=int, default=0, help="also train the last K GPT blocks")
    # optimisation
    p.add_argument("--epochs", type=float, default=1.0, help="passes over all (image, caption) pairs")
    p.add_argument("--max-steps", type=int, default=None, help="length of the schedule (default: --epochs)")
    p.add_argument("--stop-step", type=int, default=None, help="stop (and checkpoint) before this step")
    p.add_argument("-B", "--batch-size", type=int, default=64, help="micro-batch of pairs per process")
    p.add_argument("--total-batch", type=int, default=256, help="pairs per optimizer step (gradient accumulation)")
    p.add_argument("--lr", type=float, default=3e-4, help="bridge max learning rate (cosine to 10%%)")
    p.add_argument("--lm-lr", type=float, default=1e-5, help="learning rate of the unfrozen GPT blocks")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-caption-tokens", type=int, default=40, help="longer captions are cut (COCO: >99%% fit)")
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-pairs", type=int, default=2000, help="size of the fixed val subset (pairs)")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", "caption", args.bridge)
    return args

# -----------------------------------------------------------------------------
# Where the visual tokens come from: a feature cache (fast), or the frozen encoder on every batch


class CachedVisual:
    """Visual tokens of images by COCO id, read from a memory-mapped feature cache."""

    def __init__(self, cache):
        self.cache = cache
        self.settings = {k: cache.manifest[k] for k in ("encoder", "layer", "pooling", "image_size", "tokens", "width")}

    def has(self, image_id):
        return image_id in self.cache

    def __call__(self, image_ids):
        return self.cache.batch([self.cache.row_of(i) for i in image_ids])  # (B, S, C) float32


class EncodedVisual:
    """Visual tokens computed on the fly: load, preprocess and encode every batch (the reference's approach)."""

    def __init__(self, encoder, grid, records, device):
        self.model, self.grid, self.device = encoder.to(device), grid, device
        self.paths = {r["image_id"]: r["path"] for r in records}
        self.settings = {k: v for k, v in coco.cache_settings(encoder, grid).items()
                         if k in ("encoder", "layer", "pooling", "image_size", "tokens", "width")}

    def has(self, image_id):
        return image_id in self.paths

    @torch.no_grad()
    def __call__(self, image_ids):
        pixels = []
        for i in image_ids:
            array, reason = coco.load_pixels(self.paths[i], self.model.config.image_size)
            if array is None:  # training data must be readable: build a feature cache to skip bad files
                raise ValueError(f"cannot read {self.paths[i]}: {reason} (data/coco.py features skips such files)")
            pixels.append(array)
        pixels = clip_loader.normalize_pixels(torch.from_numpy(np.stack(pixels)).to(self.device))  # (B, 3, H, W)
        return clip_loader.pool_tokens(self.model(pixels), self.grid).float().cpu()  # (B, S, C)


def encoder_params(settings):
    """Parameter count of the frozen encoder a cache was made with, without loading its weights (meta device)."""
    encoder = settings["encoder"]
    if encoder.startswith(clip_loader.RANDOM_PREFIX):
        config = clip_loader.CLIP_PRESETS[encoder[len(clip_loader.RANDOM_PREFIX):].split(":")[0]]
    elif encoder in clip_loader.CLIP_PRESETS:
        config = clip_loader.CLIP_PRESETS[encoder]
    elif os.path.isfile(os.path.join(encoder, "config.json")):
        with open(os.path.join(encoder, "config.json")) as f:
            config = clip_loader.config_from_hub(json.load(f))
    else:
        return None  # an encoder this code cannot size offline: the count is left out, not guessed
    with torch.device("meta"):
        model = clip_loader.VisionTransformer(config)
    return {"total": sum(p.numel() for p in model.parameters()), "trainable": 0}

# -----------------------------------------------------------------------------
# The examples: every (image, caption) pair, tokenized once


def make_pairs(records, visual, tokenizer, max_tokens):
    """[(image_id, caption tokens)] for the records whose image the visual source has (cache skips bad files)."""
    pairs, missing = [], 0
    for r in records:
        if not visual.has(r["image_id"]):
            missing += 1
            continue
        for caption in r["captions"]:
            pairs.append((r["image_id"], tokenizer.encode_ordinary(caption.strip())[:max_tokens]))
    if missing:
        print0(f"note: {missing} of {len(records)} images are not in the visual source (unreadable when cached); "
               "their captions are left out")
    if not pairs:
        raise ValueError("no (image, caption) pairs: is the feature cache made from this split?")
    return pairs


def batch_of(pairs, index, visual, eot, device):
    """Visual tokens (B, S, C), caption tokens and targets (B, T) of the pairs at `index`."""
    chosen = [pairs[i] for i in index]
    tokens, targets = caption_batch([t for _, t in chosen], eot)
    return visual([i for i, _ in chosen]).to(device), tokens.to(device), targets.to(device)


def epoch_order(n, epoch, seed):
    """The pairs' order in one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).numpy()


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    dist = setup_distributed(args.device)
    try:
        return train(args, dist)
    finally:
        teardown(dist)


def train(args, dist):
    enable_speedups(dist.device_type)
    use_compile = args.compile if args.compile is not None else dist.device_type == "cuda"
    assert args.total_batch % (args.batch_size * dist.world_size) == 0, \
        "--total-batch must be a multiple of --batch-size x number of processes"
    grad_accum = args.total_batch // (args.batch_size * dist.world_size)

    # ---- the frozen LM and its tokenizer
    lm, tokenizer = load_lm(args.lm)
    eot = tokenizer.eot_token  # <|endoftext|> in the LM's vocabulary: ends every caption
    fingerprint = lm_fingerprint(lm)  # before any block is unfrozen and trained

    # ---- visual tokens: cached features or on-the-fly encoding
    train_records = coco.load_records(args.coco_root, "train", args.karpathy_json)
    if args.features:
        visual = CachedVisual(coco.FeatureCache(args.features))
    else:
        encoder = clip_loader.load_clip(args.encoder, layer=args.layer)
        visual = EncodedVisual(encoder, clip_loader.parse_grid(args.pool), train_records, dist.device)
    stats = None
    if args.standardize:
        if not args.features:
            raise ValueError("--standardize needs --features (the train cache holds the statistics)")
        stats = {k: torch.from_numpy(v) for k, v in visual.cache.stats.items()}
    val_visual = None
    if args.val_features:
        val_visual = CachedVisual(coco.FeatureCache(args.val_features, expect=visual.settings))
    elif not args.features:
        val_visual = EncodedVisual(visual.model, visual.grid, coco.load_records(args.coco_root, "val", args.karpathy_json),
                                   dist.device)

    # ---- resume: the checkpoint must describe this very setup
    ckpt_path = latest_checkpoint(args.out_dir) if args.resume == "auto" else args.resume
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    if args.resume == "auto" and ckpt is None:
        print0(f"--resume auto: no checkpoint in {args.out_dir}, starting from scratch")

    # ---- the captioner
    torch.manual_seed(args.seed)  # the same fresh bridge on every rank
    overrides = dict(vis_pos=args.vis_pos, xattn_every=args.xattn_every, xattn_heads=args.xattn_heads or lm.config.n_head,
                     queries=args.queries, qformer_layers=args.qformer_layers, qformer_width=args.qformer_width,
                     qformer_heads=args.qformer_heads)
    captioner, bridge_config = build_captioner(lm, eot, args.bridge, visual.settings["width"],
                                               visual.settings["tokens"], args.unfreeze_last, stats, **overrides)
    if ckpt is not None:
        if ckpt.get("kind") != "caption":
            raise ValueError(f"{ckpt_path} is not a train_caption.py checkpoint")
        problems = []
        if ckpt["bridge_config"] != dataclasses.asdict(bridge_config):
            problems.append(f"bridge config {ckpt['bridge_config']} != {dataclasses.asdict(bridge_config)}")
        if ckpt["lm"]["fingerprint"] != fingerprint:
            problems.append(f"LM weights differ (checkpoint trained on {ckpt['lm']['name']!r}, now {args.lm!r})")
        if ckpt["features"] != visual.settings:
            problems.append(f"visual features {ckpt['features']} != {visual.settings}")
        if ckpt["unfreeze_last"] != args.unfreeze_last:
            problems.append(f"--unfreeze-last {ckpt['unfreeze_last']} != {args.unfreeze_last}")
        if problems:
            raise ValueError(f"cannot resume from {ckpt_path}: " + "; ".join(problems))
    captioner.to(dist.device)

    # ---- parameter counts per part, as in the reference project's table
    params = captioner.param_counts()
    params["encoder"] = encoder_params(visual.settings)
    for part in ("encoder", "bridge", "lm"):
        c = params[part]
        counts = "unknown" if c is None else f"{c['total']:>13,} params, {c['trainable']:>11,} trainable"
        print0(f"{part:8s} {counts}")

    # ---- optimizer: the bridge, and any unfrozen GPT blocks at their own (smaller) learning rate
    def groups(params_list, lr):
        decay = [p for p in params_list if p.dim() >= 2]
        no_decay = [p for p in params_list if p.dim() < 2]
        return [{"params": decay, "weight_decay": args.weight_decay, "base_lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "base_lr": lr}]
    param_groups = groups(list(captioner.bridge.parameters()), args.lr)
    lm_trainable = [p for p in captioner.lm.parameters() if p.requires_grad]
    if lm_trainable:
        param_groups += groups(lm_trainable, args.lm_lr)
    fused = {"fused": True} if dist.device_type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **fused)
    model = torch.compile(captioner) if use_compile else captioner
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)

    # ---- data: pairs, epochs, steps
    pairs = make_pairs(train_records, visual, tokenizer, args.max_caption_tokens)
    steps_per_epoch = len(pairs) // args.total_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs < one batch of --total-batch {args.total_batch}")
    max_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    val_pairs = None
    if val_visual is not None:
        val_records = coco.load_records(args.coco_root, "val", args.karpathy_json)
        val_pairs = make_pairs(val_records, val_visual, tokenizer, args.max_caption_tokens)[:args.val_pairs]

    start_step, last_ckpt, train_seconds = 0, None, 0.0
    if ckpt is not None:
        captioner.load_trainable_state(ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_step, last_ckpt, train_seconds = ckpt["step"], ckpt_path, ckpt["train_seconds"]
        del ckpt

    logger = JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), resume=start_step > 0,
                         config={"args": vars(args), "bridge": dataclasses.asdict(bridge_config), "params": params,
                                 "pairs": len(pairs), "max_steps": max_steps, "grad_accum": grad_accum,
                                 "world_size": dist.world_size}, device=dist.device) if dist.master else None
    print0(f"{args.bridge} bridge: {len(pairs):,} pairs, {steps_per_epoch:,} steps/epoch, {max_steps:,} steps of "
           f"{args.total_batch} = {args.batch_size} x {dist.world_size} process(es) x {grad_accum} accumulation")

    @torch.no_grad()
    def val_loss():
        """Mean caption loss over the fixed val subset (weighted by batch size; split over processes)."""
        captioner.eval()
        total = torch.zeros(2, device=dist.device)  # (loss sum, pairs)
        mine = range(dist.rank * args.batch_size, len(val_pairs), args.batch_size * dist.world_size)
        for start in mine:
            index = range(start, min(start + args.batch_size, len(val_pairs)))
            v, tokens, targets = batch_of(val_pairs, index, val_visual, eot, dist.device)
            with autocast(dist.device_type):
                _, loss = captioner(v, tokens, targets)
            total += torch.stack([loss.float() * len(index), torch.tensor(float(len(index)), device=dist.device)])
        if dist.ddp:
            torch_dist.all_reduce(total)
        captioner.train()
        return (total[0] / total[1]).item()

    def save(step, name=None):
        nonlocal last_ckpt
        if not all_finite(captioner.bridge.parameters()):
            raise FloatingPointError(f"bridge weights are not finite before step {step}; not checkpointing them; "
                                     f"last good checkpoint: {last_ckpt}")
        if dist.master:
            path = os.path.join(args.out_dir, name or f"ckpt_{step:06d}.pt")
            save_checkpoint(path, {
                "kind": "caption", "step": step, "max_steps": max_steps,
                "bridge_config": dataclasses.asdict(bridge_config), "trainable": captioner.trainable_state(),
                "unfreeze_last": args.unfreeze_last, "visual_stats": stats,
                "lm": {"name": args.lm, "config": dataclasses.asdict(lm.config),
                       "vocab": getattr(tokenizer, "ids", None), "fingerprint": fingerprint},
                "features": visual.settings, "params": params, "train_seconds": train_seconds,
                "val_loss": last_val, "optimizer": optimizer.state_dict(), "rng": rng_state(), "args": vars(args)})
            last_ckpt = path
        return last_ckpt

    # -------------------------------------------------------------------------
    # The loop: one optimizer step = grad_accum micro-batches on each process
    end_step = min(max_steps, args.stop_step or max_steps)
    last_val = None
    micro = args.batch_size
    bar = tqdm(range(start_step, end_step), initial=start_step, total=max_steps, desc=f"{args.bridge}",
               disable=not dist.master, dynamic_ncols=True)
    captioner.train()
    run_seconds = 0.0  # training time of this job (the ETA comes from it)
    for step in bar:
        if val_pairs and args.val_every and step % args.val_every == 0:
            last_val = val_loss()
            if logger:
                logger.log(step=step, val_loss=last_val)
            if dist.master:
                bar.write(f"step {step:6d} | val loss {last_val:.4f}")

        t0 = time.time()
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(len(pairs), epoch, args.seed)
        # this process's share of the global batch, then its micro-batches
        mine = order[offset * args.total_batch:][dist.rank * micro * grad_accum:][:micro * grad_accum]
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=dist.device)
        for k in range(grad_accum):
            v, tokens, targets = batch_of(pairs, mine[k * micro:(k + 1) * micro], visual, eot, dist.device)
            sync = nullcontext() if not dist.ddp or k == grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(dist.device_type):
                    _, loss = model(v, tokens, targets)
                loss = loss / grad_accum  # backward() adds micro-batch gradients up: make the sum a mean
                loss_accum += loss.detach()
                loss.backward()
        if dist.ddp:
            torch_dist.all_reduce(loss_accum)
            loss_accum /= dist.world_size
        check_finite(loss_accum, step, last_ckpt)
        norm = torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], args.grad_clip)
        check_finite(norm, step, last_ckpt)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_steps, args.warmup_steps, group["base_lr"], 0.1 * group["base_lr"])
        optimizer.step()
        if dist.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_seconds += dt
        run_seconds += dt

        record = dict(step=step, loss=loss_accum.item(), lr=optimizer.param_groups[0]["lr"], grad_norm=norm.item(),
                      samples_per_s=args.total_batch / dt)
        if logger:
            logger.log(**record)
        if step % args.log_every == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}",
                            eta=format_eta(run_seconds / (step + 1 - start_step) * (end_step - step - 1)))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            save(step + 1)
    bar.close()

    if end_step > start_step:
        if end_step == max_steps and val_pairs:
            last_val = val_loss()
            if logger:
                logger.log(step=end_step, val_loss=last_val)
            print0(f"final val loss {last_val:.4f}")
        # the end of the run (ckpt_final.pt, what evaluate.py reads), or of this job (--stop-step, for --resume)
        path = save(end_step, "ckpt_final.pt" if end_step == max_steps else None)
        print0(f"saved {path} ({train_seconds:.0f} s of training so far)")
    if logger:
        logger.log(event="end", step=end_step, train_seconds=train_seconds)
        logger.close()
    return captioner


if __name__ == "__main__":
    main(sys.argv[1:])
