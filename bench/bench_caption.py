"""
Captioning training speed per bridge: samples/s of train_caption.py's step with visual tokens read from the
feature cache (ours), against encoding the images on every step (the reference project's approach), in the
same run; peak memory (RSS on CPU, allocated on CUDA).

    python bench/bench_caption.py        # the miniature's sizes: mini LM, mini ViT, 64 px images
    python bench/bench_caption.py --lm gpt2 --vit openai/clip-vit-large-patch14 --batch-size 16 --steps 3
        # GPT-2 124M and a ViT-L/14 layout, both with random weights (nothing is downloaded)

A shapes world of a few hundred images is generated in a temporary folder and cached once (not timed).
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import best_device  # noqa: E402
import clip_loader  # noqa: E402
from bridges import BRIDGES, build_captioner  # noqa: E402
from data import coco, feature_cache, shapes  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS, get_tokenizer  # noqa: E402
from train_caption import batch_of, make_pairs  # noqa: E402


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the whole process so far


def time_steps(captioner, pairs, visual, eot, batch_size, steps, device):
    """
    samples/s of full training steps (load visual tokens, forward, backward, AdamW),
    after one warm-up step.
    """
    optimizer = torch.optim.AdamW([p for p in captioner.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        index = torch.randint(0, len(pairs), (batch_size,), generator=g).tolist()
        v, tokens, targets, _ = batch_of(pairs, index, visual, eot, device)
        _, loss = captioner(v, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step pays for allocations and lazy initialisation
            times.append(time.perf_counter() - t0)
    return batch_size * len(times) / sum(times)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", default="mini", choices=sorted(PRESETS), help="GPT size (random weights)")
    p.add_argument("--vit", default="mini", choices=sorted(clip_loader.CLIP_PRESETS),
                   help="ViT layout (random weights)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=best_device())
    args = p.parse_args()
    torch.manual_seed(0)

    config = clip_loader.CLIP_PRESETS[args.vit]
    encoder = clip_loader.build_random_clip(config, seed=0)
    encoder.encoder_id = f"bench:{args.vit}"
    with tempfile.TemporaryDirectory() as tmp:
        shapes.generate(os.path.join(tmp, "world"), train=args.images, val=1, corpus_docs=1,
                        image_size=config.image_size)
        records = coco.load_records(os.path.join(tmp, "world"), "train")
        cache = feature_cache.build_feature_cache(records, encoder, os.path.join(tmp, "cache"), batch_size=32,
                                                  device=args.device, num_workers=2)
        cached = cache
        encoded = feature_cache.EncodedImages(encoder, clip_loader.POOL, records, args.device)
        tokenizer = get_tokenizer()
        pairs, _ = make_pairs(records, cached, tokenizer, 40)
        print(f"device {args.device}; LM {args.lm} (random), "
              f"ViT {args.vit} layout (random, {config.image_size} px, "
              f"{cached.spec.tokens} pooled tokens x {config.width}); batch {args.batch_size}, "
              f"{args.steps} timed steps")
        print(f"{'bridge':8s} {'cached samples/s':>17s} {'on-the-fly samples/s':>21s} "
              f"{'speed-up':>9s} {'peak MB':>8s}")
        for kind in BRIDGES:
            lm = GPT(GPTConfig(**{**dict(vocab_size=50257), **PRESETS[args.lm]}))
            heads = lm.config.n_head
            captioner, _ = build_captioner(lm, tokenizer.eot_token, kind, config.width,
                                           cached.spec.tokens, xattn_heads=heads,
                                           qformer_width=lm.config.n_embd, qformer_heads=heads)
            captioner.to(args.device).train()
            fast = time_steps(captioner, pairs, cached, tokenizer.eot_token, args.batch_size, args.steps,
                              args.device)
            slow = time_steps(captioner, pairs, encoded, tokenizer.eot_token, args.batch_size, args.steps,
                              args.device)
            print(f"{kind:8s} {fast:17.1f} {slow:21.1f} {fast / slow:8.1f}x "
                  f"{peak_memory_mb(args.device):8.0f}")


if __name__ == "__main__":
    main()
