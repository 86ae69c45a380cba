"""
Three ways to let a frozen GPT-2 see an image, side by side, and the captioner that joins one to the GPT.

    LinearBridge          each visual token (or the whole image) -> prefix embeddings
                          (ClipCap's idea, in one layer)
    CrossAttentionBridge  gated cross-attention inserted into every k-th GPT block (Flamingo's idea)
    QFormerBridge         learnable queries read the image, their outputs become the prefix (BLIP-2's idea)

The bridge contract (all a new bridge must do):
- it is an nn.Module built from a BridgeConfig (below) and registered under a name with @register("name");
- forward(visual) takes the frozen encoder's tokens, visual (B, S, C_vis) (CLIP's class token + 32 pooled
  patch tokens by default), and returns (prefix, cross), what gpt2.py's one extension point accepts:
    prefix  (B, P, n_embd) embeddings placed before the caption, as if they were words, or None;
    cross   a list of n_layer callables-or-None, cross[i] updating block i's residual stream (B, T, C),
            or None;
- optionally attention_maps(visual) -> (B, heads, Q, S) weights over the visual tokens: evaluate.py then draws
  where the bridge looks;
- optionally reads_prompt = True: forward(visual, prompt) then also gets the question it answers, prompt =
  (its token embeddings (B, m, n_embd), mask (B, m), True where a token is real), or None for a caption.
The GPT itself is never copied or edited: the bridge is the only trainable part. BRIDGES is the one list of
bridges: train_caption.py's --bridge choices, the Makefile's demo, the tests and the benches all read it.

The captioner lays each example out as
    [<|endoftext|>] [prefix p_1 .. p_P] [caption c_1 .. c_n] [<|endoftext|>]
The LM was pretrained on documents that each start after an <|endoftext|>, so the image comes right after
one, where the LM expects the start of a new text (a prefix before it would be read as the end of some
previous document and largely ignored). The loss covers c_1 .. c_n and the final <|endoftext|> only.
A question about the image is a prompt the LM reads before it answers (BLIP-2's "Question: ... Answer:"):
    [<|endoftext|>] [prefix p_1 .. p_P] [prompt q_1 .. q_m] [answer a_1 .. a_k] [<|endoftext|>]
with the loss on a_1 .. a_k and the final <|endoftext|> only: the question is given, never predicted.
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import load_checkpoint
from gpt2 import MLP, load_lm

# -----------------------------------------------------------------------------
# The registry: every bridge, by name


BRIDGES = {}  # name -> bridge class, filled by @register below


def register(name):
    """Class decorator: add a bridge to BRIDGES under `name` (see the contract at the top of this file)."""
    def add(cls):
        BRIDGES[name] = cls
        return cls
    return add

# -----------------------------------------------------------------------------
# Bridge 1: a linear map of each visual token into the GPT's embedding space, used as a prefix


@register("linear")
class LinearBridge(nn.Module):
    """
    One Linear layer, used one of two ways:
    - per token (the default, the reference project's): each visual token -> one prefix embedding, S in all;
    - whole image (--prefix-len k, ClipCap's mapping in one layer): all S tokens at once -> k prefix
      embeddings.
    Per token, a prefix slot only ever sees its own patch; a tiny LM then has to assemble "a small red circle"
    from slots that each hold a piece of a shape. Whole image, every slot is a linear read-out of the entire
    image, so slot j can become "the colour of the first object" wherever that object is; the price is
    S * C_vis * k * n_embd weights (4.9M in the miniature's demo, far too many for ViT-L/14's 33 x 1024
    tokens).
    """

    def __init__(self, config):
        super().__init__()
        self.k = config.prefix_len
        if self.k:
            self.ln = nn.LayerNorm(config.vis_dim)  # per token, as in VisualInput
            self.proj = nn.Linear(config.vis_tokens * config.vis_dim, self.k * config.n_embd)
            if config.zero_init:  # every seed starts from the same map: only the batches' order differs
                nn.init.zeros_(self.proj.weight)
                nn.init.zeros_(self.proj.bias)
            self.tokens = config.vis_tokens
        else:
            # LayerNorm + one Linear (+ a learned per-slot offset with vis_pos): just a linear projection
            self.input = VisualInput(config, config.n_embd)

    def forward(self, visual):
        if self.k:
            check_tokens(visual, self.tokens)
            x = self.ln(visual).flatten(1)  # (B, S * C_vis)
            return self.proj(x).view(visual.size(0), self.k, -1), None  # (B, k, C)
        prefix = self.input(visual)  # (B, S, C): one word-like embedding per visual token
        return prefix, None  # the GPT adds its own position embeddings too

# -----------------------------------------------------------------------------
# Bridge 2: gated cross-attention inside the frozen GPT blocks


class GatedCrossAttention(nn.Module):
    """
    x + tanh(a) * attention(x -> image), then x + tanh(b) * MLP(x), with a = b = 0 at initialisation.
    The gates start closed so the captioner starts as exactly the frozen LM, and training opens them
    only as far as the image helps: the LM's knowledge is never disturbed by a random new layer.
    """

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)  # the same MLP shape as a GPT-2 block, new weights
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv):
        x = x + torch.tanh(self.attn_gate) * self.attn(self.ln_1(x), kv=kv)  # (B, T, C)
        x = x + torch.tanh(self.mlp_gate) * self.mlp(self.ln_2(x))
        return x


@register("xattn")
class CrossAttentionBridge(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.xattn_heads:
            raise ValueError(f"xattn_heads {config.xattn_heads} does not divide the GPT's width "
                             f"{config.n_embd}")
        self.input = VisualInput(config, config.n_embd)
        self.every = config.xattn_every
        # one layer per chosen GPT block (blocks every-1, 2*every-1, ..., so the last block always has one)
        self.layers = nn.ModuleDict({str(i): GatedCrossAttention(config.n_embd, config.xattn_heads)
                                     for i in range(config.n_layer) if (i + 1) % self.every == 0})
        self.n_layer = config.n_layer

    def forward(self, visual):
        context = self.input(visual)  # (B, S, C)
        # Keys and values of the image are computed here, once per image, not once per generated token.
        cross = [None] * self.n_layer
        for i, layer in self.layers.items():
            cross[int(i)] = partial(layer, kv=layer.attn.keys_values(context))
        return None, cross

# -----------------------------------------------------------------------------
# Bridge 3: a Q-Former (BLIP-2): learnable queries attend to each other and the image, then become the prefix


class QFormerLayer(nn.Module):

    def __init__(self, width, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, n_head)   # queries exchange what they found
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, n_head)  # queries read the image
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, q, context, text=None):
        q = self.exchange(q, text)  # (B, Q, W)
        q = q + self.cross_attn(self.ln_2(q), context=context)
        q = q + self.mlp(self.ln_3(q))
        return q

    def exchange(self, q, text):
        """Self-attention of the queries; text (instruction-aware): (the question (B, m, W), its mask (B, m)),
        whose tokens join the keys and values, so each query can read the question (InstructBLIP)."""
        h = self.ln_1(q)
        if text is None:
            return q + self.self_attn(h, context=h)
        words, real = text
        context = torch.cat([h, words], dim=1)  # (B, Q + m, W)
        mask = torch.cat([torch.ones_like(real[:, :1]).expand(-1, h.size(1)), real], dim=1)  # (B, Q + m)
        return q + self.self_attn(h, context=context, mask=mask[:, None, None, :])

    def read_weights(self, q, context, text=None):
        """Where this layer's queries look in the image: the cross-attention weights (B, nh, Q, S)."""
        return self.cross_attn.weights(self.ln_2(self.exchange(q, text)), context)


@register("qformer")
class QFormerBridge(nn.Module):

    def __init__(self, config):
        super().__init__()
        W = config.qformer_width
        if W % config.qformer_heads:
            raise ValueError(f"qformer_heads {config.qformer_heads} does not divide qformer_width {W}")
        self.input = VisualInput(config, W)
        self.queries = nn.Parameter(torch.randn(config.queries, W) * config.query_std)  # (Q, W)
        self.layers = nn.ModuleList([QFormerLayer(W, config.qformer_heads)
                                     for _ in range(config.qformer_layers)])
        self.ln_f = nn.LayerNorm(W)
        # The read-out into the GPT. Per query (BLIP-2's): query i -> prefix slot i through one shared Linear,
        # so the LM can only tell the queries apart if they have specialised. Whole (--prefix-len k): every
        # slot reads every query's output, so a slot can be "the first object's colour" however the queries
        # split the work.
        self.k = config.prefix_len
        self.proj = (nn.Linear(config.queries * W, self.k * config.n_embd) if self.k
                     else nn.Linear(W, config.n_embd))
        # instruction-aware (--qformer-instruction): the question's token embeddings, from the frozen LM,
        # mapped to the Q-Former's width, join every layer's self-attention
        self.reads_prompt = config.qformer_instruction
        self.text = nn.Sequential(nn.LayerNorm(config.n_embd), nn.Linear(config.n_embd, W)) \
            if self.reads_prompt else None

    def read(self, prompt):
        """The question as the layers read it: ((B, m, W), mask (B, m)), or None (no question, or a plain
        Q-Former)."""
        if prompt is None or self.text is None:
            return None
        embeddings, real = prompt
        return self.text(embeddings), real

    def read_image(self, visual, text=None):
        """The queries' outputs (B, Q, W) once they have read the image (and text: ((B, m, W), mask (B, m)),
        joining their self-attention; BLIP-2's first stage reads a caption this way, qformer_stage1.py)."""
        context = self.input(visual)  # (B, S, W)
        q = self.queries.expand(visual.size(0), -1, -1)  # (B, Q, W)
        for layer in self.layers:
            q = layer(q, context, text)
        return self.ln_f(q)

    def forward(self, visual, prompt=None):
        q = self.read_image(visual, self.read(prompt))  # (B, Q, W)
        if self.k:
            prefix = self.proj(q.flatten(1)).view(q.size(0), self.k, -1)  # (B, k, C)
        else:
            prefix = self.proj(q)  # (B, Q, C): Q word-like embeddings, whatever the number of patches
        return prefix, None

    def attention_maps(self, visual, prompt=None):
        """The last layer's cross-attention weights (B, nh, Q, S): where each query looks in the image."""
        context = self.input(visual)
        q = self.queries.expand(visual.size(0), -1, -1)
        text = self.read(prompt)
        for layer in self.layers[:-1]:
            q = layer(q, context, text)
        return self.layers[-1].read_weights(q, context, text)


# -----------------------------------------------------------------------------
# Building blocks: attention from queries to a context (no causal mask: every query may see every token)


class Attention(nn.Module):

    def __init__(self, dim, n_head, context_dim=None):
        super().__init__()
        assert dim % n_head == 0
        self.n_head = n_head
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context):
        """Keys and values of a context (B, S, C_ctx) -> 2 x (B, nh, S, hs). An image's are computed once."""
        B, S, _ = context.shape
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, S, C)
        return [t.view(B, S, self.n_head, -1).transpose(1, 2) for t in (k, v)]  # 2 x (B, nh, S, hs)

    def forward(self, x, context=None, kv=None, mask=None):
        """mask: None, or (B, 1, 1, S) True where a context token may be read."""
        B, T, C = x.shape
        k, v = kv if kv is not None else self.keys_values(context)
        q = self.q(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def weights(self, x, context):
        """The attention weights (B, nh, T, S), written out: for pictures of where each query looks."""
        B, T, _ = x.shape
        k, _ = self.keys_values(context)
        q = self.q(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).softmax(dim=-1)  # (B, nh, T, S)


class VisualInput(nn.Module):
    """Normalise the encoder's tokens (config: a BridgeConfig), map them to width dim, tell them apart by
    position."""

    def __init__(self, config, dim):
        super().__init__()
        # CLIP's hidden states have a few very large channels; tame them
        self.ln = nn.LayerNorm(config.vis_dim)
        self.proj = nn.Linear(config.vis_dim, dim)
        # Pooling keeps the grid order but attention is blind to order: without a position embedding the
        # bridge cannot tell "left" from "right". It starts at zero, or (--vis-pos-grid) at a 2-D sin-cos of
        # the grid, so that where a token sits is a direction from the first step instead of being learned
        # token by token.
        S = config.vis_tokens
        start = grid_sincos(*config.vis_grid, dim, S) if config.vis_pos_grid else torch.zeros(S, dim)
        self.pos = nn.Parameter(start) if config.vis_pos else None

    def forward(self, visual):
        check_tokens(visual, None if self.pos is None else self.pos.size(0))
        x = self.proj(self.ln(visual))  # (B, S, dim)
        if self.pos is not None:
            x = x + self.pos
        return x


def check_tokens(visual, expected):
    """Refuse visual (B, S, C_vis) unless S is the number of tokens a bridge has weights for (None: any)."""
    if expected is not None and visual.size(1) != expected:
        raise ValueError(f"bridge was built for {expected} visual tokens, got {visual.size(1)} "
                         "(a feature cache with another pooling?)")


def grid_sincos(rows, cols, dim, tokens):
    """
    (tokens, dim): token 0 (the class token) zeros, token 1 + r * cols + c the 2-D sin-cos code of patch
    (r, c): sin and cos of r and of c at dim / 4 frequencies each (MAE's fixed position embedding, on the
    pooled grid).
    """
    if tokens != 1 + rows * cols:
        raise ValueError(f"{tokens} visual tokens are not a class token + a {rows}x{cols} grid")
    d = dim // 4
    omega = 1.0 / 100 ** (torch.arange(d) / d)  # (d,) from 1 (neighbours differ) to ~1/100 (nearly linear)
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    r, c = r.flatten()[:, None] * omega, c.flatten()[:, None] * omega  # (rows * cols, d)
    out = torch.zeros(tokens, dim)
    out[1:, :4 * d] = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1)
    return out

# -----------------------------------------------------------------------------
# The captioner: a bridge joined to a frozen GPT


def standardize(visual, mean, std):
    """Visual tokens (B, S, C_vis) standardised per (token, channel) with the train set's mean and std."""
    return (visual - mean) / (std + 1e-6)


def caption_batch(token_lists, eot, complete=None, prompt=None):
    """
    Captions (lists of token ids) -> tokens (B, T) and targets (B, T) for Captioner.forward.
    Each row is the caption followed by <|endoftext|>; rows are padded with <|endoftext|> in `tokens`
    (any valid id would do: the causal mask keeps padding from affecting real positions) and with -100
    in `targets`, so padding carries no loss. complete[i] False marks a caption cut short (at a token limit):
    its <|endoftext|> is no target, or the model would learn to stop mid-sentence. prompt[i] > 0: row i's
    first prompt[i] tokens are a question, read but not predicted (-100), and the rest is its answer.
    """
    T = max(len(t) for t in token_lists) + 1
    tokens = torch.full((len(token_lists), T), eot, dtype=torch.long)
    targets = torch.full((len(token_lists), T), -100, dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        ends = complete is None or complete[i]
        start = 0 if prompt is None else prompt[i]
        targets[i, start:len(t) + ends] = tokens[i, start:len(t) + ends]
    return tokens, targets


class Captioner(nn.Module):

    def __init__(self, lm, bridge, eot, unfreeze_last=0, visual_stats=None, n_vocab=None):
        super().__init__()
        self.lm = lm
        self.bridge = bridge
        self.eot = eot
        # the tokenizer's size: captions never hold ids of a padded vocabulary's extra rows
        self.n_vocab = n_vocab
        # Optional per-(token, channel) standardisation of the encoder's tokens with the TRAINING set's mean
        # and std (a random ViT's features have very uneven scales); kept here so that every caller applies
        # the same.
        if visual_stats is not None:
            self.register_buffer("visual_mean", torch.as_tensor(visual_stats["mean"], dtype=torch.float32))
            self.register_buffer("visual_std", torch.as_tensor(visual_stats["std"], dtype=torch.float32))
        self.standardize = visual_stats is not None
        # Freeze once, here: no gradient and no optimizer state for the LM, except its last
        # `unfreeze_last` blocks when asked (progressive unfreezing).
        blocks = lm.transformer.h
        if not 0 <= unfreeze_last <= len(blocks):
            raise ValueError(f"unfreeze_last {unfreeze_last}: the LM has {len(blocks)} blocks")
        for p in lm.parameters():
            p.requires_grad_(False)
        for block in blocks[len(blocks) - unfreeze_last:] if unfreeze_last else []:
            for p in block.parameters():
                p.requires_grad_(True)
        self.unfreeze_last = unfreeze_last
        self.lm.eval()

    def train(self, mode=True):
        super().train(mode)
        self.lm.eval()  # the frozen LM always runs as at inference
        return self

    def standardized(self, visual):
        """The visual tokens (B, S, C_vis) as the bridge sees them."""
        return standardize(visual, self.visual_mean, self.visual_std) if self.standardize else visual

    def condition(self, visual, prompt=None, prompt_len=None):
        """
        visual (B, S, C_vis) -> the GPT's prefix (B, 1 + P, C) and cross-attention callables (or None).
        A bridge that reads the question (reads_prompt) also gets prompt (B, m) token ids, their first
        prompt_len (B,) real (None: all m); the others never see it.
        """
        if getattr(self.bridge, "reads_prompt", False) and prompt is not None:
            prefix, cross = self.bridge(self.standardized(visual), self.prompt_embeddings(prompt, prompt_len))
        else:
            prefix, cross = self.bridge(self.standardized(visual))
        B = visual.size(0)
        start = self.lm.transformer.wte.weight[self.eot].expand(B, 1, -1)  # (B, 1, C): <|endoftext|>
        prefix = start if prefix is None else torch.cat([start, prefix.to(start.dtype)], dim=1)
        return prefix, cross

    def prompt_embeddings(self, prompt, prompt_len=None):
        """The question as the frozen LM embeds it, (B, m, C) with its positions, and the mask (B, m) of its
        real tokens."""
        m = prompt.size(1)
        positions = torch.arange(m, device=prompt.device)
        embeddings = self.lm.transformer.wte(prompt) + self.lm.transformer.wpe(positions)  # (B, m, C)
        if prompt_len is None:
            return embeddings, torch.ones(prompt.shape, dtype=torch.bool, device=prompt.device)
        return embeddings, positions[None, :] < prompt_len[:, None]

    def forward(self, visual, tokens, targets=None, prompt_len=None):
        """
        visual (B, S, C_vis); tokens, targets (B, T) from caption_batch; prompt_len (B,): how many of a row's
        tokens are a question (a bridge that reads the question sees them; None: none are).
        With targets: (None, the mean loss over caption tokens); the LM computes logits only from the last
        prefix position on.
        Without: (logits over the text positions (B, T, V), None), row t predicting tokens[:, t].
        """
        prefix, cross = self.condition(visual, tokens if prompt_len is not None else None, prompt_len)
        L = prefix.size(1)
        # The logits at position j predict the token at j + 1: the last prefix position predicts the first
        # caption token, and the caption's own positions predict the rest and the final <|endoftext|>. So
        # targets[:, t] belongs to position L - 1 + t, and L is the bridge's fixed prefix length: where the
        # loss can be is known before any caption is read.
        if targets is not None:
            return self.lm(tokens, targets=targets, prefix=prefix, cross=cross, targets_from=L - 1)
        logits, _ = self.lm(tokens, prefix=prefix, cross=cross)
        return logits[:, L - 1:-1], None  # (B, T, V)

    @torch.no_grad()
    def generate(self, visual, max_new_tokens=30, temperature=0.0, top_k=None, top_p=None, generator=None,
                 prompt=None):
        """
        Caption token lists for a batch of images, through the GPT's KV-cache generate (greedy by default).
        prompt (B, m): the same number of prompt tokens per row (a question), read before the new tokens.
        """
        prefix, cross = self.condition(visual, prompt)  # once per image (and question)
        if prompt is None:
            prompt = torch.zeros(visual.size(0), 0, dtype=torch.long, device=visual.device)  # (B, 0): no text
        out = self.lm.generate(prompt, max_new_tokens, temperature, top_k, top_p, prefix=prefix, cross=cross,
                               eot=self.eot, generator=generator, n_vocab=self.n_vocab)
        captions = []
        for row in out[:, prompt.size(1):].tolist():  # the new tokens only
            captions.append(row[:row.index(self.eot)] if self.eot in row else row)
        return captions

    def param_counts(self):
        """Total and trainable parameters per part (the encoder is counted by whoever holds it)."""
        parts = {"bridge": count_params(self.bridge), "lm": count_params(self.lm)}
        return {name: {"total": t, "trainable": n} for name, (t, n) in parts.items()}

    def trainable_state(self):
        """What a checkpoint must hold: the bridge, and the LM blocks that were unfrozen (if any)."""
        state = {"bridge": self.bridge.state_dict()}
        if self.unfreeze_last:
            n = len(self.lm.transformer.h)
            state["lm_blocks"] = {str(i): self.lm.transformer.h[i].state_dict()
                                  for i in range(n - self.unfreeze_last, n)}
        return state

    def load_trainable_state(self, state):
        self.bridge.load_state_dict(state["bridge"])
        for i, block_state in state.get("lm_blocks", {}).items():
            self.lm.transformer.h[int(i)].load_state_dict(block_state)

# -----------------------------------------------------------------------------
# The bridges' configuration: one dataclass for all of them, stored in every checkpoint


def flag(default, help, minimum=None):
    """A BridgeConfig field that train_caption.py offers as a command-line flag (--field-name)."""
    return field(default=default, metadata=dict(help=help, minimum=minimum))


@dataclass
class BridgeConfig:
    # what the data and the LM decide (filled in by build_captioner)
    kind: str = "qformer"       # a name in BRIDGES
    vis_dim: int = 1024         # width of the encoder's tokens (CLIP ViT-L/14: 1024)
    vis_tokens: int = 33        # visual tokens per image (CLS + 32 pooled patches)
    vis_grid: tuple = None      # (rows, cols) of the patch tokens (clip_loader.VisualFeatures.grid)
    n_embd: int = 768           # the GPT's width
    n_layer: int = 12           # the GPT's depth
    # the bridges' own hyper-parameters, each a flag of train_caption.py
    vis_pos: bool = flag(True, "learned position embedding of the visual tokens inside the bridge")
    vis_pos_grid: bool = flag(False, "start that embedding as a fixed 2-D sin-cos of the patch grid, "
                                     "not at zero")
    prefix_len: int = flag(0, "linear: map the whole image (all visual tokens at once) to this many prefix "
                              "embeddings (0: one embedding per visual token); Q-Former: map all the "
                              "queries' outputs at once to this many (0: one embedding per query)", minimum=0)
    zero_init: bool = flag(False, "linear (whole image): start the map (weights and bias) at zero")
    xattn_every: int = flag(1, "cross-attention: a gated layer in every k-th GPT block", minimum=1)
    xattn_heads: int = flag(0, "cross-attention heads (0: as many as the GPT has)", minimum=0)
    queries: int = flag(32, "Q-Former: learnable queries (= prefix length)", minimum=1)
    query_std: float = flag(0.02, "Q-Former: the std of the queries' initial values (BLIP-2's: 0.02)")
    # sizes of Laurent, Lenain and Mebille's Q-Former
    qformer_layers: int = flag(2, "Q-Former: layers", minimum=1)
    qformer_width: int = flag(768, "Q-Former: width", minimum=1)
    qformer_heads: int = flag(12, "Q-Former: attention heads (must divide --qformer-width)", minimum=1)
    qformer_instruction: bool = flag(False, "Q-Former: the question's tokens join the queries' self-"
                                            "attention, so the queries read what is asked (InstructBLIP)")

# -----------------------------------------------------------------------------
# Building a captioner: from flags, from a checkpoint


def build_captioner(lm, eot, kind, vis_dim, vis_tokens, unfreeze_last=0, visual_stats=None, vis_grid=None,
                    **overrides):
    """A captioner with a fresh bridge of the given kind, sized to the LM and the visual tokens (a class
    token + a vis_grid of pooled patches)."""
    if kind not in BRIDGES:
        raise ValueError(f"unknown bridge {kind!r}; choose one of {sorted(BRIDGES)}")
    config = BridgeConfig(kind=kind, vis_dim=vis_dim, vis_tokens=vis_tokens,
                          vis_grid=vis_grid and tuple(vis_grid), n_embd=lm.config.n_embd,
                          n_layer=lm.config.n_layer, **overrides)
    if not config.xattn_heads:  # 0: as many heads as the GPT's own attention
        config = dataclasses.replace(config, xattn_heads=lm.config.n_head)
    return Captioner(lm, BRIDGES[kind](config), eot, unfreeze_last, visual_stats), config


def captioner_from_config(lm, eot, config, unfreeze_last=0, visual_stats=None, n_vocab=None):
    """Rebuild a captioner from a checkpoint's bridge config (a dict), checking it fits this LM."""
    config = BridgeConfig(**config)
    if config.kind not in BRIDGES:
        raise ValueError(f"this checkpoint's bridge {config.kind!r} is not one of {sorted(BRIDGES)}: "
                         f"register it (bridges.register) before loading")
    if (config.n_embd, config.n_layer) != (lm.config.n_embd, lm.config.n_layer):
        raise ValueError(f"bridge was trained for a GPT of width {config.n_embd} and depth {config.n_layer}, "
                         f"this LM has {lm.config.n_embd} and {lm.config.n_layer}")
    return Captioner(lm, BRIDGES[config.kind](config), eot, unfreeze_last, visual_stats, n_vocab), config


def load_captioner(path, lm=None, device="cpu"):
    """
    A captioner from a train_caption.py checkpoint, ready for inference: (captioner, tokenizer, checkpoint).
    The frozen LM is loaded from the identity the checkpoint records (lm: another path to the same LM, if it
    moved) and must be the very LM the bridge was trained on: its weights' fingerprint is checked.
    """
    ckpt = load_checkpoint(path, "caption checkpoint", mmap=True)  # tensors and plain data, never code
    if not isinstance(ckpt, dict) or ckpt.get("trainer") != "train_caption.py":
        raise ValueError(f"{path} is not a train_caption.py checkpoint")
    model, tokenizer = load_lm(lm or ckpt["lm"]["name"])
    if lm_fingerprint(model) != ckpt["lm"]["fingerprint"]:
        raise ValueError(f"{path}: the LM {lm or ckpt['lm']['name']!r} is not the one this bridge was "
                         "trained on (its weights differ); pass --lm with the right checkpoint")
    captioner, _ = captioner_from_config(model, tokenizer.eot_token, ckpt["bridge_config"],
                                         ckpt["unfreeze_last"], ckpt.get("visual_stats"), tokenizer.n_vocab)
    captioner.load_trainable_state(ckpt["trainable"])
    return captioner.to(device).eval(), tokenizer, ckpt


def lm_fingerprint(lm):
    """sha256 of the LM's weights, as stored: a bridge only makes sense on top of the exact LM it was
    trained on."""
    h = hashlib.sha256()
    for name, tensor in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



def count_params(module):
    """(total, trainable) parameter counts of a module."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable
