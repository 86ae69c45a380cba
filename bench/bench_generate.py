"""
Generation speed: batched KV-cache decoding (gpt2.generate) against the naive loop the reference project used
(one sequence at a time, the whole sequence re-run for every new token), at GPT-2 124M with random weights.

    python bench/bench_generate.py                 # 124M, 16 prompts, 32 new tokens, on the best device
    python bench/bench_generate.py --preset mini   # the offline miniature's LM

Both loops decode greedily from the same prompts, so they must produce the same tokens: the script checks it.
Random weights never emit <|endoftext|>, so every sequence runs its full length
(no early stop in either loop).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import best_device  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS  # noqa: E402


@torch.no_grad()
def naive_generate(model, idx, max_new_tokens):
    """The reference project's loop: batch 1, no cache, the full sequence re-run for each token."""
    rows = []
    for row in idx:
        seq = row[None]  # (1, T)
        for _ in range(max_new_tokens):
            logits, _ = model(seq)  # (1, T, V): all positions recomputed
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        rows.append(seq)
    return torch.cat(rows)


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS),
                        help="model size (random weights)")
    parser.add_argument("--num-prompts", type=int, default=16, help="captions to generate (the batch)")
    parser.add_argument("--prompt-len", type=int, default=34,
                        help="prompt tokens (34 = <|endoftext|> + 33 image tokens)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(**PRESETS[args.preset])
    model = GPT(config).to(args.device).eval()
    idx = torch.randint(0, config.vocab_size, (args.num_prompts, args.prompt_len), device=args.device)
    print(f"model {args.preset}: {model.num_params() / 1e6:.1f}M params, {config}")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.num_prompts} prompts x "
          f"{args.prompt_len} tokens -> {args.new_tokens} new tokens each (greedy, fp32)")

    model.generate(idx[:2, :4], 2, temperature=0, eot=None)  # warm-up (allocator, kernels)
    cached, t_cached = timed(lambda: model.generate(idx, args.new_tokens, temperature=0, eot=None),
                             args.device)
    naive, t_naive = timed(lambda: naive_generate(model, idx, args.new_tokens), args.device)
    same = torch.equal(cached, naive)

    n_tokens = args.num_prompts * args.new_tokens
    print(f"naive loop  (batch 1, no cache): {t_naive:8.2f} s  {args.num_prompts / t_naive:8.2f} captions/s  "
          f"{n_tokens / t_naive:9.1f} tokens/s")
    print(f"KV cache    (batch {args.num_prompts:>2}, cached) : {t_cached:8.2f} s  "
          f"{args.num_prompts / t_cached:8.2f} captions/s  "
          f"{n_tokens / t_cached:9.1f} tokens/s")
    print(f"speed-up: {t_naive / t_cached:.1f}x   identical tokens: {same}")
    if not same:
        sys.exit("cached and naive greedy decoding disagree")
