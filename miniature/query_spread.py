"""
Why a Q-Former's queries collapse, as numbers: how far apart its queries are, layer by layer, against what
they share, on a set of images.

    python -m miniature.query_spread runs/demo/caption/qformer/ckpt_final.pt \
        --features runs/demo/features/none/val

For each layer it prints the norm of the part of the queries' states (B, Q, W) that all queries share (their
mean over Q) and of what tells them apart (their std over Q), after the layer's self-attention and after the
whole layer, averaged over the images; then evaluate.py's query similarity (1: every query reads the same
patches). A query whose differences are small against the shared part reaches the next LayerNorm as nearly the
same vector as every other query, and attends where they all attend.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python miniature/...`
from bridges import load_captioner  # noqa: E402
from data.feature_cache import FeatureCache  # noqa: E402
from evaluate import query_similarity  # noqa: E402


@torch.no_grad()
def spread(captioner, visual):
    """[(where, shared norm, differences norm)] through the Q-Former's layers, averaged over the images."""
    bridge = captioner.bridge
    context = bridge.input(captioner.standardized(visual))  # (B, S, W)
    q = bridge.queries.expand(len(visual), -1, -1)  # (B, Q, W)
    rows = [("queries", q)]
    for i, layer in enumerate(bridge.layers):
        rows.append((f"layer {i} self-attention", layer.exchange(q, None)))
        q = layer(q, context)
        rows.append((f"layer {i} out", q))
    return [(where, s.mean(1).norm(dim=-1).mean().item(), s.std(1).norm(dim=-1).mean().item())
            for where, s in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a train_caption.py checkpoint of a Q-Former")
    p.add_argument("--features", required=True, help="a feature cache of held-out images")
    p.add_argument("--images", type=int, default=100, help="the first N images of the cache")
    args = p.parse_args(argv)
    captioner, _, ckpt = load_captioner(args.checkpoint)
    if ckpt["bridge_config"]["kind"] != "qformer":
        p.error(f"{args.checkpoint} is a {ckpt['bridge_config']['kind']} bridge, not a Q-Former")
    cache = FeatureCache(args.features)
    ids = [int(i) for i in cache.image_ids[:args.images]]
    _, visual = cache.tokens(ids)
    print(f"{args.checkpoint}: {len(ids)} images of {args.features}")
    print(f"{'':26s} {'shared':>8s} {'differences':>12s}")
    for where, shared, differences in spread(captioner, visual):
        print(f"{where:26s} {shared:8.2f} {differences:12.2f}")
    print(f"query similarity {query_similarity(captioner, cache, ids, 'cpu'):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
