"""
Which CPU levers pay at the miniature's sizes? One training step (forward, backward, AdamW: fused for the
bridges, as the demo steps them) of each of the demo's training stages, measured in the same run three ways:
fp32 eager (the demo's), bf16 autocast, and torch.compile (inductor, fp32), on random inputs of the demo's
shapes:
  - the LM (preset "mini": 4 layers, width 128), B 16 x T 128, as `make demo`'s lm stage;
  - the CLIP image tower ("clip-mini": 64 px, patch 8, 3 blocks of width 96), 128 images, as its clip stage;
  - the three captioners on the mini LM, B 64, 12 caption tokens, as its bridge stages: the linear prefix
    (33 pooled tokens, 12 slots), cross-attention and the Q-Former (16 queries, width 128, whole read-out),
    both on 65 tokens.
CPUs with native bf16 (avx512_bf16, AMX) may gain from autocast; others emulate it and lose. The first line
says which this one is (as `make study` names it). A compiled step is timed after its compile (the warm-up
steps); the compile's own time is printed next to it, since a demo stage pays it once.

    python bench/bench_cpu.py                            # torch's threads
    OMP_NUM_THREADS=1 python bench/bench_cpu.py          # as one of make demo's two side-by-side stages
    python bench/bench_cpu.py --stages lm clip --modes eager compile
    python bench/bench_cpu.py --stages gpt2 --modes eager bf16 --steps 1 --warmup 0 --repeats 1   # slow
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
from miniature.study import machine_name  # noqa: E402

VOCAB = 64


def lm_step():
    model = GPT(GPTConfig(**{**PRESETS["mini"], "vocab_size": VOCAB}))
    x, y = torch.randint(0, VOCAB, (16, 128)), torch.randint(0, VOCAB, (16, 128))  # (B, T)
    return model, lambda m: m(x, y)[1]


def gpt2_step():
    """The smoke's LM: GPT-2 124M (OpenAI's vocabulary), B 1 x T 256. Not among the default stages: a CPU
    that emulates bf16 takes minutes for one autocast step."""
    model = GPT(GPTConfig(**PRESETS["gpt2"]))
    x = torch.randint(0, model.config.vocab_size, (1, 256))  # (B, T)
    return model, lambda m: m(x, x)[1]


def clip_step():
    config = clip_loader.CLIP_PRESETS["clip-mini"]
    model = clip_loader.VisionTransformer(config, frozen=False)
    pixels = torch.randn(128, 3, config.image_size, config.image_size)  # (B, 3, H, W)
    return model, lambda m: m(pixels).float().pow(2).mean()


def bridge_step(kind, tokens, grid, **flags):
    def make():
        lm = GPT(GPTConfig(**{**PRESETS["mini"], "vocab_size": VOCAB}))
        captioner, _ = build_captioner(lm, 0, kind, 96, tokens, vis_grid=grid, **flags)
        visual = torch.randn(64, tokens, 96)  # (B, S, C_vis)
        caption = torch.randint(1, VOCAB, (64, 12))  # (B, T)
        return captioner, lambda m: m(visual, caption, caption)[1]
    return make


STAGES = {
    "lm": lm_step,
    "clip": clip_step,
    "gpt2": gpt2_step,
    "linear": bridge_step("linear", 33, (4, 8), prefix_len=12),
    "xattn": bridge_step("xattn", 65, (8, 8), vis_pos_grid=True),
    "qformer": bridge_step("qformer", 65, (8, 8), vis_pos_grid=True, qformer_width=128, qformer_heads=4,
                           queries=16, prefix_len=16),
}


FUSED = {STAGES[name] for name in ("linear", "xattn", "qformer")}


def time_step(make, mode, steps, warmup):
    """ms per training step, and the seconds of the warm-up steps (the compile, for mode "compile")."""
    torch.manual_seed(0)
    model, loss_fn = make()
    run = torch.compile(model) if mode == "compile" else model
    params = [p for p in model.parameters() if p.requires_grad]
    # the optimizer as the demo steps it: its bridge stages pass --fused, the LM and CLIP stages do not
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=make in FUSED)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", "bf16" if mode == "bf16" else "fp32"):
            loss = loss_fn(run)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t1) / steps * 1000, t1 - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compile among them)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every mode, interleaved; the best of each")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES),
                        default=[k for k in STAGES if k != "gpt2"],
                        help="default: all but gpt2 (the smoke's LM, slow: --steps 1 --warmup 0 --repeats 1)")
    parser.add_argument("--modes", nargs="+", choices=("eager", "bf16", "compile"),
                        default=["eager", "bf16", "compile"], help="the first is the baseline")
    args = parser.parse_args()
    print(f"{machine_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.stages:
        best, first_warmup = {mode: float("inf") for mode in args.modes}, {}
        for _ in range(args.repeats):
            for mode in args.modes:
                ms, warm = time_step(STAGES[name], mode, args.steps, args.warmup)
                best[mode] = min(best[mode], ms)
                # the first round's warm-up is the cold one: later rounds reuse inductor's compiled kernels
                first_warmup.setdefault(mode, warm)
        base = best[args.modes[0]]
        cells = [f"{mode} {ms:7.1f} ms/step ({base / ms:.2f}x; first warm-up {first_warmup[mode]:.0f} s)"
                 for mode, ms in best.items()]
        print(f"{name:>8}: " + " | ".join(cells))
