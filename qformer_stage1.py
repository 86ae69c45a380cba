"""
BLIP-2's first stage, by hand: train the Q-Former against text before it ever meets the frozen LM.

    python qformer_stage1.py --coco-root data/shapes --features runs/demo/features/none/train \\
        --val-features runs/demo/features/none/val --out-dir runs/stage1 \\
        --qformer-width 128 --qformer-heads 4 --queries 16 --vis-pos-grid --query-std 1.0
    # the second stage: the usual captioning (or VQA) run, its Q-Former starting from the first stage's
    python train_caption.py --bridge qformer --qformer-init runs/stage1/ckpt_final.pt ... (the same flags)

Trained by the captioning loss alone, a Q-Former's queries learn only what reaches them back through a frozen
LM; they start alike and can stay alike. BLIP-2 first trains them to pull out of the image what a caption says
of it, with two losses (its third, image-grounded generation, is what the second stage trains through the LM):
  ITC  image-text contrastive. The queries' outputs and the caption's embedding (the text tower and the
       symmetric InfoNCE loss of the miniature's CLIP, miniature/clip_model.py) share one space; an image is
       as close to a caption as its closest query. Each image must pick its caption out of the batch's.
  ITM  image-text matching. The caption's words join the queries' self-attention (as a question does in the
       instruction-aware Q-Former) and a linear head says match / no match: for every true pair, a caption
       the ITC finds close to the image but that is another image's, and an image close to the caption but
       not its own (hard negatives, drawn with probability softmax(similarity)). Telling those apart needs
       the details the ITC's single similarity can blur: which object is which colour, which is left.
The Q-Former's body (its input layer, queries and layers) is what the second stage keeps; its read-out into
the LM and the text tower are left behind. Writes to --out-dir: log.jsonl, ckpt_<step>.pt, ckpt_final.pt.
"""
import argparse
import dataclasses
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from bridges import BridgeConfig, QFormerBridge, standardize
from checkpoints import RunFolder, rng_state
from common import UsageError, autocast, load_checkpoint, positive_int
from data import coco, feature_cache
from gpt2 import decay_groups
from miniature.clip_model import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, CLIPTrainConfig, TextTransformer, \
    contrastive_loss, similarity
from miniature.train_clip import add_contrastive_flags, caption_tokenizer, check_text_flags, epoch_plan
from train_utils import (add_run_flags, check_finite, enable_speedups, format_eta, grad_scaler, launch, lr_at,
                         mean_over_processes, print0)

TRAINER = "qformer_stage1.py"

# -----------------------------------------------------------------------------
# The model: the Q-Former, a text tower, and the two losses


class Stage1(nn.Module):

    def __init__(self, bridge_config, text_config):
        super().__init__()
        self.qformer = QFormerBridge(bridge_config)
        self.qformer.proj.requires_grad_(False)  # the read-out into an LM: the second stage trains it
        W, D = bridge_config.qformer_width, text_config.embed_dim
        self.text_model = TextTransformer(text_config)
        self.image_projection = nn.Linear(W, D, bias=False)  # each query's output -> the shared space
        self.text_projection = nn.Linear(text_config.text_width, D, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.words = nn.Linear(text_config.text_width, W)  # the caption's words as the queries read them
        self.itm_head = nn.Linear(W, 2)  # no match / match

    def embed(self, visual, tokens, eot_index):
        """The queries in the shared space (B, Q, D), the captions there (B, D), and the captions' words
        (B, T, C_text)."""
        queries = F.normalize(self.image_projection(self.qformer.read_image(visual)), dim=-1)  # (B, Q, D)
        words = self.text_model.states(tokens)  # (B, T, C_text)
        pooled = words[torch.arange(len(words), device=words.device), eot_index]  # (B, C_text)
        return queries, F.normalize(self.text_projection(pooled), dim=-1), words

    def forward(self, visual, tokens, eot_index):
        """(ITC loss, ITM loss) of B (image, caption) pairs: visual (B, S, C_vis), tokens (B, T), eot_index
        (B,)."""
        queries, text, words = self.embed(visual, tokens, eot_index)
        itc = contrastive_loss(queries, text, self.logit_scale)
        other_text, other_image = hard_negatives(similarity(queries, text).detach(), tokens)  # (B,), (B,)
        real = torch.arange(tokens.size(1), device=tokens.device) <= eot_index[:, None]  # (B, T) not padding
        words = self.words(words)  # (B, T, W)
        B = len(visual)
        # the true pairs, each image with a close caption that is not its own, each caption with a close image
        images = torch.cat([visual, visual, visual[other_image]])  # (3B, S, C_vis)
        captions = (torch.cat([words, words[other_text], words]), torch.cat([real, real[other_text], real]))
        matches = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(visual.device)  # (3B,)
        logits = self.itm_head(self.qformer.read_image(images, captions)).mean(dim=1)  # (3B, 2): over queries
        return itc, F.cross_entropy(logits, matches)


def hard_negatives(sim, tokens):
    """
    sim (B, B) image-caption similarities -> for each image the row of another's caption, for each caption
    the row of another image, drawn with probability softmax(sim): the ITC's closest wrong answers are drawn
    most. A caption word for word the same as the image's own is no negative: it never is drawn.
    """
    same = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)  # (B, B), True on the diagonal too
    sim = sim.float().masked_fill(same, float("-inf")) / 0.07  # CLIP's first temperature: sharp, not one-hot
    # a batch where every caption is the same words has no negative: any other row, uniformly
    fallback = (~torch.eye(len(sim), dtype=torch.bool, device=sim.device)).float()
    pick = []
    for s in (sim, sim.t()):
        weights = s.softmax(dim=1).nan_to_num(0.0)
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, fallback)
        pick.append(torch.multinomial(weights, 1).squeeze(1))
    return pick[0], pick[1]

# -----------------------------------------------------------------------------
# The loop


def train(args, dist):
    job = setup(args, dist)  # the features and captions, the model, its optimizer, the run folder: see below
    raw, model, optimizer, scaler, run = job.raw, job.model, job.optimizer, job.scaler, job.run
    data = job.data
    B, micro, (start_step, end_step) = args.batch_size, args.batch_size // dist.world_size, job.steps
    bar = tqdm(range(start_step, end_step), initial=start_step, total=args.max_steps, desc="stage 1",
               disable=not dist.master, dynamic_ncols=True)
    run_seconds = 0.0
    for step in bar:
        if args.val_every and step % args.val_every == 0 and step > 0 and dist.master:
            log_retrieval(job, step, bar.write)

        t0 = time.time()
        model.train()
        epoch, offset = divmod(step, job.steps_per_epoch)
        order, caption_of = epoch_plan(data, epoch, args.seed)  # each image once per epoch, with one caption
        mine = order[offset * B:(offset + 1) * B][dist.rank * micro:(dist.rank + 1) * micro]
        rows = caption_of[mine]
        visual = features(job.source, data["image_ids"][mine], job.stats, dist.device)  # (b, S, C_vis)
        T = int(data["eot"][rows].max()) + 1
        tokens, eot = data["captions"][rows, :T].to(dist.device), data["eot"][rows].to(dist.device)  # (b, T)
        optimizer.zero_grad(set_to_none=True)
        with autocast(dist.device_type, args.dtype):
            itc, itm = model(visual, tokens, eot)
        scaler.scale(itc + itm).backward()
        itc, itm = (mean_over_processes(x.detach(), dist) for x in (itc, itm))
        check_finite(itc + itm, step, run.last)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(job.params, args.grad_clip)
        lr = lr_at(step, args.max_steps, args.warmup_steps, args.lr, 0.1 * args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        if dist.device_type == "cuda":
            torch.cuda.synchronize()  # so that the step's time is its own
        with torch.no_grad():
            raw.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        dt = time.time() - t0
        job.train_seconds += dt
        run_seconds += dt
        run.log(step=step, itc=itc.item(), itm=itm.item(), lr=lr, grad_norm=norm.item(), pairs_per_s=B / dt)
        if step % args.log_every == 0:
            bar.set_postfix(itc=f"{itc.item():.3f}", itm=f"{itm.item():.3f}",
                            eta=format_eta(run_seconds / (step + 1 - start_step) * (end_step - step - 1)))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            run.save(f"ckpt_{step + 1:06d}.pt", checkpoint(job, args, step + 1), job.params)
    bar.close()
    quality = log_retrieval(job, end_step, print0) if dist.master and job.val_data else None
    name = "ckpt_final.pt" if end_step == args.max_steps else f"ckpt_{end_step:06d}.pt"
    if end_step > start_step:
        path = run.save(name, {**checkpoint(job, args, end_step), "quality": quality}, job.params)
        print0(f"saved {path}; {job.train_seconds:.0f} s of training"
               + ("" if end_step == args.max_steps else "; continue with --resume auto"))
    run.finish(step=end_step, train_seconds=job.train_seconds)
    return raw

# -----------------------------------------------------------------------------
# Setting up


def setup(args, dist):
    enable_speedups(dist.device_type)
    if args.batch_size % dist.world_size:
        raise UsageError(f"-B {args.batch_size} pairs per step cannot be split evenly over {dist.world_size} "
                         f"processes")
    run = RunFolder(args, dist, TRAINER)
    records = coco.load_records(args.coco_root, "train")
    tokenizer = caption_tokenizer(records)  # the GPT-2 tokens the train captions use, as the CLIP's
    source = feature_cache.FeatureCache(args.features)
    stats = {k: torch.from_numpy(v) for k, v in source.stats.items()} if args.standardize else None
    data = caption_rows(records, source, tokenizer, args.text_tokens)
    val_data = None
    if args.val_features:
        val_source = feature_cache.FeatureCache(args.val_features, expect=source.spec)
        val_records = coco.load_records(args.coco_root, "val")[:args.val_images]
        val_data = caption_rows(val_records, val_source, tokenizer, args.text_tokens, known_words_only=True)
        val_data["source"] = val_source
    steps_per_epoch = len(data["image_ids"]) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(data['image_ids'])} train images are fewer than one batch of "
                         f"-B {args.batch_size}")

    torch.manual_seed(args.seed)
    W = args.qformer_width
    bridge_config = BridgeConfig(
        kind="qformer", vis_dim=source.spec.width, vis_tokens=source.spec.tokens,
        vis_grid=source.spec.grid and tuple(source.spec.grid), n_embd=W, n_layer=0, vis_pos=args.vis_pos,
        vis_pos_grid=args.vis_pos_grid, queries=args.queries, query_std=args.query_std,
        qformer_layers=args.qformer_layers, qformer_width=W,
        qformer_heads=args.qformer_heads)  # n_embd: a stand-in; the read-out is not kept
    text_config = CLIPTrainConfig(text_layers=args.text_layers, text_heads=args.text_heads,
                                  text_width=args.text_width, text_tokens=args.text_tokens,
                                  vocab_size=tokenizer.n_vocab, embed_dim=args.embed_dim)
    check_resumable(run.ckpt, run.resumed_from, bridge_config, text_config, tokenizer)
    try:
        raw = Stage1(bridge_config, text_config).to(dist.device)
    except ValueError as e:  # bridges.py names the config field; the user typed the flag
        raise UsageError(str(e).replace("qformer_heads", "--qformer-heads")
                         .replace("qformer_width", "--qformer-width")) from e
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay_groups(params, args.weight_decay), lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6, **({"fused": True} if args.fused else {}))
    scaler = grad_scaler(dist.device_type, args.dtype)
    model = torch.compile(raw, backend=args.compile_backend) if args.compile else raw
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)
    ckpt = run.resume(optimizer, args)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    start_step = ckpt["step"] if ckpt else 0
    counts = {"qformer": sum(p.numel() for n, p in raw.named_parameters() if p.requires_grad
                             and n.startswith("qformer.")),
              "text tower and heads": sum(p.numel() for n, p in raw.named_parameters()
                                          if not n.startswith("qformer."))}
    run.start_log(start_step, {"args": vars(args), "bridge": dataclasses.asdict(bridge_config),
                               "text": dataclasses.asdict(text_config), "params": counts,
                               "world_size": dist.world_size}, dist.device)
    print0(f"stage 1: {len(data['image_ids']):,} train images ({len(data['captions']):,} captions), "
           f"{tokenizer.n_vocab}-token vocabulary; "
           + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
           + f" trainable; {steps_per_epoch} steps/epoch")

    return SimpleNamespace(
        raw=raw, model=model, optimizer=optimizer, scaler=scaler, run=run, params=params, data=data,
        val_data=val_data, stats=stats, tokenizer=tokenizer, source=source, bridge_config=bridge_config,
        text_config=text_config, steps_per_epoch=steps_per_epoch,
        steps=(start_step, min(args.max_steps, args.stop_step or args.max_steps)),
        train_seconds=ckpt["train_seconds"] if ckpt else 0.0)


def features(source, image_ids, stats, device):
    """The visual tokens (b, S, C_vis) of these images, standardised with the train cache's stats (None: as
    they are), as the captioner standardises them."""
    v = source.tokens(image_ids.tolist())[1]
    if stats is not None:
        v = standardize(v, stats["mean"], stats["std"])
    return v.to(device)


def caption_rows(records, source, tokenizer, text_tokens, known_words_only=False):
    """
    The images the feature cache has, and their captions as epoch_plan reads them: captions (M, text_tokens)
    padded with <|endoftext|>, eot (M,) where each ends, first / count (N,) image i's rows. A caption longer
    than text_tokens - 1 is cut; known_words_only (val): a caption with a word the train captions never used
    is left out.
    """
    absent = [r for r in records if r["image_id"] not in source and r["image_id"] not in source.unreadable]
    if absent:  # a cache of another split: never train on less than was asked for, silently
        raise ValueError(f"{len(absent)} of the {len(records)} images are not in the feature cache "
                         f"{source.out_dir} (e.g. {absent[0]['path']}): was it built from another split?")
    image_ids, captions, eot, first, count = [], [], [], [], []
    for r in records:
        if r["image_id"] not in source:
            continue  # unreadable when the cache was built: reported there
        rows = []
        for caption in r["captions"]:
            try:
                ids = tokenizer.encode_ordinary(caption.strip())[:text_tokens - 1]
            except ValueError:
                if known_words_only:
                    continue
                raise
            if ids:
                rows.append(ids + [tokenizer.eot_token] * (text_tokens - len(ids)))
                eot.append(len(ids))
        if rows:
            image_ids.append(r["image_id"])
            first.append(len(captions))
            count.append(len(rows))
            captions.extend(rows)
    if not image_ids:
        raise ValueError(f"none of the {len(records)} images of {source.out_dir} has a caption")
    return dict(image_ids=torch.tensor(image_ids), captions=torch.tensor(captions), eot=torch.tensor(eot),
                first=torch.tensor(first), count=torch.tensor(count))


def checkpoint(job, args, step):
    """The whole model and what resuming needs; "qformer" is the part the second stage starts from."""
    return {"trainer": TRAINER, "step": step, "model": job.raw.state_dict(),
            "qformer": {k: v for k, v in job.raw.qformer.state_dict().items() if not k.startswith("proj.")},
            "bridge_config": dataclasses.asdict(job.bridge_config),
            "text": dataclasses.asdict(job.text_config),
            "vocab": job.tokenizer.ids, "visual_features": job.source.spec.as_dict(),
            "standardize": args.standardize, "optimizer": job.optimizer.state_dict(), "rng": rng_state(),
            "train_seconds": job.train_seconds, "args": vars(args)}


def check_resumable(ckpt, path, bridge_config, text_config, tokenizer):
    """UsageError unless the checkpoint (None: a fresh run) holds this very model, on captions of this
    vocabulary."""
    if ckpt is None:
        return
    have = {"bridge": ckpt["bridge_config"], "text": ckpt["text"], "vocabulary": ckpt["vocab"]}
    want = {"bridge": dataclasses.asdict(bridge_config), "text": dataclasses.asdict(text_config),
            "vocabulary": tokenizer.ids}
    differ = [k for k in have if _plain(have[k]) != _plain(want[k])]
    if differ:
        raise UsageError(f"cannot resume from {path}: its {' and '.join(differ)} differ from this run's "
                         f"flags and data; resume with the same flags, or start over with --overwrite")


@torch.no_grad()
def log_retrieval(job, step, write):
    """Image -> text and text -> image R@1 over the val images (their first caption each), as the ITC ranks
    them, and how many true and hard-negative pairs the ITM head gets right."""
    model, data, was_training = job.raw, job.val_data, job.raw.training
    model.eval()
    rows = data["first"]
    visual = features(data["source"], data["image_ids"], job.stats, next(model.parameters()).device)
    T = int(data["eot"][rows].max()) + 1
    tokens, eot = data["captions"][rows, :T].to(visual.device), data["eot"][rows].to(visual.device)
    queries, text, _ = model.embed(visual, tokens, eot)
    sim = similarity(queries, text)  # (N, N)
    labels = torch.arange(len(sim), device=sim.device)
    r = {"image_to_text_R@1": (sim.argmax(dim=1) == labels).float().mean().item(),
         "text_to_image_R@1": (sim.argmax(dim=0) == labels).float().mean().item()}
    model.train(was_training)
    write(f"step {step:5d} | val R@1 image->text {r['image_to_text_R@1']:.3f}, text->image "
          f"{r['text_to_image_R@1']:.3f} ({len(sim)} images)")
    job.run.log(step=step, **{f"val_{k}": v for k, v in r.items()})
    return r

# -----------------------------------------------------------------------------
# The second stage's start: train_caption.py --qformer-init


# the fields the second stage must repeat: those that fix the shapes of what it keeps (vis_dim, vis_tokens:
# the features, below), and query_std, though the queries are loaded: a run whose flags say its queries
# started at unit scale must not be handed ones that started at 0.02
KEPT = ("vis_pos", "vis_pos_grid", "queries", "query_std", "qformer_layers", "qformer_width", "qformer_heads")


def start_from(bridge, config, path, spec, standardize):
    """Load a stage-1 checkpoint's Q-Former into a fresh captioning bridge (config: its BridgeConfig) that
    reads the same features (spec); the read-out into the LM (and the question's projection) stay fresh."""
    ckpt = load_checkpoint(path, "--qformer-init checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("trainer") != TRAINER:
        raise UsageError(f"--qformer-init {path} is not a checkpoint of {TRAINER} (BLIP-2's first stage)")
    if config.kind != "qformer":
        raise UsageError(f"--qformer-init starts a Q-Former; this run trains --bridge {config.kind}")
    first = ckpt["bridge_config"]
    differ = [f"--{k.replace('_', '-')} {first[k]} there, {getattr(config, k)} here" for k in KEPT
              if first[k] != getattr(config, k)]
    have = type(spec).from_dict(ckpt["visual_features"], path)
    differ += [f"features: {d}" for d in have.differences(spec, "stage 1 read")]
    if ckpt["standardize"] != standardize:
        differ.append(f"--standardize {ckpt['standardize']} there, {standardize} here")
    if differ:
        raise UsageError(f"--qformer-init {path} was trained for another Q-Former: {'; '.join(differ)}")
    missing, unexpected = bridge.load_state_dict(ckpt["qformer"], strict=False)
    assert not unexpected and all(k.startswith(("proj.", "text.")) for k in missing), (missing, unexpected)
    print0(f"the Q-Former starts from {path} (stage 1, step {ckpt['step']})")


def _plain(x):
    """Tuples as lists, to compare what a checkpoint stored with what the flags give."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x

# -----------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-root", default="data/coco", help="COCO-format root (the train captions)")
    p.add_argument("--features", required=True,
                   help="feature cache of the train split (data/feature_cache.py)")
    p.add_argument("--val-features", default=None, help="feature cache of the val split: retrieval R@1")
    p.add_argument("--val-images", type=positive_int, default=500, help="val images the R@1 ranks among")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise the tokens with the train cache's statistics (as train_caption.py's)")
    p.add_argument("--out-dir", default="runs/stage1")
    p.add_argument("--seed", type=int, default=1337)
    # the Q-Former: as train_caption.py's flags of the same names, which the second stage must repeat
    defaults = BridgeConfig()
    p.add_argument("--queries", type=positive_int, default=defaults.queries)
    p.add_argument("--query-std", type=float, default=defaults.query_std,
                   help="the std of the queries' initial values (the demo's Q-Former: 1.0)")
    p.add_argument("--qformer-layers", type=positive_int, default=defaults.qformer_layers)
    p.add_argument("--qformer-width", type=positive_int, default=defaults.qformer_width)
    p.add_argument("--qformer-heads", type=positive_int, default=defaults.qformer_heads)
    p.add_argument("--vis-pos", action=argparse.BooleanOptionalAction, default=defaults.vis_pos)
    p.add_argument("--vis-pos-grid", action=argparse.BooleanOptionalAction, default=defaults.vis_pos_grid)
    # the text tower (miniature/clip_model.py's, trained from scratch here) and the optimisation: as
    # miniature/train_clip.py's flags
    add_contrastive_flags(p, max_steps=600, lr=1e-3, weight_decay=0.05)
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    check_text_flags(p, args)
    return args


def main(argv=None):
    return launch(train, get_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
