"""
microbatch.py: the memory estimate of a training step checked against what autograd saves and what the
allocator peaks at (on a CPU, at a small GPT-2 shape), and the micro-batch it chooses for 24, 40 and 80 GB
cards.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import microbatch
from common import autocast
from gpt2 import GPT, GPTConfig
from train_utils import Dist

# GPT-2's proportions, small: the output layer much wider than a block (50304 / 768 ~ 4096 / 64)
SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=4096)
GPT2_124M = GPTConfig(vocab_size=50304)  # as train_lm.py trains it: the vocabulary padded to 50,304
GiB = 2**30


def training_step(model, B, dtype, pack=None):
    """One forward and backward of B random sequences of block_size tokens, saved tensors seen by pack."""
    x, y = (torch.randint(0, model.config.vocab_size, (B, model.config.block_size)) for _ in range(2))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack or (lambda t: t), lambda t: t)
    with hooks, autocast("cpu", dtype):
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model, B, dtype):
    """Bytes of the tensors autograd saves for backward (each storage once, the parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    training_step(model, B, dtype, pack)
    return sum(saved.values())


def peak_bytes(model, B, dtype):
    """The CPU allocator's peak over a training step, from the profiler's record of allocations and frees."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        training_step(model, B, dtype)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak

# -----------------------------------------------------------------------------


def test_parameter_count_is_the_models():
    for config in (SMALL, GPT2_124M):
        with torch.device("meta"):
            assert microbatch.n_params(config) == GPT(config).num_params()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_saved_activations_are_what_autograd_saves(dtype):
    # one sequence more (B = 1 -> 3, per sequence) adds what the arithmetic says, to within a few bytes a
    # token (the position ids, the same for every batch); under bf16 the weights' bf16 copies are per step,
    # not per sequence, and cancel out
    torch.manual_seed(0)
    model = GPT(SMALL)
    per_sequence = (saved_bytes(model, 3, dtype) - saved_bytes(model, 1, dtype)) / 2
    assert per_sequence == pytest.approx(microbatch.saved_bytes_per_token(SMALL, dtype) * SMALL.block_size,
                                         rel=1e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peak_per_sequence_is_the_allocators(dtype):
    # the saved activations and the two fp32 (T, V) gradients at the start of backward: the peak that one
    # sequence more raises, as the CPU allocator counts it
    torch.manual_seed(0)
    model = GPT(SMALL)
    per_sequence = (peak_bytes(model, 3, dtype) - peak_bytes(model, 1, dtype)) / 2
    assert per_sequence == pytest.approx(microbatch.bytes_per_sequence(SMALL, SMALL.block_size, dtype),
                                         rel=1e-3)


@pytest.mark.parametrize("card_gib, expected", [(24, 16), (40, 32), (80, 64)])
def test_micro_batch_for_gpt2_124m_on_24_40_80_gb(monkeypatch, card_gib, expected):
    # a card with half a GiB taken by the CUDA context; GPT-2 124M, T = 1024, bf16, one process: 512 sequences
    # per optimizer step, at most the preset's 64 at a time
    free = (card_gib - 0.5) * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), card_gib * GiB))
    dist = Dist(False, 0, 0, 1, "cuda", "cuda")
    B, why = microbatch.choose_micro_batch(GPT2_124M, 1024, "bf16", dist, share=512, cap=64)
    assert B == expected
    per_sequence, fixed = microbatch.bytes_per_sequence(GPT2_124M, 1024, "bf16"), microbatch.fixed_bytes(
        GPT2_124M, "bf16")
    assert fixed + B * per_sequence <= microbatch.HEADROOM * free  # it fits ...
    assert B == 64 or fixed + 2 * B * per_sequence > microbatch.HEADROOM * free  # ... and twice it does not
    assert f"{free / GiB:.1f} GiB free" in why and f"{per_sequence / GiB:.2f} GiB per sequence" in why


def test_micro_batch_divides_the_share_and_a_cpu_keeps_the_preset():
    # 48 sequences per process: on 80 GB all 48 fit; on 24 GB the largest power of two that divides 48
    assert microbatch.fit_micro_batch(79.5 * GiB, GPT2_124M, 1024, "bf16", share=48, cap=48)[0] == 48
    assert microbatch.fit_micro_batch(23.5 * GiB, GPT2_124M, 1024, "bf16", share=48, cap=48)[0] == 16
    assert microbatch.fit_micro_batch(1 * GiB, GPT2_124M, 1024, "bf16", share=48, cap=48)[0] == 1
    cpu = Dist(False, 0, 0, 1, "cpu", "cpu")
    assert microbatch.choose_micro_batch(GPT2_124M, 1024, "fp32", cpu, share=512, cap=64) == (64, None)


def test_out_of_memory_message_names_the_smaller_micro_batch():
    message = microbatch.out_of_memory_message(64, 1024, 524288, 1, "cuda:0")
    assert "-B 64 sequences of -T 1024" in message and "pass -B 32" in message
    assert "--total-batch 524,288 tokens" in message and "from 8 to 16 micro-steps" in message
    # 27 sequences per process at -B 9: 4 does not divide 27, the next smaller that does
    assert "pass -B 3" in microbatch.out_of_memory_message(9, 1024, 27 * 1024, 1, "cuda:0")
    assert "even one sequence does not fit" in microbatch.out_of_memory_message(1, 1024, 524288, 1, "cuda:0")
