"""
How often a caption training step makes the host wait for the device, counted on a CPU.

On a GPU, every number read back to Python (loss.item(), float(norm), `if tensor:`, tensor.tolist()) waits
for all the work queued before it: the CPU stops feeding the GPU, which then idles until the CPU catches up.
A CPU has no queue to wait for, so these tests count the calls that would wait on a GPU: every
`aten::_local_scalar_dense` (what .item(), float(), int() and bool() of a tensor run), every .tolist() and
every torch.tensor(..., device=...), asked for by this project's code (torch's own reads of CPU-resident
tensors, like AdamW's step count, never wait and are not counted). The GPU-only waits,
torch.cuda.synchronize() and a CUDA event's, cannot be counted here (train_caption.StepLog waits for one
event per log step). On a GPU, torch.cuda.set_sync_debug_mode("warn") names every wait.
"""
import dataclasses
import json
import os
import traceback
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_caption
from data import coco, feature_cache, shapes
from gpt2 import GPT, GPTConfig, SubsetTokenizer, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(torch.__file__))  # site-packages: torch's own reads are not ours
# torch's frames between the line that asked and the dispatch mode
DISPATCHER = tuple(os.path.join(VENV, "torch", *p) for p in (["_compile.py"], ["_dynamo"],
                                                              ["utils", "_python_dispatch.py"]))


class HostReads(TorchDispatchMode):
    """Counts, by the project line that asked, the tensor-to-Python reads that wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.callers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.note()
        return func(*args, **(kwargs or {}))

    def note(self):
        # the Python line that asked (the innermost frame but this file's and the dispatcher's): counted if it
        # is this project's
        caller = next(f for f in reversed(traceback.extract_stack())
                      if f.filename != __file__ and not f.filename.startswith(DISPATCHER))
        if caller.filename.startswith(ROOT) and not caller.filename.startswith(VENV):
            self.callers.append(f"{os.path.relpath(caller.filename, ROOT)}:{caller.lineno}")


def count_host_reads(monkeypatch, fn):
    """
    fn()'s waits for the device, by the line that asked: item / float / bool / int of a tensor, tolist, and
    torch.tensor(..., device=...) (which on a GPU copies from the host only once the GPU's queue is done).
    """
    reads = HostReads()
    tolist, tensor = torch.Tensor.tolist, torch.tensor

    def counted_tolist(self):
        reads.note()
        return tolist(self)

    def counted_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            reads.note()
        return tensor(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counted_tolist)
        m.setattr(torch, "tensor", counted_tensor)
        with reads:
            fn()
    return reads.callers


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A shapes world with a feature cache of its train split and an untrained tiny LM (train_lm format)."""
    tmp = tmp_path_factory.mktemp("syncs")
    root = str(tmp / "shapes")
    shapes.generate(root, train=24, val=4, corpus_docs=4, seed=0, image_size=32)
    records = coco.load_records(root, "train")
    feature_cache.build_feature_cache(records, "random-vit:tiny:seed0", str(tmp / "feat"), batch_size=32,
                                      num_workers=1)
    tok = get_tokenizer()
    vocab = SubsetTokenizer({t for r in records for c in r["captions"] for t in tok.encode_ordinary(c)}).ids
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": lm.state_dict(), "config": dataclasses.asdict(lm.config), "vocab": vocab},
               tmp / "lm.pt")
    return dict(root=root, features=str(tmp / "feat"), lm=str(tmp / "lm.pt"))


def train_args(world, out_dir, steps, *extra):
    return ["--bridge", "linear", "--lm", world["lm"], "--coco-root", world["root"], "--features",
            world["features"], "--out-dir", str(out_dir), "-B", "4", "--total-batch", "8", "--max-steps",
            str(steps), "--warmup-steps", "2", "--val-every", "0", "--ckpt-every", "0", "--device", "cpu",
            *extra]


@pytest.mark.parametrize("preload", ["no", "yes"])
def test_a_training_step_reads_nothing_back_between_log_steps(small_world, tmp_path, monkeypatch, preload):
    # two runs that differ only in length: what the longer one reads more is what its extra steps read
    every = ["--log-every", "4", "--preload-features", preload]
    short = count_host_reads(monkeypatch, lambda: train_caption.main(
        train_args(small_world, tmp_path / "short", 4, *every)))
    long = count_host_reads(monkeypatch, lambda: train_caption.main(
        train_args(small_world, tmp_path / "long", 12, *every)))
    extra = list(long)
    for caller in short:
        extra.remove(caller)
    # the 8 more steps hold 2 more log steps (after steps 7 and 11), each reading its 4 steps' losses and
    # gradient norms at once (before issue #27: 4 reads a step and 1 more a log step, plus a
    # torch.cuda.synchronize() a step, plus with --preload-features a torch.tensor(device=) a micro-batch)
    assert len(extra) == 2, f"{len(extra) / 8:.2f} host reads per step, from {sorted(set(extra))}"
    # and the log still holds every step
    log = [json.loads(line) for line in open(tmp_path / "long" / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == list(range(12))


class FakeEvent:
    """torch.cuda.Event's interface, on a clock that ticks 250 ms at each record()."""
    clock, waits = 0.0, []

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self):
        FakeEvent.clock += 250.0
        self.ms = FakeEvent.clock

    def synchronize(self):
        FakeEvent.waits.append(self)

    def elapsed_time(self, end):
        return end.ms - self.ms


def test_the_step_log_times_cuda_steps_with_events_and_waits_once_per_write(monkeypatch):
    # the CUDA branch of train_caption.StepLog, which a CPU run never takes, with fake events
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "waits", [])
    logged = []
    job = SimpleNamespace(steps=(0, 4, 4), val_pairs=None, train_seconds=0.0,
                          run=SimpleNamespace(last=None, log=lambda **r: logged.append(r)),
                          scaler=SimpleNamespace(is_enabled=lambda: False))
    args = SimpleNamespace(log_every=2, ckpt_every=0, val_every=0, total_batch=8)
    log = train_caption.StepLog(job, args, SimpleNamespace(device_type="cuda"),
                                SimpleNamespace(set_postfix=lambda **kw: None))
    writes = []
    for step in range(4):
        log.start_step()
        log.end_step(step, torch.tensor(2.0 - step / 4), torch.tensor(0.5), lr=1e-3)
        if log.due(step):
            writes.append(step)
            log.write()
    assert writes == [0, 1, 3] and len(FakeEvent.waits) == 3  # the first step, then every 2nd
    assert [r["step"] for r in logged] == [0, 1, 2, 3] and [r["loss"] for r in logged] == [2, 1.75, 1.5, 1.25]
    assert all(r["samples_per_s"] == 8 / 0.25 and r["grad_norm"] == 0.5 for r in logged)
    assert job.train_seconds == 4 * 0.25
    log.start_step()
    log.end_step(4, torch.tensor(float("nan")), torch.tensor(0.5), lr=1e-3)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4"):
        log.write()
