"""
Answer tuning: teach the LM to answer a question from a description in its context, before it is frozen.

    python tune_lm.py --lm runs/demo/lm-qa/ckpt_001500.pt --coco-root data/shapes --out-dir runs/lm-tuned \\
        --questions data/shapes/annotations/v2_OpenEnded_shapes_train_questions.json
    # then every bridge trains on the tuned LM, frozen as before
    python train_caption.py --lm runs/lm-tuned/ckpt_final.pt --task mix ...

A prefix bridge puts the image where the frozen LM expects text, so it can answer no better than the LM
answers from a caption put there instead. BLIP-2's best VQA runs freeze FlanT5, an LM instruction-tuned to
answer; the miniature's LM, pretrained on captions and a few answered questions, learns to copy captions but
answers little better with the scene described than without (docs/miniature.md). This tunes it on the train
split's questions, each after two of its image's captions, with the loss on the captions and the answer, not
on the question:

    <|endoftext|> a small red circle on the left and a large blue square on the right.\\n
    a small red circle is left of a large blue square.\\nQuestion: what shape is on the right? Answer: square
    <|endoftext|>        (the loss: on the captions, and on " square <|endoftext|>")

It sees text only: the captions stand in for the images the bridges will read. Writes to --out-dir: log.jsonl,
ckpt_<step>.pt and ckpt_final.pt, a checkpoint gpt2.load_lm reads as it reads train_lm.py's, with the VQA
accuracy of the tuned LM on the val questions (after a caption, and alone) when --val-questions is given.
"""
import argparse
import dataclasses
import time

import numpy as np
import torch

from checkpoints import RunFolder, rng_state
from common import UsageError, autocast, natural_int, nonneg_float, positive_float, positive_int
from data import coco
from gpt2 import decay_groups, load_lm
from train_utils import add_run_flags, check_finite, enable_speedups, format_eta, launch, lr_at, print0

TRAINER = "tune_lm.py"


def examples(questions, records, tokenizer):
    """
    [(described, asked, answer, image_id)] for each question: token lists of every caption of its image (each
    on a line of its own: coco.context_of), "Question: ... Answer:", and " red" then <|endoftext|>. A question
    the LM cannot spell (a word outside a --vocab-subset LM's vocabulary) is left out, counted and named.
    """
    captions = {r["image_id"]: r["captions"] for r in records}
    absent = [q for q in questions if not captions.get(q["image_id"])]
    if absent:
        raise UsageError(f"{len(absent)} of {len(questions)} questions are about images with no caption in "
                         f"--coco-root's train split (e.g. question {absent[0]['question_id']}, image "
                         f"{absent[0]['image_id']}): pass the questions of that split")
    rows, left_out = [], []
    for q in questions:
        try:
            described = [tokenizer.encode_ordinary(coco.context_of(c)) for c in captions[q["image_id"]]]
            asked = tokenizer.encode_ordinary(coco.qa_prompt(q["question"]))
            answer = tokenizer.encode_ordinary(" " + coco.most_common_answer(q["answers"]))
        except ValueError as e:  # SubsetTokenizer: a word this LM never saw
            left_out.append(f"question {q['question_id']} ({e})")
            continue
        rows.append((described, asked, answer + [tokenizer.eot_token], q["image_id"]))
    if left_out:
        print0(f"note: {len(left_out)} of {len(questions)} questions left out, e.g. {left_out[0]}")
    if not rows:
        raise UsageError("no question could be put to this LM: is it one whose corpus held them?")
    return rows


def batch(examples, rng, B, eot, described=2, asked=1, same_image=None, newline=None):
    """
    B random rows "<|endoftext|> caption caption Question: ... Answer: answer <|endoftext|>", with `described`
    different captions of the image: x (B, T) padded with <|endoftext|>, y (B, T) each position's next token,
    or -100 (no loss) under the question and the padding. The loss covers the answer, and the captions too: a
    run on answers alone made the LM forget how to describe (docs/miniature.md), which the captioning bridges
    need. Not the question: it is asked, not said. With asked > 1, each row's question is followed by up to
    asked - 1 more about the same image, each answered, ended by a newline (the token `newline`; the last by
    <|endoftext|>): more answers learned from one reading of the captions. same_image: siblings(examples).
    """
    if asked > 1 and same_image is None:
        same_image = siblings(examples)
    rows = []
    for i in rng.integers(len(examples), size=B):
        captions, *_, image = examples[i]
        picked = rng.choice(len(captions), size=min(described, len(captions)), replace=False)
        context = [eot] + [t for j in picked for t in captions[j]]
        tokens, targets = list(context), context[1:]  # targets: those of tokens[:-1]
        others = [j for j in same_image[image] if j != i] if same_image else []
        more = rng.choice(others, size=min(asked - 1, len(others)), replace=False) if others else []
        for n, k in enumerate([i, *more]):
            _, question, answer, _ = examples[k]
            answer = answer if n == len(more) else answer[:-1] + [newline]
            tokens += question + answer
            targets += [-100] * len(question) + answer
        rows.append((tokens, targets))
    T = max(len(tokens) for tokens, _ in rows) - 1
    x = torch.full((B, T), eot)
    y = torch.full((B, T), -100)
    for r, (tokens, targets) in enumerate(rows):
        x[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        y[r, :len(tokens) - 1] = torch.tensor(targets)
    return x, y


def siblings(examples):
    """{image_id: [indices of its questions in examples]}"""
    groups = {}
    for i, (*_, image) in enumerate(examples):
        groups.setdefault(image, []).append(i)
    return groups


def train(args, dist):
    if dist.world_size > 1:
        raise UsageError("tune_lm.py runs in one process (the tuning is short): run it with python, "
                         "not torchrun")
    enable_speedups(dist.device_type)
    run = RunFolder(args, dist, TRAINER)
    model, tokenizer = load_lm(args.lm, dist.device)
    questions = coco.question_records(args.questions, args.answers, args.coco_root, "train")
    rows = examples(questions, coco.load_records(args.coco_root, "train"), tokenizer)
    same_image, newline = siblings(rows), tokenizer.encode_ordinary("\n")[0]  # (for --asked)
    optimizer = torch.optim.AdamW(decay_groups(list(model.parameters()), args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95), **({"fused": True} if args.fused else {}))
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    ckpt = run.resume(optimizer, args)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    start = ckpt["step"] if ckpt else 0
    run.start_log(start, {"args": vars(args), "questions": len(rows)}, dist.device)
    print0(f"answer tuning {args.lm}: {len(rows):,} questions, {args.max_steps} steps of "
           f"{args.batch_size}")

    def state(step, **extra):  # what gpt2.load_lm reads, and what resumes the tuning
        return {"trainer": TRAINER, "model": model.state_dict(), "config": dataclasses.asdict(model.config),
                "vocab": getattr(tokenizer, "ids", None), "tuned_from": args.lm,
                "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(), "args": vars(args),
                **extra}

    model.train()
    t0 = time.time()
    for step in range(start, args.max_steps):
        rng = np.random.default_rng([args.seed, step])  # the step's own batch: a resumed run sees the same
        x, y = batch(rows, rng, args.batch_size, tokenizer.eot_token, asked=args.asked,
                     same_image=same_image, newline=newline)
        lr = lr_at(step, args.max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(dist.device_type, args.dtype):
            _, loss = forward(x.to(dist.device), y.to(dist.device))
        check_finite(loss.detach(), step, run.last)  # before the step: a NaN never reaches the weights
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        check_finite(norm, step, run.last)  # an inf gradient would put inf into every weight
        optimizer.step()
        run.log(step=step, loss=loss.item(), lr=lr, grad_norm=norm.item())
        if step % args.log_every == 0 or step == args.max_steps - 1:
            eta = (time.time() - t0) / (step + 1 - start) * (args.max_steps - step - 1)
            print0(f"step {step:5d}/{args.max_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                   f"eta {format_eta(eta)}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.max_steps:
            run.save(f"ckpt_{step + 1:06d}.pt", state(step + 1), list(model.parameters()))
    quality = probe(model, tokenizer, args) if args.val_questions else None
    run.save("ckpt_final.pt", state(args.max_steps, quality=quality), list(model.parameters()))
    run.finish(step=args.max_steps, quality=quality)
    print0(f"saved {args.out_dir}/ckpt_final.pt")


def probe(model, tokenizer, args):
    """The tuned LM's VQA accuracy on --val-questions, after one caption of the image and with the question
    alone (miniature/qa_probe.py's measure)."""
    from miniature.qa_probe import probe_lm, summary  # evaluate.py's answering: imported only when used
    model.eval()
    scores = probe_lm(model, tokenizer, args.coco_root, args.val_questions, "val")
    print0(summary(scores))
    return {name: {"VQA": s["VQA"], "types": s["VQA_types"], "question_types": s["VQA_question_types"]}
            for name, s in scores.items()}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", required=True, help="the LM to tune: a train_lm.py checkpoint, or gpt2 (OpenAI's)")
    p.add_argument("--coco-root", required=True,
                   help="a COCO-format root: its train captions are the contexts")
    p.add_argument("--questions", required=True, help="the train split's questions (VQAv2's layout)")
    p.add_argument("--answers", default=None, help="their annotations (default: found by VQAv2's naming)")
    p.add_argument("--val-questions", default=None,
                   help="the val split's questions: the tuned LM's VQA accuracy on them, measured at the end")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--max-steps", type=positive_int, default=2000)
    p.add_argument("-B", "--batch-size", type=positive_int, default=64, help="questions per step")
    p.add_argument("--asked", type=positive_int, default=1,
                   help="questions per row: each after the captions and the answers before it")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="max learning rate (cosine to 10%%)")
    p.add_argument("--warmup-steps", type=positive_int, default=30)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--ckpt-every", type=natural_int, default=500, help="0: only the final checkpoint")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    add_run_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    launch(train, get_args(argv))


if __name__ == "__main__":
    main()
