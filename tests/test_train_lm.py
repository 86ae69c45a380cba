"""
train_lm.py on tiny models: overfitting one batch, exact resume, DDP == one process, clear errors, NaN stop.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_lm
from data import fineweb
from gpt2 import GPT, SubsetTokenizer, load_lm
from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat and then it ran far away from home under blue sky".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    rng = np.random.default_rng(0)
    with open(tmp / "docs.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30))))}) + "\n")
    out = str(tmp / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[str(tmp / "docs.jsonl")]), name="t",
                    shard_size=1000)
    return out


def args(shards, out_dir, *extra):
    return ["--preset", "tiny", "--data-dir", shards, "--out-dir", str(out_dir), "-B", "4", "-T", "32",
            "--total-batch", "256", "--vocab-subset", "--device", "cpu", "--val-every", "0",
            "--sample-every", "0", "--hellaswag-every", "0", "--log-every", "100", *map(str, extra)]


def records(out_dir, key="loss"):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if key in r]

# -----------------------------------------------------------------------------


def test_overfits_a_single_batch(tmp_path):
    # a train shard of exactly one batch (B*T + 1 tokens): the loader serves the same batch every step
    data = tmp_path / "one"
    os.makedirs(data)
    rng = np.random.default_rng(0)
    np.save(data / "x_val_000000.npy", rng.integers(0, 40, 4 * 32 + 1).astype(np.uint16))
    np.save(data / "x_train_000001.npy", rng.integers(0, 40, 4 * 32 + 1).astype(np.uint16))
    train_lm.main(args(str(data), tmp_path / "run", "--total-batch", "128", "--max-steps", "150",
                       "--warmup-steps", "10", "--lr", "1e-2", "--ckpt-every", "0", "--n-embd", "64"))
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert losses[0] > 3.0 and losses[-1] < 0.1, losses[::10]


def test_compiled_training_matches_eager(shards, tmp_path):
    # torch.compile (inductor, which compiles C++ with gcc on a CPU) trains the same model as eager PyTorch:
    # the losses of three steps agree to float tolerance (make smoke compiles a bridge at full size; this is
    # the LM's)
    train_lm.main(args(shards, tmp_path / "eager", "--max-steps", "3", "--no-compile"))
    train_lm.main(args(shards, tmp_path / "compiled", "--max-steps", "3", "--compile"))
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [0, 1, 2]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-3)


def test_exact_resume_is_bit_identical(shards, tmp_path):
    train_lm.main(args(shards, tmp_path / "a", "--max-steps", "8", "--ckpt-every", "0"))
    train_lm.main(args(shards, tmp_path / "b", "--max-steps", "8", "--stop-step", "4"))
    assert os.path.exists(tmp_path / "b" / "ckpt_000004.pt")
    train_lm.main(args(shards, tmp_path / "b", "--max-steps", "8", "--resume", "auto"))
    a, b = (load_checkpoint(str(tmp_path / "a" / "ckpt_000008.pt")),
            load_checkpoint(str(tmp_path / "b" / "ckpt_000008.pt")))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    assert a["loader"] == b["loader"] and a["step"] == b["step"] == 8
    assert [r["loss"] for r in records(tmp_path / "a")] == [r["loss"] for r in records(tmp_path / "b")]
    starts = [r for r in map(json.loads, open(tmp_path / "b" / "log.jsonl")) if r.get("event") == "start"]
    assert [s["resume"] for s in starts] == [False, True]  # the resumed run appended to the same log
    # what gpt2.load_lm (the captioner's entry point) reads back
    model, tok = load_lm(str(tmp_path / "a" / "ckpt_000008.pt"))
    assert tok.ids == a["vocab"] and model.config.vocab_size == len(a["vocab"])
    assert set(a) >= {"model", "config", "vocab", "optimizer", "step", "loader", "rng", "args"}


def test_resume_with_other_config_or_vocab_is_refused(shards, tmp_path):
    train_lm.main(args(shards, tmp_path, "--max-steps", "2"))
    with pytest.raises(ValueError, match=r"different config.*'n_layer': \(2, 3\)"):
        train_lm.main(args(shards, tmp_path, "--max-steps", "4", "--resume", "auto", "--n-layer", "3"))
    no_subset = [a for a in args(shards, tmp_path, "--max-steps", "4", "--resume", "auto")
                 if a != "--vocab-subset"]
    with pytest.raises(ValueError, match="vocabulary of .* tokens, this run has 50304"):
        train_lm.main(no_subset)


def test_missing_data_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data/fineweb.py"):
        train_lm.main(args(str(tmp_path / "nowhere"), tmp_path, "--max-steps", "2"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path, monkeypatch):
    forward = GPT.forward
    calls = {"n": 0}

    # from the 6th optimizer step (2 micro-steps each) the loss is NaN
    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 5:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError,
                       match=r"loss is nan at step 5; stopping; last good checkpoint: .*ckpt_000004.pt"):
        train_lm.main(args(shards, tmp_path, "--max-steps", "10", "--ckpt-every", "2"))
    assert [os.path.basename(p) for p in sorted(glob.glob(str(tmp_path / "ckpt_*.pt")))] == \
        ["ckpt_000002.pt", "ckpt_000004.pt"]
    good = load_checkpoint(str(tmp_path / "ckpt_000004.pt"))
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def reference_run(shards, tmp_path, *extra):
    """
    Six HellaSwag examples, and a run of one process into tmp_path/one with the full GPT-2 vocabulary (so that
    HellaSwag runs, and its counts are summed over ranks). Returns the same run's arguments for tmp_path/two.
    """
    examples = tmp_path / "hs"
    os.makedirs(examples)
    from tests.test_hellaswag import fabricate
    with open(examples / "hellaswag_val.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in fabricate(6))
    common = [a for a in args(shards, "", "--ckpt-every", "0", "--hellaswag-dir", examples,
                              "--val-every", "2", "--val-steps", "2", "--n-embd", "16", *extra)
              if a != "--vocab-subset"]
    one, two = common.copy(), common.copy()
    one[one.index("--out-dir") + 1], two[two.index("--out-dir") + 1] = (str(tmp_path / "one"),
                                                                        str(tmp_path / "two"))
    subprocess.run([sys.executable, "train_lm.py", *one], cwd=ROOT, env=ENV, check=True, capture_output=True)
    return two


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_rank_0_decides_for_every_rank(shards, tmp_path):
    """
    DDP: two processes, stopped and resumed, equal one (the same global batch of 256 tokens: one process
    accumulates 2 micro-batches, two processes 1 each). Rank 1 sees neither the HellaSwag file nor the run
    folder (a second machine without the first one's disk): rank 0 reads both and every rank uses what it
    found.
    """
    two = reference_run(shards, tmp_path, "--max-steps", "4", "--hellaswag-every", "2")
    examples = tmp_path / "hs"
    blind = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "tests/hide_on_rank1.py", os.pathsep.join([str(examples), str(tmp_path / "two")]), "train_lm.py"]
    for extra in (["--stop-step", "2"], ["--resume", "auto"]):
        run = subprocess.run([*blind, *two, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    for key in ("loss", "val_loss", "hellaswag"):
        a, b = ([r[key] for r in records(tmp_path / "one", key)],
                [r[key] for r in records(tmp_path / "two", key)])
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert [r["hellaswag_n"] for r in records(tmp_path / "two", "hellaswag")] == [6, 6, 6]
    start = next(map(json.loads, open(tmp_path / "two" / "log.jsonl")))
    assert start["config"]["world_size"] == 2 and start["config"]["grad_accum"] == 1


def test_micro_batches_fit_any_world_size_that_divides_the_batch():
    from train_utils import micro_batches
    assert micro_batches(256, 64, 1) == (64, 4) and micro_batches(256, 64, 8) == (32, 1)
    assert micro_batches(256, 64, 2) == (64, 2) and micro_batches(96, 64, 2) == (48, 1)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        micro_batches(256, 64, 3)


def test_mfu_is_per_gpu():
    from train_utils import estimate_mfu
    one = estimate_mfu(124e6, 12, 12, 64, 1024, 100_000, 989e12)
    assert one == pytest.approx((6 * 124e6 + 12 * 12 * 12 * 64 * 1024) * 100_000 / 989e12)
    # 8 GPUs at 100k tokens/s each: train_lm passes the run's 800k tokens/s divided by 8, the same MFU
    assert estimate_mfu(124e6, 12, 12, 64, 1024, 800_000 / 8, 989e12) == pytest.approx(one)


def test_micro_batch_left_out_is_what_fits(shards, tmp_path, monkeypatch, capsys):
    # a device with free memory for 2.5 sequences of this run (as microbatch.py estimates them): without -B
    # the run takes 2 at a time (a power of two that divides its 8 sequences per step), 4 micro-steps, and
    # validation reads as many tokens in 4x the batches
    import microbatch
    argv = [a for a in args(shards, tmp_path, "--max-steps", "1") if a not in ("-B", "4")]
    config = train_lm.model_config(train_lm.get_args(argv), SubsetTokenizer(fineweb.token_ids(shards)).ids)
    need = microbatch.fixed_bytes(config, "fp32") + 2.5 * microbatch.bytes_per_sequence(config, 32, "fp32")
    monkeypatch.setattr(microbatch, "free_memory", lambda device: need / microbatch.HEADROOM)
    train_lm.main(argv)
    start = next(map(json.loads, open(tmp_path / "log.jsonl")))
    assert start["config"]["grad_accum"] == 4 and start["config"]["args"]["batch_size"] == 2
    assert start["config"]["args"]["val_steps"] == 4 * train_lm.TRAIN_PRESETS["tiny"]["val_steps"]
    assert "micro-batch -B 2, the largest that fits" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [([], (16, 32)), (["-B", "64"], (64, 8)), (["-B", "8"], (8, 64))])
def test_gpt2_124m_on_a_24_gb_card_takes_16_unless_told(monkeypatch, argv, expected):
    # the preset's 524,288 tokens per step: 16 sequences of 1024 and 32 micro-steps on a 24 GB card (half a
    # GiB of it held by the CUDA context), unless -B says otherwise
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(23.5 * 2**30), 24 * 2**30))
    from train_utils import Dist
    run_args = train_lm.get_args(argv)
    run_args.dtype = "bf16"  # what launch() resolves --dtype auto to on such a card
    assert train_lm.micro_batch(run_args, train_lm.model_config(run_args, None),
                                Dist(False, 0, 0, 1, "cuda", "cuda")) == expected
    assert run_args.batch_size == expected[0]


def test_out_of_memory_stops_with_the_micro_batch_to_pass(shards, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, idx, targets=None, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB")
    monkeypatch.setattr(GPT, "forward", out_of_memory)
    with pytest.raises(SystemExit) as e:  # as argparse and train_lm's other usage errors stop
        train_lm.main(args(shards, tmp_path, "--max-steps", "2"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: out of memory on cpu with a micro-batch of -B 4 sequences of -T 32 tokens: pass -B 2" \
        in err
    assert "--total-batch 256 tokens (gradient accumulation goes from 2 to 4 micro-steps" in err
    assert "Traceback" not in err
