"""
How good is the miniature's CLIP: retrieval on held-out images, and linear probes of the pooled tokens the
bridges read, for each object's colour, shape and size and for the layout (miniature/train_clip.py writes them
to quality.json; `--probe-only` probes any encoder).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_loader
from data import shapes
from train_utils import print0

# -----------------------------------------------------------------------------
# Retrieval


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
    R@1 both ways over a whole split: image->text (is the best-scoring caption, among all, one of the image's
    own?) and text->image (is the best-scoring image the caption's own?). Two images of the miniature can be
    described by exactly the same words; with `scenes`, the *_scene figures also count a hit on such a twin as
    right.
    """
    images, texts = embed(model, data)
    sim = images @ texts.t()  # (N, M)
    owner = data["owner"]
    i2t = owner[sim.argmax(1)]  # (N,): the image whose caption ranks first for each image
    t2i = sim.argmax(0)  # (M,): the image ranked first for each caption
    n = torch.arange(len(images))
    out = {"image_to_text_R@1": (i2t == n).float().mean().item(),
           "text_to_image_R@1": (t2i == owner).float().mean().item(),
           "images": len(images), "captions": len(texts)}
    if scenes is not None:
        keys = [scene_key(scenes[str(r["image_id"])]) for r in data["records"]]

        def same(a, b):  # the fraction of pairs (a[k], b[k]) that are twin scenes
            return float(np.mean([keys[i] == keys[j] for i, j in zip(a.tolist(), b.tolist())]))

        out.update({"image_to_text_R@1_scene": same(i2t, n), "text_to_image_R@1_scene": same(t2i, owner),
                    "images_with_a_twin": int(sum(keys.count(k) > 1 for k in keys))})
    return out


# -----------------------------------------------------------------------------
# Linear probes of the tokens the bridges read


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
    """
    Per image: colour, shape, size of object 0 and 1, and the layout (horizontal / vertical), as class ids.
    """
    columns = {}
    for k in range(2):
        for attribute, values in PROBE_TARGETS.items():
            columns[f"{attribute}{k}"] = [values.index(scenes[str(r["image_id"])]["objects"][k][attribute])
                                          for r in records]
    columns["layout"] = [("horizontal", "vertical").index(scenes[str(r["image_id"])]["layout"])
                         for r in records]
    return {name: torch.tensor(v) for name, v in columns.items()}


def linear_probe(train_x, train_y, val_x, val_y, steps=300, lr=1e-2, weight_decay=1e-3, seed=0):
    """
    One linear layer over standardised features, trained full-batch with cross-entropy on the train images
    (one head per target), tested on val. Returns val accuracy per target, per attribute over both objects
    ("colour" = mean of colour0 and colour1), "position" (the layout: which object is left/top is part of
    every per-object target), and "objects": both objects' colour, shape and size all right.
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
    Linear probes of an image tower's pooled tokens (grid as in the feature cache) and of its class token,
    fitted on the first train_images train images (enough for a linear layer, and a few seconds on a CPU).
    """
    train_tokens = pooled_tokens(encoder, train["pixels"][:train_images], grid)
    val_tokens = pooled_tokens(encoder, val["pixels"], grid)
    train_y = {k: v[:train_images] for k, v in probe_labels(train["records"], scenes["train"]).items()}
    val_y = probe_labels(val["records"], scenes["val"])
    width = encoder.config.width
    return {"pooled_tokens": linear_probe(train_tokens, train_y, val_tokens, val_y),
            "class_token": linear_probe(train_tokens[:, :width], train_y, val_tokens[:, :width], val_y)}


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
                     f"{r['text_to_image_R@1_scene']:.3f}; {r['images_with_a_twin']} of {r['images']} images "
                     "have a twin)")
        print0(line)
    for name, p in quality.get("probe", {}).items():
        print0(f"linear probe of the {name.replace('_', ' ')}: " +
               ", ".join(f"{a} {p[a]:.3f}" for a in ("colour", "shape", "size", "position", "objects")))
