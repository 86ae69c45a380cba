"""
Does bf16 autocast pay on this CPU, at the miniature's sizes? One training step (forward, backward, AdamW)
of the demo's three heaviest stages, fp32 against bf16 autocast, in the same run, on random inputs:
  - the LM (preset "mini": 4 layers, width 128), B 16 x T 128, as `make demo`'s lm stage;
  - the CLIP image tower ("clip-mini": 64 px, patch 8, 3 blocks of width 96), 128 images, as its clip stage;
  - a Q-Former captioner (16 queries, width 128, whole read-out) on 65 visual tokens, B 64,
    as its bridge stage.
CPUs with native bf16 (avx512_bf16, AMX) may gain; others emulate it and lose.
The flags say which this one has.

    python bench/bench_cpu_bf16.py               # torch's threads
    OMP_NUM_THREADS=1 python bench/bench_cpu_bf16.py   # as one of make demo's two side-by-side stages
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_loader  # noqa: E402
from bridges import build_captioner  # noqa: E402
from common import autocast  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS  # noqa: E402


def lm_step():
    model = GPT(GPTConfig(**{**PRESETS["mini"], "vocab_size": 64}))
    x, y = torch.randint(0, 64, (16, 128)), torch.randint(0, 64, (16, 128))  # (B, T)
    return model, lambda: model(x, y)[1]


def clip_step():
    config = clip_loader.CLIP_PRESETS["clip-mini"]
    model = clip_loader.VisionTransformer(config, frozen=False)
    pixels = torch.randn(128, 3, config.image_size, config.image_size)  # (B, 3, H, W)
    return model, lambda: model(pixels).float().pow(2).mean()


def qformer_step():
    lm = GPT(GPTConfig(**{**PRESETS["mini"], "vocab_size": 64}))
    captioner, _ = build_captioner(lm, 0, "qformer", 96, 65, qformer_width=128, qformer_heads=4, queries=16,
                                   prefix_len=16)
    visual, tokens = torch.randn(64, 65, 96), torch.randint(1, 64, (64, 12))  # (B, S, C_vis), (B, T)
    targets = tokens.clone()
    return captioner, lambda: captioner(visual, tokens, targets)[1]


def time_step(make, dtype, steps, warmup=3):
    torch.manual_seed(0)
    model, loss_fn = make()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", dtype):
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1000


def cpu_name():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "?")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in text]
    return f"{model} ({', '.join(flags) or 'no native bf16'})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fp32/bf16 pairs, interleaved; the best of each")
    args = parser.parse_args()
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, make in (("lm", lm_step), ("clip", clip_step), ("qformer", qformer_step)):
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(args.repeats):
            for dtype in best:
                best[dtype] = min(best[dtype], time_step(make, dtype, args.steps))
        print(f"{name:>8}: fp32 {best['fp32']:7.1f} ms/step | bf16 autocast {best['bf16']:7.1f} ms/step | "
              f"bf16 speed-up {best['fp32'] / best['bf16']:.2f}x")
