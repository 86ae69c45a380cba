"""
Training speed and memory of train_lm.py's optimizer step (forward, backward, clip, AdamW) at a small config
and at GPT-2 124M, on random tokens (no data needed). Warm-up steps are run first and not timed.

    python bench/bench_train_lm.py                 # CPU: tiny B x T so it finishes in ~1-2 minutes
    python bench/bench_train_lm.py -B 16 -T 1024   # a GPU: also prints MFU, and an fp32 eager baseline

Peak memory: on CUDA torch.cuda.max_memory_allocated per config; on CPU the process's peak resident set
(getrusage maxrss, which only grows: the small config runs first, so each figure is the peak so far).
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import autocast, best_device, resolve_dtype  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS  # noqa: E402
from train_utils import enable_speedups, estimate_mfu, gpu_peak_flops  # noqa: E402


def bench(name, config, B, T, device, steps, warmup, fast):
    """
    tokens/s of full optimizer steps; fast = the GPU speed-ups train_lm.py uses
    (bf16, TF32, compile, fused AdamW).
    """
    torch.manual_seed(0)
    model = GPT(config).to(device)
    device_type = device.split(":")[0]
    optimizer = model.configure_optimizers(0.1, 6e-4, fused=fast and device_type == "cuda")
    step_model = torch.compile(model) if fast and device_type == "cuda" else model
    dtype = resolve_dtype("auto", device_type) if fast else "fp32"
    x = torch.randint(0, config.vocab_size, (B, T), device=device)  # (B, T)
    y = torch.randint(0, config.vocab_size, (B, T), device=device)  # (B, T)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device_type, dtype):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):  # allocator, kernels, torch.compile: not timed
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = B * T / dt
    if device_type == "cuda":
        mem = f"peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated"
        peak = gpu_peak_flops(device)  # one GPU: its tokens/s over its own peak
        if peak is None:
            mfu = ""
        else:
            utilization = estimate_mfu(model.num_params(), config.n_layer, config.n_head,
                                       config.n_embd // config.n_head, T, tps, peak)
            mfu = f" | mfu {utilization:.1%}"
    else:
        mem = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB (process)"
        mfu = ""
    label = "bf16+tf32+compile+fused" if fast and device_type == "cuda" else "fp32 eager"
    print(f"{name:>10} {model.num_params() / 1e6:7.2f}M | B={B} T={T} | {label:<24} | "
          f"{dt * 1000:8.1f} ms/step | {tps:10,.0f} tokens/s{mfu} | {mem}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=best_device())
    parser.add_argument("-B", type=int, default=None, help="micro-batch (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("-T", type=int, default=None,
                        help="sequence length (default: 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (CUDA with compile: use >= 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    B, T = args.B or (16 if cuda else 4), args.T or (1024 if cuda else 128)
    steps = args.steps or (20 if cuda else 5)
    enable_speedups(args.device.split(":")[0])
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{steps} timed steps after {args.warmup} warm-up steps, random tokens")

    small = GPTConfig(**{**PRESETS["mini"], "vocab_size": 50304, "block_size": max(T, 256)})
    gpt2 = GPTConfig(**{**PRESETS["gpt2"], "vocab_size": 50304})  # the padded vocabulary train_lm.py uses
    print(f"small: {small}\n124M:  {gpt2}")
    bench("mini", small, B, T, args.device, steps, args.warmup, fast=True)
    if cuda:
        bench("gpt2-124m", gpt2, B, T, args.device, steps, args.warmup, fast=False)  # the baseline
    bench("gpt2-124m", gpt2, B, T, args.device, steps, max(args.warmup, 3 if cuda else 1), fast=True)
