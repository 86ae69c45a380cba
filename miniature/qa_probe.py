"""
Can the frozen LM answer a question from a description in its context? A prefix bridge only puts the image
where the LM expects text: if the LM cannot answer from a caption of the scene, it cannot answer from a prefix
that stands in for one either. This asks every question of a world's split twice, greedily, with VQAv2's
accuracy: after one reference caption of its image ("<caption>.\\nQuestion: ... Answer:", corpus_qa.jsonl's
layout), and alone (the LM's prior for that wording).

    python -m miniature.qa_probe --lm runs/demo/lm-qa/ckpt_001500.pt --root data/shapes
"""
import argparse

from bridges import Captioner
from data import coco
from evaluate import NoImage, answer_questions, vqa_row
from gpt2 import load_lm


def answers(lm, tokenizer, questions, context, batch_size=256):
    """{question_id: answer} for each question after context[image_id] (a string, maybe empty), answered as
    evaluate.py answers: the LM alone (the blind captioner: a new document after <|endoftext|>), greedy."""
    lm_alone = Captioner(lm, NoImage(), tokenizer.eot_token, n_vocab=tokenizer.n_vocab).eval()
    return answer_questions(lm_alone, tokenizer, questions, None, batch_size, "fp32", before=context)[0]


def probe_lm(lm, tokenizer, root, questions_json, split="val"):
    """{"caption": evaluate.vqa_row's scores (VQA, per answer type, per question type), "question alone": ...}
    for the questions of a world's split."""
    questions = coco.question_records(questions_json, None, root, split)
    captions = {r["image_id"]: r["captions"][0] for r in coco.load_records(root, split)}
    contexts = {"caption": {i: coco.context_of(c) for i, c in captions.items()},
                "question alone": {i: "" for i in captions}}
    return {name: vqa_row(answers(lm, tokenizer, questions, context), questions)
            for name, context in contexts.items()}


def summary(scores):
    """probe_lm's scores, two lines each: '  caption: VQA 0.756 (number 0.838, other 0.750, yes/no 0.718)',
    then per question type: '  how many 0.838, is the 0.490, ...'."""
    return "\n".join(f"{name:>15}: VQA {s['VQA']:.3f} ("
                     + ", ".join(f"{t} {v:.3f}" for t, v in s["VQA_types"].items()) + ")\n" + " " * 17
                     + ", ".join(f"{t} {v:.3f}" for t, v in s["VQA_question_types"].items())
                     for name, s in scores.items())


def probe(lm_path, root, split="val"):
    lm, tokenizer = load_lm(lm_path)
    questions = f"{root}/annotations/v2_OpenEnded_shapes_{split}_questions.json"
    return probe_lm(lm, tokenizer, root, questions, split)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", required=True, help="a train_lm.py checkpoint (the miniature's LM)")
    parser.add_argument("--root", default="data/shapes",
                        help="a world with its questions (data/shapes.py --questions)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    print(summary(probe(args.lm, args.root, args.split)))
