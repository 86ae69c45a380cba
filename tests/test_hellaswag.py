"""
data/hellaswag.py: rendering and masks on examples in the official jsonl format, and scoring with fake models.
"""
import json
import urllib.error

import pytest
import torch
import torch.nn as nn

from data import hellaswag
from gpt2 import get_tokenizer

GOOD = ["red", "green", "blue"]    # the right ending of every fabricated example is made of these words
BAD = ["stone", "paper", "lamp"]   # the wrong ones of these


def fabricate(n=10):
    """Examples exactly as hellaswag_val.jsonl holds them (same fields), the label cycling through 0..3."""
    out = []
    for i in range(n):
        label = i % 4
        endings = [" ".join(BAD[(i + j) % 3] for _ in range(1 + (i + j) % 3)) for j in range(4)]
        endings[label] = " ".join(GOOD[(i + k) % 3] for k in range(1 + i % 3))
        ctx_a, ctx_b = f"Example {i} starts here.", "then a man"
        out.append({"ind": 100 + i, "activity_label": "Painting", "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": ctx_a + " " + ctx_b, "split": "val", "split_type": "indomain", "label": label,
                    "endings": endings, "source_id": f"activitynet~v_{i}"})
    return out


class FavouringModel(nn.Module):
    """A fake LM whose next-token logits are the same at every position: high for `words`, low otherwise."""

    def __init__(self, words, vocab_size=50304):
        super().__init__()
        self.config = type("C", (), {"block_size": 1024})()
        enc = get_tokenizer()
        bias = torch.zeros(vocab_size)
        for w in words:
            bias[enc.encode(" " + w)] = 10.0
        self.register_buffer("bias", bias)

    def forward(self, idx):
        return self.bias.expand(*idx.shape, -1), None  # (B, T, V)


def test_render_example_tokens_and_mask():
    enc = get_tokenizer()
    ex = fabricate(3)[2]
    tokens, mask, label = hellaswag.render_example(ex, enc)
    ctx = enc.encode(ex["ctx"])
    assert label == 2 and tokens.shape[0] == 4 and mask.shape == tokens.shape
    for i, ending in enumerate(ex["endings"]):
        end = enc.encode(" " + ending)
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end and tokens[i, n:].eq(0).all()
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.size(1) - n)
    assert tokens.size(1) == max(len(ctx) + len(enc.encode(" " + e)) for e in ex["endings"])


def test_most_likely_row_picks_lowest_average_loss():
    enc = get_tokenizer()
    ex = fabricate(2)[1]
    tokens, mask, label = hellaswag.render_example(ex, enc)
    good = FavouringModel(GOOD)
    assert hellaswag.most_likely_row(good(tokens)[0], tokens, mask) == label
    bad = FavouringModel(BAD)
    assert hellaswag.most_likely_row(bad(tokens)[0], tokens, mask) != label


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_accuracy_and_rank_sharding(batch_size):
    examples = fabricate(10)
    assert hellaswag.evaluate(FavouringModel(GOOD), examples, "cpu", batch_size=batch_size) == (1.0, 10)
    assert hellaswag.evaluate(FavouringModel(BAD), examples, "cpu", batch_size=batch_size) == (0.0, 10)
    # without a process group each rank scores its own share: examples 0, 2, 4, ... and 1, 3, 5, ...
    shares = [hellaswag.evaluate(FavouringModel(GOOD), examples, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert shares == [(1.0, 5), (1.0, 5)]


def test_evaluate_with_a_real_gpt_and_long_rows_truncated():
    from gpt2 import GPT, GPTConfig
    torch.manual_seed(0)
    # rows longer than 8 tokens
    model = GPT(GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    acc, n = hellaswag.evaluate(model, fabricate(6), "cpu", batch_size=4)
    assert n == 6 and 0.0 <= acc <= 1.0


def test_load_examples_and_offline_message(tmp_path, monkeypatch):
    examples = fabricate(4)
    with open(tmp_path / "hellaswag_val.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    assert hellaswag.load_examples("val", str(tmp_path)) == examples

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(RuntimeError, match=r"Offline\? Download that file"):
        hellaswag.load_examples("val", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="--download"):
        hellaswag.load_examples("val", str(tmp_path / "none"), download_if_missing=False)
