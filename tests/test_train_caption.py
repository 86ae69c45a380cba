"""
train_caption.py on a tiny shapes world: exact resume, frozen LM, DDP == one process, clear refusals,
NaN stop.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bridges
import evaluate
import train_caption
from data import coco, feature_cache, shapes
from gpt2 import GPT, GPTConfig, SubsetTokenizer, get_tokenizer, load_lm
from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER = "random-vit:tiny:seed0"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny COCO-format shapes world, feature caches of both splits, and a small LM checkpoint (train_lm
    format)."""
    tmp = tmp_path_factory.mktemp("caption")
    root = str(tmp / "shapes")
    shapes.generate(root, train=40, val=12, corpus_docs=10, seed=0, image_size=32)
    for split in ("train", "val"):
        feature_cache.build_feature_cache(coco.load_records(root, split), ENCODER, str(tmp / f"feat_{split}"),
                                 batch_size=16, num_workers=1)
    gpt2_tok = get_tokenizer()
    ids = {t for split in ("train", "val") for r in coco.load_records(root, split) for c in r["captions"]
           for t in gpt2_tok.encode_ordinary(c)}  # the vocabulary train_lm --vocab-subset would keep
    vocab = SubsetTokenizer(ids).ids
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=32))
    # a little pretraining on the train captions, so the LM can be confident (GPT-2's init cannot)
    index = {t: i for i, t in enumerate(vocab)}
    texts = [[index[t] for t in gpt2_tok.encode_ordinary(c)] for r in coco.load_records(root, "train")
             for c in r["captions"]]
    tokens, targets = bridges.caption_batch(texts, index[50256])
    # <|endoftext|> caption <|endoftext|>
    x = torch.cat([torch.full((len(texts), 1), index[50256]), tokens], dim=1)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(25):  # not to convergence: the image must still have something to add
        _, loss = lm(x[:, :-1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": lm.state_dict(), "config": dataclasses.asdict(lm.config), "vocab": vocab},
               tmp / "lm.pt")
    return dict(root=root, train=str(tmp / "feat_train"), val=str(tmp / "feat_val"), lm=str(tmp / "lm.pt"))


def args(world, out_dir, bridge="xattn", *extra):
    return ["--bridge", bridge, "--lm", world["lm"], "--coco-root", world["root"],
            "--features", world["train"], "--val-features", world["val"], "--out-dir", str(out_dir),
            "-B", "8", "--total-batch", "16", "--max-steps", "6", "--warmup-steps", "2", "--lr", "3e-3",
            "--val-every", "3", "--val-pairs", "20", "--ckpt-every", "0", "--log-every", "1",
            "--device", "cpu", "--qformer-width", "32", "--qformer-heads", "2", "--queries", "4",
            *map(str, extra)]


def records(out_dir, key):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if key in r]


@pytest.mark.parametrize("bridge", list(bridges.BRIDGES))
def test_resume_is_exact_and_the_lm_stays_frozen(world, tmp_path, bridge):
    full = train_caption.main(args(world, tmp_path / "full", bridge))
    half = tmp_path / "half"
    train_caption.main(args(world, half, bridge, "--stop-step", "3"))
    assert os.path.exists(half / "ckpt_000003.pt") and not os.path.exists(half / "ckpt_final.pt")
    resumed = train_caption.main(args(world, half, bridge, "--resume", "auto"))
    for k, v in full.bridge.state_dict().items():
        assert torch.equal(v, resumed.bridge.state_dict()[k]), k
    assert [r["loss"] for r in records(tmp_path / "full", "loss")] == \
        [r["loss"] for r in records(half, "loss")]
    # frozen means frozen: the LM after training is bit-identical to the checkpoint it came from
    lm, _ = load_lm(world["lm"])
    for k, v in lm.state_dict().items():
        assert torch.equal(v, full.lm.state_dict()[k]), k
    # the final checkpoint rebuilds the same captioner
    loaded, tokenizer, ckpt = bridges.load_captioner(str(tmp_path / "full" / "ckpt_final.pt"))
    visual = feature_cache.FeatureCache(world["val"]).batch([0, 1, 2])
    assert loaded.generate(visual, 8) == full.eval().generate(visual, 8)
    assert ckpt["params"]["bridge"]["trainable"] == ckpt["params"]["bridge"]["total"] > 0
    assert ckpt["params"]["lm"]["trainable"] == 0 and ckpt["params"]["encoder"]["total"] > 0
    assert ckpt["train_seconds"] > 0 and ckpt["val_loss"] is not None


def test_ddp_two_processes_match_one(world, tmp_path):
    # the same global batch of 16 pairs: one process accumulates 2 micro-batches of 8, two processes 1 each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train_caption.py", *args(world, tmp_path / "one", "qformer")], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_caption.py", *args(world, tmp_path / "two", "qformer")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for key in ("loss", "val_loss"):
        a, b = ([r[key] for r in records(tmp_path / "one", key)],
                [r[key] for r in records(tmp_path / "two", key)])
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    start = next(map(json.loads, open(tmp_path / "two" / "log.jsonl")))
    assert start["config"]["world_size"] == 2 and start["config"]["grad_accum"] == 1


def test_on_the_fly_encoding_trains_too(world, tmp_path):
    a = [x for x in args(world, tmp_path, "linear", "--encoder", ENCODER, "--max-steps", "2")]
    for flag in ("--features", "--val-features"):
        i = a.index(flag)
        del a[i:i + 2]
    train_caption.main(a)
    ckpt = load_checkpoint(str(tmp_path / "ckpt_final.pt"))
    assert ckpt["visual_features"]["encoder"] == ENCODER and ckpt["visual_features"]["grid"] == [4, 8]
    assert len(records(tmp_path, "val_loss")) == 2


def test_mismatches_are_refused(world, tmp_path):
    train_caption.main(args(world, tmp_path, "xattn", "--stop-step", "2"))
    with pytest.raises(ValueError, match="bridge config"):
        train_caption.main(args(world, tmp_path, "xattn", "--resume", "auto", "--xattn-every", "2"))
    other_lm = tmp_path / "other_lm.pt"
    ckpt = torch.load(world["lm"], weights_only=True)
    ckpt["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, other_lm)
    with pytest.raises(ValueError, match="LM weights differ"):
        train_caption.main(args(world, tmp_path, "xattn", "--resume", "auto", "--lm", other_lm))
    with pytest.raises(ValueError, match="not the one this bridge was trained on"):
        bridges.load_captioner(str(tmp_path / "ckpt_000002.pt"), lm=str(other_lm))
    # a val cache made by another encoder is never mixed with the train cache
    other = tmp_path / "feat_other"
    feature_cache.build_feature_cache(coco.load_records(world["root"], "val"), "random-vit:tiny:seed1",
                                      str(other), batch_size=16, num_workers=1)
    a = args(world, tmp_path / "x", "linear")
    a[a.index("--val-features") + 1] = str(other)
    with pytest.raises(ValueError, match="encoder"):
        train_caption.main(a)


def poison_from_step_4(monkeypatch):
    """Make every training loss NaN from step 4 on (2 micro-batches per step); returns the call counter."""
    forward = bridges.Captioner.forward
    calls = {"n": 0}

    def poisoned(self, visual, tokens, targets=None, prompt_len=None):
        logits, loss = forward(self, visual, tokens, targets, prompt_len)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 8:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(bridges.Captioner, "forward", poisoned)
    return calls


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    poison_from_step_4(monkeypatch)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4.*ckpt_000004.pt"):
        train_caption.main(args(world, tmp_path, "linear", "--ckpt-every", "2", "--val-every", "0"))
    good = load_checkpoint(str(tmp_path / "ckpt_000004.pt"))
    assert all(torch.isfinite(v).all() for v in good["trainable"]["bridge"].values())
    assert not os.path.exists(tmp_path / "ckpt_final.pt")


@pytest.mark.parametrize("log_every, ckpt_every, last_good", [
    (3, 4, "ckpt_000004.pt"),  # found at the log step after step 5
    (8, 3, "ckpt_000003.pt"),  # found before the checkpoint after step 5 (ckpt_000006.pt) is written
])
def test_a_nan_is_found_at_the_next_log_step_and_never_checkpointed(world, tmp_path, monkeypatch, log_every,
                                                                     ckpt_every, last_good):
    # the loop reads its losses back only every --log-every steps (and before checkpoints): a NaN from step 4
    # on is found after step 5, the steps in between having trained on it, and nothing after it is saved
    calls = poison_from_step_4(monkeypatch)
    with pytest.raises(FloatingPointError, match=f"loss is nan at step 4.*{last_good}"):
        train_caption.main(args(world, tmp_path, "linear", "--max-steps", "12", "--log-every", log_every,
                                "--ckpt-every", ckpt_every, "--val-every", "0"))
    assert calls["n"] == 6 * 2  # steps 0-5 ran
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")) == \
        [f"ckpt_{s:06d}.pt" for s in range(ckpt_every, 5, ckpt_every)]
    good = load_checkpoint(str(tmp_path / last_good))
    assert all(torch.isfinite(v).all() for v in good["trainable"]["bridge"].values())
    assert [r["step"] for r in records(tmp_path, "loss")] == [0, 1, 2, 3]  # the finite steps are logged


class MixerBridge(torch.nn.Module):
    """
    A fourth bridge, defined here and nowhere else: `queries` prefix embeddings, each a learned softmax
    mixture of the visual tokens, projected to the GPT's width. It offers attention_maps, so evaluate.py draws
    them too.
    """

    def __init__(self, config):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.zeros(config.queries, config.vis_tokens))  # (Q, S) mixing logits
        self.proj = torch.nn.Linear(config.vis_dim, config.n_embd)

    def attention_maps(self, visual):
        return self.mix.softmax(-1).expand(visual.size(0), 1, -1, -1)  # (B, 1, Q, S): one "head"

    def forward(self, visual):
        # (B, Q, S) @ (B, S, C_vis) -> (B, Q, C)
        prefix = self.proj(self.attention_maps(visual)[:, 0] @ visual)
        return prefix, None


@pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics need Java")
def test_a_fourth_bridge_registered_at_run_time_trains_and_is_evaluated(world, tmp_path, monkeypatch):
    monkeypatch.setitem(bridges.BRIDGES, "mixer", MixerBridge)  # the one line a new bridge adds (@register)
    out = tmp_path / "mixer"
    train_caption.main(args(world, out, "mixer", "--queries", "3", "--max-steps", "4"))
    losses = [r["loss"] for r in records(out, "loss")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    ckpt = load_checkpoint(str(out / "ckpt_final.pt"))
    assert ckpt["bridge_config"]["kind"] == "mixer" and \
        set(ckpt["trainable"]["bridge"]) == {"mix", "proj.weight", "proj.bias"}
    result = evaluate.main(["--checkpoints", str(out / "ckpt_final.pt"), "--coco-root", world["root"],
                            "--features", world["val"], "--out", str(tmp_path / "results"),
                            "--method", "greedy", "--max-new-tokens", "6", "--metrics", "bleu", "cider",
                            "--device", "cpu"])
    assert [row["bridge"] for row in result["rows"]] == ["mixer", "blind (frozen LM of mixer, no image)"]
    assert result["rows"][0]["kind"] == "mixer" and "CIDEr" in result["rows"][0]
    for name in ("grid_mixer.png", "attention_mixer.png", "val_loss.png"):
        assert (tmp_path / "results" / name).stat().st_size > 1000, name
