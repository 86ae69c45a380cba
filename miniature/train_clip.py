"""
CLIP's contrastive pretraining, by hand, at the scale of the offline miniature.

At full scale the captioners read OpenAI's CLIP ViT-L/14, pretrained on 400M (image, text) pairs: its tokens
say what is in an image because the contrastive objective rewarded exactly that. The miniature's encoder
should have learned the same way, so this script pretrains a small CLIP (miniature/clip_model.py: the towers
and the loss) on the miniature's own train images and captions, and saves it in the Hugging Face CLIP layout,
where clip_loader.load_clip reads it like OpenAI's. At the end the model measures itself on the held-out val
images and writes quality.json beside the weights (miniature/clip_probes.py): retrieval R@1 both ways, and
linear probes of the pooled tokens the bridges will read.

    python -m miniature.train_clip --root data/shapes --out-dir runs/clip   # what `make clip` runs
    # any encoder, without training:
    python -m miniature.train_clip --probe-only --encoder random-vit:mini:seed0 --root data/shapes
    torchrun --standalone --nproc_per_node=2 -m miniature.train_clip ...    # DDP (negatives stay per process)
"""
import argparse
import dataclasses
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# runnable as `python miniature/train_clip.py` from the repo root as well as `python -m miniature.train_clip`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_loader  # noqa: E402
from checkpoints import RunFolder, rng_state  # noqa: E402
from common import (UsageError, autocast, int_at_least, natural_int, nonneg_float,  # noqa: E402
                    positive_float, positive_int, write_json)
from data import coco, feature_cache  # noqa: E402
from gpt2 import SubsetTokenizer, decay_groups, get_tokenizer  # noqa: E402
from miniature.clip_model import LOGIT_SCALE_MAX, CLIP, CLIPTrainConfig, save_hub_folder  # noqa: E402
from miniature.clip_probes import print_quality, probe_encoder, read_scenes, retrieval  # noqa: E402
from train_utils import (add_run_flags, check_finite, enable_speedups, format_eta, grad_scaler,  # noqa: E402
                         launch, lr_at, mean_over_processes, print0)

# -----------------------------------------------------------------------------
# The loop. Every process takes its slice of the global batch, and its negatives are the captions of its own
# slice (CLIP all-gathers the embeddings so that every process scores against the whole batch; with one
# process, the demo's case, the two are the same).


def train(args, dist):
    job = setup(args, dist)  # the images and captions, the model, its optimizer, the run folder: see below
    raw_model, model, optimizer, scaler, run = job.raw_model, job.model, job.optimizer, job.scaler, job.run
    data, B, micro, (start_step, end_step) = job.train_data, args.batch_size, job.micro, job.steps
    bar = tqdm(range(start_step, end_step), initial=start_step, total=args.max_steps, desc="clip",
               disable=not dist.master, dynamic_ncols=True)
    run_seconds = 0.0
    for step in bar:
        if args.val_every and step % args.val_every == 0 and step > 0 and dist.master:
            log_retrieval(job, step, bar.write)

        t0 = time.time()
        model.train()
        epoch, offset = divmod(step, job.steps_per_epoch)
        order, caption_of = epoch_plan(data, epoch, args.seed)
        # this process's slice of the step's batch
        mine = order[offset * B:(offset + 1) * B][dist.rank * micro:(dist.rank + 1) * micro]
        rows = caption_of[mine]  # (b,) one caption of each image
        pixels = clip_loader.normalize_pixels(data["pixels"][mine].to(dist.device))  # (b, 3, H, W)
        T = int(data["eot"][rows].max()) + 1  # the batch's longest caption: no position wasted on padding
        tokens = data["captions"][rows, :T].to(dist.device)  # (b, T)
        optimizer.zero_grad(set_to_none=True)
        with autocast(dist.device_type, args.dtype):
            loss = model(pixels, tokens, data["eot"][rows].to(dist.device))
        scaler.scale(loss).backward()
        loss = mean_over_processes(loss.detach(), dist)  # the loss to log, over all processes
        check_finite(loss, step, run.last)
        scaler.unscale_(optimizer)  # the true gradients, for clipping (a no-op but with fp16)
        norm = torch.nn.utils.clip_grad_norm_(job.params, args.grad_clip)
        if not scaler.is_enabled():  # (with fp16 an overflow is the scaler's to skip)
            check_finite(norm, step, run.last)  # an inf gradient would put inf into every weight
        lr = lr_at(step, args.max_steps, args.warmup_steps, args.lr, 0.1 * args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        if dist.device_type == "cuda":
            torch.cuda.synchronize()  # wait for the GPU, so that the step's time is its own
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)  # CLIP's cap on the temperature's inverse: 100
        dt = time.time() - t0
        job.train_seconds += dt
        run_seconds += dt

        scale = raw_model.logit_scale.exp().item()
        run.log(step=step, loss=loss.item(), lr=lr, grad_norm=norm.item(), logit_scale=scale,
                samples_per_s=B / dt)
        if step % args.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale:.1f}",
                            eta=format_eta(run_seconds / (step + 1 - start_step) * (end_step - step - 1)))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            run.save(f"ckpt_{step + 1:06d}.pt", checkpoint(job, args, step + 1), job.params)
    bar.close()
    if end_step > start_step:
        run.save(f"ckpt_{end_step:06d}.pt", checkpoint(job, args, end_step), job.params)
    if end_step < args.max_steps:
        print0(f"stopped before step {end_step} of {args.max_steps}: continue with --resume auto")
    elif dist.master and (end_step > start_step
                          or not os.path.exists(os.path.join(args.out_dir, "config.json"))):
        finish(job, args)
    else:
        print0(f"{run.resumed_from} is at step {start_step}: nothing left to train; "
               f"{args.out_dir}/config.json is its model")
    run.finish(step=end_step, train_seconds=job.train_seconds)
    return raw_model

# -----------------------------------------------------------------------------
# Setting up: the images and captions, the model and its optimizer, what --resume brings back


def setup(args, dist):
    """Everything the loop reads, as one namespace (job.raw_model, job.train_data, ...)."""
    enable_speedups(dist.device_type)
    if args.batch_size % dist.world_size:
        raise UsageError(f"-B {args.batch_size} pairs per step cannot be split evenly over {dist.world_size} "
                         f"processes")
    # --overwrite deletes the old model too: a new run stopped early must not leave it looking finished
    run = RunFolder(args, dist, "miniature/train_clip.py",
                    outputs=("config.json", "model.safetensors", "quality.json"))

    # ---- data: the vocabulary is the GPT-2 tokens the train captions use
    t0 = time.time()
    tokenizer = caption_tokenizer(coco.load_records(args.root, "train"))
    config = CLIPTrainConfig(vision=args.vision, text_layers=args.text_layers, text_heads=args.text_heads,
                             text_width=args.text_width, text_tokens=args.text_tokens,
                             vocab_size=tokenizer.n_vocab, embed_dim=args.embed_dim)
    check_resumable(run.ckpt, run.resumed_from, config, tokenizer)
    size = clip_loader.CLIP_PRESETS[args.vision].image_size
    train_data = load_split(args.root, "train", size, tokenizer, args.text_tokens, args.limit)
    val_data = load_split(args.root, "val", size, tokenizer, args.text_tokens, args.limit)
    steps_per_epoch = len(train_data["pixels"]) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_data['pixels'])} train images are fewer than one batch of "
                         f"-B {args.batch_size}")
    print0(f"{len(train_data['pixels'])} train images ({len(train_data['captions'])} captions), "
           f"{len(val_data['pixels'])} val images, {tokenizer.n_vocab}-token vocabulary; loaded in "
           f"{time.time() - t0:.1f}s")

    # ---- the model and its optimizer
    torch.manual_seed(args.seed)  # the same fresh text tower on every rank
    raw_model = CLIP(config, seed=args.seed).to(dist.device)
    params = list(raw_model.parameters())
    # CLIP's betas and eps: beta2 0.98 follows the loss's fast changes early in training better than 0.999
    optimizer = torch.optim.AdamW(decay_groups(params, args.weight_decay), lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6, **({"fused": True} if args.fused else {}))
    scaler = grad_scaler(dist.device_type, args.dtype)
    model = torch.compile(raw_model, backend=args.compile_backend) if args.compile else raw_model
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in
              [("image tower", raw_model.vision_model), ("text tower", raw_model.text_model)]}
    print0(f"CLIP {config}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) +
           f"; {sum(p.numel() for p in params) / 1e6:.2f}M trainable")

    ckpt = run.resume(optimizer, args)  # optimizer moments and RNGs; the weights next
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    start_step = ckpt["step"] if ckpt else 0
    run.start_log(start_step, {"args": vars(args), "model": dataclasses.asdict(config), "params": counts,
                               "world_size": dist.world_size}, dist.device)
    return SimpleNamespace(
        raw_model=raw_model, model=model, optimizer=optimizer, scaler=scaler, run=run, params=params,
        config=config, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
        steps_per_epoch=steps_per_epoch, micro=args.batch_size // dist.world_size,
        steps=(start_step, min(args.max_steps, args.stop_step or args.max_steps)),
        train_seconds=ckpt["train_seconds"] if ckpt else 0.0)


def checkpoint(job, args, step):
    """A checkpoint: the model, and all it takes to resume exactly."""
    return {"trainer": "miniature/train_clip.py", "step": step, "model": job.raw_model.state_dict(),
            "config": dataclasses.asdict(job.config), "vocab": job.tokenizer.ids,
            "optimizer": job.optimizer.state_dict(), "rng": rng_state(),
            "train_seconds": job.train_seconds, "args": vars(args)}


def log_retrieval(job, step, write):
    r = retrieval(job.raw_model, job.val_data)
    write(f"step {step:5d} | val R@1 image->text {r['image_to_text_R@1']:.3f}, text->image "
          f"{r['text_to_image_R@1']:.3f} | logit scale {job.raw_model.logit_scale.exp().item():.1f}")
    job.run.log(step=step, **{f"val_{k}": v for k, v in r.items()})

# -----------------------------------------------------------------------------
# Data: every image of a split in memory (uint8), every caption tokenized once


def caption_tokenizer(records):
    """GPT-2's BPE restricted to the tokens the train captions use (as the miniature's LM is),
    + <|endoftext|>."""
    bpe = get_tokenizer()
    return SubsetTokenizer({t for r in records for c in r["captions"] for t in bpe.encode_ordinary(c)})


def load_split(root, split, image_size, tokenizer, max_tokens, limit=None):
    """
    One split as tensors: pixels (N, H, W, 3) uint8 exactly as CLIP preprocesses them; captions (M, T) padded
    with <|endoftext|>, eot (M,) the position of each caption's <|endoftext|>, owner (M,) its image's row;
    image i's captions are rows first[i] .. first[i] + count[i] - 1.
    """
    records = [r for r in coco.load_records(root, split) if r["captions"]][:limit]
    pixels, captions, eot, owner, first, count = [], [], [], [], [], []
    for row, r in enumerate(records):
        first.append(len(captions))
        count.append(len(r["captions"]))
        array, reason = feature_cache.load_pixels(r["path"], image_size)
        if array is None:
            raise ValueError(f"cannot read {r['path']}: {reason}")
        pixels.append(array)
        for caption in r["captions"]:
            ids = tokenizer.encode_ordinary(caption)
            if len(ids) + 1 > max_tokens:
                raise UsageError(f"caption of {len(ids)} tokens does not fit --text-tokens {max_tokens}: "
                                 f"{caption!r}")
            captions.append(ids + [tokenizer.eot_token] * (max_tokens - len(ids)))
            eot.append(len(ids))
            owner.append(row)
    return dict(records=records, pixels=torch.from_numpy(np.stack(pixels)), captions=torch.tensor(captions),
                eot=torch.tensor(eot), owner=torch.tensor(owner), first=torch.tensor(first),
                count=torch.tensor(count))


def epoch_plan(data, epoch, seed):
    """
    One epoch: the images in an order fixed by (seed, epoch), each paired with one of its captions drawn the
    same way, so a resumed run sees exactly the batches it would have seen. Returns (order, caption row per
    image).
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(data["first"]), generator=g)
    caption_of = data["first"] + (torch.rand(len(data["first"]), generator=g) * data["count"]).long()
    return order, caption_of

# -----------------------------------------------------------------------------
# Resuming, and the end of a run: the model's quality, then the hub-format folder


def check_resumable(ckpt, ckpt_path, config, tokenizer):
    """UsageError unless the checkpoint holds this very model: same towers, same caption vocabulary."""
    if ckpt is None:
        return
    if ckpt["vocab"] != tokenizer.ids:
        raise UsageError(f"{ckpt_path} was trained on captions with another vocabulary: "
                         "resume with its --root")
    if ckpt["config"] != dataclasses.asdict(config):
        diff = {k: (ckpt["config"].get(k), v) for k, v in dataclasses.asdict(config).items()
                if ckpt["config"].get(k) != v}
        raise UsageError(f"cannot resume from {ckpt_path}: the model differs (checkpoint, now): {diff}")


def finish(job, args):
    """The finished model: its quality on held-out images (quality.json), then the hub-format folder."""
    t0 = time.time()
    model, scenes = job.raw_model, read_scenes(args.root)
    quality = {"retrieval": retrieval(model, job.val_data, scenes and scenes["val"]),
               "train_seconds": job.train_seconds, "steps": args.max_steps, "batch_size": args.batch_size,
               "model": dataclasses.asdict(model.config)}
    if scenes:
        quality["probe"] = probe_encoder(model.vision_model, job.train_data, job.val_data, scenes,
                                         clip_loader.parse_grid(args.probe_pool))
    quality["eval_seconds"] = time.time() - t0
    write_json(os.path.join(args.out_dir, "quality.json"), quality)
    save_hub_folder(model, job.tokenizer, args.out_dir)  # config.json last: a folder with one is complete
    print_quality(quality)
    print0(f"saved {args.out_dir}/config.json + model.safetensors (Hugging Face CLIP layout) and "
           f"quality.json; {job.train_seconds:.0f} s of training")
    job.run.log(event="quality", **quality)


def probe_only(args):
    """Probe any encoder (the random one, for the ablation) on the miniature's images, without training."""
    scenes = read_scenes(args.root)
    if scenes is None:
        raise FileNotFoundError(f"{args.root} has no scenes_train.json / scenes_val.json: "
                                "probes need the miniature")
    encoder = clip_loader.load_clip(args.encoder)
    print(clip_loader.describe(encoder))
    size = encoder.config.image_size
    tokenizer = caption_tokenizer(coco.load_records(args.root, "train"))
    train = load_split(args.root, "train", size, tokenizer, args.text_tokens, args.limit)
    val = load_split(args.root, "val", size, tokenizer, args.text_tokens, args.limit)
    quality = {"encoder": args.encoder, "probe": probe_encoder(encoder, train, val, scenes,
                                                               clip_loader.parse_grid(args.probe_pool))}
    print_quality(quality)
    return quality

# -----------------------------------------------------------------------------
# Command line


def add_contrastive_flags(p, max_steps, lr, weight_decay):
    """The text tower's flags and a contrastive run's optimisation, evaluation and checkpoint flags: this
    script's, and qformer_stage1.py's (BLIP-2's first stage trains the same tower against the queries)."""
    # the text tower
    p.add_argument("--text-layers", type=positive_int, default=2)
    p.add_argument("--text-width", type=positive_int, default=64)
    p.add_argument("--text-heads", type=positive_int, default=4)
    p.add_argument("--text-tokens", type=int_at_least(2), default=32,
                   help="longest caption + <|endoftext|> (the CLIP stage refuses a longer caption; "
                   "qformer_stage1.py cuts it)")
    p.add_argument("--embed-dim", type=positive_int, default=128, help="the shared image-text embedding")
    # optimisation
    p.add_argument("--max-steps", type=positive_int, default=max_steps)
    p.add_argument("--stop-step", type=positive_int, default=None,
                   help="stop (and checkpoint) before this step")
    p.add_argument("-B", "--batch-size", type=int_at_least(2), default=128,
                   help="(image, caption) pairs per step, over all processes: each other's negatives")
    p.add_argument("--lr", type=positive_float, default=lr, help="max learning rate (cosine to 10%%)")
    p.add_argument("--warmup-steps", type=natural_int, default=30)
    p.add_argument("--weight-decay", type=nonneg_float, default=weight_decay)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=natural_int, default=200,
                   help="val R@1 every N steps (it is always measured at the end)")
    p.add_argument("--ckpt-every", type=natural_int, default=200)
    p.add_argument("--log-every", type=positive_int, default=10)


def check_text_flags(p, args):
    if args.text_width % args.text_heads:
        p.error(f"--text-heads {args.text_heads} does not divide --text-width {args.text_width}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/shapes",
                   help="COCO-format root with train and val splits (data/shapes.py)")
    p.add_argument("--out-dir", default="runs/clip", help="checkpoints, log.jsonl, and the hub-format model")
    p.add_argument("--seed", type=int, default=1337)
    # the model
    p.add_argument("--vision", default="clip-mini", choices=sorted(clip_loader.CLIP_PRESETS),
                   help="image tower layout")
    add_contrastive_flags(p, max_steps=500, lr=2e-3, weight_decay=0.1)
    p.add_argument("--probe-pool", default=clip_loader.POOL_FLAG,
                   help="pooling grid of the probed tokens (as the feature cache's --pool)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N images of each split (tests)")
    p.add_argument("--probe-only", action="store_true", help="no training: probe --encoder's tokens and exit")
    p.add_argument("--encoder", default=None,
                   help="with --probe-only: any clip_loader.load_clip id or folder")
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    check_text_flags(p, args)
    if args.probe_only and args.encoder is None:
        p.error("--probe-only needs --encoder (e.g. random-vit:mini:seed0, or a folder this script wrote)")
    try:
        clip_loader.parse_grid(args.probe_pool)
    except ValueError as e:
        p.error(f"--probe-pool: {e}")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.probe_only:
        return probe_only(args)
    return launch(train, args)


if __name__ == "__main__":
    main(sys.argv[1:])
