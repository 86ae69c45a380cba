"""
Pictures of a comparison, drawn with matplotlib (Agg backend: files only, no display needed): validation loss
per bridge, a caption grid per bridge, and where a bridge's queries look in the image (any bridge that offers
attention_maps(visual), see bridges.py). evaluate.py calls them; each returns the PNG's path.
"""
import json
import os
import sys
import textwrap

import numpy as np
import torch
from PIL import Image, ImageOps

import clip_loader

# -----------------------------------------------------------------------------


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
        points = [(r["step"], r["val_loss"])
                  for r in read_log(os.path.join(os.path.dirname(path), "log.jsonl"))
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
        return clip_loader.to_rgb(ImageOps.exif_transpose(image))  # as it was captioned: upright


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


@torch.no_grad()
def plot_attention(captioner, visual, records, grid, out_path, title, n_queries=4):
    """
    Where a bridge's queries look (for the Q-Former: the last layer's cross-attention), mean over heads, for a
    few queries: the patch part drawn over the image (each pooled token covers its cell of the rows x cols
    grid), the weight on the class token written above. The queries shown are the most focused ones (lowest
    entropy over the images). One colour scale for every panel (0 to the largest weight shown): uniform
    attention looks uniform.
    """
    plt = _pyplot()
    device = next(captioner.parameters()).device
    weights = captioner.bridge.attention_maps(captioner.standardized(visual.to(device)))  # (B, nh, Q, S)
    weights = weights.mean(dim=1).float().cpu()  # (B, Q, S)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(0)  # (Q,)
    queries = entropy.argsort()[:n_queries].tolist()
    rows, cols = grid  # the patch grid behind tokens 1..S-1 (token 0 is the class token)
    vmax = float(weights[:, queries, 1:].max())
    B = len(records)
    fig, axes = plt.subplots(B, len(queries) + 1, figsize=(2.6 * (len(queries) + 1), 2.8 * B), squeeze=False)
    for b, record in enumerate(records):
        image = np.asarray(_open_rgb(record["path"]).resize((224, 224)))
        axes[b, 0].imshow(image)
        axes[b, 0].set_title("image", fontsize=8)
        for j, q in enumerate(queries):
            ax = axes[b, j + 1]
            cells = weights[b, q, 1:].view(rows, cols).numpy()  # (rows, cols): attention on each pooled cell
            ax.imshow(image)
            heat = ax.imshow(cells, cmap="inferno", alpha=0.6, extent=(0, 224, 224, 0),
                             interpolation="nearest", vmin=0.0, vmax=vmax)
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


def read_log(path):
    """The JSONL training log next to a checkpoint -> list of records ([] if there is none). A last line
    cut off by a run still writing it is ignored."""
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
