"""
Feature extraction speed: our hand-written CLIP ViT against transformers' CLIPVisionModel with the same
config, the same random weights and the same batch, in the same run; then read throughput of a feature cache;
then building a cache from COCO-sized JPEGs, with the builder's old defaults (4 decoding threads, batches of
64, progress recorded after every batch) and its new ones (every CPU, 256, every 32 batches).

    python bench/bench_features.py                              # the miniature's encoder (random-vit:mini)
    python bench/bench_features.py --preset openai/clip-vit-large-patch14 --batch-size 32 --steps 3

Weights are random (no download): speed does not depend on their values. transformers is a test-only
dependency; without it only our model is timed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import best_device  # noqa: E402
import clip_loader  # noqa: E402
from data import feature_cache  # noqa: E402


def images_per_second(model, pixels, steps):
    with torch.no_grad():
        model(pixels)  # warm-up
        if pixels.is_cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(steps):
            model(pixels)
        if pixels.is_cuda:
            torch.cuda.synchronize()
    return steps * len(pixels) / (time.time() - t0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Benchmark CLIP feature extraction and feature-cache reads.")
    parser.add_argument("--preset", default="mini", help=f"one of {list(clip_loader.CLIP_PRESETS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache-images", type=int, default=20000,
                        help="rows in the synthetic cache read back")
    parser.add_argument("--pool", default=clip_loader.POOL_FLAG)
    parser.add_argument("--jpegs", type=int, default=1024,
                        help="640x480 JPEGs (COCO's typical size) to build a cache from (0: skip)")
    args = parser.parse_args()
    device = best_device()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")

    # -------------------------------------------------------------------------
    # 1. the encoder: ours vs transformers, same weights
    config = clip_loader.CLIP_PRESETS[args.preset]
    ours = clip_loader.build_random_clip(config, seed=0).to(device)
    pixels = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    print(f"{args.preset}: {config.tokens} tokens x {config.width}, {config.layers} blocks, "
          f"batch {args.batch_size}")
    ours_ips = images_per_second(ours, pixels, args.steps)
    print(f"ours (clip_loader)          {ours_ips:8.1f} images/s")
    try:
        import transformers
    except ImportError:
        print("transformers not installed: no baseline")
    else:
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=config.width, intermediate_size=config.mlp_width, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, image_size=config.image_size, patch_size=config.patch_size,
            hidden_act=config.act, layer_norm_eps=config.layer_norm_eps))
        # the same weights: our keys are the hub's, renamed
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = clip_loader.load_clip(d).to(device)
        hf = hf.to(device).eval()
        with torch.no_grad():
            diff = (ours(pixels) - hf(pixel_values=pixels).last_hidden_state).abs().max().item()
        hf_ips = images_per_second(lambda x: hf(pixel_values=x), pixels, args.steps)
        ours_ips = images_per_second(ours, pixels, args.steps)
        print(f"ours, again (same weights)  {ours_ips:8.1f} images/s   max |ours - theirs| = {diff:.1e}")
        print(f"transformers CLIPVisionModel{hf_ips:8.1f} images/s   "
              f"ours / theirs = {ours_ips / hf_ips:.2f}x")

    # -------------------------------------------------------------------------
    # 2. reading the feature cache: random mini-batches of rows, as a training loop does
    spec = clip_loader.VisualFeatures.of(ours, clip_loader.parse_grid(args.pool))
    S = spec.tokens
    with tempfile.TemporaryDirectory() as d:
        N, C = args.cache_images, config.width
        features = np.memmap(os.path.join(d, "features.fp16"), dtype=np.float16, mode="w+", shape=(N, S, C))
        for i in range(0, N, 4096):
            features[i:i + 4096] = np.random.default_rng(i).standard_normal(
                (min(4096, N - i), S, C)).astype(np.float16)
        features.flush()
        del features
        np.save(os.path.join(d, "image_ids.npy"), np.arange(N))
        np.savez(os.path.join(d, "stats.npz"), mean=np.zeros((S, C), np.float32),
                 std=np.ones((S, C), np.float32))
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(dict(format=feature_cache.FORMAT, complete=True, count=N,
                           visual_features=spec.as_dict()), f)
        cache = feature_cache.FeatureCache(d)
        rng = np.random.default_rng(0)
        batch, reads = 64, 0
        t0 = time.time()
        while time.time() - t0 < 3.0:
            x = cache.batch(np.sort(rng.choice(N, batch, replace=False))).to(device)  # (B, S, C) float32
            reads += batch
        seconds = time.time() - t0
        print(f"feature cache ({N} x {S} x {C} fp16, {N * S * C * 2 / 2**20:.0f} MiB): "
              f"{reads / seconds:,.0f} samples/s in random batches of {batch}")

    # -------------------------------------------------------------------------
    # 3. building a cache from JPEG files: decoding threads, batch size, how often progress is recorded
    if args.jpegs:
        with tempfile.TemporaryDirectory() as d:
            rng = np.random.default_rng(0)
            # smooth random images: JPEG files of a photo's size (a noise image compresses far worse)
            base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
            records = []
            for i in range(args.jpegs):
                path = os.path.join(d, f"{i:06d}.jpg")
                image = Image.fromarray(np.roll(base, i, axis=1)).resize((640, 480), Image.BICUBIC)
                image.save(path, quality=90)
                records.append(dict(image_id=i, path=path, captions=[]))
            settings = [("old defaults", dict(batch_size=64, num_workers=4, flush_every=1)),
                        ("new defaults", dict(batch_size=256, num_workers=None, flush_every=32))]
            for name, kw in settings:
                t0 = time.time()
                feature_cache.build_feature_cache(records, ours, os.path.join(d, name.replace(" ", "_")),
                                                  pool_grid=clip_loader.parse_grid(args.pool), device=device,
                                                  **kw)
                print(f"cache of {args.jpegs} JPEGs, {name} {kw}, {feature_cache.usable_cpus()} CPUs: "
                      f"{args.jpegs / (time.time() - t0):,.1f} images/s")
