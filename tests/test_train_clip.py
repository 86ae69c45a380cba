# miniature/train_clip.py: the contrastive loss, a text tower that ignores padding, training that learns and
# resumes exactly, and the Hugging Face layout it saves: read back by clip_loader and by transformers with the
# same outputs.
import json
import os

import pytest
import torch

import clip_loader
from miniature import clip_model, train_clip
from data import shapes
from common import load_checkpoint, save_checkpoint
from tests.test_bad_inputs import usage_error

# the tiny image tower (32 px, patches of 8: 17 tokens x 32) and a 1-layer text tower: a few ms per step
TINY = ["--vision", "tiny", "--text-layers", "1", "--text-width", "32", "--text-heads", "2",
        "--embed-dim", "16", "-B", "16", "--warmup-steps", "2", "--lr", "3e-3", "--val-every", "0",
        "--log-every", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(str(root), train=48, val=16, corpus_docs=10, seed=5)
    return str(root)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A tiny CLIP trained for 150 steps, about a second (its folder: checkpoint, log, hub-format model,
    quality.json)."""
    out = str(tmp_path_factory.mktemp("clip"))
    model = train_clip.main(["--root", world, "--out-dir", out, "--max-steps", "150", "--ckpt-every", "0",
                             *TINY])
    return model, out


def test_contrastive_loss_by_hand():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * image @ text.t()
    # row i: image i's softmax over the 4 captions; column i: caption i's softmax over the 4 images
    by_rows = -torch.log_softmax(logits, 1).diagonal().mean()
    by_columns = -torch.log_softmax(logits, 0).diagonal().mean()
    assert torch.allclose(clip_model.contrastive_loss(image, text, scale), (by_rows + by_columns) / 2)
    # perfectly matched pairs of orthogonal embeddings at CLIP's largest scale: nearly zero loss
    eye = torch.eye(4, 8)
    assert clip_model.contrastive_loss(eye, eye, torch.tensor(clip_model.LOGIT_SCALE_MAX)) < 1e-3


def test_text_tower_pools_at_endoftext_and_ignores_padding():
    config = clip_model.CLIPTrainConfig(text_layers=2, text_width=32, text_heads=2, text_tokens=12,
                                        vocab_size=20)
    torch.manual_seed(0)
    tower = clip_model.TextTransformer(config)
    caption = torch.tensor([[3, 5, 7, 19]])  # 3 words, then <|endoftext|> (id 19) at position 3
    padded = torch.tensor([[3, 5, 7, 19, 19, 19, 19, 19]])
    # causal attention: what follows never reaches position 3
    garbage = torch.tensor([[3, 5, 7, 19, 1, 2, 11, 4]])
    eot = torch.tensor([3])
    out = tower(caption, eot)
    assert out.shape == (1, 32)
    torch.testing.assert_close(tower(padded, eot), out)
    torch.testing.assert_close(tower(garbage, eot), out)
    assert not torch.allclose(tower(caption, torch.tensor([2])), out)  # another position is another summary


def test_the_image_tower_trains_while_clip_loader_towers_stay_frozen():
    model = clip_model.CLIP(clip_model.CLIPTrainConfig(vision="tiny", vocab_size=20, text_width=32,
                                                       text_heads=2))
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert model.vision_model.training  # not forced into eval mode as a frozen tower is
    pixels = torch.randn(2, 3, 32, 32)
    model.encode_image(pixels).sum().backward()
    assert model.vision_model.patch_embedding.weight.grad is not None
    frozen = clip_loader.load_clip("random-vit:tiny:seed0")
    frozen.train()
    assert not frozen.training and frozen(pixels.requires_grad_(True)).grad_fn is None


def test_training_lowers_the_loss_and_reports_quality(trained):
    _, out = trained
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 150
    # ln(16) = 2.77 is chance for a batch of 16: the towers must learn to pair images with their own captions
    assert sum(losses[:10]) / 10 > 2.7 and sum(losses[-10:]) / 10 < 1.5, losses
    quality = json.load(open(os.path.join(out, "quality.json")))
    r = quality["retrieval"]
    assert r["images"] == 16 and r["captions"] == 80
    assert 0 <= r["image_to_text_R@1"] <= r["image_to_text_R@1_scene"] <= 1
    assert 0 <= r["text_to_image_R@1"] <= r["text_to_image_R@1_scene"] <= 1
    for name in ("pooled_tokens", "class_token"):
        probe = quality["probe"][name]
        assert set(probe) >= {"colour", "shape", "size", "position", "objects"}
        assert all(0 <= probe[a] <= 1 for a in ("colour", "shape", "size", "position", "objects"))


def test_resume_is_exact(world, tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    args = ["--root", world, "--max-steps", "8", "--ckpt-every", "0", *TINY]
    a = train_clip.main([*args, "--out-dir", whole])
    train_clip.main([*args, "--out-dir", halves, "--stop-step", "4"])
    # stopped: no model folder yet
    assert sorted(os.listdir(halves)) == [".lock", "ckpt_000004.pt", "log.jsonl"]
    b = train_clip.main([*args, "--out-dir", halves, "--resume", "auto"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert open(os.path.join(whole, "config.json")).read() == open(os.path.join(halves, "config.json")).read()


def test_saved_folder_loads_like_openai_clip(trained):
    model, out = trained
    model.eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.vision_model(pixels)  # (3, 17, 32)
    # clip_loader's path for openai/clip-vit-large-patch14: config.json's vision_config + vision_model.*
    # weights
    tower = clip_loader.load_clip(out)
    assert tower.encoder_id == out and not clip_loader.is_untrained(tower)
    assert tower.config == clip_loader.CLIP_PRESETS["tiny"]
    assert torch.equal(tower(pixels), expected)
    # the whole model (text tower, projections, temperature) comes back too
    again, tokenizer = clip_model.load_hub_folder(out)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert tokenizer.decode(tokenizer.encode_ordinary("a small red circle")) == "a small red circle"


def test_saved_folder_matches_transformers(trained):
    transformers = pytest.importorskip("transformers")
    model, out = trained
    model.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hf = transformers.CLIPVisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, output_hidden_states=True)
        ours = model.vision_model(pixels)
        torch.testing.assert_close(ours, theirs.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.vision_model.pooled(ours), theirs.pooler_output,
                                   atol=1e-5, rtol=1e-5)
        # an earlier layer, as the feature cache's --layer reads it
        torch.testing.assert_close(clip_loader.load_clip(out, layer=1)(pixels), theirs.hidden_states[1],
                                   atol=1e-5, rtol=1e-5)
        # the image embedding through the visual projection, as CLIPVisionModelWithProjection computes it
        proj = transformers.CLIPVisionModelWithProjection.from_pretrained(out).eval()
        torch.testing.assert_close(proj(pixel_values=pixels).image_embeds,
                                   model.visual_projection(model.vision_model.pooled(ours)),
                                   atol=1e-5, rtol=1e-5)


def test_hub_key_names_are_transformers_own(trained):
    from safetensors.torch import load_file
    _, out = trained
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    for key in ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
                "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
                "vision_model.encoder.layers.1.self_attn.q_proj.weight",
                "vision_model.encoder.layers.1.self_attn.out_proj.bias",
                "vision_model.encoder.layers.0.layer_norm2.bias",
                "vision_model.encoder.layers.0.mlp.fc2.weight",
                "vision_model.post_layernorm.bias", "visual_projection.weight", "text_projection.weight",
                "logit_scale"]:
        assert key in keys, key
    assert all(k.startswith(("vision_model.", "text_model.", "visual_projection.", "text_projection.",
                             "logit_scale"))
               for k in keys)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "clip" and config["vision_config"]["patch_size"] == 8
    assert clip_loader.config_from_hub(config) == clip_loader.CLIP_PRESETS["tiny"]


def test_clear_errors(world, trained, tmp_path, capsys):
    _, out = trained
    # a checkpoint of another model shape, or of another script, is refused on resume (exit status 2, as
    # argparse)
    usage_error(train_clip.main, ["--root", world, "--out-dir", str(tmp_path / "x"), "--resume",
                                  os.path.join(out, "ckpt_000150.pt"), "--max-steps", "151", *TINY,
                                  "--text-layers", "2"], capsys, "the model differs")
    other = str(tmp_path / "caption.pt")
    save_checkpoint(other, {"trainer": "train_caption.py", "step": 1})
    usage_error(train_clip.main, ["--root", world, "--out-dir", str(tmp_path / "y"), "--resume", other,
                                  *TINY], capsys, "not a miniature/train_clip.py checkpoint")
    # a caption that does not fit the text tower's positions; a run folder that holds a run
    usage_error(train_clip.main, ["--root", world, "--out-dir", str(tmp_path / "z"), *TINY,
                                  "--text-tokens", "8"], capsys, "does not fit --text-tokens 8")
    usage_error(train_clip.main, ["--root", world, "--out-dir", out, *TINY], capsys, "already holds a run")
    # refused before anything was written (the run's lock aside)
    assert os.listdir(tmp_path / "z") == [".lock"]
    # flags out of range, or that do not fit each other
    for flags, match in [(["-B", "1"], "--batch-size"),
                         (["--text-heads", "3"], "does not divide --text-width"),
                         (["--probe-pool", "3"], "--probe-pool"), (["--probe-only"], "needs --encoder"),
                         (["--lr", "0"], "--lr")]:
        usage_error(train_clip.get_args, ["--root", world, *flags], capsys, match)
    # a hub folder that train_clip.py did not write: its image tower loads, the whole model does not
    config = json.load(open(os.path.join(out, "config.json")))
    del config["train_clip"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(config))
    os.link(os.path.join(out, "model.safetensors"), plain / "model.safetensors")
    assert clip_loader.load_clip(str(plain)).config == clip_loader.CLIP_PRESETS["tiny"]
    with pytest.raises(ValueError, match="not written by train_clip.py"):
        clip_model.load_hub_folder(str(plain))
    assert load_checkpoint(os.path.join(out, "ckpt_000150.pt"))["trainer"] == "miniature/train_clip.py"


def test_resume_auto_on_a_finished_run_changes_nothing(trained, world):
    _, out = trained
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    train_clip.main(["--root", world, "--out-dir", out, "--max-steps", "150", "--ckpt-every", "0", *TINY,
                     "--resume", "auto"])
    after = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)
             if name != "log.jsonl"}
    assert after == {k: v for k, v in before.items() if k != "log.jsonl"}


def test_probe_only_reads_any_encoder(world):
    quality = train_clip.main(["--root", world, "--probe-only", "--encoder", "random-vit:tiny:seed0",
                               "--probe-pool", "2x2"])
    assert set(quality["probe"]) == {"pooled_tokens", "class_token"}
