"""
The miniature's CLIP: two towers, two projections into one space, one learned temperature, and the contrastive
loss they are trained with (miniature/train_clip.py trains it).

    image (B, 3, H, W) -> clip_loader's ViT -> class token -> post-LayerNorm -> visual_projection -> (B, D)
    caption (B, T)     -> token + position embeddings -> gpt2.py's causal Blocks -> LayerNorm
                       -> the state at <|endoftext|> -> text_projection -> (B, D)
    both L2-normalised; logits = exp(logit_scale) * image @ text^T                      (B, B)
    loss = (cross-entropy over each row + over each column) / 2

The symmetric InfoNCE loss: in a batch of B pairs each image has to pick out its own caption among the B
captions, and each caption its own image. Nothing else is supervised; to win, the image tower must expose
whatever tells two captions apart: both objects' colour, shape and size, and which is where. logit_scale is
CLIP's learned temperature (initialised at 1/0.07, kept <= 100 as CLIP does, or the logits can grow until
training is unstable).

A trained model is saved in the Hugging Face CLIP layout: config.json (a CLIPConfig-like dict with a nested
"vision_config") and model.safetensors with transformers' "vision_model.*" key names, plus our text tower
under "text_model.*" and the projections and logit_scale under theirs. So `clip_loader.load_clip(<folder>)`
and `data/feature_cache.py --encoder <folder>` load it by the very path that loads
openai/clip-vit-large-patch14, and transformers' CLIPVisionModel.from_pretrained(<folder>) reads the same
image tower (tested). The text tower is NOT transformers' CLIPTextModel (it is gpt2.py's Block over a GPT-2
BPE subset): only the image tower is meant to be loaded elsewhere.
"""
import dataclasses
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_loader
from common import atomic_open, read_json, write_json
from gpt2 import Block, GPTConfig, SubsetTokenizer

# -----------------------------------------------------------------------------
# Configuration: which image tower, how big a text tower, how wide the shared embedding


@dataclasses.dataclass
class CLIPTrainConfig:
    vision: str = "clip-mini"   # a clip_loader.CLIP_PRESETS name: the image tower's layout
    text_layers: int = 2        # gpt2.Block layers of the text tower
    text_heads: int = 4
    text_width: int = 64
    text_tokens: int = 32       # longest caption + <|endoftext|> (the miniature's are at most 21 tokens)
    vocab_size: int = 0         # filled in from the tokenizer: the GPT-2 tokens the train captions use
    embed_dim: int = 128        # the shared image-text embedding (the hub's projection_dim)

    def text_gpt_config(self):
        """The text tower's sizes as a gpt2.GPTConfig, which is what gpt2.Block is built from."""
        return GPTConfig(block_size=self.text_tokens, vocab_size=self.vocab_size, n_layer=self.text_layers,
                         n_head=self.text_heads, n_embd=self.text_width)

# -----------------------------------------------------------------------------
# The text tower: a small causal transformer, pooled at <|endoftext|>


class TextTransformer(nn.Module):
    """
    Captions (B, T) -> one vector each (B, C): CLIP's text tower, built from gpt2.py's Block (causal
    attention, as CLIP's is). The caption's summary is the state at its <|endoftext|>, the one position that
    has read every word. Causal attention is also why no padding mask is needed: padding comes after
    <|endoftext|>, and no position attends forward, so padding never reaches the pooled state.
    """

    def __init__(self, config):
        super().__init__()
        g = config.text_gpt_config()
        self.token_embedding = nn.Embedding(g.vocab_size, g.n_embd)
        self.position_embedding = nn.Embedding(g.block_size, g.n_embd)
        self.blocks = nn.ModuleList([Block(g) for _ in range(g.n_layer)])
        self.final_layer_norm = nn.LayerNorm(g.n_embd)
        for name, p in self.named_parameters():  # GPT-2's init (gpt2.GPT._init_weights) for this small tower
            if p.dim() >= 2:
                # residual-branch outputs (the c_proj layers) scaled by 1/sqrt(2 * layers), as in GPT-2
                scale = (2 * g.n_layer) ** -0.5 if name.endswith("c_proj.weight") else 1.0
                nn.init.normal_(p, std=0.02 * scale)

    def forward(self, tokens, eot_index):
        x = self.states(tokens)  # (B, T, C)
        return x[torch.arange(len(x), device=tokens.device), eot_index]  # (B, C): the state at <|endoftext|>

    def states(self, tokens):
        """Every position's final state (B, T, C) (BLIP-2's first stage reads the words, not only the
        summary)."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.final_layer_norm(x)  # (B, T, C)

# -----------------------------------------------------------------------------
# CLIP: two towers, two projections into one space, one learned temperature

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)      # CLIP clamps the scale at 100


class CLIP(nn.Module):

    def __init__(self, config, seed=0):
        super().__init__()
        self.config = config
        vision = clip_loader.CLIP_PRESETS[config.vision]
        # the image tower starts from the init of the miniature's random encoder, and is trained (not frozen)
        self.vision_model = clip_loader.build_random_clip(vision, seed=seed, frozen=False)
        self.text_model = TextTransformer(config)
        # no biases: CLIP's projections are plain matrices (the hub's visual_projection / text_projection)
        self.visual_projection = nn.Linear(vision.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision.width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_image(self, pixels):
        tokens = self.vision_model(pixels)  # (B, 1 + N, C)
        return F.normalize(self.visual_projection(self.vision_model.pooled(tokens)), dim=-1)  # (B, D)

    def encode_text(self, tokens, eot_index):
        return F.normalize(self.text_projection(self.text_model(tokens, eot_index)), dim=-1)  # (B, D)

    def forward(self, pixels, tokens, eot_index):
        """The contrastive loss of B (image, caption) pairs: pixels (B, 3, H, W), tokens (B, T),
        eot_index (B,)."""
        return contrastive_loss(self.encode_image(pixels), self.encode_text(tokens, eot_index),
                                self.logit_scale)


def similarity(image, text):
    """(B, B): row i = image i against every caption. image (B, D), or (B, Q, D) with several embeddings per
    image (BLIP-2's queries): then an image is as similar to a caption as its closest query."""
    sim = image @ text.t()  # (B, B) or (B, Q, B)
    return sim if image.dim() == 2 else sim.amax(dim=1)


def contrastive_loss(image, text, logit_scale):
    """Symmetric InfoNCE over normalised embeddings image (B, D) or (B, Q, D), text (B, D): the matching
    pair sits on the diagonal."""
    logits = logit_scale.exp() * similarity(image, text)  # (B, B)
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

# -----------------------------------------------------------------------------
# Saving in the Hugging Face CLIP layout


def hub_config(model, tokenizer):
    """config.json: CLIPConfig's fields, the image tower's under "vision_config" (what clip_loader reads)."""
    c = model.config
    vision = dict(clip_loader.config_to_hub(model.vision_model.config), model_type="clip_vision_model",
                  projection_dim=c.embed_dim)
    return dict(model_type="clip", projection_dim=c.embed_dim, logit_scale_init_value=LOGIT_SCALE_INIT,
                vision_config=vision,
                # the text tower is ours, not transformers' CLIPTextModel: described here, loaded by
                # miniature/clip_model.py
                train_clip=dict(config=dataclasses.asdict(c), gpt2_token_ids=tokenizer.ids,
                                logit_scale=model.logit_scale.item(),
                                note="text_model.* is miniature.clip_model.TextTransformer (gpt2.Block), "
                                     "over the GPT-2 token ids listed here; only the image tower follows "
                                     "transformers' layout"))


def save_hub_folder(model, tokenizer, folder):
    """model.safetensors, then config.json (both atomic): a folder with a config.json is complete."""
    from safetensors.torch import save
    os.makedirs(folder, exist_ok=True)
    state = clip_loader.ours_to_hub(model.vision_model.state_dict())
    for key, tensor in model.state_dict().items():
        # text_model.*, visual_projection, text_projection, logit_scale
        if not key.startswith("vision_model."):
            state[key] = tensor
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    with atomic_open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    write_json(os.path.join(folder, "config.json"), hub_config(model, tokenizer))


def load_hub_folder(folder):
    """A whole model of miniature/train_clip.py (both towers) back from its folder, and its tokenizer."""
    from safetensors.torch import load_file
    hub = read_json(os.path.join(folder, "config.json"), "CLIP config")
    if "train_clip" not in hub:
        raise ValueError(f"{folder} was not written by train_clip.py (no 'train_clip' entry in config.json); "
                         f"its image tower alone loads with clip_loader.load_clip")
    model = CLIP(CLIPTrainConfig(**hub["train_clip"]["config"]))
    state = load_file(os.path.join(folder, "model.safetensors"))
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vision_model.")}
    rest.update({"vision_model." + k: v for k, v in clip_loader.hub_to_ours(vision).items()})
    model.load_state_dict(rest, strict=True)
    return model, SubsetTokenizer(hub["train_clip"]["gpt2_token_ids"])
