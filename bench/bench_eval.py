"""
Evaluation speed: captions/s of evaluate.py's default decoding (beam search of width 3, batched over images,
through the KV cache) against the evaluation loop of Laurent, Lenain and Mebille's gpt2-vision-language (the
project whose table we reproduce): one image at a time; for each of its 24 new tokens the whole sequence (the
33 visual tokens, the prompt "A photo of" and the tokens so far) is run through the GPT again, without a
cache; nucleus sampling (T 0.8, p 0.9); no stop at <|endoftext|>. GPT-2 124M and a Q-Former with random
weights, the same images for both, in the same run; greedy decoding too. Each is also charged the LM matmul
work it did (counted by hooks, not assumed), which bounds the speed-up: their loop runs 24 full forwards per
image, but beam search runs 3 rows per image per step through the whole LM, output layer included. Then a
check that our KV-cache decoding computes what a full recompute does (greedy, identical tokens), and the time
the metrics take on a COCO-val-sized set (5,000 images x 5 references).

    python bench/bench_eval.py                      # 16 images (~3 min on 2 CPU cores)
    python bench/bench_eval.py --images 64 --metric-images 0    # on a GPU

Random weights are fine for speed: they rarely emit <|endoftext|>, so every caption runs its full length (the
reference's 24 tokens, our 30: ours does more work per caption, not less).
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import autocast, best_device  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
# bench/ is on sys.path as the script's dir
from bench_metrics import perturbed, synthetic_caption  # noqa: E402
from bridges import BRIDGES, build_captioner  # noqa: E402
from gpt2 import EOT, GPT, GPTConfig, PRESETS, get_tokenizer, sample_next  # noqa: E402


@torch.no_grad()
def reference_loop(captioner, visual, prompt, new_tokens, temperature=0.8, top_p=0.9, generator=None):
    """Their decoding: batch 1, no cache, the prefix + prompt + caption so far re-run for every token."""
    captions = []
    for b in range(visual.size(0)):
        prefix, cross = captioner.condition(visual[b:b + 1])  # (1, L, C)
        seq = torch.tensor([prompt], dtype=torch.long, device=visual.device)  # (1, P)
        for _ in range(new_tokens):
            # every position again
            logits, _ = captioner.lm(seq, prefix=prefix, cross=cross)  # (1, L + P + t, V)
            if temperature == 0:
                token = logits[:, -1].argmax(-1)
                if token.item() == captioner.eot:  # the greedy check stops at <|endoftext|>, as ours does
                    break
            else:
                token = sample_next(logits[:, -1].float(), temperature, None, top_p, generator)  # (1,)
            seq = torch.cat([seq, token[:, None]], dim=1)
        captions.append(seq[0, len(prompt):].tolist())
    return captions


class LMWork:
    """
    Counts the LM's matmul work while active: positions through the blocks and rows through the output layer
    (forward hooks on the first block and on lm_head). 2 flops per weight per row; attention scores and the
    bridge are left out (a few % at these lengths). At equal flops/s, the ratio of two counts bounds their
    speed ratio.
    """
    def __init__(self, lm):
        self.lm, self.positions, self.head_rows = lm, 0, 0
        block = lm.transformer.h[0]
        # matrices, not LN/biases
        self.block_weights = sum(p.numel() for p in block.parameters() if p.dim() == 2)
        self.head_weights = lm.lm_head.weight.numel()

    def __enter__(self):
        def count(attr):
            def hook(module, args, out):
                setattr(self, attr, getattr(self, attr) + out[..., 0].numel())  # rows: every dim but the last
            return hook
        self.hooks = [self.lm.transformer.h[0].register_forward_hook(count("positions")),
                      self.lm.lm_head.register_forward_hook(count("head_rows"))]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def gflop(self):
        block_flops = 2 * self.positions * self.block_weights * self.lm.config.n_layer
        return (block_flops + 2 * self.head_rows * self.head_weights) / 1e9


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="LM size (random weights)")
    parser.add_argument("--bridge", default="qformer", choices=sorted(BRIDGES))
    parser.add_argument("--images", type=int, default=16, help="images to caption")
    parser.add_argument("--vis-tokens", type=int, default=33, help="visual tokens (CLS + 4x8 pooled patches)")
    parser.add_argument("--vis-dim", type=int, default=1024, help="their width (CLIP ViT-L/14: 1024)")
    parser.add_argument("--check-images", type=int, default=4,
                        help="images of the greedy equality check (0: skip)")
    parser.add_argument("--metric-images", type=int, default=5000,
                        help="images for the metric timing (0: skip)")
    parser.add_argument("--refs", type=int, default=5, help="references per image for the metric timing")
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # evaluate.py's defaults
    defaults = evaluate.parse_args(["--checkpoints", "x.pt", "--device", args.device])

    torch.manual_seed(0)
    lm = GPT(GPTConfig(**PRESETS[args.preset]))
    captioner, config = build_captioner(lm, EOT if lm.config.vocab_size > EOT else 0, args.bridge,
                                        args.vis_dim, args.vis_tokens)
    captioner = captioner.to(device).eval()
    visual = torch.randn(args.images, args.vis_tokens, args.vis_dim, device=device)  # (B, S, C_vis)
    counts = captioner.param_counts()
    print(f"LM {args.preset} ({counts['lm']['total'] / 1e6:.1f}M, random weights), {args.bridge} bridge "
          f"({counts['bridge']['total'] / 1e6:.1f}M), visual {args.vis_tokens} x {args.vis_dim}; "
          f"device {device}, torch threads {torch.get_num_threads()}, {args.images} images, "
          f"dtype {defaults.dtype}")

    # ---- evaluate.py's defaults against their loop, the same images
    ours_kw = dict(method=defaults.method, beam=defaults.beam, max_new_tokens=defaults.max_new_tokens,
                   length_penalty=defaults.length_penalty)
    batches = [visual[i:i + defaults.batch_size] for i in range(0, args.images, defaults.batch_size)]
    with autocast(device.type, defaults.dtype):
        # warm-up: allocator, kernels
        evaluate.decode_batch(captioner, visual[:2], **{**ours_kw, "max_new_tokens": 2})
        with LMWork(lm) as work_ours:
            ours, t_ours = timed(
                lambda: [c for v in batches for c in evaluate.decode_batch(captioner, v, **ours_kw)],
                device)
        greedy_kw = {**ours_kw, "method": "greedy", "beam": 1}
        with LMWork(lm) as work_greedy:
            greedy, t_greedy = timed(
                lambda: [c for v in batches for c in evaluate.decode_batch(captioner, v, **greedy_kw)],
                device)
    prompt = get_tokenizer().encode_ordinary("A photo of") if lm.config.vocab_size > EOT else [1, 2, 3]
    with LMWork(lm) as work_ref:
        theirs, t_ref = timed(lambda: reference_loop(captioner, visual, prompt, 24,
                                                     generator=torch.Generator(device=device).manual_seed(0)),
                              device)

    def length(captions):
        return sum(len(c) for c in captions) / len(captions)

    batch = min(args.images, defaults.batch_size)
    for name, t, captions, work in [
            ("their loop (batch 1, no cache, nucleus T 0.8 p 0.9, prompt + 24 tokens)",
             t_ref, theirs, work_ref),
            (f"evaluate.py defaults ({defaults.method} {defaults.beam}, batch {batch}, KV cache, "
             f"up to {defaults.max_new_tokens} tokens)", t_ours, ours, work_ours),
            (f"evaluate.py --method greedy (batch {batch}, KV cache, up to {defaults.max_new_tokens} tokens)",
             t_greedy, greedy, work_greedy)]:
        print(f"{name:<80}: {t:7.2f} s {args.images / t:7.2f} captions/s  "
              f"{length(captions):.1f} tokens/caption  "
              f"LM work {work.gflop():7.1f} GFLOP ({work.gflop() / t:5.1f} GFLOP/s)")
    print(f"speed-up of the defaults: {t_ref / t_ours:.1f}x "
          f"(their work / ours: {work_ref.gflop() / work_ours.gflop():.1f}x,"
          f" the bound at equal GFLOP/s); of greedy: {t_ref / t_greedy:.1f}x "
          f"(work {work_ref.gflop() / work_greedy.gflop():.1f}x)")

    # ---- correctness: greedy through the KV cache = greedy by full recompute, token for token
    if args.check_images:
        v = visual[:args.check_images]
        cached = evaluate.decode_batch(captioner, v, "greedy", max_new_tokens=20)
        recomputed = reference_loop(captioner, v, [], 20, temperature=0)
        print(f"greedy, {args.check_images} images x 20 tokens: "
              f"KV cache = full recompute: {cached == recomputed}")
        if cached != recomputed:
            sys.exit("our greedy decoding and the full recompute disagree")

    if args.metric_images:
        rng = random.Random(0)
        references = {i: [synthetic_caption(rng) for _ in range(args.refs)]
                      for i in range(args.metric_images)}
        predictions = {i: perturbed(rng.choice(refs), rng) for i, refs in references.items()}
        t0 = time.perf_counter()
        metrics.get_meteor()
        jvm_s = time.perf_counter() - t0
        scores, t_metrics = timed(lambda: metrics.score_captions(predictions, references),
                                  torch.device("cpu"))
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in scores["seconds"].items())
        print(f"\nmetrics on {args.metric_images} images x {args.refs} references: "
              f"{t_metrics:.1f} s ({stages}); "
              f"+ {jvm_s:.1f} s METEOR JVM start, once per process")
