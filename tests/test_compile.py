"""
The training forward and loss under torch.compile: one graph and no graph break for every bridge (the loss
needs no mask whose size depends on the data), no second trace when the caption length changes, and the same
loss and gradients as the masked loss the head used to compute. backend="aot_eager" traces forward and
backward as the default inductor backend would, without generating kernels: a few seconds on a CPU.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.nn import functional as F

import train_caption
from bridges import BRIDGES, build_captioner, caption_batch
from gpt2 import GPT, GPTConfig, PRESETS
from tests.test_train_caption import args, world  # noqa: F401 (world: a fixture, the tiny shapes world)

EOT = 0  # the tiny LM's <|endoftext|> id
SMALL = dict(xattn_heads=2, queries=4, qformer_layers=2, qformer_width=32, qformer_heads=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own traces and graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_captioner(kind):
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=2, n_head=2, n_embd=32))
    captioner, _ = build_captioner(lm, EOT, kind, 16, 5, **SMALL)
    with torch.no_grad():  # open the cross-attention gates: closed, the image would not reach the loss
        for name, p in captioner.bridge.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
    return captioner.train()


def masked_loss(captioner, visual, tokens, targets):
    """The loss the plain way: logits everywhere, the scored positions picked with a boolean mask."""
    prefix, cross = captioner.condition(visual)
    L, B = prefix.size(1), tokens.size(0)
    # position j predicts token j + 1: the caption's targets start at the last prefix position
    full = torch.cat([targets.new_full((B, L - 1), -100), targets, targets.new_full((B, 1), -100)], dim=1)
    logits, _ = captioner.lm(tokens, prefix=prefix, cross=cross)  # (B, L + T, V)
    scored = full.reshape(-1) != -100
    return F.cross_entropy(logits.reshape(-1, logits.size(-1))[scored], full.reshape(-1)[scored])


@pytest.mark.parametrize("kind", list(BRIDGES))
def test_compiled_captioner_is_one_graph_for_every_caption_length(kind):
    captioner = tiny_captioner(kind)
    trained = [p for p in captioner.parameters() if p.requires_grad]
    compiles = CompileCounterWithBackend("aot_eager")
    model = torch.compile(captioner, backend=compiles)
    g = torch.Generator().manual_seed(0)
    for longest in (3, 6, 9):  # each batch is as long as its longest caption (+ <|endoftext|>)
        captions = [torch.randint(1, 32, (n,), generator=g).tolist() for n in (longest, longest - 2, 1)]
        tokens, targets = caption_batch(captions, EOT)  # (3, longest + 1)
        for t in (tokens, targets):  # as train_caption.py does under --compile
            torch._dynamo.maybe_mark_dynamic(t, 1)
        visual = torch.randn(3, 5, 16, generator=g)
        _, loss = model(visual, tokens, targets)
        expected = masked_loss(captioner, visual, tokens, targets)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(captioner(visual, tokens, targets)[1], expected)  # eager, too
        for ours, theirs in zip(torch.autograd.grad(loss, trained), torch.autograd.grad(expected, trained)):
            torch.testing.assert_close(ours, theirs)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # one trace for all three lengths: the caption length was marked dynamic before the first
    assert compiles.frame_count == 1


def test_compiled_pretraining_loss_has_no_mask_and_no_graph_break():
    torch.manual_seed(0)
    lm = GPT(GPTConfig(**PRESETS["tiny"])).train()
    compiles = CompileCounterWithBackend("aot_eager")
    model = torch.compile(lm, backend=compiles)
    x, y = torch.randint(0, 128, (2, 2, 16)).unbind(0)  # (B, T) inputs and next-token targets
    _, loss = model(x, y)
    logits, _ = lm(x)  # (B, T, V): every position is scored in pretraining
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1)))
    assert sum(counters["graph_break"].values()) == 0 and compiles.frame_count == 1


def test_train_caption_compiles_its_step_once(world, tmp_path, monkeypatch):  # noqa: F811
    """train_caption.py --compile, its own loop: one graph for micro-batches of several caption lengths."""
    compiles = CompileCounterWithBackend("aot_eager")  # in place of inductor's minutes of C++ compiling
    compile, mark = torch.compile, torch._dynamo.maybe_mark_dynamic
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile(model, backend=compiles))
    lengths = set()  # the T of every micro-batch, seen where train_caption.py marks it dynamic

    def spy(t, dim):
        lengths.add(t.size(dim))
        mark(t, dim)
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", spy)
    train_caption.main(args(world, tmp_path, "qformer", "--max-steps", "2", "-B", "2", "--total-batch", "4",
                            "--compile"))
    assert len(lengths) > 1  # a real test: the batches' lengths differed
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compiles.frame_count == 1
