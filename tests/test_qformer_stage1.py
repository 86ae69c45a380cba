"""
BLIP-2's first stage (qformer_stage1.py): the contrastive similarity over queries, the hard negatives, that
both losses fall on a tiny world, an exact resume, and the second stage starting from the first
(train_caption.py --qformer-init). Its bad input: tests/test_bad_inputs_stage1.py.
"""
import json

import pytest
import torch

import qformer_stage1
import train_caption
from bridges import BridgeConfig, QFormerBridge
from miniature.clip_model import CLIPTrainConfig, contrastive_loss, similarity
from tests.test_questions import world  # noqa: F401 (fixture)

SIZES = ["--qformer-width", "32", "--qformer-heads", "2", "--queries", "4", "--vis-pos-grid"]


def stage1_args(tiny, out_dir, *extra):
    return ["--coco-root", tiny["root"], "--features", tiny["train"], "--val-features", tiny["val"],
            "--out-dir", str(out_dir), "-B", "16", "--warmup-steps", "2", "--lr", "3e-3",
            "--text-width", "32", "--text-heads", "2", "--embed-dim", "32", "--device", "cpu", "--seed", "0",
            *SIZES,
            *map(str, extra)]


def losses(out_dir):
    log = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return [(r["itc"], r["itm"]) for r in log if "itc" in r]


@pytest.fixture
def stage1(questions_stage1):
    """train_stage1's run folder, trained once for every module that imports this (tests/conftest.py)."""
    return questions_stage1


def train_stage1(world, out):  # noqa: F811
    """A first stage trained for 80 steps (40 epochs) on the tiny world's 40 images, into the folder out."""
    qformer_stage1.main(stage1_args(world, out, "--max-steps", "80", "--val-every", "0", "--ckpt-every", "0"))
    return out


def test_an_image_is_as_close_to_a_caption_as_its_closest_query():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)  # (B, Q, D)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)  # (B, D)
    by_hand = torch.tensor([[max(float(q @ t) for q in queries[i]) for t in text] for i in range(3)])
    assert torch.allclose(similarity(queries, text), by_hand, atol=1e-6)
    scale = torch.tensor(2.0)
    # one query per image is CLIP's loss exactly
    one = contrastive_loss(queries[:, 0], text, scale)
    assert torch.equal(contrastive_loss(queries[:, :1], text, scale), one)


def test_hard_negatives_are_never_the_pair_itself_nor_the_same_words():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    sim.fill_diagonal_(10.0)  # the true pairs are the closest: a negative must still be another row
    tokens = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [7, 8], [9, 9]])  # rows 0 and 2: the same words
    for _ in range(50):
        text, image = qformer_stage1.hard_negatives(sim, tokens)
        for i in range(6):
            assert text[i] != i and image[i] != i
            assert not torch.equal(tokens[text[i]], tokens[i])
            assert not torch.equal(tokens[image[i]], tokens[i])
    # the closest wrong caption is drawn most
    sim = torch.zeros(4, 4)
    sim[0, 3] = 0.5
    picks = torch.stack([qformer_stage1.hard_negatives(sim, torch.arange(4)[:, None])[0] for _ in range(200)])
    assert (picks[:, 0] == 3).float().mean() > 0.8
    # a batch of one caption repeated has no true negative: another row, not the pair itself, not a crash
    text, image = qformer_stage1.hard_negatives(torch.randn(3, 3), torch.ones(3, 2, dtype=torch.long))
    assert all(text[i] != i and image[i] != i for i in range(3))


def test_the_contrastive_loss_falls_on_a_tiny_world(stage1):
    history = losses(stage1)
    first, last = [torch.tensor(history[s]).mean(dim=0) for s in (slice(0, 10), slice(-10, None))]
    assert last[0] < 0.7 * first[0], (first, last)  # ITC
    ckpt = torch.load(stage1 / "ckpt_final.pt", weights_only=True)
    assert set(ckpt["quality"]) == {"image_to_text_R@1", "text_to_image_R@1"}


def test_the_queries_learn_to_match_and_to_retrieve():
    """Eight kinds of image, each named by one word: both losses must fall well below what guessing gives
    (ITM's prior: one true pair for two negatives, -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.64), and held-out images
    must find their word."""
    torch.manual_seed(0)
    config = BridgeConfig(kind="qformer", vis_dim=16, vis_tokens=5, vis_grid=(2, 2), n_embd=32, queries=4,
                          qformer_width=32, qformer_heads=2)
    text = CLIPTrainConfig(text_width=32, text_heads=2, vocab_size=10, embed_dim=32, text_tokens=4)
    model = qformer_stage1.Stage1(config, text)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    kinds = torch.randn(8, 5, 16)  # (kind, S, C_vis)

    def batch(n):
        kind = torch.randint(0, 8, (n,))
        words = torch.stack([kind, torch.full_like(kind, 9)], dim=1)  # the kind's word, <|endoftext|> (9)
        return kinds[kind] + 0.3 * torch.randn(n, 5, 16), words, torch.ones(n, dtype=torch.long)

    history = []
    for _ in range(300):
        itc, itm = model(*batch(32))
        optimizer.zero_grad()
        (itc + itm).backward()
        optimizer.step()
        history.append((itc.item(), itm.item()))
    itc, itm = torch.tensor(history[-50:]).mean(dim=0)
    assert itc < 0.8 * torch.log(torch.tensor(32.0)) and itm < 0.45, (itc, itm)
    with torch.no_grad():
        visual = kinds + 0.3 * torch.randn(8, 5, 16)  # a new picture of each kind
        words = torch.stack([torch.arange(8), torch.full((8,), 9)], dim=1)
        queries, captions, _ = model.embed(visual, words, torch.ones(8, dtype=torch.long))
    assert (similarity(queries, captions).argmax(dim=1) == torch.arange(8)).float().mean() >= 0.75


def test_a_resumed_first_stage_ends_where_an_uninterrupted_one_does(world, tmp_path):  # noqa: F811
    args = ["--max-steps", "12", "--val-every", "0", "--ckpt-every", "0"]
    qformer_stage1.main(stage1_args(world, tmp_path / "whole", *args))
    qformer_stage1.main(stage1_args(world, tmp_path / "parts", *args, "--stop-step", "5"))
    qformer_stage1.main(stage1_args(world, tmp_path / "parts", *args, "--resume", "auto"))
    whole, parts = (torch.load(tmp_path / run / "ckpt_final.pt", weights_only=True)["model"]
                    for run in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_the_second_stage_starts_from_the_first(world, stage1, tmp_path):  # noqa: F811
    ckpt = torch.load(stage1 / "ckpt_final.pt", weights_only=True)
    config = BridgeConfig(**{**ckpt["bridge_config"], "n_embd": 48, "prefix_len": 4})  # another LM's width
    bridge = QFormerBridge(config)
    read_out = bridge.proj.weight.clone()
    qformer_stage1.start_from(bridge, config, str(stage1 / "ckpt_final.pt"),
                              train_caption.feature_cache.FeatureCache(world["train"]).spec, False)
    state = bridge.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["qformer"].items())  # the body: the first stage's
    assert torch.equal(bridge.proj.weight, read_out)  # the read-out into the LM: fresh
    # through train_caption.py: the run's first checkpoint holds the first stage's body, one step on
    out = tmp_path / "caption"
    train_caption.main(["--bridge", "qformer", "--lm", world["lm"], "--coco-root", world["root"],
                        "--features", world["train"], "--out-dir", str(out), "-B", "8", "--total-batch", "8",
                        "--max-steps", "1", "--lr", "1e-9", "--warmup-steps", "0", "--device", "cpu",
                        "--qformer-init", str(stage1 / "ckpt_final.pt"), *SIZES])
    trained = torch.load(out / "ckpt_final.pt", weights_only=True)["trainable"]["bridge"]
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in ckpt["qformer"].items())


def test_query_std_sets_the_first_stages_starting_queries(world, stage1, tmp_path):  # noqa: F811
    """--query-std as train_caption.py's: the demo's Q-Former starts its queries at unit scale, and a first
    stage for it must too (its queries are what the second stage keeps)."""
    out = tmp_path / "unit"
    qformer_stage1.main(stage1_args(world, out, "--max-steps", "1", "--lr", "1e-9", "--warmup-steps", "0",
                                    "--val-every", "0", "--ckpt-every", "0", "--query-std", "1.0"))
    unit = torch.load(out / "ckpt_final.pt", weights_only=True)
    plain = torch.load(stage1 / "ckpt_final.pt", weights_only=True)
    assert unit["bridge_config"]["query_std"] == 1.0 and plain["bridge_config"]["query_std"] == 0.02
    assert 0.8 < float(unit["qformer"]["queries"].std()) < 1.2  # 4 queries x 32 wide
