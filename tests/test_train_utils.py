"""train_utils: schedule, atomic checkpoints, RNG state through weights_only, JSONL log, NaN stop."""
import json
import math
import random

import numpy as np
import pytest
import torch

from common import load_checkpoint, save_checkpoint
from checkpoints import JsonlLogger, rng_state, set_rng_state
from train_utils import check_finite, format_eta, lr_at


def test_lr_schedule_warmup_then_cosine_to_min():
    kw = dict(max_steps=100, warmup_steps=10, max_lr=1.0, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)  # halfway down the cosine: the mean of max and min
    assert lr_at(100, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_checkpoint_round_trip_atomic_and_clear_errors(tmp_path):
    path = str(tmp_path / "c.pt")
    state = {"model": {"w": torch.randn(3)}, "step": 7, "vocab": None, "args": {"lr": 1e-3, "name": "x"},
             "rng": rng_state()}
    save_checkpoint(path, state)
    assert not (tmp_path / "c.pt.tmp").exists()
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 7
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(path)


def test_rng_state_survives_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(str(tmp_path / "r.pt"), {"rng": rng_state()})
    want = (random.random(), np.random.randn(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    got = (random.random(), np.random.randn(), torch.rand(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_jsonl_logger_truncates_or_appends(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = JsonlLogger(path, config={"a": 1}, device="cpu")
    log.log(step=0, loss=1.5)
    log.log(step=1, loss=1.2)  # logged after the checkpoint the next job resumes from: it is done again
    log.close()
    log = JsonlLogger(path, resume_step=1)
    log.log(step=1, loss=1.0)
    log.close()
    records = [json.loads(line) for line in open(path)]
    assert [(r.get("event"), r.get("loss")) for r in records] == \
        [("start", None), (None, 1.5), ("start", None), (None, 1.0)]
    assert records[0]["config"] == {"a": 1} and "torch" in records[0] and "argv" in records[0]
    JsonlLogger(path).close()  # a fresh run starts a fresh log
    assert len(open(path).readlines()) == 1


def test_check_finite_message():
    check_finite(torch.tensor(2.0), 3, None)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 12; stopping; last good checkpoint: "
                                                 r"ck.pt; try a lower --lr"):
        check_finite(torch.tensor(math.nan), 12, "ck.pt")
    assert format_eta(3725) == "1h02m" and format_eta(65) == "1m05s"


def test_rng_of_8_gpus_restores_on_a_machine_with_2(monkeypatch):
    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]  # saved by a run on 8 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device: restored.append(device))
    set_rng_state(state)
    assert restored == [0, 1]
