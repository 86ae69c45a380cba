"""
CLIP's image tower (a ViT), written by hand, loaded with OpenAI's weights, frozen.

The captioners never train the vision encoder: they read its hidden states. This file builds CLIP's
vision transformer from its parts, in the order an image flows through it:

    pixels (B, 3, H, W)
      -> patch embedding: a conv with kernel = stride = patch size   (B, N, C), N = (H / patch)^2
      -> class token prepended, learned positions added              (B, 1 + N, C)
      -> pre-LayerNorm ("pre_layrnorm": the hub's real, misspelt key)
      -> residual blocks: LayerNorm -> attention, LayerNorm -> quick-GELU MLP
      -> hidden states of the chosen layer                           (B, 1 + N, C)

CLIP's post-LayerNorm is applied only to the class token on its way to the image embedding (transformers'
`pooler_output`); the token states we return are taken before it, which is exactly transformers'
`last_hidden_state` for the last layer and `hidden_states[layer]` for any other (LLaVA uses the penultimate).

Also here: CLIP's image preprocessing (bit-exact with transformers' CLIPImageProcessor, batched), pooling the
patch grid to a few tokens (257 -> 33, as Laurent, Lenain and Mebille's gpt2-vision-language, the project
whose table we reproduce, pools them), and a small *untrained* ViT with the same layout for the offline
miniature. No `transformers` at run time: the tests check parity against it.

    python clip_loader.py --encoder openai/clip-vit-large-patch14 some.jpg other.png
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

from common import autocast, hub_folder, read_hub_weights, read_json, to_device

# -----------------------------------------------------------------------------
# Configuration: the four OpenAI checkpoints, and the miniature's untrained encoder


@dataclass
class CLIPVisionConfig:
    image_size: int = 224            # side of the square input, pixels
    patch_size: int = 14             # side of a square patch: (image_size // patch_size)^2 patches per image
    width: int = 1024                # channels of every token (the hub's hidden_size)
    layers: int = 24                 # residual attention blocks
    heads: int = 16                  # attention heads per block
    mlp_width: int = 4096            # hidden units of each block's MLP (the hub's intermediate_size)
    layer_norm_eps: float = 1e-5     # epsilon of every LayerNorm
    act: str = "quick_gelu"          # x * sigmoid(1.702 x), as OpenAI trained it; "gelu" for some later CLIPs

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def tokens(self):
        return 1 + self.grid ** 2


CLIP_PRESETS = {
    "openai/clip-vit-base-patch32": CLIPVisionConfig(224, 32, 768, 12, 12, 3072),        # 50 tokens x 768
    "openai/clip-vit-base-patch16": CLIPVisionConfig(224, 16, 768, 12, 12, 3072),        # 197 tokens x 768
    "openai/clip-vit-large-patch14": CLIPVisionConfig(224, 14, 1024, 24, 16, 4096),      # 257 tokens x 1024
    "openai/clip-vit-large-patch14-336": CLIPVisionConfig(336, 14, 1024, 24, 16, 4096),  # 577 tokens x 1024
    # The offline miniature's encoder: never trained, only randomly initialised (see build_random_clip).
    # 64 px images in patches of 4 give 257 tokens of width 128, the token count L/14 gives at 224 px. Patches
    # of 4, as with 8 a linear probe on the random features cannot tell the shapes apart; two blocks, as more
    # random blocks add nothing a probe can read (the probes: docs/miniature.md).
    "mini": CLIPVisionConfig(64, 4, 128, 2, 4, 512),
    # The miniature's PRETRAINED encoder (miniature/train_clip.py trains it on the miniature's images and
    # captions): patches of 8 give 65 tokens, a quarter of "mini"'s, and 3 blocks of width 96 keep its
    # training step cheap on a CPU (its time: docs/miniature.md).
    "clip-mini": CLIPVisionConfig(64, 8, 96, 3, 4, 384),
    "tiny": CLIPVisionConfig(32, 8, 32, 2, 4, 64),  # unit tests: 17 tokens x 32
}

RANDOM_PREFIX = "random-vit:"  # encoder ids "random-vit:<preset>:seed<k>" name an untrained ViT

# -----------------------------------------------------------------------------
# The model: attention -> MLP -> block -> the vision transformer


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: every patch sees every patch)."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        # separate q/k/v projections, named as on the hub, so OpenAI's weights load without reshuffling
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x):
        B, S, C = x.shape
        q = self.q_proj(x).view(B, S, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, S, hs)
        k = self.k_proj(x).view(B, S, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, S, hs)
        v = self.v_proj(x).view(B, S, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v, as CLIP scales it
        y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, C)
        return self.out_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported activation {config.act!r}: CLIP uses 'quick_gelu' (or 'gelu')")
        self.quick = config.act == "quick_gelu"
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x):
        x = self.fc1(x)
        # OpenAI trained CLIP with this sigmoid approximation of GELU; exact GELU would shift every feature
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class VisionTransformer(nn.Module):
    """
    CLIP's image tower. `layer` picks whose hidden states forward() returns, indexed like transformers'
    `hidden_states`: 0 is the embedding after pre-LayerNorm, k the output of block k, -1 the last block,
    -2 the penultimate one. Blocks after the chosen layer are kept (so checkpoints load strictly) but never
    run. The model is frozen here, once: no parameter wants a gradient and it never leaves eval mode. Only
    miniature/train_clip.py, which pretrains a small tower, builds one with frozen=False.
    """

    def __init__(self, config, layer=-1, frozen=True):
        super().__init__()
        if not -(config.layers + 1) <= layer <= config.layers:
            raise ValueError(f"layer {layer} out of range for a {config.layers}-block ViT "
                             f"(use 0..{config.layers}, or -1 for the last, -2 for the penultimate)")
        self.config = config
        self.layer = layer
        # load_clip() records the name it was built from (the feature cache checks it)
        self.encoder_id = "custom"
        self.n_run = layer % (config.layers + 1)  # how many blocks forward() runs
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.position_embedding = nn.Parameter(torch.zeros(config.tokens, config.width))
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        # CLIP's post-LayerNorm: only for the class token's image embedding (pooled()), never for the tokens
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode=True):
        # frozen: a caller's model.train() must not switch the encoder out of eval mode
        return super().train(mode and not self.frozen)

    def forward(self, pixels):
        # a frozen tower never records an autograd graph, even for pixels that want a gradient; one being
        # pretrained (miniature/train_clip.py) follows the caller's grad mode like any module
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            B = pixels.shape[0]
            x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, g, g)
            x = x.flatten(2).transpose(1, 2)  # (B, N, C), patches in raster order
            cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, C)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, C): the class token comes first
            x = x + self.position_embedding  # positions are added before the pre-LayerNorm
            x = self.pre_layrnorm(x)
            for block in self.blocks[:self.n_run]:
                x = block(x)
            return x  # (B, 1 + N, C)

    def pooled(self, tokens):
        """
        CLIP's pooled image state (transformers' pooler_output):
        post-LayerNorm of the last layer's class token.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.post_layernorm(tokens[:, 0])  # (B, C)


# -----------------------------------------------------------------------------
# The untrained encoder of the offline miniature


def build_random_clip(config, seed=0, layer=-1, frozen=True):
    """
    A randomly initialised, UNTRAINED ViT with CLIP's layout and CLIP's init scheme, reproducible from the
    seed. Its features carry no learned semantics, only what random projections of the pixels keep (colour,
    size, position, and shape once patches are small enough); the offline miniature uses it so that the whole
    pipeline runs without downloading anything. miniature/train_clip.py starts its training from it
    (frozen=False).
    """
    model = VisionTransformer(config, layer, frozen)
    g = torch.Generator().manual_seed(seed)
    C, L = config.width, config.layers
    with torch.no_grad():
        # transformers' CLIPPreTrainedModel._init_weights: residual-branch outputs scaled down by sqrt(2L)
        model.class_embedding.normal_(0, C ** -0.5, generator=g)
        model.patch_embedding.weight.normal_(0, 0.02, generator=g)
        model.position_embedding.normal_(0, 0.02, generator=g)
        for block in model.blocks:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.weight.normal_(0, C ** -0.5 * (2 * L) ** -0.5, generator=g)
            block.self_attn.out_proj.weight.normal_(0, C ** -0.5, generator=g)
            block.mlp.fc1.weight.normal_(0, (2 * C) ** -0.5, generator=g)
            block.mlp.fc2.weight.normal_(0, C ** -0.5 * (2 * L) ** -0.5, generator=g)
            for linear in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                           block.self_attn.out_proj, block.mlp.fc1, block.mlp.fc2):
                linear.bias.zero_()
        for ln in ([model.pre_layrnorm, model.post_layernorm] +
                   [m for b in model.blocks for m in (b.layer_norm1, b.layer_norm2)]):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    return model


def random_clip_id(preset="mini", seed=0):
    """The encoder id that names (and rebuilds, through load_clip) an untrained ViT."""
    return f"{RANDOM_PREFIX}{preset}:seed{seed}"


# -----------------------------------------------------------------------------
# Loading OpenAI's weights by hand from the Hugging Face hub's files


def config_from_hub(hub):
    """
    Our config from a hub config.json: a CLIPModel's holds the image tower's under "vision_config".
    Keys left out of the file take transformers' CLIPVisionConfig defaults (those of ViT-B/32), as it would.
    """
    v = hub.get("vision_config") or hub
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"only RGB CLIP towers are supported, this one takes {v['num_channels']} channels")
    return CLIPVisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                            width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                            heads=v.get("num_attention_heads", 12),
                            mlp_width=v.get("intermediate_size", 3072),
                            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                            act=v.get("hidden_act", "quick_gelu"))


def hub_to_ours(state):
    """
    Rename a hub checkpoint's keys to ours, dropping what the image tower does not use. Three layouts exist:
    CLIPModel and CLIPVisionModelWithProjection (and CLIPVisionModel before transformers 5) prefix the tower
    with "vision_model."; CLIPVisionModel saved by transformers 5 has no prefix. Everything not explicitly
    ignored here must match our model exactly (the load is strict).
    """
    ignored = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
    ours = {}
    for key, tensor in state.items():
        # position_ids: an index buffer, not a weight
        if key.startswith(ignored) or key.endswith("position_ids"):
            continue
        key = key.removeprefix("vision_model.")
        key = key.replace("encoder.layers.", "blocks.").removeprefix("embeddings.")
        if key == "position_embedding.weight":  # the hub keeps positions in an nn.Embedding
            key = "position_embedding"
        ours[key] = tensor
    return ours


def ours_to_hub(state):
    """
    The inverse of hub_to_ours: our image tower's state dict under transformers' CLIPModel key names
    ("vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.0.self_attn.q_proj.weight", ...), for saving a tower we trained
    (miniature/train_clip.py) so that it loads exactly like OpenAI's.
    """
    hub = {}
    for key, tensor in state.items():
        if key in ("patch_embedding.weight", "class_embedding", "position_embedding"):
            key = "embeddings." + key + (".weight" if key == "position_embedding" else "")
        key = key.replace("blocks.", "encoder.layers.")
        hub["vision_model." + key] = tensor
    return hub


def config_to_hub(config):
    """
    The inverse of config_from_hub: a CLIPVisionConfig's fields under the hub's names (a "vision_config").
    """
    return dict(hidden_size=config.width, intermediate_size=config.mlp_width, num_hidden_layers=config.layers,
                num_attention_heads=config.heads, num_channels=3, image_size=config.image_size,
                patch_size=config.patch_size, hidden_act=config.act, layer_norm_eps=config.layer_norm_eps)


def load_clip(name_or_dir="openai/clip-vit-large-patch14", layer=-1):
    """
    A frozen CLIP image tower (eval mode, no gradients) whose forward returns layer `layer`'s hidden states.
    name_or_dir: a hub id (openai/clip-vit-large-patch14, ...), a local folder in the hub's layout
    (config.json + model.safetensors or pytorch_model.bin, from CLIPModel, CLIPVisionModel or
    CLIPVisionModelWithProjection), or "random-vit:<preset>:seed<k>" for the untrained miniature encoder.
    `model.encoder_id` records the name.
    """
    if name_or_dir.startswith(RANDOM_PREFIX):
        preset, _, seed = name_or_dir.removeprefix(RANDOM_PREFIX).partition(":seed")
        if preset not in CLIP_PRESETS or not seed.isdigit():
            raise ValueError(f"bad random encoder id {name_or_dir!r}: expected 'random-vit:<preset>:seed<k>' "
                             f"with a preset in {sorted(CLIP_PRESETS)}")
        model = build_random_clip(CLIP_PRESETS[preset], int(seed), layer)
    else:
        folder = hub_folder(name_or_dir)
        config = config_from_hub(read_json(os.path.join(folder, "config.json"), "CLIP config"))
        model = VisionTransformer(config, layer)
        theirs = hub_to_ours(read_hub_weights(folder))
        ours = model.state_dict()
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing or unexpected:
            raise ValueError(f"{folder} is not a CLIP image tower this loader understands: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, tensor in theirs.items():
            if tensor.shape != ours[key].shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(ours[key].shape)}")
        model.load_state_dict(theirs, strict=True)
    model.encoder_id = name_or_dir
    return model


# -----------------------------------------------------------------------------
# Preprocessing, exactly as CLIP does it (checked against transformers' CLIPImageProcessor)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image):
    """
    Any PIL image as 8-bit RGB. Transparency is composited onto white (as transformers 5 does), and 16-bit
    grayscale is scaled down: PIL's own convert("RGB") clips it, turning most 16-bit images pure white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale ("I" is how PIL often opens 16-bit PNGs): 0..65535 -> 0..255
        gray = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


MAX_RESIZED_PIXELS = 2 ** 25  # 33.5M pixels (100 MB as RGB): far above any real photo's resized size


def resize_crop(image, size=224):
    """
    One image as a (size, size, 3) uint8 array: shortest side resized to `size` with bicubic, the long side to
    int(size * long / short) (truncated, as CLIPImageProcessor does: rounding moves pixels by up to 2.6
    levels), then the centre crop starting at (long - size) // 2. A needle-thin image (a 1 x 5000 PNG of 100
    bytes) would become gigapixels before the crop: beyond MAX_RESIZED_PIXELS it is refused with a ValueError
    instead.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if new_w * new_h > MAX_RESIZED_PIXELS:
        raise ValueError(f"a {w}x{h} image (aspect ratio 1:{max(w, h) / min(w, h):.0f}) would be resized to "
                         f"{new_w}x{new_h} pixels before the crop; "
                         f"refusing images beyond {MAX_RESIZED_PIXELS:,} pixels")
    image = to_rgb(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))  # (size, size, 3)


def normalize_pixels(pixels):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float: scaled to [0, 1], then CLIP's mean and std per channel."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(images, size=224):
    """A list of PIL images (any mode, any size) -> (B, 3, size, size) float tensor, ready for the model."""
    return normalize_pixels(torch.from_numpy(np.stack([resize_crop(im, size) for im in images])))


# -----------------------------------------------------------------------------
# Pooling the patch grid: 257 tokens -> 33, and what a bridge's visual tokens are


def parse_grid(text):
    """A --pool flag: "4x8" -> (4, 8); "none" -> None (no pooling)."""
    if text == "none":
        return None
    rows, sep, cols = text.partition("x")
    if not (sep and rows.isdigit() and cols.isdigit()):
        raise ValueError(f"pool grid {text!r}: expected ROWSxCOLS like 4x8, or none")
    return int(rows), int(cols)


# the default pooling grid of every script's --pool (the reference project's): 1 + 4 x 8 = 33 tokens
POOL_FLAG = "4x8"
POOL = parse_grid(POOL_FLAG)


def pool_tokens(tokens, grid=POOL):
    """
    Keep the class token and average the patch grid down to grid = (rows, cols) tokens: (B, 1 + N, C) ->
    (B, 1 + rows * cols, C); grid=None (or the ViT's own grid) keeps every token. A bridge attending over 33
    tokens instead of 257 is about 8x cheaper, and averaging neighbouring patches keeps their layout.
    """
    B, S, C = tokens.shape
    side = math.isqrt(S - 1)
    if grid is None or tuple(grid) == (side, side):
        return tokens
    if side * side != S - 1:
        raise ValueError(f"{S - 1} patch tokens do not form a square grid")
    patches = tokens[:, 1:].transpose(1, 2).reshape(B, C, side, side)  # (B, C, g, g)
    pooled = F.adaptive_avg_pool2d(patches, grid)  # (B, C, rows, cols)
    pooled = pooled.flatten(2).transpose(1, 2)  # (B, rows * cols, C)
    return torch.cat([tokens[:, :1], pooled], dim=1)  # (B, 1 + rows * cols, C)


@dataclass(frozen=True)
class VisualFeatures:
    """
    What a bridge's visual tokens are, in one place: a feature cache's manifest and a caption checkpoint
    record it, and the cache or encoder a checkpoint is later given must be == to it. The tokens of an image
    are the class token, then the grid of (pooled) patch tokens, row by row.
    """
    encoder: str     # what load_clip loads: a hub id, a hub-format folder, or random-vit:<preset>:seed<k>
    layer: int       # the block whose output is read (-1: the last; -2: the one before it, LLaVA's choice)
    grid: tuple      # (rows, cols) of patch tokens: the pooling grid, or the ViT's own grid when not pooled
    image_size: int  # pixels per side the encoder reads
    width: int       # channels of every token

    @property
    def tokens(self):
        return 1 + self.grid[0] * self.grid[1]

    @classmethod
    def of(cls, model, grid):
        """The features a loaded encoder gives, pooled to grid (None: not pooled)."""
        c = model.config
        grid = tuple(grid) if grid else (c.grid, c.grid)
        return cls(model.encoder_id, model.layer, grid, c.image_size, c.width)

    def as_dict(self):
        """For JSON and checkpoints (plain types only)."""
        return dict(asdict(self), grid=list(self.grid))

    @classmethod
    def from_dict(cls, d, where):
        """Back from as_dict(); a ValueError naming `where` (a file) for a record of another form."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or sorted(d) != sorted(names):
            raise ValueError(f"{where} records its visual features as {d!r}, not as this version of the code "
                             f"does ({', '.join(names)}): it was made by an earlier version; make it again")
        return cls(**dict(d, grid=tuple(d["grid"])))

    def differences(self, other, mine="have"):
        """'field: have X, expected Y' for every field in which other differs."""
        return [f"{f.name}: {mine} {getattr(self, f.name)!r}, expected {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@torch.no_grad()
def encode_pixels(model, pixels, grid=POOL, dtype="fp32"):
    """
    The one way images become visual tokens, everywhere in the project (feature caching, on-the-fly encoding
    in training and evaluation): (B, H, W, 3) uint8 pixels, already resized and cropped (resize_crop, or
    data.feature_cache.load_pixels) -> the frozen encoder's tokens, pooled: (B, 1 + rows * cols, C),
    float32 on the CPU. The model may sit on any device; the pixels follow it. dtype: the autocast dtype
    ("bf16" on a GPU runs a ViT-L/14 at several times its fp32 speed, and the tokens are stored in fp16
    anyway).
    """
    device = model.patch_embedding.weight.device
    x = normalize_pixels(to_device(torch.as_tensor(np.stack(pixels)), device))  # (B, 3, H, W)
    with autocast(device.type, dtype):
        tokens = model(x)  # (B, 1 + N, C)
    return pool_tokens(tokens.float(), grid).cpu()  # (B, S, C)


def encode_images(model, images, grid=POOL):
    """
    PIL images (any mode, any size) -> pooled tokens (B, S, C), preprocessed at the model's own input size.
    """
    return encode_pixels(model, [resize_crop(im, model.config.image_size) for im in images], grid)


def encoder_param_counts(name_or_dir):
    """
    {"total", "trainable": 0} of the frozen encoder an id names, without loading its weights (a model on the
    meta device has shapes but no storage); None for a hub id this machine cannot size offline (left out, not
    guessed).
    """
    if name_or_dir.startswith(RANDOM_PREFIX):
        config = CLIP_PRESETS[name_or_dir.removeprefix(RANDOM_PREFIX).split(":")[0]]
    elif name_or_dir in CLIP_PRESETS:
        config = CLIP_PRESETS[name_or_dir]
    elif os.path.isfile(os.path.join(name_or_dir, "config.json")):
        config = config_from_hub(read_json(os.path.join(name_or_dir, "config.json"), "CLIP config"))
    else:
        return None
    with torch.device("meta"):
        model = VisionTransformer(config)
    return {"total": sum(p.numel() for p in model.parameters()), "trainable": 0}


def is_untrained(model):
    """
    True for the miniature's random encoder: its features mean nothing beyond random projections of pixels.
    """
    return model.encoder_id.startswith(RANDOM_PREFIX)


def describe(model):
    """One line about an encoder: its id, layout, layer and parameter counts (all frozen)."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    untrained = " (UNTRAINED, random init)" if is_untrained(model) else ""
    return (f"{model.encoder_id}{untrained}: {c.image_size}px, patch {c.patch_size}, "
            f"{c.tokens} tokens x {c.width}, {c.layers} blocks, layer {model.layer}; "
            f"{total / 1e6:.2f}M params, {trainable} trainable")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(
        description="Encode images with a frozen CLIP ViT and print the token shapes.")
    parser.add_argument("images", nargs="*", help="image files (none: one random-noise image)")
    parser.add_argument("--encoder", default="openai/clip-vit-large-patch14",
                        help="hub id, local hub-format folder, or random-vit:<preset>:seed<k> "
                             "(e.g. random-vit:mini:seed0)")
    parser.add_argument("--layer", type=int, default=-1, help="-1 = last block, -2 = penultimate (LLaVA)")
    parser.add_argument("--pool", default=POOL_FLAG, help="ROWSxCOLS grid for the patch tokens, or none")
    args = parser.parse_args()

    model = load_clip(args.encoder, layer=args.layer)
    print(describe(model))
    print("config:", asdict(model.config))
    if args.images:
        images = [ImageOps.exif_transpose(Image.open(p)) for p in args.images]  # phone photos upright
    else:
        images = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))]
    pixels = preprocess(images, model.config.image_size)
    tokens = model(pixels)
    pooled = pool_tokens(tokens, parse_grid(args.pool))
    print(f"pixels {tuple(pixels.shape)} -> tokens {tuple(tokens.shape)} -> pooled {tuple(pooled.shape)}")
