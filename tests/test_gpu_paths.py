"""
The code paths a GPU takes, checked on a CPU with the device's facts faked (issue #27, "First contact with a
GPU"): --dtype auto on GPUs with and without bf16 tensor cores, non-blocking copies only on CUDA, the MFU peak
of GPUs whose names contain one another, and HellaSwag tokenized once per process.
"""
import pytest
import torch

import train_utils
from common import resolve_dtype, to_device
from data import hellaswag
from gpt2 import get_tokenizer
from tests.test_hellaswag import GOOD, FavouringModel, fabricate


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_dtype_asks_for_bf16_tensor_cores(monkeypatch, capability, expected):
    # torch says yes to bf16 on a T4 or V100 too (emulated): auto must still pick fp16 + loss scaling there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert resolve_dtype("auto", "cuda") == expected


def test_auto_dtype_elsewhere_and_explicit_dtypes_unchanged(monkeypatch):
    def no_gpu_here(*a, **k):
        raise AssertionError("a CPU or MPS run must not ask CUDA anything")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu_here)
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "mps") == "fp32"
    for dtype in ("fp32", "bf16", "fp16"):
        assert [resolve_dtype(dtype, device) for device in ("cpu", "mps", "cuda")] == [dtype] * 3


@pytest.mark.parametrize("device, non_blocking", [
    ("cuda", True), ("cuda:1", True), (torch.device("cuda", 0), True),
    ("mps", False), ("cpu", False), (torch.device("cpu"), False)])
def test_to_device_is_non_blocking_only_on_cuda(monkeypatch, device, non_blocking):
    calls = []

    def to(self, *args, **kwargs):
        calls.append((args, kwargs))
        return self
    monkeypatch.setattr(torch.Tensor, "to", to)
    t = torch.zeros(2)
    assert to_device(t, device) is t
    assert calls == [((device,), {"non_blocking": non_blocking})]


def test_to_device_really_copies_on_cpu():
    assert to_device(torch.arange(3), "cpu").tolist() == [0, 1, 2]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10G", 70), ("NVIDIA A10", 125), ("NVIDIA RTX A5000", 111),
    ("Tesla T4", None), ("NVIDIA GeForce RTX 4080", None)])
def test_peak_flops_most_specific_name_wins(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = train_utils.gpu_peak_flops(0)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


class CountingTokenizer:
    """The GPT-2 tokenizer, counting its encode calls."""

    def __init__(self):
        self.enc, self.calls = get_tokenizer(), 0

    def encode(self, text):
        self.calls += 1
        return self.enc.encode(text)


def test_hellaswag_tokenizes_once_per_process():
    examples, tok, model = fabricate(6), CountingTokenizer(), FavouringModel(GOOD)
    first = hellaswag.evaluate(model, examples, "cpu", tok, batch_size=4)
    assert tok.calls == 6 * 5  # the context and 4 endings of each example
    second = hellaswag.evaluate(model, examples, "cpu", tok, batch_size=4)
    assert tok.calls == 6 * 5 and second == first == (1.0, 6)
    # a copy of the examples (as every other rank receives them from rank 0) hits the same cache
    assert hellaswag.evaluate(model, [dict(ex) for ex in examples], "cpu", tok, batch_size=3) == first
    assert tok.calls == 6 * 5
    # an edited example is tokenized again, not served stale
    ex = examples[0]
    edited = [dict(ex, endings=list(reversed(ex["endings"])), label=3 - ex["label"])]
    assert hellaswag.evaluate(model, edited, "cpu", tok) == (1.0, 1) and tok.calls == 6 * 5 + 5
