# clip_loader.py against transformers: the same random CLIP weights, saved in the hub's formats, must give the
# same hidden states through our hand-written ViT; our preprocessing must give the reference processor's
# pixels.
import json

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
from clip_loader import (CLIP_PRESETS, describe, encode_images, load_clip, parse_grid, pool_tokens,
                         preprocess, resize_crop, to_rgb)

transformers = pytest.importorskip("transformers")

# a small ViT: 40 px in patches of 8 -> 25 patches + the class token, width 32, 3 blocks
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=40,
             patch_size=8)


def random_hf_vision_model(cls=None, seed=0):
    torch.manual_seed(seed)
    cls = cls or transformers.CLIPVisionModel
    return cls(transformers.CLIPVisionConfig(**SMALL)).eval()


def random_pixels(batch=3, size=40, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    """A random transformers CLIPVisionModel and the folder it was saved to (safetensors, the hub's
    layout)."""
    model = random_hf_vision_model()
    folder = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(folder)
    return model, str(folder)

# -----------------------------------------------------------------------------
# The model


def test_hidden_states_match_transformers(hf_vision):
    hf, folder = hf_vision
    pixels = random_pixels()
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    # the last layer is transformers' last_hidden_state: no post-LayerNorm on the tokens
    ours = load_clip(folder)
    assert ours(pixels).shape == (3, 26, 32)
    torch.testing.assert_close(ours(pixels), out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled(ours(pixels)), out.pooler_output, atol=1e-5, rtol=1e-5)
    # other layers, indexed like hidden_states: 0 = embeddings after pre_layrnorm, -2 = penultimate (LLaVA)
    for layer in (0, 1, -2):
        torch.testing.assert_close(load_clip(folder, layer=layer)(pixels), out.hidden_states[layer],
                                   atol=1e-5, rtol=1e-5)


def test_full_clip_checkpoint_with_text_tower_as_bin(tmp_path):
    # openai/clip-vit-* hold a CLIPModel: "vision_model."-prefixed image tower, a text tower and projections;
    # the config nests the tower's settings under "vision_config". Old hub repos ship pytorch_model.bin only.
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        vision_config=SMALL, projection_dim=16,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16))
    hf = transformers.CLIPModel(config).eval()
    state = hf.state_dict()
    assert any(k.startswith("text_model.") for k in state) and "visual_projection.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    pixels = random_pixels(seed=1)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(load_clip(str(tmp_path))(pixels), expected, atol=1e-5, rtol=1e-5)


def test_vision_model_with_projection_checkpoint(tmp_path):
    hf = random_hf_vision_model(transformers.CLIPVisionModelWithProjection, seed=2)
    hf.save_pretrained(tmp_path)
    pixels = random_pixels(seed=2)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(load_clip(str(tmp_path))(pixels), expected, atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_is_refused(hf_vision, tmp_path):
    _, folder = hf_vision
    config = json.load(open(f"{folder}/config.json"))
    config["intermediate_size"] = 128  # config.json no longer matches the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(open(f"{folder}/model.safetensors", "rb").read())
    with pytest.raises(ValueError, match=r"mlp\.fc1\.\w+ has shape"):
        load_clip(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip(str(tmp_path))


def test_frozen_eval_no_grad(hf_vision):
    _, folder = hf_vision
    model = load_clip(folder)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # a training loop calling train() on everything must not wake the encoder up
    assert not model.training and not any(m.training for m in model.modules())
    pixels = random_pixels().requires_grad_(True)
    assert model(pixels).grad_fn is None


def test_offline_error_names_the_files(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(RuntimeError) as info:
        load_clip("openai/clip-vit-base-patch32")
    message = str(info.value)
    assert "config.json" in message and "model.safetensors" in message and "hf download" in message


def test_bad_layer_and_bad_ids():
    with pytest.raises(ValueError, match="out of range"):
        load_clip("random-vit:tiny:seed0", layer=3)
    with pytest.raises(ValueError, match="random-vit"):
        load_clip("random-vit:nope:seed0")
    with pytest.raises(FileNotFoundError):
        load_clip("./no/such/folder")


def test_random_vit_is_seeded_and_labelled():
    a, b, c = (load_clip("random-vit:tiny:seed0"), load_clip("random-vit:tiny:seed0"),
               load_clip("random-vit:tiny:seed1"))
    pixels = random_pixels(size=32)
    torch.testing.assert_close(a(pixels), b(pixels), atol=0, rtol=0)
    assert not torch.allclose(a(pixels), c(pixels))
    assert "UNTRAINED" in describe(a) and \
        "UNTRAINED" not in describe(clip_loader.VisionTransformer(CLIP_PRESETS["tiny"]))
    # the miniature preset: 257 tokens, like L/14 at 224 px
    assert CLIP_PRESETS["mini"].tokens == 257 == CLIP_PRESETS["openai/clip-vit-large-patch14"].tokens


def test_random_init_follows_transformers_scheme():
    # same init recipe as transformers' CLIP (std per parameter group), so the random miniature encoder is the
    # architecture and initialisation of a real CLIP before training
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=64, patch_size=4)
    hf = transformers.CLIPVisionModel(config)  # transformers 5: the tower sits at the top level
    ours = load_clip("random-vit:mini:seed0")
    pairs = [(ours.class_embedding, hf.embeddings.class_embedding),
             (ours.position_embedding, hf.embeddings.position_embedding.weight),
             (ours.blocks[0].self_attn.q_proj.weight, hf.encoder.layers[0].self_attn.q_proj.weight),
             (ours.blocks[0].self_attn.out_proj.weight, hf.encoder.layers[0].self_attn.out_proj.weight),
             (ours.blocks[0].mlp.fc1.weight, hf.encoder.layers[0].mlp.fc1.weight),
             (ours.blocks[0].mlp.fc2.weight, hf.encoder.layers[0].mlp.fc2.weight)]
    for mine, theirs in pairs:
        assert abs(mine.std().item() / theirs.std().item() - 1) < 0.1

# -----------------------------------------------------------------------------
# Preprocessing


def odd_images():
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = Image.fromarray(rng.integers(0, 256, (150, 260, 4), dtype=np.uint8), mode="RGBA")
    palette = rgb(90, 130).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3  # palette index 3 is transparent
    return {
        "wide": rgb(199, 300),      # long side 224 * 300 / 199 = 337.7: truncating and rounding disagree
        "tall": rgb(301, 203),
        "square": rgb(224, 224),
        "small": rgb(31, 57),       # upsampled
        "gray": Image.fromarray(rng.integers(0, 256, (240, 320), dtype=np.uint8), mode="L"),
        "rgba": rgba,
        "cmyk": rgb(230, 170).convert("CMYK"),
        "palette_transparent": palette,
        "gray_alpha": rgba.convert("LA"),
    }


def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessorPil  # the PIL reference (CLIPImageProcessor needs torchvision)
    processor = CLIPImageProcessorPil()
    images = odd_images()
    ours = preprocess(list(images.values()))  # one batch of every size and mode
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    for i, (name, image) in enumerate(images.items()):
        theirs = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(ours[i], theirs, atol=1e-5, rtol=0, msg=f"{name} differs")


def test_long_side_is_truncated_not_rounded():
    image = odd_images()["wide"]
    truncated = resize_crop(image).astype(float)
    w, h = image.size
    rounded = image.resize((round(224 * w / h), 224), Image.Resampling.BICUBIC)
    left = (rounded.width - 224) // 2
    rounded = np.asarray(rounded.crop((left, 0, left + 224, 224))).astype(float)
    assert np.abs(truncated - rounded).max() > 1  # rounding really is a different image


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (rgb[..., 0] == 255).mean() < 0.01  # PIL's own convert("RGB") makes ~100% of this image white

# -----------------------------------------------------------------------------
# Pooling


def test_pool_tokens_to_33():
    B, g, C = 2, 16, 8  # L/14's grid: 16 x 16 patches
    tokens = torch.randn(B, 1 + g * g, C)
    pooled = pool_tokens(tokens, grid=(4, 8))
    assert pooled.shape == (B, 33, C)
    torch.testing.assert_close(pooled[:, 0], tokens[:, 0])  # the class token passes through untouched
    grid = tokens[:, 1:].reshape(B, g, g, C)  # patches in raster order: row, column
    torch.testing.assert_close(pooled[:, 1], grid[:, 0:4, 0:2].mean(dim=(1, 2)))   # top-left cell
    torch.testing.assert_close(pooled[:, 8], grid[:, 0:4, 14:16].mean(dim=(1, 2)))  # top-right cell
    torch.testing.assert_close(pooled[:, 32], grid[:, 12:16, 14:16].mean(dim=(1, 2)))  # bottom-right cell
    assert pool_tokens(tokens, grid=None) is tokens
    assert pool_tokens(tokens, grid=(2, 2)).shape == (B, 5, C)
    with pytest.raises(ValueError, match="square"):
        pool_tokens(torch.randn(1, 1 + 15, C))
    assert parse_grid("4x8") == (4, 8) and parse_grid("none") is None
    with pytest.raises(ValueError):
        parse_grid("4by8")


def test_encode_images_end_to_end():
    model = load_clip("random-vit:tiny:seed0")
    images = list(odd_images().values())[:4]
    out = encode_images(model, images, grid=(2, 2))
    assert out.shape == (4, 5, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, pool_tokens(model(preprocess(images, 32)), (2, 2)))
