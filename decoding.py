"""
Decoding: how a captioner turns an image into words, three ways, batched over images.

    greedy       take the likeliest token at every step (GPT.generate with temperature 0)
    sampling     draw each token from the softmax at a temperature, optionally cut to the top-p nucleus
                 (GPT.generate with a temperature; gpt2.sample_next does the drawing)
    beam search  keep the `beam` likeliest captions so far, extend each by every token, keep the best again

Every method conditions on the image once (captioner.condition: the prefix and the cross-attention keys and
values), then feeds one token per step to the LM, which keeps the keys and values of everything before in its
KV cache (gpt2.KVCache). Greedy and sampling are GPT.generate's; beam search, below, drives the same cache and
reorders it as beams are kept, dropped and copied. evaluate.py decodes with decode_batch.
"""
import math

import torch
from torch.nn import functional as F


@torch.no_grad()
def decode_batch(captioner, visual, method="beam", beam=3, max_new_tokens=30, length_penalty=1.0,
                 temperature=1.0, top_p=None, generator=None, prompt=None):
    """
    One batch of images (B, S, C_vis) -> B token lists, by greedy, beam search (beam 1 = greedy) or sampling.
    prompt (B, m): text every row reads first (a question; the same length in every row), or None.
    """
    if method == "greedy" or (method == "beam" and beam == 1):
        return captioner.generate(visual, max_new_tokens, temperature=0.0, prompt=prompt)
    if method == "beam":
        return beam_search(captioner, visual, beam, max_new_tokens, length_penalty, prompt)
    if method == "sample":
        return captioner.generate(visual, max_new_tokens, temperature=temperature, top_p=top_p,
                                  generator=generator, prompt=prompt)
    raise ValueError(f"unknown decoding method {method!r}: choose greedy, beam or sample")


def start_beams(captioner, visual, K, max_new_tokens, prompt=None):
    """
    All K beams of an image start from the same prefix: prefill it once per image, then give each beam a copy
    of its image's keys and values. Rows b*K .. b*K+K-1 are then image b's beams, and the cross-attention
    callables are made for that layout too (beams are only ever reshuffled within an image, never across).
    Returns (the KV cache, the cross-attention callables, the first token's log-probabilities (B*K, V)).
    """
    lm, B = captioner.lm, visual.size(0)
    prefix, cross = captioner.condition(visual, prompt)  # (B, L, C)
    empty = torch.zeros(B, 0, dtype=torch.long, device=visual.device)  # (B, 0): no text yet
    text = empty if prompt is None else prompt  # (B, m)
    cache = lm.new_cache(B, prefix.size(1) + text.size(1) + max_new_tokens)
    logits, _ = lm(text, prefix=prefix, cross=cross, cache=cache, last_only=True)  # (B, 1, V)
    per_beam = torch.arange(B, device=visual.device).repeat_interleave(K)  # (B*K,) the image of each beam
    cache.reorder(per_beam)
    # from here on beams are reshuffled within an image only: their prefixes stay put
    cache.shared = cache.pos
    if cross is not None:
        _, cross = captioner.condition(visual[per_beam], None if prompt is None else prompt[per_beam])
    return cache, cross, F.log_softmax(logits[per_beam, -1, :captioner.n_vocab].float(), dim=-1)


@torch.no_grad()
def beam_search(captioner, visual, beam=3, max_new_tokens=30, length_penalty=1.0, prompt=None):
    """
    Beam search for a batch of images: visual (B, S, C_vis) -> B captions (lists of token ids, without the
    final <|endoftext|>). All B * beam hypotheses advance together, one LM call per step. prompt (B, m):
    text read first (a question), as in decode_batch.

    A hypothesis ends when it emits <|endoftext|>; it is then scored by
        sum of its tokens' log-probabilities / length ** length_penalty   (length counts the <|endoftext|>)
    so length_penalty=0 ranks by total log-probability and 1 by the mean per token (longer captions are not
    punished for having more terms to sum). A hypothesis still running after max_new_tokens is scored the same
    way over its max_new_tokens tokens.

    Which ends count, and when to stop, follow the usual rule (Hugging Face's early_stopping=False): at each
    step the 2 * beam best continuations are ranked; an <|endoftext|> among the first `beam` of them is a
    finished hypothesis, and the best `beam` others are the next beams. An image is done when it holds `beam`
    finished hypotheses and none of its live beams scores better at its current length. With length_penalty=0
    that is exact (a live beam's total can only fall); beam=1 is exactly greedy decoding.
    """
    lm, eot, K, n_vocab = captioner.lm, captioner.eot, beam, captioner.n_vocab
    B = visual.size(0)
    cache, cross, logprobs = start_beams(captioner, visual, K, max_new_tokens, prompt)  # (B*K, V)
    V = logprobs.size(-1)

    # At the start all K beams of an image are the same empty caption: keep only the first alive, or the
    # first step would pick the same token K times.
    scores = torch.full((B, K), float("-inf"), device=visual.device)  # (B, K) total log-probability per beam
    scores[:, 0] = 0.0
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=visual.device)  # (B*K, t) captions so far
    finished = [[] for _ in range(B)]  # per image: (score, token list), best first, at most K
    done = [False] * B
    rows = torch.arange(B, device=visual.device)[:, None] * K  # (B, 1) first row of each image's beams

    def normalized(total, length):
        return total / length ** length_penalty

    for t in range(max_new_tokens):
        length = t + 1  # tokens in a hypothesis that ends (or stops) at this step
        candidates = (scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)  # (B, 2K), best first
        top_beam, top_token = top_index // V, top_index % V  # (B, 2K) which beam it extends, with which token
        is_eot = top_token == eot

        # finished hypotheses: <|endoftext|> among the first K candidates. Their scores and captions come to
        # the host in one transfer per step, not one per hypothesis (each is a GPU sync).
        hits = (is_eot[:, :K] & torch.isfinite(top_scores[:, :K])).nonzero()  # (E, 2): (image, rank)
        if len(hits):
            ended_rows = rows[hits[:, 0], 0] + top_beam[hits[:, 0], hits[:, 1]]  # (E,)
            ended = zip(hits[:, 0].tolist(), top_scores[hits[:, 0], hits[:, 1]].tolist(),
                        tokens[ended_rows].tolist())
            for b, score, caption in ended:
                if not done[b]:
                    finished[b] = sorted(finished[b] + [(normalized(score, length), caption)],
                                         key=lambda h: h[0], reverse=True)[:K]

        # the next beams: the best K candidates that do not end (a stable sort keeps their rank order; there
        # are always at least K, since each beam contributes at most one <|endoftext|> to the 2K)
        keep = torch.argsort(is_eot.to(torch.int8), dim=-1, stable=True)[:, :K]  # (B, K) positions in the 2K
        scores = top_scores.gather(1, keep)  # (B, K)
        source = (rows + top_beam.gather(1, keep)).view(-1)  # (B*K,) the row each new beam continues
        new_tokens = top_token.gather(1, keep).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[source], new_tokens[:, None]], dim=1)  # (B*K, t + 1)

        best_alive = scores[:, 0].tolist()  # scores are sorted: beam 0 is each image's best
        for b in range(B):
            if not done[b] and len(finished[b]) == K:
                done[b] = normalized(best_alive[b], length) <= finished[b][-1][0]
        if all(done) or t == max_new_tokens - 1:
            break
        cache.reorder(source)  # only when another step will read the cache
        logits, _ = lm(new_tokens[:, None], cross=cross, cache=cache)  # (B*K, 1, V): one position per beam
        logprobs = F.log_softmax(logits[:, -1, :n_vocab].float(), dim=-1)  # (B*K, V)

    # images still running at max_new_tokens: their live beams compete as they are
    captions, live_scores, live_tokens = [], scores.tolist(), tokens.tolist()
    for b in range(B):
        hypotheses = list(finished[b])
        if not done[b]:
            hypotheses += [(normalized(live_scores[b][k], len(live_tokens[b * K + k])),
                            live_tokens[b * K + k])
                           for k in range(K) if math.isfinite(live_scores[b][k])]
        captions.append(max(hypotheses, key=lambda h: h[0])[1])
    return captions
