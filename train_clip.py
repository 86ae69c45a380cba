"""
CLIP's contrastive pretraining, by hand, at the scale of the offline miniature.

At full scale the captioners read OpenAI's CLIP ViT-L/14, pretrained on 400M (image, text) pairs: its tokens say
what is in an image because the contrastive objective rewarded exactly that. The miniature's encoder should have
learned the same way, so this script pretrains a small CLIP on the miniature's own train images and captions:

    image (B, 3, H, W) -> clip_loader's ViT -> class token -> post-LayerNorm -> visual_projection -> (B, D)
    caption (B, T)     -> token + position embeddings -> gpt2.py's causal Blocks -> LayerNorm
                       -> the state at <|endoftext|> -> text_projection -> (B, D)
    both L2-normalised; logits = exp(logit_scale) * image @ text^T                      (B, B)
    loss = (cross-entropy over each row + over each column) / 2

The symmetric InfoNCE loss: in a batch of B pairs each image has to pick out its own caption among the B captions,
and each caption its own image. Nothing else is supervised; to win, the image tower must expose whatever tells
two captions apart: both objects' colour, shape and size, and which is where. logit_scale is CLIP's learned
temperature (initialised at 1/0.07, kept <= 100 as CLIP does, or the logits can grow until training is unstable).

The result is saved in the Hugging Face CLIP layout: config.json (a CLIPConfig-like dict with a nested
"vision_config") and model.safetensors with transformers' "vision_model.*" key names, plus our text tower under
"text_model.*" and the projections and logit_scale under theirs. So `clip_loader.load_clip(<folder>)` and
`data/coco.py features --encoder <folder>` load it by the very path that loads openai/clip-vit-large-patch14,
and transformers' CLIPVisionModel.from_pretrained(<folder>) reads the same image tower (tested). The text tower
is NOT transformers' CLIPTextModel (it is gpt2.py's Block over a GPT-2 BPE subset): only the image tower is
meant to be loaded elsewhere.

At the end the model measures itself on the held-out val images and writes quality.json beside the weights:
image->text and text->image retrieval R@1, and linear probes of the pooled tokens the bridges will read, for each
object's colour, shape and size and for the layout.

    python train_clip.py --root data/shapes --out-dir runs/clip                 # what `make clip` runs
    python train_clip.py --probe-only --encoder random-vit:mini:seed0 --root data/shapes   # probe any encoder
    torchrun --standalone --nproc_per_node=2 train_clip.py ...                  # DDP (negatives stay per process)
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip_loader
from common import (UsageError, atomic_open, autocast, int_at_least, natural_int, nonneg_float, positive_float,
                    positive_int, read_json, write_json)
from data import coco, shapes
from gpt2 import Block, GPTConfig, SubsetTokenizer, get_tokenizer
from train_utils import (Checkpoints, JsonlLogger, add_run_flags, enable_speedups, find_resume, format_eta,
                         grad_scaler, launch, lr_at, optimizer_step, print0, restore_training_state, rng_state)

# -----------------------------------------------------------------------------
# Configuration: which image tower, how big a text tower, how wide the shared embedding


@dataclasses.dataclass
class CLIPTrainConfig:
    vision: str = "clip-mini"   # a clip_loader.CLIP_PRESETS name: the image tower's layout
    text_layers: int = 2        # gpt2.Block layers of the text tower
    text_heads: int = 4
    text_width: int = 64
    text_tokens: int = 32       # longest caption + <|endoftext|> (the miniature's are at most 21 tokens)
    vocab_size: int = 0         # filled in from the tokenizer: the GPT-2 tokens the train captions use
    embed_dim: int = 128        # the shared image-text embedding (the hub's projection_dim)

    def text_gpt_config(self):
        """The text tower's sizes as a gpt2.GPTConfig, which is what gpt2.Block is built from."""
        return GPTConfig(block_size=self.text_tokens, vocab_size=self.vocab_size, n_layer=self.text_layers,
                         n_head=self.text_heads, n_embd=self.text_width)

# -----------------------------------------------------------------------------
# The text tower: a small causal transformer, pooled at <|endoftext|>


class TextTransformer(nn.Module):
    """
    Captions (B, T) -> one vector each (B, C): CLIP's text tower, built from gpt2.py's Block (causal attention,
    as CLIP's is). The caption's summary is the state at its <|endoftext|>, the one position that has read every
    word. Causal attention is also why no padding mask is needed: padding comes after <|endoftext|>, and no
    position attends forward, so padding never reaches the pooled state.
    """

    def __init__(self, config):
        super().__init__()
        g = config.text_gpt_config()
        self.token_embedding = nn.Embedding(g.vocab_size, g.n_embd)
        self.position_embedding = nn.Embedding(g.block_size, g.n_embd)
        self.blocks = nn.ModuleList([Block(g) for _ in range(g.n_layer)])
        self.final_layer_norm = nn.LayerNorm(g.n_embd)
        for name, p in self.named_parameters():  # GPT-2's init (gpt2.GPT._init_weights) for this small tower
            if p.dim() >= 2:
                # residual-branch outputs (the c_proj layers) scaled by 1/sqrt(2 * layers), as in GPT-2
                scale = (2 * g.n_layer) ** -0.5 if name.endswith("c_proj.weight") else 1.0
                nn.init.normal_(p, std=0.02 * scale)

    def forward(self, tokens, eot_index):
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.final_layer_norm(x)  # (B, T, C)
        return x[torch.arange(B, device=tokens.device), eot_index]  # (B, C): the state at <|endoftext|>

# -----------------------------------------------------------------------------
# CLIP: two towers, two projections into one space, one learned temperature

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)      # CLIP clamps the scale at 100


class CLIP(nn.Module):

    def __init__(self, config, seed=0):
        super().__init__()
        self.config = config
        vision = clip_loader.CLIP_PRESETS[config.vision]
        # the image tower starts from the init of the miniature's random encoder, and is trained (not frozen)
        self.vision_model = clip_loader.build_random_clip(vision, seed=seed, frozen=False)
        self.text_model = TextTransformer(config)
        # no biases: CLIP's projections are plain matrices (the hub's visual_projection / text_projection)
        self.visual_projection = nn.Linear(vision.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision.width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_image(self, pixels):
        tokens = self.vision_model(pixels)  # (B, 1 + N, C)
        return F.normalize(self.visual_projection(self.vision_model.pooled(tokens)), dim=-1)  # (B, D)

    def encode_text(self, tokens, eot_index):
        return F.normalize(self.text_projection(self.text_model(tokens, eot_index)), dim=-1)  # (B, D)

    def forward(self, pixels, tokens, eot_index):
        """The contrastive loss of B (image, caption) pairs: pixels (B, 3, H, W), tokens (B, T), eot_index (B,)."""
        return contrastive_loss(self.encode_image(pixels), self.encode_text(tokens, eot_index), self.logit_scale)


def contrastive_loss(image, text, logit_scale):
    """Symmetric InfoNCE over normalised embeddings image, text (B, D): the matching pair sits on the diagonal."""
    logits = logit_scale.exp() * image @ text.t()  # (B, B): row i = image i against every caption
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

# -----------------------------------------------------------------------------
# Data: every image of a split in memory (uint8), every caption tokenized once


def caption_tokenizer(records):
    """GPT-2's BPE restricted to the tokens the train captions use (as the miniature's LM is), + <|endoftext|>."""
    bpe = get_tokenizer()
    return SubsetTokenizer({t for r in records for c in r["captions"] for t in bpe.encode_ordinary(c)})


def load_split(root, split, image_size, tokenizer, max_tokens, limit=None):
    """
    One split as tensors: pixels (N, H, W, 3) uint8 exactly as CLIP preprocesses them; captions (M, T) padded
    with <|endoftext|>, eot (M,) the position of each caption's <|endoftext|>, owner (M,) its image's row; image
    i's captions are rows first[i] .. first[i] + count[i] - 1.
    """
    records = [r for r in coco.load_records(root, split) if r["captions"]][:limit]
    pixels, captions, eot, owner, first, count = [], [], [], [], [], []
    for row, r in enumerate(records):
        first.append(len(captions))
        count.append(len(r["captions"]))
        array, reason = coco.load_pixels(r["path"], image_size)
        if array is None:
            raise ValueError(f"cannot read {r['path']}: {reason}")
        pixels.append(array)
        for caption in r["captions"]:
            ids = tokenizer.encode_ordinary(caption)
            if len(ids) + 1 > max_tokens:
                raise UsageError(f"caption of {len(ids)} tokens does not fit --text-tokens {max_tokens}: {caption!r}")
            captions.append(ids + [tokenizer.eot_token] * (max_tokens - len(ids)))
            eot.append(len(ids))
            owner.append(row)
    return dict(records=records, pixels=torch.from_numpy(np.stack(pixels)), captions=torch.tensor(captions),
                eot=torch.tensor(eot), owner=torch.tensor(owner), first=torch.tensor(first), count=torch.tensor(count))


def epoch_plan(data, epoch, seed):
    """
    One epoch: the images in an order fixed by (seed, epoch), each paired with one of its captions drawn the same
    way, so a resumed run sees exactly the batches it would have seen. Returns (order, caption row per image).
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(data["pixels"]), generator=g)
    caption_of = data["first"] + (torch.rand(len(data["pixels"]), generator=g) * data["count"]).long()
    return order, caption_of

# -----------------------------------------------------------------------------
# How good is it: retrieval on held-out images, and linear probes of the tokens the bridges read


def scene_key(scene):
    """What a caption can say about a scene: two objects' size, colour and shape, in order, and the layout."""
    return (scene["layout"],) + tuple((o["size"], o["colour"], o["shape"]) for o in scene["objects"])


@torch.no_grad()
def embed(model, data, batch_size=500):
    """Normalised embeddings of every image (N, D) and every caption (M, D) of a split."""
    model.eval()
    images = torch.cat([model.encode_image(clip_loader.normalize_pixels(data["pixels"][i:i + batch_size]))
                        for i in range(0, len(data["pixels"]), batch_size)])
    texts = torch.cat([model.encode_text(data["captions"][i:i + batch_size], data["eot"][i:i + batch_size])
                       for i in range(0, len(data["captions"]), batch_size)])
    return images, texts


@torch.no_grad()
def retrieval(model, data, scenes=None):
    """
    R@1 both ways over a whole split: image->text (is the best-scoring caption, among all, one of the image's own?)
    and text->image (is the best-scoring image the caption's own?). Two images of the miniature can be described
    by exactly the same words; with `scenes`, the *_scene figures also count a hit on such a twin as right.
    """
    images, texts = embed(model, data)
    sim = images @ texts.t()  # (N, M)
    owner = data["owner"]
    i2t = owner[sim.argmax(1)]  # (N,): the image whose caption ranks first for each image
    t2i = sim.argmax(0)  # (M,): the image ranked first for each caption
    n = torch.arange(len(images))
    out = {"image_to_text_R@1": (i2t == n).float().mean().item(), "text_to_image_R@1": (t2i == owner).float().mean().item(),
           "images": len(images), "captions": len(texts)}
    if scenes is not None:
        keys = [scene_key(scenes[str(r["image_id"])]) for r in data["records"]]
        same = lambda a, b: float(np.mean([keys[i] == keys[j] for i, j in zip(a.tolist(), b.tolist())]))
        out.update({"image_to_text_R@1_scene": same(i2t, n), "text_to_image_R@1_scene": same(t2i, owner),
                    "images_with_a_twin": int(sum(keys.count(k) > 1 for k in keys))})
    return out


# what a probe predicts for every image, of object 0 (the left or top one) and of object 1
PROBE_TARGETS = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES), "size": list(shapes.SIZES)}


@torch.no_grad()
def pooled_tokens(encoder, pixels, grid, batch_size=250):
    """The pooled tokens the bridges read, flattened per image: (N, S * C) float32."""
    out = []
    for i in range(0, len(pixels), batch_size):
        tokens = encoder(clip_loader.normalize_pixels(pixels[i:i + batch_size]))  # (b, 1 + N, C)
        out.append(clip_loader.pool_tokens(tokens, grid).flatten(1).float())  # (b, S * C)
    return torch.cat(out)


def probe_labels(records, scenes):
    """Per image: colour, shape, size of object 0 and 1, and the layout (horizontal / vertical), as class ids."""
    columns = {}
    for k in range(2):
        for attribute, values in PROBE_TARGETS.items():
            columns[f"{attribute}{k}"] = [values.index(scenes[str(r["image_id"])]["objects"][k][attribute])
                                          for r in records]
    columns["layout"] = [("horizontal", "vertical").index(scenes[str(r["image_id"])]["layout"]) for r in records]
    return {name: torch.tensor(v) for name, v in columns.items()}


def linear_probe(train_x, train_y, val_x, val_y, steps=300, lr=1e-2, weight_decay=1e-3, seed=0):
    """
    One linear layer over standardised features, trained full-batch with cross-entropy on the train images (one
    head per target), tested on val. Returns val accuracy per target, per attribute over both objects ("colour" =
    mean of colour0 and colour1), "position" (the layout: which object is left/top is part of every per-object
    target), and "objects": both objects' colour, shape and size all right.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    sizes = {name: int(y.max()) + 1 for name, y in train_y.items()}
    torch.manual_seed(seed)
    head = nn.Linear(train_x.size(1), sum(sizes.values()))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def split(logits):  # (N, sum of class counts) -> one (N, classes) block per target
        return dict(zip(sizes, logits.split(list(sizes.values()), dim=1)))

    for _ in range(steps):
        loss = sum(F.cross_entropy(z, train_y[name]) for name, z in split(head(train_x)).items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = {name: z.argmax(1) == val_y[name] for name, z in split(head(val_x)).items()}
    acc = {name: r.float().mean().item() for name, r in right.items()}
    out = {a: (acc[f"{a}0"] + acc[f"{a}1"]) / 2 for a in PROBE_TARGETS}
    out["position"] = acc["layout"]
    both = torch.stack([right[f"{a}{k}"] for a in PROBE_TARGETS for k in range(2)]).all(0)
    out["objects"] = both.float().mean().item()
    out["per_target"] = acc
    return out


def probe_encoder(encoder, train, val, scenes, grid, train_images=2000):
    """
    Linear probes of an image tower's pooled tokens (grid as in the feature cache) and of its class token, fitted
    on the first train_images train images (enough for a linear layer, and a few seconds on a CPU).
    """
    train_tokens = pooled_tokens(encoder, train["pixels"][:train_images], grid)
    val_tokens = pooled_tokens(encoder, val["pixels"], grid)
    train_y = {k: v[:train_images] for k, v in probe_labels(train["records"], scenes["train"]).items()}
    val_y = probe_labels(val["records"], scenes["val"])
    width = encoder.config.width
    return {"pooled_tokens": linear_probe(train_tokens, train_y, val_tokens, val_y),
            "class_token": linear_probe(train_tokens[:, :width], train_y, val_tokens[:, :width], val_y)}

# -----------------------------------------------------------------------------
# Saving in the Hugging Face CLIP layout


def hub_config(model, tokenizer):
    """config.json: CLIPConfig's fields, the image tower's under "vision_config" (what clip_loader reads)."""
    c = model.config
    vision = dict(clip_loader.config_to_hub(model.vision_model.config), model_type="clip_vision_model",
                  projection_dim=c.embed_dim)
    return dict(model_type="clip", projection_dim=c.embed_dim, logit_scale_init_value=LOGIT_SCALE_INIT,
                vision_config=vision,
                # the text tower is ours, not transformers' CLIPTextModel: described here, loaded by train_clip.py
                train_clip=dict(config=dataclasses.asdict(c), gpt2_token_ids=tokenizer.ids,
                                logit_scale=model.logit_scale.item(),
                                note="text_model.* is train_clip.TextTransformer (gpt2.Block), over the GPT-2 "
                                     "token ids listed here; only the image tower follows transformers' layout"))


def save_hub_folder(model, tokenizer, folder):
    """model.safetensors, then config.json (both atomic): a folder with a config.json is complete."""
    from safetensors.torch import save
    os.makedirs(folder, exist_ok=True)
    state = clip_loader.ours_to_hub(model.vision_model.state_dict())
    for key, tensor in model.state_dict().items():
        if not key.startswith("vision_model."):  # text_model.*, visual_projection, text_projection, logit_scale
            state[key] = tensor
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    with atomic_open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    write_json(os.path.join(folder, "config.json"), hub_config(model, tokenizer))


def load_hub_folder(folder):
    """A whole train_clip.py model (both towers) back from its folder, and its tokenizer."""
    from safetensors.torch import load_file
    hub = read_json(os.path.join(folder, "config.json"), "CLIP config")
    if "train_clip" not in hub:
        raise ValueError(f"{folder} was not written by train_clip.py (no 'train_clip' entry in config.json); "
                         f"its image tower alone loads with clip_loader.load_clip")
    model = CLIP(CLIPTrainConfig(**hub["train_clip"]["config"]))
    state = load_file(os.path.join(folder, "model.safetensors"))
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vision_model.")}
    rest.update({"vision_model." + k: v for k, v in clip_loader.hub_to_ours(vision).items()})
    model.load_state_dict(rest, strict=True)
    return model, SubsetTokenizer(hub["train_clip"]["gpt2_token_ids"])

# -----------------------------------------------------------------------------
# Training


def train(args, dist):
    enable_speedups(dist.device_type)
    if args.batch_size % dist.world_size:
        raise UsageError(f"-B {args.batch_size} pairs per step cannot be split evenly over {dist.world_size} processes")
    micro = args.batch_size // dist.world_size
    # --overwrite deletes the old model too: a new run stopped early must not leave it looking finished
    ckpt_path, ckpt = find_resume(args.resume, args.out_dir, args.overwrite,
                                  outputs=("config.json", "model.safetensors", "quality.json"))
    if ckpt is not None and ckpt.get("kind") != "clip":
        raise UsageError(f"{ckpt_path} is not a train_clip.py checkpoint (kind {ckpt.get('kind')!r})")

    # ---- data: the vocabulary is the GPT-2 tokens the train captions use
    t0 = time.time()
    tokenizer = caption_tokenizer(coco.load_records(args.root, "train"))
    config = CLIPTrainConfig(vision=args.vision, text_layers=args.text_layers, text_heads=args.text_heads,
                             text_width=args.text_width, text_tokens=args.text_tokens, vocab_size=tokenizer.n_vocab,
                             embed_dim=args.embed_dim)
    check_resumable(ckpt, ckpt_path, config, tokenizer)
    size = clip_loader.CLIP_PRESETS[args.vision].image_size
    train_data = load_split(args.root, "train", size, tokenizer, args.text_tokens, args.limit)
    val_data = load_split(args.root, "val", size, tokenizer, args.text_tokens, args.limit)
    steps_per_epoch = len(train_data["pixels"]) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_data['pixels'])} train images are fewer than one batch of -B {args.batch_size}")
    print0(f"{len(train_data['pixels'])} train images ({len(train_data['captions'])} captions), "
           f"{len(val_data['pixels'])} val images, {tokenizer.n_vocab}-token vocabulary; loaded in {time.time() - t0:.1f}s")

    # ---- the model and its optimizer
    torch.manual_seed(args.seed)  # the same fresh text tower on every rank
    raw_model = CLIP(config, seed=args.seed).to(dist.device)
    params = list(raw_model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases, LayerNorms, the class embedding, logit_scale
    # CLIP's betas and eps: beta2 0.98 follows the loss's fast changes early in training better than 0.999
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                                  **({"fused": True} if args.fused else {}))
    scaler = grad_scaler(dist.device_type, args.dtype)
    model = torch.compile(raw_model) if args.compile else raw_model
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in
              [("image tower", raw_model.vision_model), ("text tower", raw_model.text_model)]}
    print0(f"CLIP {config}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) +
           f"; {sum(p.numel() for p in params) / 1e6:.2f}M trainable")

    start_step, train_seconds = restore(ckpt, raw_model, optimizer, args)
    del ckpt
    end_step = min(args.max_steps, args.stop_step or args.max_steps)
    checkpoints = Checkpoints(args.out_dir, dist.master, last=ckpt_path)
    logger = JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), resume_step=start_step or None,
                         config={"args": vars(args), "model": dataclasses.asdict(config), "params": counts,
                                 "world_size": dist.world_size}, device=dist.device) if dist.master else None

    def state(step):  # a checkpoint: the model, and all it takes to resume exactly
        return {"kind": "clip", "step": step, "model": raw_model.state_dict(), "config": dataclasses.asdict(config),
                "vocab": tokenizer.ids, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "train_seconds": train_seconds, "args": vars(args)}

    # -------------------------------------------------------------------------
    # The loop. Every process takes its slice of the global batch, and its negatives are the captions of its own
    # slice (CLIP all-gathers the embeddings so that every process scores against the whole batch; with one
    # process, the demo's case, the two are the same).
    bar = tqdm(range(start_step, end_step), initial=start_step, total=args.max_steps, desc="clip",
               disable=not dist.master, dynamic_ncols=True)
    run_seconds = 0.0
    for step in bar:
        if args.val_every and step % args.val_every == 0 and step > 0 and dist.master:
            r = retrieval(raw_model, val_data)
            bar.write(f"step {step:5d} | val R@1 image->text {r['image_to_text_R@1']:.3f}, "
                      f"text->image {r['text_to_image_R@1']:.3f} | logit scale {raw_model.logit_scale.exp().item():.1f}")
            if logger:
                logger.log(step=step, **{f"val_{k}": v for k, v in r.items()})

        t0 = time.time()
        model.train()
        epoch, offset = divmod(step, steps_per_epoch)
        order, caption_of = epoch_plan(train_data, epoch, args.seed)
        mine = order[offset * args.batch_size:(offset + 1) * args.batch_size][dist.rank * micro:(dist.rank + 1) * micro]
        rows = caption_of[mine]  # (b,) one caption of each image
        pixels = clip_loader.normalize_pixels(train_data["pixels"][mine].to(dist.device))  # (b, 3, H, W)
        T = int(train_data["eot"][rows].max()) + 1  # the batch's longest caption: no position wasted on padding
        tokens = train_data["captions"][rows, :T].to(dist.device)  # (b, T)
        optimizer.zero_grad(set_to_none=True)
        with autocast(dist.device_type, args.dtype):
            loss = model(pixels, tokens, train_data["eot"][rows].to(dist.device))
        scaler.scale(loss).backward()
        loss, norm = optimizer_step(optimizer, scaler, params, loss.detach(), step, args.grad_clip, dist=dist,
                                    last_ckpt=checkpoints.last,
                                    lr_of=lambda group: lr_at(step, args.max_steps, args.warmup_steps, args.lr, 0.1 * args.lr))
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)  # CLIP's cap on the temperature's inverse: 100
        dt = time.time() - t0
        train_seconds += dt
        run_seconds += dt
        if logger:
            logger.log(step=step, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=norm,
                       logit_scale=raw_model.logit_scale.exp().item(), samples_per_s=args.batch_size / dt)
        if step % args.log_every == 0:
            bar.set_postfix(loss=f"{loss:.3f}", scale=f"{raw_model.logit_scale.exp().item():.1f}",
                            eta=format_eta(run_seconds / (step + 1 - start_step) * (end_step - step - 1)))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            checkpoints.save(f"ckpt_{step + 1:06d}.pt", state(step + 1), params)
    bar.close()
    if end_step > start_step:
        checkpoints.save(f"ckpt_{end_step:06d}.pt", state(end_step), params)
    if end_step < args.max_steps:
        print0(f"stopped before step {end_step} of {args.max_steps}: continue with --resume auto")
    elif dist.master and (end_step > start_step or not os.path.exists(os.path.join(args.out_dir, "config.json"))):
        finish(raw_model, tokenizer, train_data, val_data, args, train_seconds, logger)
    else:
        print0(f"{ckpt_path} is at step {start_step}: nothing left to train; {args.out_dir}/config.json is its model")
    if logger:
        logger.log(event="end", step=end_step, train_seconds=train_seconds)
        logger.close()
    return raw_model


def check_resumable(ckpt, ckpt_path, config, tokenizer):
    """UsageError unless the checkpoint holds this very model: same towers, same caption vocabulary."""
    if ckpt is None:
        return
    if ckpt["vocab"] != tokenizer.ids:
        raise UsageError(f"{ckpt_path} was trained on captions with another vocabulary: resume with its --root")
    if ckpt["config"] != dataclasses.asdict(config):
        diff = {k: (ckpt["config"].get(k), v) for k, v in dataclasses.asdict(config).items() if ckpt["config"].get(k) != v}
        raise UsageError(f"cannot resume from {ckpt_path}: the model differs (checkpoint, now): {diff}")


def restore(ckpt, model, optimizer, args):
    """Load a checkpoint's weights, optimizer and RNG state; return (step, train_seconds) to go on from."""
    if ckpt is None:
        return 0, 0.0
    model.load_state_dict(ckpt["model"])
    restore_training_state(ckpt, optimizer, args)
    return ckpt["step"], ckpt["train_seconds"]


def finish(model, tokenizer, train_data, val_data, args, train_seconds, logger):
    """The finished model: its quality on held-out images (quality.json), then the hub-format folder."""
    t0 = time.time()
    scenes = read_scenes(args.root)
    quality = {"retrieval": retrieval(model, val_data, scenes and scenes["val"]), "train_seconds": train_seconds,
               "steps": args.max_steps, "batch_size": args.batch_size, "model": dataclasses.asdict(model.config)}
    if scenes:
        quality["probe"] = probe_encoder(model.vision_model, train_data, val_data, scenes,
                                         clip_loader.parse_grid(args.probe_pool))
    quality["eval_seconds"] = time.time() - t0
    write_json(os.path.join(args.out_dir, "quality.json"), quality)
    save_hub_folder(model, tokenizer, args.out_dir)  # config.json last: a folder with one is complete
    print_quality(quality)
    print0(f"saved {args.out_dir}/config.json + model.safetensors (Hugging Face CLIP layout) and quality.json; "
           f"{train_seconds:.0f} s of training")
    if logger:
        logger.log(event="quality", **quality)


def read_scenes(root):
    """The miniature's train and val scenes (what was drawn), or None for a real COCO root."""
    scenes = {split: shapes.read_scenes(root, split) for split in ("train", "val")}
    return scenes if all(s is not None for s in scenes.values()) else None


def print_quality(quality):
    r = quality.get("retrieval")
    if r:
        line = f"val R@1: image->text {r['image_to_text_R@1']:.3f}, text->image {r['text_to_image_R@1']:.3f}"
        if "image_to_text_R@1_scene" in r:
            line += (f" (a twin scene counted as right: {r['image_to_text_R@1_scene']:.3f}, "
                     f"{r['text_to_image_R@1_scene']:.3f}; {r['images_with_a_twin']} of {r['images']} images have a twin)")
        print0(line)
    for name, p in quality.get("probe", {}).items():
        print0(f"linear probe of the {name.replace('_', ' ')}: " +
               ", ".join(f"{a} {p[a]:.3f}" for a in ("colour", "shape", "size", "position", "objects")))


def probe_only(args):
    """Probe any encoder (the random one, for the ablation) on the miniature's images, without training."""
    scenes = read_scenes(args.root)
    if scenes is None:
        raise FileNotFoundError(f"{args.root} has no scenes_train.json / scenes_val.json: probes need the miniature")
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


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/shapes", help="COCO-format root with train and val splits (data/shapes.py)")
    p.add_argument("--out-dir", default="runs/clip", help="checkpoints, log.jsonl, and the hub-format model")
    p.add_argument("--seed", type=int, default=1337)
    # the model
    p.add_argument("--vision", default="clip-mini", choices=sorted(clip_loader.CLIP_PRESETS), help="image tower layout")
    p.add_argument("--text-layers", type=positive_int, default=2)
    p.add_argument("--text-width", type=positive_int, default=64)
    p.add_argument("--text-heads", type=positive_int, default=4)
    p.add_argument("--text-tokens", type=int_at_least(2), default=32, help="longest caption + <|endoftext|>")
    p.add_argument("--embed-dim", type=positive_int, default=128, help="the shared image-text embedding")
    # optimisation
    p.add_argument("--max-steps", type=positive_int, default=500)
    p.add_argument("--stop-step", type=positive_int, default=None, help="stop (and checkpoint) before this step")
    p.add_argument("-B", "--batch-size", type=int_at_least(2), default=128,
                   help="(image, caption) pairs per step, over all processes: each caption's negatives")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="max learning rate (cosine to 10%%)")
    p.add_argument("--warmup-steps", type=natural_int, default=30)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=natural_int, default=200, help="val R@1 every N steps (it is always measured at the end)")
    p.add_argument("--ckpt-every", type=natural_int, default=200)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--probe-pool", default="4x8", help="pooling grid of the probed tokens (as the feature cache's --pool)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images of each split (tests)")
    p.add_argument("--probe-only", action="store_true", help="no training: probe --encoder's tokens and exit")
    p.add_argument("--encoder", default=None, help="with --probe-only: any clip_loader.load_clip id or folder")
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    if args.text_width % args.text_heads:
        p.error(f"--text-heads {args.text_heads} does not divide --text-width {args.text_width}")
    if args.probe_only and args.encoder is None:
        p.error("--probe-only needs --encoder (e.g. random-vit:mini:seed0, or a train_clip.py folder)")
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
