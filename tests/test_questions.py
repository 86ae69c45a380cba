"""
Visual question answering, the model side: the prompt layout (the question read, only the answer predicted),
prompted decoding (cached against uncached), train_caption.py on questions and on the mix, evaluate.py's
VQA column with its blind row and folder mode's --question, and tune_lm.py's answer tuning. The data and the
metric: test_shapes_questions.py, test_vqa.py; bad input: test_bad_inputs_vqa.py.
"""
from collections import Counter
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import bridges
import decoding
import evaluate
import train_caption
import tune_lm
from bridges import BRIDGES, build_captioner, caption_batch
from data import coco, feature_cache, shapes
from common import load_checkpoint
from gpt2 import GPT, GPTConfig, SubsetTokenizer, get_tokenizer, load_lm
from miniature import qa_probe
from metrics import score_vqa

ENCODER = "random-vit:tiny:seed0"
SMALL = dict(xattn_heads=2, queries=4, qformer_layers=2, qformer_width=32, qformer_heads=2)


def questions_file(root, split):
    return os.path.join(root, "annotations", f"v2_OpenEnded_shapes_{split}_questions.json")


@pytest.fixture
def world(questions_world):
    """make_world's world, built once for every module that imports this fixture (tests/conftest.py)."""
    return questions_world


def make_world(tmp):
    """A tiny world with its questions, feature caches of both splits, and an LM over corpus_qa.jsonl's
    vocabulary (train_lm.py's checkpoint format; a little pretraining on that corpus), in the folder tmp."""
    root = str(tmp / "shapes")
    shapes.generate(root, train=40, val=12, corpus_docs=300, seed=0, image_size=32)
    shapes.write_questions(root)
    shapes.write_qa_corpus(root)
    for split in ("train", "val"):
        feature_cache.build_feature_cache(coco.load_records(root, split), ENCODER, str(tmp / f"feat_{split}"),
                                          batch_size=16, num_workers=1)
    gpt2 = get_tokenizer()
    docs = [json.loads(line)["text"] for line in open(os.path.join(root, "corpus_qa.jsonl"))]
    tok = SubsetTokenizer({t for d in docs for t in gpt2.encode_ordinary(d)})
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=256, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    texts = [tok.encode_ordinary(d) for d in docs]
    tokens, targets = caption_batch(texts, tok.eot_token)
    x = torch.cat([torch.full((len(texts), 1), tok.eot_token), tokens], dim=1)  # <|endoftext|> document ...
    for step in range(150):  # enough that it answers from a description in its context, sometimes
        rows = torch.arange(step * 32, step * 32 + 32) % len(texts)  # 32 documents a step
        _, loss = lm(x[rows, :-1], targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": lm.state_dict(), "config": dataclasses.asdict(lm.config), "vocab": tok.ids},
               tmp / "lm.pt")
    return dict(root=root, train=str(tmp / "feat_train"), val=str(tmp / "feat_val"), lm=str(tmp / "lm.pt"),
                tok=tok, tmp=tmp)


def train_args(world, out_dir, task, bridge="linear", *extra):
    return ["--bridge", bridge, "--lm", world["lm"], "--coco-root", world["root"], "--task", task,
            "--questions", questions_file(world["root"], "train"), "--features", world["train"],
            "--val-features", world["val"], "--out-dir", str(out_dir), "-B", "16", "--total-batch", "16",
            "--warmup-steps", "2", "--lr", "3e-3", "--ckpt-every", "0", "--log-every", "5", "--device", "cpu",
            "--qformer-width", "32", "--qformer-heads", "2", "--queries", "4", *map(str, extra)]


def val_losses(out_dir):
    log = map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
    return [r["val_loss"] for r in log if "val_loss" in r]

# -----------------------------------------------------------------------------
# The layout and prompted decoding


def test_the_question_is_read_and_only_the_answer_predicted():
    tokens, targets = caption_batch([[5, 6, 7, 8], [9, 3]], eot=0, prompt=[3, 0])
    assert tokens.tolist() == [[5, 6, 7, 8, 0], [9, 3, 0, 0, 0]]
    # row 0: three prompt tokens, then its one-token answer and <|endoftext|>; row 1: a caption, all predicted
    assert targets.tolist() == [[-100, -100, -100, 8, 0], [9, 3, 0, -100, -100]]


KINDS = [(kind, False) for kind in BRIDGES] + [("qformer", True)]  # (bridge, instruction-aware)


def tiny_captioner(kind, seed=0, vocab=12, instruction=False):
    torch.manual_seed(seed)
    lm = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    captioner, _ = build_captioner(lm, 0, kind, 16, 5, **SMALL, **({"qformer_instruction": True}
                                                                   if instruction else {}))
    with torch.no_grad():  # a random LM that reads its input (std 0.1), and open cross-attention gates
        for name, p in captioner.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            if name.endswith("gate"):
                p.fill_(0.5)
    return captioner.eval()


@pytest.mark.parametrize("kind, instruction", KINDS)
def test_prompted_generation_equals_uncached_greedy(kind, instruction):
    # the KV-cache path with a prompt against the plainest reference: the whole sequence again at every step
    captioner = tiny_captioner(kind, instruction=instruction)
    visual, prompt = torch.randn(3, 5, 16), torch.randint(1, 12, (3, 4))  # (B, S, C_vis), (B, m)
    got = captioner.generate(visual, max_new_tokens=6, prompt=prompt)
    with torch.no_grad():
        for b in range(3):
            prefix, cross = captioner.condition(visual[b:b + 1], prompt[b:b + 1])
            text, expected = prompt[b:b + 1], []
            for _ in range(6):
                logits, _ = captioner.lm(text, prefix=prefix, cross=cross)
                token = int(logits[0, -1].argmax())
                if token == 0:
                    break
                expected.append(token)
                text = torch.cat([text, torch.tensor([[token]])], dim=1)
            assert got[b] == expected
    # beam search of width 1 reads the prompt the same way
    assert decoding.beam_search(captioner, visual, beam=1, max_new_tokens=6, prompt=prompt) == got


def test_the_instruction_aware_qformer_reads_the_question_and_only_the_question():
    captioner = tiny_captioner("qformer", instruction=True)
    visual = torch.randn(2, 5, 16)
    question, other = torch.tensor([[3, 4, 5]]).expand(2, -1), torch.tensor([[3, 4, 6]]).expand(2, -1)
    with torch.no_grad():
        asked, _ = captioner.condition(visual, question)
        assert not torch.allclose(asked, captioner.condition(visual, other)[0])  # the question matters
        # in a training batch the question is the first prompt_len tokens of a longer row: the answer and the
        # padding after it are masked out, and a caption (prompt_len 0) reads no text at all
        rows = torch.tensor([[3, 4, 5, 9, 0, 0], [7, 8, 9, 0, 0, 0]])
        padded, _ = captioner.condition(visual, rows, torch.tensor([3, 0]))
        torch.testing.assert_close(padded[:1], asked[:1])
        torch.testing.assert_close(padded[1:], captioner.condition(visual[1:])[0])
    # a plain Q-Former is never shown the question
    plain = tiny_captioner("qformer")
    with torch.no_grad():
        torch.testing.assert_close(plain.condition(visual, question)[0], plain.condition(visual)[0])


def test_an_answer_ends_at_its_first_sentence():
    assert evaluate.answer_of(" red. Question: what shape is on the left? Answer: circle.") == "red"
    assert evaluate.answer_of(" 1.5 \nQuestion") == "1.5"
    assert evaluate.answer_of(" yes") == "yes"

# -----------------------------------------------------------------------------
# Training on questions, on captions and questions at once


def test_training_on_questions_lowers_the_answer_loss(world, tmp_path):
    out = tmp_path / "q"
    val = questions_file(world["root"], "val")
    train_caption.main(train_args(world, out, "questions", "linear", "--max-steps", "120", "--lr", "1e-2",
                                  "--val-every", "60", "--val-questions", val))
    first, *_, last = val_losses(out)
    assert last < 0.6 * first, (first, last)  # on the answers of held-out questions


def test_the_instruction_aware_qformer_learns_from_the_question(world, tmp_path):
    out = tmp_path / "iq"
    train_caption.main(train_args(world, out, "questions", "qformer", "--max-steps", "60", "--lr", "1e-2",
                                  "--val-every", "30", "--qformer-instruction",
                                  "--val-questions", questions_file(world["root"], "val")))
    first, *_, last = val_losses(out)
    assert last < 0.6 * first, (first, last)
    ckpt = torch.load(out / "ckpt_final.pt", weights_only=True)
    assert ckpt["bridge_config"]["qformer_instruction"]
    start = build_captioner(GPT(GPTConfig(**ckpt["lm"]["config"])), 0, "qformer", 32, 5, prefix_len=0,
                            **SMALL, qformer_instruction=True)[0]  # the same shapes, freshly made
    trained = ckpt["trainable"]["bridge"]
    assert set(trained) == set(start.bridge.state_dict())  # the question's projection is saved too
    assert not torch.equal(trained["text.1.weight"], start.bridge.state_dict()["text.1.weight"])


def test_the_mix_holds_every_caption_and_every_question(world, tmp_path, capsys):
    train_caption.main(train_args(world, tmp_path / "mix", "mix", "qformer", "--max-steps", "2",
                                  "--val-every", "0"))
    captions = sum(len(r["captions"]) for r in coco.load_records(world["root"], "train"))
    questions = len(coco.question_records(questions_file(world["root"], "train"), None, world["root"],
                                          "train"))
    assert f"qformer bridge, mix: {captions + questions:,} pairs" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "mix" / "ckpt_final.pt", weights_only=True)
    assert ckpt["args"]["task"] == "mix" and len(ckpt["trained_on"]["image_ids"]) == 40
    # weighed: every question read three times an epoch, every caption once
    train_caption.main(train_args(world, tmp_path / "mix3", "mix", "qformer", "--max-steps", "1",
                                  "--val-every", "0", "--question-repeats", "3"))
    assert f"qformer bridge, mix: {captions + 3 * questions:,} pairs" in capsys.readouterr().out


def test_question_pairs_hold_the_prompt_then_the_humans_answer(world):
    cache = feature_cache.FeatureCache(world["train"])
    questions = coco.question_records(questions_file(world["root"], "train"), None, world["root"], "train")
    pairs, left_out = train_caption.question_pairs(questions, cache, world["tok"], 40, "q.json")
    assert len(pairs) == len(questions) and not left_out
    for (image_id, tokens, complete, m), q in zip(pairs, questions):
        assert image_id == q["image_id"] and complete
        assert world["tok"].decode(tokens[:m]) == f"Question: {q['question']} Answer:"
        assert world["tok"].decode(tokens[m:]) == f" {q['answers'][0]}"

# -----------------------------------------------------------------------------
# Evaluation: a VQA column, a blind row, answers for your own images


@pytest.fixture
def trained(questions_trained):
    """train_every_bridge's checkpoints, made once for every module that imports this (tests/conftest.py)."""
    return questions_trained


def train_every_bridge(world, runs):
    """Every bridge trained briefly on the mix, into the folder runs: their checkpoints."""
    paths = []
    for kind in BRIDGES:
        train_caption.main(train_args(world, runs / kind, "mix", kind, "--max-steps", "4",
                                      "--val-every", "0"))
        paths.append(str(runs / kind / "ckpt_final.pt"))
    return paths


def test_evaluate_scores_the_questions_with_a_blind_row(world, trained, tmp_path):
    out = str(tmp_path / "results")
    result = evaluate.main(["--checkpoints", *trained, "--coco-root", world["root"],
                            "--features", world["val"], "--questions", questions_file(world["root"], "val"),
                            "--out", out, "--max-new-tokens", "6", "--batch-size", "8", "--metrics", "bleu",
                            "--device", "cpu"])
    val = coco.question_records(questions_file(world["root"], "val"), None, world["root"], "val")
    rows = {row["bridge"]: row for row in result["rows"]}
    assert len(rows) == len(BRIDGES) + 1
    for name, row in rows.items():
        file = "answers_blind.json" if row.get("blind") else f"answers_{name}.json"
        answers = {int(i): a["answer"] for i, a in json.load(open(os.path.join(out, file))).items()}
        assert row["questions"] == len(val) == len(answers)  # every question answered, by every row
        assert row["VQA"] == pytest.approx(score_vqa(answers, val)["accuracy"])
        assert row["VQA_ci"][0] <= row["VQA"] <= row["VQA_ci"][1]
        # per question type: the mean of its questions' accuracies, every type of the world's questions
        assert set(row["VQA_question_types"]) == {q["question_type"] for q in val}
        kind = [q for q in val if q["question_type"] == "is there a"]
        assert row["VQA_question_types"]["is there a"] == pytest.approx(
            score_vqa({q["question_id"]: answers[q["question_id"]] for q in kind}, kind)["accuracy"])
    table = open(os.path.join(out, "table.md")).read()
    assert "VQA accuracy" in table and table.count("| blind (frozen LM of linear, no image) |") == 2


def test_each_image_is_read_once_per_batch_of_questions(world, trained, monkeypatch):
    cache = feature_cache.FeatureCache(world["val"])
    read, tokens = [], cache.tokens
    monkeypatch.setattr(cache, "tokens", lambda ids: read.append(list(ids)) or tokens(ids))
    questions = coco.question_records(questions_file(world["root"], "val"), None, world["root"], "val")
    captioner, tokenizer, _ = bridges.load_captioner(trained[0])
    answers, _ = evaluate.answer_questions(captioner, tokenizer, questions, cache, 64, "fp32")
    assert all(len(ids) == len(set(ids)) for ids in read)  # no image twice in a read
    assert sum(map(len, read)) < len(questions)
    # and each question is answered about its own image: as when it is asked alone
    alone, _ = evaluate.answer_questions(captioner, tokenizer, questions, cache, 1, "fp32")
    assert answers == alone


def test_evaluate_answers_a_question_about_your_own_images(world, trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for r in coco.load_records(world["root"], "val")[:2]:
        os.symlink(r["path"], folder / os.path.basename(r["path"]))
    result = evaluate.main(["--images", str(folder), "--checkpoint", trained[0], "--out", str(tmp_path / "o"),
                            "--question", "what color is the shape on the left?", "--device", "cpu",
                            "--max-new-tokens", "4"])
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and all(len(line.split("\t")) == 3 for line in lines)  # path, caption, answer
    saved = json.load(open(result["path"]))
    assert saved["question"] == "what color is the shape on the left?" and len(saved["answers"]) == 2


def test_the_lm_probe_asks_with_a_caption_and_without(world):
    scores = qa_probe.probe(world["lm"], world["root"])
    assert set(scores) == {"caption", "question alone"}
    questions = coco.question_records(questions_file(world["root"], "val"), None, world["root"], "val")
    assert all(0.0 <= s["VQA"] <= 1.0 and s["questions"] == len(questions) for s in scores.values())
    # per question type too: each type's share of the questions weighs its accuracy into the whole
    kinds = Counter(q["question_type"] for q in questions)
    for s in scores.values():
        assert set(s["VQA_question_types"]) == set(kinds)
        whole = sum(kinds[t] * v for t, v in s["VQA_question_types"].items()) / len(questions)
        assert whole == pytest.approx(s["VQA"])
    # alone, an answer depends on the question's words only: the same text, the same answer
    lm, tokenizer = load_lm(world["lm"])
    alone = qa_probe.answers(lm.eval(), tokenizer, questions, {q["image_id"]: "" for q in questions})
    by_text = {}
    for q in questions:
        by_text.setdefault(q["question"], set()).add(alone[q["question_id"]])
    assert all(len(answers) == 1 for answers in by_text.values())


# -----------------------------------------------------------------------------
# Answer tuning (tune_lm.py): the LM taught to answer from a caption before it is frozen


def tune_args(world, out_dir, *extra):
    return ["--lm", world["lm"], "--coco-root", world["root"],
            "--questions", questions_file(world["root"], "train"), "--out-dir", str(out_dir), "-B", "16",
            "--warmup-steps", "2", "--lr", "3e-3", "--log-every", "10", "--device", "cpu", *map(str, extra)]


def answer_loss(lm, rows, tokenizer):
    """The mean loss on the answers of every question after its image's first caption."""
    eot = tokenizer.eot_token
    losses = []
    with torch.no_grad():
        for described, asked, answer, _ in rows:
            tokens = [eot] + described[0] + asked + answer
            x = torch.tensor([tokens[:-1]])
            y = torch.tensor([[-100] * (len(tokens) - 1 - len(answer)) + answer])
            losses.append(lm.eval()(x, y)[1].item())
    return sum(losses) / len(losses)


def test_answer_tuning_scores_the_captions_and_the_answer_not_the_question(world):
    lm, tok = load_lm(world["lm"])
    questions = coco.question_records(questions_file(world["root"], "train"), None, world["root"], "train")
    rows = tune_lm.examples(questions[:8], coco.load_records(world["root"], "train"), tok)
    x, y = tune_lm.batch(rows, np.random.default_rng(0), 8, tok.eot_token)
    for row in range(8):
        scored = (y[row] != -100).nonzero().flatten()
        assert torch.equal(y[row, scored[:-1]], x[row, scored[:-1] + 1])  # each scores its next token
        text = tok.decode(x[row].tolist())
        said = tok.decode(y[row, scored].tolist())
        # the scored tokens spell the two captions (each its own line) and the answer; never the question
        assert "Question" not in said and "Answer" not in said and said.endswith("<|endoftext|>")
        assert said.count(".\n") == 2 and text.startswith("<|endoftext|>") and text.count(".\n") == 2
        answer = said.split(".\n")[-1][:-len("<|endoftext|>")].strip()
        assert answer in {coco.most_common_answer(q["answers"]) for q in questions[:8]}


def test_answer_tuning_asks_several_questions_of_one_image_after_its_captions(world):
    lm, tok = load_lm(world["lm"])
    questions = coco.question_records(questions_file(world["root"], "train"), None, world["root"], "train")
    rows = tune_lm.examples(questions, coco.load_records(world["root"], "train"), tok)
    newline = tok.encode_ordinary("\n")[0]
    x, y = tune_lm.batch(rows, np.random.default_rng(0), 8, tok.eot_token, asked=3, newline=newline)
    answers = {}  # image -> its questions and their answers
    for q in questions:
        answers.setdefault(q["image_id"], []).append((q["question"], coco.most_common_answer(q["answers"])))
    for row in range(8):
        asked = []  # (question, answer) as the row reads them
        for part in tok.decode(x[row].tolist()).split("Question: ")[1:]:
            question, answer = part.split(" Answer: ")
            asked.append((question, answer.split("\n")[0].split("<|endoftext|>")[0].strip()))
        # three questions of one image (every image has at least three), each followed by its own answer
        assert len({question for question, _ in asked}) == 3
        assert any(all(qa in pairs for qa in asked) for pairs in answers.values())
        # the loss: on the captions and the answers, each answer ended by a newline, the last by <|endoftext|>
        said = tok.decode(y[row, (y[row] != -100)].tolist())
        assert "Question" not in said and said.endswith("<|endoftext|>")
        scored = said.split(".\n")[-1].removesuffix("<|endoftext|>").split("\n")
        assert [s.strip() for s in scored] == [answer for _, answer in asked]


def test_answer_tuning_lowers_the_answer_loss_and_saves_an_lm(world, tmp_path):
    tune_lm.main(tune_args(world, tmp_path / "tuned", "--max-steps", 60, "--ckpt-every", 0,
                           "--val-questions", questions_file(world["root"], "val")))
    questions = coco.question_records(questions_file(world["root"], "train"), None, world["root"], "train")
    records = coco.load_records(world["root"], "train")
    before, tok = load_lm(world["lm"])
    after, _ = load_lm(str(tmp_path / "tuned" / "ckpt_final.pt"))  # read as a train_lm.py checkpoint
    rows = tune_lm.examples(questions, records, tok)
    assert answer_loss(after, rows, tok) < 0.5 * answer_loss(before, rows, tok)
    quality = load_checkpoint(str(tmp_path / "tuned" / "ckpt_final.pt"))["quality"]
    assert set(quality) == {"caption", "question alone"} and 0 <= quality["caption"]["VQA"] <= 1


def test_answer_tuning_resumes_exactly(world, tmp_path):
    tune_lm.main(tune_args(world, tmp_path / "straight", "--max-steps", 20, "--ckpt-every", 0))
    tune_lm.main(tune_args(world, tmp_path / "halves", "--max-steps", 20, "--ckpt-every", 10))
    os.remove(tmp_path / "halves" / "ckpt_final.pt")  # as if stopped after step 10's checkpoint
    tune_lm.main(tune_args(world, tmp_path / "halves", "--max-steps", 20, "--ckpt-every", 10,
                           "--resume", "auto"))
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))["model"]
    resumed = load_checkpoint(str(tmp_path / "halves" / "ckpt_final.pt"))["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
