"""
How well a miniature LM copies a scene from its context: the ability the prefix bridges lean on.

For every val image of the miniature, the LM reads <|endoftext|> + one reference caption + "." (as in its
corpus documents, where several captions of one scene follow each other) and writes the next sentence, greedy.
That sentence is scored against the image's OTHER four references (CIDEr-D) and its scene (per-attribute
accuracy): an LM that copies the scene scores like a reference, one that ignores its context scores like the
blind baseline, printed first (nothing in context), scored against the same four references.

    python bench/bench_lm_copying.py runs/demo/lm/ckpt_000500.pt runs/demo/lm/ckpt_001500.pt
        # after make demo
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.coco import load_records  # noqa: E402
from data.shapes import attribute_accuracy, read_scenes  # noqa: E402
from evaluate import first_sentence, score_captions  # noqa: E402
from gpt2 import load_lm  # noqa: E402


@torch.no_grad()
def continue_greedy(lm, tokenizer, context, max_new_tokens=30):
    """<|endoftext|> + context -> the first sentence of the LM's greedy continuation."""
    idx = torch.tensor([[tokenizer.eot_token] + tokenizer.encode_ordinary(context)])  # (1, T)
    new = lm.generate(idx, max_new_tokens, temperature=0.0, eot=tokenizer.eot_token)[0, idx.size(1):].tolist()
    new = new[:new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new
    return first_sentence(tokenizer.decode(new))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="train_lm.py checkpoints of the miniature's LM")
    parser.add_argument("--root", default="data/shapes", help="the miniature (data/shapes.py)")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    records = load_records(args.root, "val")[:args.images]
    scenes = read_scenes(args.root, "val")
    if scenes is None:
        sys.exit(f"{args.root} has no scenes_val.json: this bench needs the miniature (data/shapes.py)")
    in_context = {r["image_id"]: r["captions"][0] for r in records}
    # the one in context is not scored against
    references = {r["image_id"]: r["captions"][1:] for r in records}
    for path in args.checkpoints:
        lm, tokenizer = load_lm(path)
        lm.eval()
        blind = continue_greedy(lm, tokenizer, "")
        rows = {"blind (nothing in context)": {i: blind for i in references},
                "one reference in context": {i: continue_greedy(lm, tokenizer, in_context[i] + ".")
                                             for i in references}}
        print(f"{path}: {len(references)} val images")
        for name, captions in rows.items():
            cider = score_captions(captions, references, ("cider",))["CIDEr"]
            accuracy = attribute_accuracy(captions, scenes)
            print(f"  {name:28s} CIDEr-D {cider:.3f}  " +
                  "  ".join(f"{a} {v:.2f}" for a, v in accuracy.items()))
