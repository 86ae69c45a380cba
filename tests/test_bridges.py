import copy

import pytest
import torch
from torch.nn import functional as F

from bridges import (BRIDGES, BridgeConfig, Captioner, caption_batch, build_captioner, captioner_from_config,
                     count_params)
from gpt2 import GPT, GPTConfig
import train_caption

KINDS = list(BRIDGES)  # every registered bridge
# and each way of using one: the prefix bridges per token / per query (their defaults) or read out whole
VARIANTS = [pytest.param(k, {}, id=k) for k in KINDS] + [
    pytest.param("linear", dict(prefix_len=6), id="linear-whole"),
    pytest.param("qformer", dict(prefix_len=6), id="qformer-whole")]
EOT = 0  # the tiny LM's <|endoftext|> id
SMALL = dict(xattn_heads=2, queries=4, qformer_layers=2, qformer_width=32, qformer_heads=2)


def tiny_lm(seed=0, vocab=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))


def make(kind, seed=0, vis_dim=16, vis_tokens=5, unfreeze_last=0, lm=None, **kw):
    lm = lm or tiny_lm(seed)
    torch.manual_seed(seed + 1)
    captioner, config = build_captioner(lm, EOT, kind, vis_dim, vis_tokens, unfreeze_last, **{**SMALL, **kw})
    return captioner


@pytest.fixture(scope="module")
def copying_lm():
    """
    A tiny LM pretrained to repeat its input: <|endoftext|> a_1..a_6 a_1..a_6 <|endoftext|>.
    A frozen LM fresh from GPT-2's init cannot be steered far by any prefix (its tied output layer only
    reaches logits of about +-0.6); a prefix bridge works by leaning on what the LM learned to do with its
    context, and copying is the simplest such skill (a 2-layer induction circuit, ~3 s on a CPU).
    """
    lm = tiny_lm()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        a = torch.randint(1, 32, (64, 6), generator=g)
        eot = torch.full((64, 1), EOT)
        x = torch.cat([eot, a, a, eot], dim=1)  # (64, 14)
        targets = x[:, 1:].clone()
        targets[:, :6] = -100  # the first copy is unpredictable; learn to repeat it, then stop
        _, loss = lm(x[:, :-1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    return lm.state_dict()


def open_gates(captioner, value=0.5):
    """Closed gates make cross-attention a no-op; tests of its mechanics need them open."""
    with torch.no_grad():
        for name, p in captioner.bridge.named_parameters():
            if name.endswith("gate"):
                p.fill_(value)


def test_caption_batch_pads_tokens_with_eot_and_targets_with_ignore():
    tokens, targets = caption_batch([[5, 6], [7]], eot=9)
    assert tokens.tolist() == [[5, 6, 9], [7, 9, 9]]
    assert targets.tolist() == [[5, 6, 9], [7, 9, -100]]


@pytest.mark.parametrize("kind", KINDS)
def test_layout_positions_and_masks_on_a_hand_made_example(kind):
    captioner = make(kind, vis_tokens=2)
    seen = {}
    forward = captioner.lm.forward

    def spy(idx, targets=None, prefix=None, cross=None, cache=None, last_only=False, targets_from=0):
        seen.update(idx=idx, targets=targets, prefix=prefix, targets_from=targets_from)
        return forward(idx, targets=targets, prefix=prefix, cross=cross, cache=cache, last_only=last_only,
                       targets_from=targets_from)

    captioner.lm.forward = spy
    visual = torch.randn(2, 2, 16)
    tokens, targets = caption_batch([[5, 6], [7]], EOT)
    logits, _ = captioner(visual, tokens)
    _, loss = captioner(visual, tokens, targets)

    bridge_prefix, _ = captioner.bridge(visual)
    P = 0 if bridge_prefix is None else bridge_prefix.size(1)  # prefix tokens after the <|endoftext|> start
    assert P == {"linear": 2, "xattn": 0, "qformer": 4}.get(kind, P)
    prefix = seen["prefix"]
    assert prefix.shape == (2, 1 + P, 32)
    # the sequence starts with the LM's own <|endoftext|> embedding, then the image
    assert torch.equal(prefix[:, 0], captioner.lm.transformer.wte.weight[EOT].expand(2, -1))
    # the last prefix position (1 + P - 1) predicts the first caption token; nothing before it carries loss,
    # and the LM is told so without a mask: the targets start there
    assert seen["targets_from"] == P
    assert seen["targets"].tolist() == [[5, 6, EOT], [7, EOT, -100]]
    # returned logits are aligned with the caption tokens: row t predicts tokens[:, t]
    assert logits.shape == (2, 3, 32)
    expected = F.cross_entropy(logits.reshape(-1, 32), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cross_attention_with_closed_gates_is_exactly_the_lm():
    captioner = make("xattn")
    tokens = torch.randint(1, 32, (3, 7))
    logits, _ = captioner(torch.randn(3, 5, 16), tokens)
    # the plain LM reading <|endoftext|> + the same tokens
    plain, _ = captioner.lm(torch.cat([torch.full((3, 1), EOT), tokens], dim=1))
    assert torch.allclose(logits, plain[:, :-1], atol=1e-6, rtol=0)
    open_gates(captioner)
    opened, _ = captioner(torch.randn(3, 5, 16), tokens)
    assert not torch.allclose(opened, plain[:, :-1], atol=1e-3)  # and the image does matter once they open


@pytest.mark.parametrize("kind, variant", VARIANTS)
def test_each_bridge_overfits_a_tiny_batch_with_the_lm_frozen(kind, variant, copying_lm):
    lm = tiny_lm()
    lm.load_state_dict(copying_lm)
    captioner = make(kind, lm=lm, vis_dim=64, vis_tokens=6, queries=6, **variant)
    params = [p for p in captioner.parameters() if p.requires_grad]
    # the Q-Former (a deeper path, queries that start alike) needs a gentler step; at 3e-3 it stalls near
    # loss 0.4
    optimizer = torch.optim.AdamW(params, lr=1e-3 if kind == "qformer" else 3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    visual = torch.randn(4, 6, 64)  # four "images"
    captions = [torch.randint(1, 32, (6,)).tolist() for _ in range(4)]
    tokens, targets = caption_batch(captions, EOT)
    losses = []
    for _ in range(400 if kind == "qformer" else 300):
        _, loss = captioner(visual, tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    # frozen means frozen: bit-identical LM weights, and no optimizer state was allocated for them
    for k, v in captioner.lm.state_dict().items():
        assert torch.equal(v, copying_lm[k]), k
    assert {id(p) for p in params} == {id(p) for p in captioner.bridge.parameters()}
    assert {id(p) for p in optimizer.state} <= {id(p) for p in captioner.bridge.parameters()}
    # and having learned, greedy decoding says the caption of each image
    assert captioner.generate(visual, max_new_tokens=10) == captions


def test_unfreeze_last_trains_only_the_last_blocks():
    captioner = make("linear", unfreeze_last=1)
    before = copy.deepcopy(captioner.lm.state_dict())
    params = [p for p in captioner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tokens, targets = caption_batch([[3, 4, 5]], EOT)
    _, loss = captioner(torch.randn(1, 5, 16), tokens, targets)
    loss.backward()
    optimizer.step()
    after = captioner.lm.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("transformer.h.1.") for k in changed)
    assert set(captioner.trainable_state()["lm_blocks"]) == {"1"}


@pytest.mark.parametrize("kind, variant", VARIANTS)
def test_cached_generation_equals_uncached(kind, variant):
    captioner = make(kind, seed=3, **variant)
    open_gates(captioner)
    visual = torch.randn(3, 5, 16)
    cached = captioner.generate(visual, max_new_tokens=12)
    # uncached: re-run the whole sequence for every new token, no KV cache
    prefix, cross = captioner.condition(visual)
    seq = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = captioner.lm(seq, prefix=prefix, cross=cross)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    uncached = [row[:row.index(EOT)] if EOT in row else row for row in seq.tolist()]
    assert cached == uncached
    assert any(len(c) > 2 for c in cached)  # a real comparison, not of empty captions


def test_whole_image_linear_prefix_reads_every_token_into_every_slot():
    captioner = make("linear", vis_tokens=5, prefix_len=3)
    visual = torch.randn(2, 5, 16, requires_grad=True)
    prefix, cross = captioner.bridge(visual)
    assert prefix.shape == (2, 3, 32) and cross is None  # (B, k, n_embd), k = --prefix-len, whatever S is
    for slot in range(3):  # each slot is a read-out of the whole image: every token of its own image moves it
        grad, = torch.autograd.grad(prefix[0, slot].sum(), visual, retain_graph=True)
        assert (grad[0].abs().sum(-1) > 0).all() and (grad[1] == 0).all()
    # still one Linear layer (and a per-token LayerNorm): S * C_vis inputs, k * n_embd outputs
    assert count_params(captioner.bridge)[0] == 5 * 16 * 3 * 32 + 3 * 32 + 2 * 16


def test_whole_qformer_read_out_maps_all_query_outputs_to_every_slot():
    per_query, whole = make("qformer").bridge, make("qformer", prefix_len=3).bridge
    visual = torch.randn(2, 5, 16)
    assert per_query(visual)[0].shape == (2, 4, 32)  # (B, Q, n_embd): one slot per query
    assert whole(visual)[0].shape == (2, 3, 32)  # (B, k, n_embd): k = --prefix-len, whatever Q is
    for bridge, reads in ((per_query, lambda slot, q: q == slot), (whole, lambda slot, q: True)):
        outputs = []
        bridge.ln_f.register_forward_hook(lambda m, i, o: outputs.append(o))  # the queries' outputs (B, Q, W)
        prefix = bridge(visual)[0]
        for slot in range(prefix.size(1)):
            grad, = torch.autograd.grad(prefix[0, slot].sum(), outputs[-1], retain_graph=True)
            assert (grad[0].abs().sum(-1) > 0).tolist() == [reads(slot, q) for q in range(4)]
            assert (grad[1] == 0).all()  # and only its own image's
    # one Linear from all Q * W outputs to k * n_embd, in place of the shared W -> n_embd one
    assert count_params(whole)[0] - count_params(per_query)[0] == (4 * 32 * 3 * 32 + 3 * 32) - (32 * 32 + 32)


def test_qformer_attention_maps_are_distributions_over_the_image():
    captioner = make("qformer")
    maps = captioner.bridge.attention_maps(torch.randn(2, 5, 16))
    assert maps.shape == (2, 2, 4, 5)  # (B, heads, queries, visual tokens)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 4), atol=1e-6)


def test_query_std_sets_the_queries_starting_scale_and_is_a_flag():
    for std in (0.02, 1.0):
        queries = make("qformer", queries=64, qformer_width=32, query_std=std).bridge.queries  # 2,048 values
        assert abs(queries.std().item() / std - 1) < 0.1
    assert train_caption.get_args(["--bridge", "qformer", "--query-std", "0.5"]).query_std == 0.5


def test_zero_init_starts_the_whole_image_map_at_zero_whatever_the_seed_and_is_a_flag():
    maps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        maps.append(make("linear", prefix_len=2, zero_init=True).bridge.proj)
    assert all(p.abs().sum() == 0 for m in maps for p in (m.weight, m.bias))
    torch.manual_seed(0)
    assert make("linear", prefix_len=2).bridge.proj.weight.abs().sum() > 0  # the default: PyTorch's init
    assert train_caption.get_args(["--bridge", "linear", "--zero-init"]).zero_init


def test_parameter_counts_per_part():
    captioner = make("qformer")
    counts = captioner.param_counts()
    assert counts["lm"]["trainable"] == 0 and counts["lm"]["total"] == captioner.lm.num_params()
    assert counts["bridge"]["trainable"] == counts["bridge"]["total"] == count_params(captioner.bridge)[0] > 0


def test_mismatches_are_refused_clearly():
    captioner = make("xattn", vis_tokens=5)
    with pytest.raises(ValueError, match="built for 5 visual tokens, got 9"):
        captioner(torch.randn(1, 9, 16), torch.tensor([[1, 2]]))
    whole = make("linear", vis_tokens=5, prefix_len=3)
    with pytest.raises(ValueError, match="built for 5 visual tokens, got 9"):
        whole(torch.randn(1, 9, 16), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="unknown bridge"):
        build_captioner(tiny_lm(), EOT, "perceiver", 16, 5)
    config = BridgeConfig(kind="linear", vis_dim=16, vis_tokens=5, n_embd=64, n_layer=2)
    with pytest.raises(ValueError, match="width 64"):
        captioner_from_config(tiny_lm(), EOT, vars(config))
    rebuilt, _ = captioner_from_config(tiny_lm(), EOT, vars(BridgeConfig(kind="linear", vis_dim=16, n_embd=32,
                                                                         n_layer=2)))
    assert isinstance(rebuilt, Captioner)


def test_grid_position_start_is_a_2d_sincos_of_the_pooled_grid():
    from bridges import grid_sincos
    # (33, 32): class token + 4 x 8 patches, row-major as encode_pixels pools
    code = grid_sincos(4, 8, 32, 33)
    assert code[0].abs().sum() == 0  # the class token has no place in the grid
    patches = code[1:].view(4, 8, 32)
    rows, cols = patches[..., :16], patches[..., 16:]  # the first half codes the row, the second the column
    assert torch.equal(rows[:, :1].expand(-1, 8, -1), rows) and torch.equal(cols[:1].expand(4, -1, -1), cols)
    assert len({tuple(p.tolist()) for p in code[1:]}) == 32  # every patch its own code
    with pytest.raises(ValueError, match="not a class token \\+ a 4x8 grid"):
        grid_sincos(4, 8, 32, 65)
    # --vis-pos-grid: every bridge's visual position embedding starts there, and still learns
    for kind in KINDS:
        pos = make(kind, vis_tokens=5, vis_grid=(2, 2), vis_pos_grid=True).bridge
        pos = next(p for name, p in pos.named_parameters() if name.endswith("pos"))
        assert pos.requires_grad and torch.equal(pos.detach(), grid_sincos(2, 2, pos.size(1), 5)), kind
        fresh = make(kind, vis_tokens=5).bridge.state_dict()
        # the default: zeros
        assert all(v.abs().sum() == 0 for n, v in fresh.items() if n.endswith("pos")), kind
