"""
Can the frozen LM answer a question from a description in its context? A prefix bridge only puts the image
where the LM expects text: if the LM cannot answer from a caption of the scene, it cannot answer from a prefix
that stands in for one either. This asks every question of a world's split twice, greedily, with VQAv2's
accuracy: after one reference caption of its image ("<caption>.\\nQuestion: ... Answer:", corpus_qa.jsonl's
layout), and alone (the LM's prior for that wording).

    python -m miniature.qa_probe --lm runs/demo/lm-qa/ckpt_001500.pt --root data/shapes
"""
import argparse

import torch

from data import coco
from evaluate import answer_of
from gpt2 import load_lm
from metrics import score_vqa


@torch.no_grad()
def answers(lm, tokenizer, questions, context, batch_size=256):
    """{question_id: answer} for each question after context[image_id] (a string, maybe empty): greedy,
    batches of one prompt length, as evaluate.py answers."""
    by_length = {}
    for q in questions:
        text = context[q["image_id"]] + coco.qa_prompt(q["question"])
        tokens = [tokenizer.eot_token] + tokenizer.encode_ordinary(text)  # a new document, as in pretraining
        by_length.setdefault(len(tokens), []).append((q, tokens))
    found = {}
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.tensor([tokens for _, tokens in chunk])  # (B, T)
            out = lm.generate(x, 4, temperature=0.0, eot=tokenizer.eot_token, n_vocab=tokenizer.n_vocab)
            for (q, _), row in zip(chunk, out[:, x.size(1):].tolist()):
                row = row[:row.index(tokenizer.eot_token)] if tokenizer.eot_token in row else row
                found[q["question_id"]] = answer_of(tokenizer.decode(row))
    return found


def probe(lm_path, root, split="val"):
    """{"caption": score_vqa's result, "question alone": ...} for the questions of a world's split."""
    lm, tokenizer = load_lm(lm_path)
    lm.eval()
    questions = coco.question_records(f"{root}/annotations/v2_OpenEnded_shapes_{split}_questions.json", None,
                                      root, split)
    captions = {r["image_id"]: r["captions"][0] for r in coco.load_records(root, split)}
    contexts = {"caption": {i: c + ".\n" for i, c in captions.items()},
                "question alone": {i: "" for i in captions}}
    return {name: score_vqa(answers(lm, tokenizer, questions, context), questions)
            for name, context in contexts.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", required=True, help="a train_lm.py checkpoint (the miniature's LM)")
    parser.add_argument("--root", default="data/shapes",
                        help="a world with its questions (data/shapes.py --questions)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    for name, s in probe(args.lm, args.root, args.split).items():
        types = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in s["per_answer_type"].items())
        print(f"{name:>15}: VQA {s['accuracy']:.3f} ({types})")
