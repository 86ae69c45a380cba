"""
Decoding (greedy, beam, sampling), the comparison of bridge checkpoints and captioning a folder of images.
The metrics part of evaluate.py is tested in test_metrics.py. Everything here is made by the tests themselves:
a tiny LM, fake bridge checkpoints in train_caption.py's format, a few images of the miniature world.
"""
import itertools
import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

import clip_loader
import decoding
import evaluate
import metrics
from bridges import BRIDGES, Captioner, build_captioner, lm_fingerprint, load_captioner
from data import coco, feature_cache, shapes
from gpt2 import GPT, GPTConfig, SubsetTokenizer, get_tokenizer

KINDS = list(BRIDGES)  # every registered bridge
EOT = 0
SMALL = dict(xattn_heads=2, queries=4, qformer_layers=2, qformer_width=32, qformer_heads=2)
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap's PTB tokenizer needs Java")


def tiny_captioner(kind, seed=0, vocab=8):
    """A random tiny captioner. With a vocabulary of 8, <|endoftext|> (id 0) is the argmax now and then, so
    captions end at different lengths."""
    torch.manual_seed(seed)
    lm = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    captioner, _ = build_captioner(lm, EOT, kind, 16, 5, **SMALL)
    with torch.no_grad():
        # GPT-2's init (std 0.02) makes a random LM nearly blind to its input; std 0.1 makes the captions
        # depend on the image and sometimes end early
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
        # open the cross-attention gates, or that bridge is a no-op
        for name, p in captioner.bridge.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
    return captioner.eval()

# -----------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("kind", KINDS)
def test_beam_1_is_greedy(kind):
    captioner = tiny_captioner(kind, seed=0)
    visual = torch.randn(8, 5, 16)
    greedy = captioner.generate(visual, max_new_tokens=12)
    for length_penalty in (0.0, 1.0):
        assert decoding.beam_search(captioner, visual, beam=1, max_new_tokens=12,
                                    length_penalty=length_penalty) == greedy
    # captions of different lengths: the <|endoftext|> stop was exercised
    assert len({len(c) for c in greedy}) > 1
    assert len({tuple(c) for c in greedy}) > 1  # and they depend on the image


@pytest.mark.parametrize("kind", KINDS)
def test_batched_decoding_equals_one_by_one(kind):
    captioner = tiny_captioner(kind, seed=0)
    visual = torch.randn(5, 5, 16)
    for beam in (1, 3):
        batched = decoding.beam_search(captioner, visual, beam=beam, max_new_tokens=10)
        single = [decoding.beam_search(captioner, visual[i:i + 1], beam=beam, max_new_tokens=10)[0]
                  for i in range(5)]
        assert batched == single
    # sampling: the same seed gives the same captions, a deterministic run
    tok = SubsetTokenizer(range(7))
    batches = [(list(range(5)), visual)]
    a = evaluate.decode(captioner, tok, batches, method="sample", top_p=0.9, seed=3, max_new_tokens=10)[0]
    b = evaluate.decode(captioner, tok, batches, method="sample", top_p=0.9, seed=3, max_new_tokens=10)[0]
    assert a == b and len(a) == 5


@torch.no_grad()
def plain_beam_search(captioner, visual, beam, max_new_tokens, length_penalty):
    """The same search written the plain way, as a reference: one image, a Python list of hypotheses, and the
    whole sequence re-run through the LM (no KV cache) for each one at each step."""
    prefix, cross = captioner.condition(visual)  # (1, L, C)
    alive, finished = [(0.0, [])], []
    for t in range(max_new_tokens):
        candidates = []
        for score, seq in alive:
            logits, _ = captioner.lm(torch.tensor([seq], dtype=torch.long), prefix=prefix, cross=cross)
            logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1).tolist()
            candidates += [(score + lp, seq, v) for v, lp in enumerate(logprobs)]
        top = sorted(candidates, key=lambda c: -c[0])[:2 * beam]
        finished += [(s / (t + 1) ** length_penalty, seq) for rank, (s, seq, v) in enumerate(top)
                     if v == captioner.eot and rank < beam]
        finished = sorted(finished, key=lambda h: -h[0])[:beam]
        alive = [(s, seq + [v]) for s, seq, v in top if v != captioner.eot][:beam]
        if len(finished) == beam and alive[0][0] / (t + 1) ** length_penalty <= finished[-1][0]:
            return finished[0][1]
    finished += [(s / max_new_tokens ** length_penalty, seq) for s, seq in alive]
    return max(finished, key=lambda h: h[0])[1]


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_equals_a_plain_implementation(kind):
    captioner = tiny_captioner(kind, seed=0)
    visual = torch.randn(5, 5, 16)
    for length_penalty in (0.0, 1.0):
        ours = decoding.beam_search(captioner, visual, beam=3, max_new_tokens=10,
                                    length_penalty=length_penalty)
        plain = [plain_beam_search(captioner, visual[i:i + 1], 3, 10, length_penalty) for i in range(5)]
        assert ours == plain
    assert ours != captioner.generate(visual, max_new_tokens=10)  # the beams changed something: a real test


class ToyCache:
    """Stands in for gpt2.KVCache: it keeps each row's history, so a wrong reorder shows in the result."""

    def __init__(self, batch_size):
        self.history = torch.zeros(batch_size, 0, dtype=torch.long)
        self.world = None
        self.pos = 0

    def reorder(self, index):
        self.history, self.world = self.history[index], self.world[index]


class ToyLM(nn.Module):
    """
    A 'language model' whose next-token probabilities are a table over the caption so far, in two worlds
    (which one is read from the image, so a batch mixes them). Tokens: 0 <|endoftext|>, 1 A, 2 B, 3 C.
      world 0:  first A 0.6, B 0.4; after A: EOT 0.30, A 0.36, B 0.34; after B: EOT 0.99; later: EOT 0.9
                greedy says "A A" (0.6 * 0.36 * 0.9 = 0.194); the best caption is "B" (0.4 * 0.99 = 0.396)
      world 1:  first C 0.7, A 0.3; after C: EOT 0.9; later: EOT 0.95: greedy and best agree on "C"
    """
    V = 4

    def table(self, world, history):
        p = torch.full((self.V,), 1e-3)
        h = tuple(history)
        if world == 0:
            spec = {(): {1: 0.6, 2: 0.4}, (1,): {0: 0.30, 1: 0.36, 2: 0.34}, (2,): {0: 0.99}}.get(h, {0: 0.9})
        else:
            spec = {(): {3: 0.7, 1: 0.3}, (3,): {0: 0.9}}.get(h, {0: 0.95})
        for token, prob in spec.items():
            p[token] = prob
        return (p / p.sum()).log()

    def forward(self, idx, prefix=None, cross=None, cache=None, last_only=False):
        if prefix is not None:  # prefill: the image says which world
            cache.world = prefix[:, 0, 0].round().long()
        cache.history = torch.cat([cache.history, idx], dim=1)
        logits = torch.stack([self.table(int(w), h.tolist()) for w, h in zip(cache.world, cache.history)])
        return logits[:, None, :], None  # (B, 1, V)

    def new_cache(self, batch_size, max_len):
        return ToyCache(batch_size)


class ToyCaptioner:
    lm, eot, n_vocab = ToyLM(), 0, None

    def condition(self, visual, prompt=None):
        return visual[:, :1, :], None  # (B, 1, C) prefix: the world flag

    def generate(self, visual, max_new_tokens=30, temperature=0.0, **kw):
        captions = []
        for b in range(visual.size(0)):
            cache = self.lm.new_cache(1, 0)
            logits, _ = self.lm(torch.zeros(1, 0, dtype=torch.long), prefix=visual[b:b + 1], cache=cache)
            caption = []
            while len(caption) < max_new_tokens and (token := int(logits[0, -1].argmax())) != self.eot:
                caption.append(token)
                logits, _ = self.lm(torch.tensor([[token]]), cache=cache)
            captions.append(caption)
        return captions


def best_by_enumeration(lm, world, max_len, length_penalty):
    """The answer beam search should find: every caption up to max_len tokens, scored exhaustively."""
    best = None
    for n in range(max_len):
        for caption in itertools.product(range(1, lm.V), repeat=n):
            seq = list(caption) + [0]
            logp = sum(lm.table(world, seq[:i])[seq[i]].item() for i in range(len(seq)))
            score = logp / len(seq) ** length_penalty
            if best is None or score > best[0]:
                best = (score, list(caption))
    return best[1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_known_best_caption_where_greedy_does_not(length_penalty):
    captioner = ToyCaptioner()
    visual = torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 1, 2)  # worlds 0, 1, 0
    assert captioner.generate(visual) == [[1, 1], [3], [1, 1]]  # greedy is fooled in world 0
    assert best_by_enumeration(captioner.lm, 0, 4, length_penalty) == [2]
    assert best_by_enumeration(captioner.lm, 1, 4, length_penalty) == [3]
    assert decoding.beam_search(captioner, visual, beam=2, max_new_tokens=6,
                                length_penalty=length_penalty) == [[2], [3], [2]]
    assert decoding.beam_search(captioner, visual, beam=1, max_new_tokens=6) == captioner.generate(visual)

# -----------------------------------------------------------------------------
# A tiny fake world: miniature images, a feature cache, an LM and bridge checkpoints in the real formats

ENCODER = "random-vit:tiny:seed0"  # 32 px, 17 tokens x 32; pooled 2x2 -> 5 tokens


def features_spec(width=32):
    return clip_loader.VisualFeatures(ENCODER, layer=-1, grid=(2, 2), image_size=32, width=width)


def save_checkpoint(path, captioner, config, lm_path, lm, vocab, features, val_losses, train_seconds):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    counts = captioner.param_counts()
    torch.save(dict(trainer="train_caption.py", step=20, max_steps=20, bridge_config=asdict(config),
                    trainable=captioner.trainable_state(), unfreeze_last=0,
                    visual_stats=dict(mean=captioner.visual_mean, std=captioner.visual_std)
                    if captioner.standardize else None,
                    lm=dict(name=lm_path, config=asdict(lm.config), vocab=vocab,
                            fingerprint=lm_fingerprint(lm)),
                    visual_features=features.as_dict(),
                    params=dict(encoder=dict(total=1000, trainable=0), **counts),
                    train_seconds=train_seconds, val_loss=val_losses[-1], optimizer={}, rng={}, args={}),
               path)
    with open(os.path.join(os.path.dirname(path), "log.jsonl"), "w") as f:
        f.write(json.dumps({"event": "start", "config": {}}) + "\n")
        for k, loss in enumerate(val_losses):
            f.write(json.dumps({"step": 10 * k, "loss": loss + 0.1, "lr": 1e-3, "grad_norm": 1.0,
                                "samples_per_s": 100.0}) + "\n")
            f.write(json.dumps({"step": 10 * k, "val_loss": loss}) + "\n")
        f.write(json.dumps({"event": "end"}) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    root = str(base / "shapes")
    shapes.generate(root, train=2, val=10, corpus_docs=4, seed=0)
    records = coco.load_records(root, "val")
    cache_dir = str(base / "cache_val")
    cache = feature_cache.build_feature_cache(records, ENCODER, cache_dir, batch_size=8, pool_grid=(2, 2),
                                     device="cpu", num_workers=1)
    # the LM: random, over the GPT-2 tokens the miniature's captions use (train_lm.py's checkpoint format)
    gpt2_tok = get_tokenizer()
    vocab = sorted({t for r in records for c in r["captions"] for t in gpt2_tok.encode_ordinary(c)})
    tok = SubsetTokenizer(vocab)
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32))
    lm_path = str(base / "lm.pt")
    torch.save(dict(model=lm.state_dict(), config=asdict(lm.config), vocab=vocab), lm_path)
    stats = dict(mean=torch.from_numpy(cache.mean), std=torch.from_numpy(cache.std))
    checkpoints = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(10 + i)
        captioner, config = build_captioner(lm, tok.eot_token, kind, 32, 5, visual_stats=stats, **SMALL)
        path = str(base / "runs" / kind / "ckpt_final.pt")
        save_checkpoint(path, captioner, config, lm_path, lm, vocab, features_spec(),
                        [3.0 - 0.5 * k - 0.1 * i for k in range(4)], 60.0 * (i + 1))
        checkpoints[kind] = path
    # one checkpoint trained on features of another width: must be refused against this cache
    captioner, config = build_captioner(lm, tok.eot_token, "linear", 64, 5, **SMALL)
    path = str(base / "runs" / "wide" / "ckpt_final.pt")
    save_checkpoint(path, captioner, config, lm_path, lm, vocab, features_spec(width=64), [2.0], 1.0)
    checkpoints["wide"] = path
    return dict(base=base, root=root, cache=cache_dir, checkpoints=checkpoints, records=records)


@needs_java
def test_compare_writes_table_json_captions_and_pictures(world, tmp_path):
    out = str(tmp_path / "results")
    ckpts = [world["checkpoints"][k] for k in KINDS]
    result = evaluate.main(["--checkpoints", *ckpts, "--coco-root", world["root"], "--split", "val",
                            "--features", world["cache"], "--out", out, "--beam", "2",
                            "--max-new-tokens", "8", "--batch-size", "4", "--metrics", "bleu", "cider",
                            "--device", "cpu", "--extra-scores", "data.shapes"])
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["images"] == 10 and saved == json.loads(json.dumps(result))
    rows = {row["bridge"]: row for row in saved["rows"]}
    assert list(rows)[:len(KINDS)] == KINDS
    blind = [row for row in saved["rows"] if row.get("blind")]
    assert len(blind) == 1 and blind[0]["bridge"] == "blind (frozen LM of linear, no image)"
    for kind, row in rows.items():
        assert 0.0 <= row["BLEU-4"] <= 1.0 and \
            row["CIDEr_ci"][0] <= row["CIDEr"] + 1e-9 <= row["CIDEr_ci"][1] + 2e-9
        assert row["captions_per_s"] > 0 and set(row["attributes"]) == set(shapes.SCORE_COLUMNS)
    for i, kind in enumerate(KINDS):
        row = rows[kind]
        assert row["train_seconds"] == 60.0 * (i + 1) and row["val_loss"] == pytest.approx(1.5 - 0.1 * i)
        assert row["trainable_params"] == row["params"]["bridge"]["trainable"] > 0
        assert row["total_params"] == 1000 + row["params"]["bridge"]["total"] + row["params"]["lm"]["total"]
    # the blind baseline gives every image the same caption
    with open(os.path.join(out, "captions_blind.json")) as f:
        assert len({v["caption"] for v in json.load(f).values()}) == 1
    with open(os.path.join(out, "captions_qformer.json")) as f:
        captions = json.load(f)
    assert len(captions) == 10 and all(len(v["references"]) == 5 for v in captions.values())
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n| ") == len(KINDS) + 2  # header + the bridges + blind
    assert "| blind (frozen LM of linear, no image) |" in table
    assert "colour | shape | size | position | layout | relation" in table
    maps = [f"attention_{k}.png" for k in KINDS if hasattr(BRIDGES[k], "attention_maps")]
    assert maps and not os.path.exists(os.path.join(out, "attention_linear.png"))
    for name in ["val_loss.png"] + [f"grid_{k}.png" for k in KINDS] + maps:
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name


def test_every_checkpoint_is_decoded_before_any_scoring(world, tmp_path, monkeypatch):
    # captions/s times decoding alone: no scorer (nor the METEOR JVM it may start) runs while anything decodes
    events, decode, score_row = [], evaluate.decode, evaluate.score_row
    monkeypatch.setattr(evaluate, "decode", lambda *a, **k: events.append("decode") or decode(*a, **k))
    monkeypatch.setattr(evaluate, "score_row", lambda *a, **k: events.append("score") or score_row(*a, **k))
    result = evaluate.main(["--checkpoints", *[world["checkpoints"][k] for k in KINDS],
                            "--coco-root", world["root"], "--split", "val", "--features", world["cache"],
                            "--out", str(tmp_path / "results"), "--max-new-tokens", "6", "--batch-size", "4",
                            "--metrics", "bleu", "cider", "--device", "cpu"])
    assert events.count("decode") == len(KINDS) + 1 and events.count("score") == len(KINDS) + 1  # + blind
    assert events == ["decode"] * (len(KINDS) + 1) + ["score"] * (len(KINDS) + 1)
    # the bridges with queries report how alike their queries' attention maps are (1.0: all read the same
    # tokens)
    for row in result["rows"]:
        if hasattr(BRIDGES.get(row.get("kind")), "attention_maps"):
            assert 0.0 < row["query_similarity"] <= 1.0 + 1e-6
        else:
            assert "query_similarity" not in row


def test_blind_captioner_is_the_lm_alone(world):
    captioner, tokenizer, _ = load_captioner(world["checkpoints"]["xattn"])
    blind = Captioner(captioner.lm, evaluate.NoImage(), tokenizer.eot_token).eval()
    start = torch.full((3, 1), tokenizer.eot_token)  # (3, 1): a new text, nothing else
    with torch.no_grad():
        expected, _ = captioner.lm(start)
        # the prefix's last position: what the blind captioner predicts as the first word
        prefix, cross = blind.condition(torch.zeros(3, 0, 0))
        first, _ = captioner.lm(torch.zeros(3, 0, dtype=torch.long), prefix=prefix, cross=cross)
    assert prefix.shape == (3, 1, captioner.lm.config.n_embd) and cross is None
    torch.testing.assert_close(first[:, -1], expected[:, -1], rtol=0, atol=0)
    greedy = captioner.lm.generate(start[:1], 8, temperature=0.0, eot=None)[0, 1:].tolist()
    assert blind.generate(torch.zeros(2, 0, 0), 8) == [greedy[:greedy.index(tokenizer.eot_token)]
                                                     if tokenizer.eot_token in greedy else greedy] * 2
    assert evaluate.first_sentence(" a red circle. a blue square.") == "a red circle"


@needs_java
def test_compare_on_karpathy_split_with_meteor(world, tmp_path):
    # Karpathy's json over the same images: 6 test, 4 val
    images = [dict(filepath="val2017", filename=os.path.basename(r["path"]), cocoid=r["image_id"],
                   split="test" if i < 6 else "val", sentences=[dict(raw=c) for c in r["captions"]])
              for i, r in enumerate(world["records"])]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(dict(images=images, dataset="coco")))
    out = str(tmp_path / "results")
    result = evaluate.main(["--checkpoints", world["checkpoints"]["linear"], "--coco-root", world["root"],
                            "--karpathy-json", str(karpathy), "--features", world["cache"], "--out", out,
                            "--extra-scores", "data.shapes",
                            "--method", "greedy", "--max-new-tokens", "6", "--device", "cpu"])
    assert result["split"] == "test" and result["images"] == 6 and "Karpathy test" in result["where"]
    linear, blind = result["rows"]
    assert linear["images"] == blind["images"] == 6
    # METEOR: the corpus score and the per-image mean, std and bootstrap interval from one JVM
    assert 0.0 <= linear["METEOR"] <= 1.0 and 0.0 <= linear["METEOR_std"]
    assert linear["METEOR_ci"][0] - 1e-9 <= linear["METEOR_mean"] <= linear["METEOR_ci"][1] + 1e-9
    # the same captions scored directly give the same numbers: only the 6 test images, with their references
    with open(os.path.join(out, "captions_linear.json")) as f:
        saved = json.load(f)
    test_ids = {str(r["image_id"]) for r in world["records"][:6]}
    assert set(saved) == test_ids
    direct = metrics.score_captions({k: v["caption"] for k, v in saved.items()},
                                     {k: v["references"] for k, v in saved.items()})
    assert direct["METEOR"] == pytest.approx(linear["METEOR"]) and \
        direct["CIDEr"] == pytest.approx(linear["CIDEr"])
    # Karpathy's test split has no scene file: the miniature's hook offers no columns
    assert "attributes" not in linear and "colour" not in open(os.path.join(out, "table.md")).read()


@needs_java
def test_a_reused_out_folder_keeps_no_earlier_results(world, tmp_path, capsys):
    # an earlier comparison of other checkpoints left its captions and grid there: they are not this table's
    out = tmp_path / "results"
    out.mkdir()
    for name in ("captions_gone.json", "grid_gone.png", "attention_gone.png", "my_notes.txt",
                 "captions_images.json"):
        (out / name).write_text("{}")
    evaluate.main(["--checkpoints", world["checkpoints"]["linear"], "--coco-root", world["root"],
                   "--features", world["cache"], "--out", str(out), "--method", "greedy",
                   "--max-new-tokens", "4", "--metrics", "bleu", "--device", "cpu"])
    names = set(os.listdir(out))
    assert not names & {"captions_gone.json", "grid_gone.png", "attention_gone.png"}
    assert {"my_notes.txt", "captions_images.json", "captions_linear.json", "table.md"} <= names
    assert "deleted 3 file(s) of an earlier evaluation" in capsys.readouterr().err


def test_cache_checkpoint_mismatch_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match=r"trained on other features.*width: cache has 32, expected 64"):
        evaluate.main(["--checkpoints", world["checkpoints"]["wide"], "--coco-root", world["root"],
                       "--features", world["cache"], "--out", str(tmp_path), "--metrics", "bleu",
                       "--device", "cpu"])


def test_caption_a_folder_reports_and_skips_unreadable_files(world, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for r in world["records"][:2]:
        shutil.copy(r["path"], folder / os.path.basename(r["path"]))
    shutil.copy(world["records"][2]["path"], folder / "photo.JPEG")  # a PNG behind a jpeg name still opens
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not even looked at")
    out = str(tmp_path / "out")
    result = evaluate.main(["--images", str(folder), "--checkpoint", world["checkpoints"]["qformer"],
                            "--out", out, "--method", "greedy", "--max-new-tokens", "6", "--device", "cpu"])
    err = capsys.readouterr()
    assert len(result["captions"]) == 3 and \
        [s["path"] for s in result["skipped"]] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in err.err and "1 unreadable skipped" in err.err
    with open(result["path"]) as f:
        saved = json.load(f)
    assert sorted(saved["captions"]) == sorted(result["captions"]) and saved["skipped"][0]["reason"]
    assert all(str(folder) in line for line in err.out.strip().splitlines()) and err.out.count("\n") == 3
    # the on-the-fly encoder computes what the cache holds (up to the cache's fp16 rounding)
    cache = feature_cache.FeatureCache(world["cache"])
    rows = world["records"][:2]
    source = evaluate.encoded_images(features_spec(), rows, torch.device("cpu"))
    _, visual = source.tokens([r["image_id"] for r in rows])  # (2, 5, 32)
    torch.testing.assert_close(visual, cache.batch([cache.row_of(r["image_id"]) for r in rows]),
                               atol=2e-3, rtol=2e-3)


def test_bench_eval_charges_each_decoder_the_work_it_does():
    # bench_eval's speed-up bound rests on this count: the reference loop re-runs every position for every
    # token
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_eval
    captioner = tiny_captioner("linear").eval()
    lm = captioner.lm
    visual = torch.randn(2, 5, 16)  # (B, S, C_vis)
    L = captioner.condition(visual[:1])[0].size(1)  # the prefix's length
    with bench_eval.LMWork(lm) as work:
        bench_eval.reference_loop(captioner, visual, [1, 2, 3], 4, generator=torch.Generator().manual_seed(0))
    assert work.positions == work.head_rows == 2 * sum(L + 3 + t for t in range(4))
    C = lm.config.n_embd
    assert work.block_weights == 12 * C * C  # qkv 3C², projection C², MLP 4C² + 4C²
    flops_per_position = 2 * (12 * C * C * lm.config.n_layer + C * lm.config.vocab_size)
    assert work.gflop() == pytest.approx(work.positions * flops_per_position / 1e9)
    with bench_eval.LMWork(lm) as work:
        [caption] = decoding.decode_batch(captioner, visual[:1], "greedy", max_new_tokens=6)
    # one prefill of L positions (output layer on its last only), then one position per token that is fed
    # back: every token but a sixth (no forward after the last step)
    assert work.positions == L + min(len(caption), 5)
    assert work.head_rows == 1 + work.positions - L
