"""
Decoding's speed against its batch size and dtype: captions/s of evaluate.py's beam search (width 3) and
greedy decoding, batched over images through the KV cache, at each batch size, in bf16 autocast and in fp32,
for the Q-Former (a prefix) and cross-attention (keys and values at every layer). The first batch size (by
default 64, evaluate.py's default) is the baseline, in the same run. GPT-2 124M with random weights
(bench/gpu_check.py's fabricated hub folder), visual tokens of CLIP ViT-L/14's width; the same images for
every setting.

    python bench/bench_decode_batch.py --device cuda --batch-sizes 64 256 512   # on a GPU
    python bench/bench_decode_batch.py --preset tiny --batch-sizes 4 8          # toy sizes, a CPU (the test)

Each setting runs once untimed first: on CUDA, SDPA's cuDNN kernels build a plan for every new shape (each
step's cache length, each batch size), which a cold pass pays inside its time. Random weights rarely emit
<|endoftext|>, so every caption runs its full 30 tokens.
"""
import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "tests")]
import gpu_check  # noqa: E402
from bench_eval import timed  # noqa: E402
from common import autocast, best_device  # noqa: E402
from decoding import decode_batch  # noqa: E402
from gpt2 import load_lm  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(gpu_check.SIZES),
                   help="full: GPT-2 124M, ViT-L/14's width; tiny: toy sizes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--bridges", nargs="+", default=["qformer", "xattn"])
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (the best is printed)")
    p.add_argument("--device", default=best_device())
    p.add_argument("--work-dir", default=None, help="where the fabricated GPT-2 goes (default: a temporary "
                                                    "folder)")
    args = p.parse_args(argv)
    size, device = gpu_check.SIZES[args.preset], torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        lm, tok = load_lm(gpu_check.World(args.work_dir or tmp, size, args.device).gpt2)
    N = max(args.batch_sizes)  # images decoded per pass, in batches of each size
    print(f"decoding {N} images per pass on {args.device}, torch {torch.__version__}")
    first = args.batch_sizes[0]
    print(f"| bridge | method | dtype | batch | captions/s | x batch {first} | passes (s) |\n"
          "|---|---|---|---|---|---|---|")
    for bridge in args.bridges:
        captioner, shape = gpu_check.decoding_captioner(lm, tok, bridge, size, args.preset, device)
        torch.manual_seed(0)
        visual = torch.randn(N, *shape, device=device)  # (N, S, C_vis)
        baseline = {}
        for B in args.batch_sizes:
            for dtype in ("bf16", "fp32"):
                for method in ("beam", "greedy"):
                    def one_pass():
                        with autocast(device.type, dtype):
                            for i in range(0, N, B):
                                decode_batch(captioner, visual[i:i + B], method, beam=3, max_new_tokens=30)
                    one_pass()  # warm-up at these shapes
                    seconds = [timed(one_pass, device)[1] for _ in range(args.repeats)]
                    rate = N / min(seconds)
                    base = baseline.setdefault((dtype, method), rate)  # the first batch size's
                    print(f"| {bridge} | {method} | {dtype} | {B} | {rate:,.0f} | {rate / base:.1f}x | "
                          f"{' '.join(f'{s:.3f}' for s in seconds)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
