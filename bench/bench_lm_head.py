"""
A prefix bridge's training step at GPT-2 124M: the output layer over every position (the loss then ignoring
the prefix and padding), against the output layer only from the last prefix position on (what
gpt2.GPT.forward does with targets_from: a fixed slice, so torch.compile needs no graph break; the padding
inside the slice is computed and ignored), and against a boolean mask that picks exactly the positions with a
target (the head before commit c29d62e: the fewest rows, but a host sync and graph break under
torch.compile). With
a 33-token image prefix and COCO-length captions, about half the positions of a sequence have no target, and
the output layer (768 x 50,257) is the largest matmul of a 124M GPT. Same model, same batches, same run.

    python bench/bench_lm_head.py                  # linear bridge, 8 pairs per step (~40 s on 2 CPU cores)
    python bench/bench_lm_head.py --batch 64       # on a GPU
    python bench/bench_lm_head.py --preset tiny --steps 1    # a check that it runs (seconds)
"""
import argparse
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bridges import BRIDGES, build_captioner, caption_batch  # noqa: E402
from common import autocast, best_device, resolve_dtype  # noqa: E402
from gpt2 import EOT, GPT, GPTConfig, PRESETS  # noqa: E402


def all_positions_loss(captioner, visual, tokens, targets):
    """The step before: logits (B, L + T, V) for every position, then a loss that ignores most of them."""
    prefix, cross = captioner.condition(visual)
    L, B = prefix.size(1), tokens.size(0)
    full = torch.cat([targets.new_full((B, L - 1), -100), targets, targets.new_full((B, 1), -100)], dim=1)
    logits, _ = captioner.lm(tokens, prefix=prefix, cross=cross)  # (B, L + T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), full.reshape(-1), ignore_index=-100)


def masked_loss(captioner, visual, tokens, targets):
    """The head before commit c29d62e: logits only where the target is not -100, found with a boolean mask."""
    prefix, cross = captioner.condition(visual)
    L, B = prefix.size(1), tokens.size(0)
    full = torch.cat([targets.new_full((B, L - 1), -100), targets, targets.new_full((B, 1), -100)], dim=1)
    lm = captioner.lm
    x = lm.transformer.wte(tokens)
    x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, L + T, C)
    x = x + lm.transformer.wpe(torch.arange(x.size(1), device=x.device))
    for i, block in enumerate(lm.transformer.h):
        x = block(x, cross[i] if cross is not None else None)
    x = lm.transformer.ln_f(x)
    scored = full.reshape(-1) != -100  # (B * (L + T),): its count is data, read back by the host
    logits = lm.lm_head(x.reshape(-1, x.size(-1))[scored])  # (N, V)
    return F.cross_entropy(logits.float(), full.reshape(-1)[scored])


def time_steps(captioner, step_loss, batches, device):
    params = [p for p in captioner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for i, (v, tokens, targets) in enumerate([batches[0]] + batches):  # the first: a warm-up, not timed
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = step_loss(captioner, v, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--bridge", default="linear", choices=sorted(BRIDGES))
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--device", default=best_device())
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device.type)

    torch.manual_seed(0)
    lm = GPT(GPTConfig(**{**PRESETS[args.preset], "vocab_size": 50257}))
    captioner, _ = build_captioner(lm, EOT, args.bridge, 1024, 33)
    captioner.to(device).train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):  # COCO-like captions: 8 to 20 tokens
        captions = [torch.randint(0, 50000, (int(torch.randint(8, 21, (1,), generator=g)),),
                                  generator=g).tolist()
                    for _ in range(args.batch)]
        tokens, targets = caption_batch(captions, EOT)
        batches.append((torch.randn(args.batch, 33, 1024, generator=g).to(device), tokens.to(device),
                        targets.to(device)))
    with torch.no_grad():
        L = captioner.condition(batches[0][0][:1])[0].size(1)  # <|endoftext|> + the prefix
    # the GPT's sequence positions
    positions = sum(args.batch * (L + tokens.size(1)) for _, tokens, _ in batches)
    scored = sum(int((y != -100).sum()) for _, _, y in batches)
    print(f"LM {args.preset} (random), {args.bridge} bridge, {args.batch} pairs per step, "
          f"device {device}, {dtype}; {positions / len(batches):.0f} positions per step, "
          f"{scored / len(batches):.0f} of them with a target")

    def new(c, v, tokens, targets):
        return c(v, tokens, targets)[1]

    with autocast(device.type, dtype):
        before = time_steps(captioner, all_positions_loss, batches, device)
        after = time_steps(captioner, new, batches, device)
        masked = time_steps(captioner, masked_loss, batches, device)
    per_step = positions / len(batches)
    for name, seconds in [("on every position", before), ("from the prefix on (gpt2.py)", after),
                          ("where a target is (a mask)", masked)]:
        print(f"output layer {name:29s}: {seconds * 1000:8.0f} ms/step  {per_step / seconds:8.0f} tokens/s")
    print(f"speed-up of gpt2.py's head over every position: {before / after:.2f}x "
          f"(the mask's: {before / masked:.2f}x)")
