"""
Evaluation speed: captions/s of evaluate.py's default decoding (beam search of width 3, batched over images,
through the KV cache) against the evaluation loop of Laurent, Lenain and Mebille's gpt2-vision-language (the
project whose table we reproduce): one image at a time; for each of its 24 new tokens the whole sequence (the 33
visual tokens, the prompt "A photo of" and the tokens so far) is run through the GPT again, without a cache;
nucleus sampling (T 0.8, p 0.9); no stop at <|endoftext|>. GPT-2 124M and a Q-Former with random weights, the same
images for both, in the same run. Then a check that our KV-cache decoding computes what a full recompute does
(greedy, identical tokens), and the time the metrics take on a COCO-val-sized set (5,000 images x 5 references).

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
from bench_metrics import perturbed, synthetic_caption  # noqa: E402  (bench/ is on sys.path as the script's dir)
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
            logits, _ = captioner.lm(seq, prefix=prefix, cross=cross)  # (1, L + P + t, V): every position again
            if temperature == 0:
                token = logits[:, -1].argmax(-1)
                if token.item() == captioner.eot:  # the greedy check stops at <|endoftext|>, as ours does
                    break
            else:
                token = sample_next(logits[:, -1].float(), temperature, None, top_p, generator)  # (1,)
            seq = torch.cat([seq, token[:, None]], dim=1)
        captions.append(seq[0, len(prompt):].tolist())
    return captions


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="LM size (random weights)")
    parser.add_argument("--bridge", default="qformer", choices=sorted(BRIDGES))
    parser.add_argument("--images", type=int, default=16, help="images to caption")
    parser.add_argument("--vis-tokens", type=int, default=33, help="visual tokens (CLS + 4x8 pooled patches)")
    parser.add_argument("--vis-dim", type=int, default=1024, help="their width (CLIP ViT-L/14: 1024)")
    parser.add_argument("--check-images", type=int, default=4, help="images of the greedy equality check (0: skip)")
    parser.add_argument("--metric-images", type=int, default=5000, help="images for the metric timing (0: skip)")
    parser.add_argument("--refs", type=int, default=5, help="references per image for the metric timing")
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    defaults = evaluate.parse_args(["--checkpoints", "x.pt", "--device", args.device])  # evaluate.py's defaults

    torch.manual_seed(0)
    lm = GPT(GPTConfig(**PRESETS[args.preset]))
    captioner, config = build_captioner(lm, EOT if lm.config.vocab_size > EOT else 0, args.bridge,
                                        args.vis_dim, args.vis_tokens)
    captioner = captioner.to(device).eval()
    visual = torch.randn(args.images, args.vis_tokens, args.vis_dim, device=device)  # (B, S, C_vis)
    counts = captioner.param_counts()
    print(f"LM {args.preset} ({counts['lm']['total'] / 1e6:.1f}M, random weights), {args.bridge} bridge "
          f"({counts['bridge']['total'] / 1e6:.1f}M), visual {args.vis_tokens} x {args.vis_dim}; device {device}, "
          f"torch threads {torch.get_num_threads()}, {args.images} images, dtype {defaults.dtype}")

    # ---- evaluate.py's defaults against their loop, the same images
    ours_kw = dict(method=defaults.method, beam=defaults.beam, max_new_tokens=defaults.max_new_tokens,
                   length_penalty=defaults.length_penalty)
    batches = [visual[i:i + defaults.batch_size] for i in range(0, args.images, defaults.batch_size)]
    with autocast(device.type, defaults.dtype):
        evaluate.decode_batch(captioner, visual[:2], **{**ours_kw, "max_new_tokens": 2})  # warm-up: allocator, kernels
        ours, t_ours = timed(lambda: [c for v in batches for c in evaluate.decode_batch(captioner, v, **ours_kw)],
                             device)
    prompt = get_tokenizer().encode_ordinary("A photo of") if lm.config.vocab_size > EOT else [1, 2, 3]
    theirs, t_ref = timed(lambda: reference_loop(captioner, visual, prompt, 24,
                                                 generator=torch.Generator(device=device).manual_seed(0)), device)

    def length(captions):
        return sum(len(c) for c in captions) / len(captions)

    print(f"their loop (batch 1, no cache, nucleus T 0.8 p 0.9, prompt + 24 tokens): {t_ref:7.2f} s "
          f"{args.images / t_ref:7.2f} captions/s  {length(theirs):.1f} tokens/caption")
    print(f"evaluate.py defaults ({defaults.method} {defaults.beam}, batch {min(args.images, defaults.batch_size)}, "
          f"KV cache, up to {defaults.max_new_tokens} tokens)   : {t_ours:7.2f} s {args.images / t_ours:7.2f} "
          f"captions/s  {length(ours):.1f} tokens/caption")
    print(f"speed-up: {t_ref / t_ours:.1f}x")

    # ---- correctness: greedy through the KV cache = greedy by full recompute, token for token
    if args.check_images:
        v = visual[:args.check_images]
        cached = evaluate.decode_batch(captioner, v, "greedy", max_new_tokens=20)
        recomputed = reference_loop(captioner, v, [], 20, temperature=0)
        print(f"greedy, {args.check_images} images x 20 tokens: KV cache = full recompute: {cached == recomputed}")
        if cached != recomputed:
            sys.exit("our greedy decoding and the full recompute disagree")

    if args.metric_images:
        rng = random.Random(0)
        references = {i: [synthetic_caption(rng) for _ in range(args.refs)] for i in range(args.metric_images)}
        predictions = {i: perturbed(rng.choice(refs), rng) for i, refs in references.items()}
        t0 = time.perf_counter()
        metrics.get_meteor()
        jvm_s = time.perf_counter() - t0
        scores, t_metrics = timed(lambda: metrics.score_captions(predictions, references), torch.device("cpu"))
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in scores["seconds"].items())
        print(f"\nmetrics on {args.metric_images} images x {args.refs} references: {t_metrics:.1f} s ({stages}); "
              f"+ {jvm_s:.1f} s METEOR JVM start, once per process")
