"""
HellaSwag (Zellers et al. 2019): pick the right ending of a short context among 4, the pretraining eval of
the "Let's reproduce GPT-2 (124M)" lecture. A language model scores each ending by the average loss of its
tokens given the context ("completion style", the only way a small base model can be asked), and the ending
with the lowest average loss is its answer: that accuracy is acc_norm (normalized by ending length).

    python data/hellaswag.py --model gpt2
        # OpenAI GPT-2 124M: acc_norm 0.2955 on the 10,042 val examples
    python data/hellaswag.py --model runs/lm/ckpt_019073.pt  # a train_lm.py checkpoint

Expected acc_norm on the validation set with this script (as measured in karpathy/build-nanogpt):
    gpt2 (124M) 0.2955    gpt2-xl (1558M) 0.4881    random guessing 0.25
(the Eleuther harness scores multiple choice differently and reports ~0.311 for gpt2 124M).
"""
import json
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python data/hellaswag.py`
from common import autocast, best_device, device_flag, positive_int, resolve_dtype  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
URLS = {split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
        for split in ("train", "val", "test")}
NUM_VAL = 10042

# -----------------------------------------------------------------------------
# Getting the data


def download(split="val", data_dir=DATA_DIR):
    """Fetch hellaswag_<split>.jsonl into data_dir (once); return its path."""
    path = os.path.join(data_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    os.makedirs(data_dir, exist_ok=True)
    try:
        with urllib.request.urlopen(URLS[split], timeout=30) as r, open(path + ".tmp", "wb") as f:
            bar = tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                       desc=path)
            while chunk := r.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RuntimeError(f"could not download {URLS[split]} ({e}). Offline? Download that file "
                           f"on a machine with internet and put it at {path}") from e
    os.replace(path + ".tmp", path)  # only a whole file ever sits at `path`
    return path


def load_examples(split="val", data_dir=DATA_DIR, download_if_missing=True):
    path = os.path.join(data_dir, f"hellaswag_{split}.jsonl")
    if not os.path.exists(path):
        if not download_if_missing:
            raise FileNotFoundError(f"{path} not found: "
                                    "run `python data/hellaswag.py --download` (needs internet)")
        path = download(split, data_dir)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

# -----------------------------------------------------------------------------
# Rendering and scoring


def render_example(example, tokenizer):
    """
    One example -> tokens (4, T): context + " " + ending for each of the 4 endings, right-padded with 0;
    mask (4, T): 1 on the ending's tokens, the only positions whose loss counts; and the label (0..3).
    The ending gets a leading space because GPT-2's tokenizer folds the space into the next word's token.
    """
    ctx_tokens = tokenizer.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = tokenizer.encode(" " + ending)
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    T = max(len(r) for r in rows)
    tokens = torch.zeros((4, T), dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, int(example["label"])


_rendered = {}  # (tokenizer, ctx, endings, label) -> render_example's (tokens, mask, label)


def render_cached(example, tokenizer):
    """
    render_example, tokenizing each example once per process: train_lm.py scores the same examples every
    --hellaswag-every steps, and tokenizing them all again would repeat the same CPU work at every
    evaluation while the GPUs wait. The returned tensors are shared between calls: read them, never write
    into them.
    """
    key = (tokenizer, example["ctx"], tuple(example["endings"]), int(example["label"]))
    if key not in _rendered:
        _rendered[key] = render_example(example, tokenizer)
    return _rendered[key]


def completion_losses(logits, tokens, mask):
    """
    Average loss of the masked (ending) tokens of each row: logits (R, T, V), tokens/mask (R, T) -> (R,).
    """
    shift_logits = logits[:, :-1, :].float()  # (R, T-1, V): position t predicts token t+1
    shift_tokens = tokens[:, 1:]              # (R, T-1)
    shift_mask = mask[:, 1:].float()          # (R, T-1)
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                             reduction="none").view(shift_tokens.shape)  # (R, T-1)
    return (losses * shift_mask).sum(dim=1) / shift_mask.sum(dim=1)


def most_likely_row(logits, tokens, mask):
    """acc_norm's answer for one example: the ending (0..3) with the lowest average loss per token."""
    return int(completion_losses(logits, tokens, mask).argmin())


@torch.no_grad()
def evaluate(model, examples, device, tokenizer=None, batch_size=8, rank=0, world_size=1, dtype="fp32"):
    """
    acc_norm of `model` over `examples`. Example i is scored on rank i % world_size; with a process group
    the counts are summed over ranks, so every rank returns the same accuracy. Batches hold batch_size
    examples (4 * batch_size rows). Returns (acc_norm, number of examples).
    """
    import torch.distributed as torch_dist
    from gpt2 import get_tokenizer
    tokenizer = tokenizer or get_tokenizer()
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    mine = [ex for i, ex in enumerate(examples) if i % world_size == rank]
    correct = 0
    device_type = torch.device(device).type
    for start in range(0, len(mine), batch_size):
        rendered = [render_cached(ex, tokenizer) for ex in mine[start:start + batch_size]]
        T = min(max(t.size(1) for t, _, _ in rendered), block_size)
        tokens = torch.zeros((4 * len(rendered), T), dtype=torch.long)  # (4E, T)
        mask = torch.zeros_like(tokens)
        for e, (t, m, _) in enumerate(rendered):
            for j in range(4):
                # every row ends with its ending;
                # a row longer than the model's context keeps its last T tokens
                end = int(m[j].nonzero().max()) + 1
                begin = max(0, end - T)
                tokens[4 * e + j, :end - begin] = t[j, begin:end]
                mask[4 * e + j, :end - begin] = m[j, begin:end]
        labels = torch.tensor([label for _, _, label in rendered])
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(device_type, dtype):
            logits, _ = model(tokens)  # (4E, T, V)
        pred = completion_losses(logits, tokens, mask).view(-1, 4).argmin(dim=1).cpu()  # (E,)
        correct += int((pred == labels).sum())
    counts = torch.tensor([correct, len(mine)], dtype=torch.long, device=device)
    if world_size > 1 and torch_dist.is_initialized():
        torch_dist.all_reduce(counts, op=torch_dist.ReduceOp.SUM)
    model.train(was_training)
    correct, total = counts.tolist()
    return correct / max(1, total), total

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2",
                        help="gpt2..gpt2-xl, a hub id or dir, or a train_lm.py checkpoint")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--download", action="store_true", help="only download the data")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass")
    parser.add_argument("--device", type=device_flag, default=best_device(),
                        help="cuda / mps / cpu (default: the best present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype")
    args = parser.parse_args()
    if args.download:
        print(download(args.split, args.data_dir))
        sys.exit()
    from gpt2 import SubsetTokenizer, load_lm
    model, tok = load_lm(args.model, args.device)
    if isinstance(tok, SubsetTokenizer):
        sys.exit(f"{args.model} has a {tok.n_vocab}-token vocabulary subset: "
                 "HellaSwag needs the full GPT-2 vocabulary")
    examples = load_examples(args.split, args.data_dir)[:args.limit]
    acc, n = evaluate(model, examples, args.device, tok, args.batch_size,
                      dtype=resolve_dtype(args.dtype, torch.device(args.device).type))
    print(f"{args.model}: HellaSwag {args.split} acc_norm {acc:.4f} over {n} examples")
