"""
Real-format stand-ins for everything the full-scale run downloads, made offline: what `make smoke` (and a few
tests) feed to the real scripts, so that every full-scale path runs here at full size without the network.

    python tests/fabricate.py --out runs/smoke/world        # all of it (about 2.4 GB, ~1 minute)

- gpt2/: GPT-2 124M with random weights, written exactly as the hub's openai-community/gpt2 is: its
  config.json, and a model.safetensors with unprefixed keys (h.0.attn.c_attn.weight, ...), Conv1D weights (the
  transpose of nn.Linear's), the attn.bias / attn.masked_bias buffers, and no lm_head (it is tied to wte).
- clip-vit-large-patch14/: a full CLIPModel checkpoint in openai/clip-vit-large-patch14's layout, random
  weights: vision_model.*, text_model.*, visual_projection, text_projection, logit_scale, and a CLIPConfig
  with nested vision_config / text_config.
- coco/: real-size JPEGs (640 x 480 and others) in COCO 2017's layout (train2017/, val2017/,
  annotations/captions_{train,val}2017.json), and dataset_coco.json in Karpathy's format, whose paths name
  COCO 2014 files (val2014/COCO_val2014_000000391895.jpg) and one of whose test images lives in train2017/,
  as most do.
- coco/ again, VQAv2 on COCO 2014: train2014/COCO_train2014_{id:012d}.jpg and val2014/COCO_val2014_*.jpg (hard
  links to the 2017 files of the same ids: the same photos under other names and splits), and VQAv2's four
  files in the root, v2_OpenEnded_mscoco_{train,val}2014_questions.json and v2_mscoco_{train,val}2014_
  annotations.json: three questions an image, 10 human answers each (who sometimes disagree), answer types
  yes/no, number and other. As in COCO, 2014's train and val are disjoint and one val2014 image (391895) is
  in train2017: the root's val files ask only about the val2014 images in val2017; coco/leak/ holds the same
  two files for all of val2014, that image too (evaluating on them a model trained on train2017 is a leak).
- fineweb/: FineWeb-Edu-like parquet files in the hub dataset's layout (sample/10BT/000_00000.parquet with its
  text, id, dump, url, ... columns), and hellaswag/hellaswag_val.jsonl in the real schema.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_json  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402

WORDS = ("a man woman dog cat person sitting standing on the table with red blue green white black large "
         "small two of in front near street plate food bus train bike horse grass water sky building").split()

# -----------------------------------------------------------------------------
# GPT-2 124M in the hub's own layout


GPT2_CONFIG = {  # openai-community/gpt2's config.json
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257}


def gpt2_hub_folder(out, config=GPT2_CONFIG, seed=0):
    """config.json + model.safetensors exactly as the hub's GPT-2 files are laid out, random weights."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=config["n_positions"], vocab_size=config["vocab_size"],
                          n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"]))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte: the hub's file does not store it
        state[key.removeprefix("transformer.")] = (tensor.t() if key.endswith(conv1d)
                                                   else tensor).contiguous()
    T = config["n_positions"]
    for i in range(config["n_layer"]):  # the causal-mask buffers OpenAI's checkpoint carries
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out, "config.json"), config)
    return out

# -----------------------------------------------------------------------------
# CLIP ViT-L/14 in the hub's CLIPModel layout


def clip_config(vision=(1024, 24, 16, 4096, 14, 224), text=(768, 12, 12, 3072), projection=768):
    width, layers, heads, mlp, patch, size = vision
    t_width, t_layers, t_heads, t_mlp = text
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection,
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
            "text_config": {"hidden_size": t_width, "intermediate_size": t_mlp,
                            "num_attention_heads": t_heads, "num_hidden_layers": t_layers,
                            "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": projection,
                            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
            "vision_config": {"hidden_size": width, "intermediate_size": mlp, "num_attention_heads": heads,
                              "num_hidden_layers": layers, "patch_size": patch, "image_size": size,
                              "num_channels": 3, "projection_dim": projection, "hidden_act": "quick_gelu",
                              "layer_norm_eps": 1e-05}}


def clip_hub_folder(out, config=None, seed=0):
    """config.json + model.safetensors of a whole CLIPModel (both towers), random weights, hub key names."""
    from safetensors.torch import save_file
    config = config or clip_config()
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}

    def tower(prefix, c, embeddings):
        for name, shape in embeddings.items():
            state[f"{prefix}.embeddings.{name}"] = torch.randn(shape, generator=g) * 0.02
        W, M = c["hidden_size"], c["intermediate_size"]
        for i in range(c["num_hidden_layers"]):
            layer = f"{prefix}.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                state[f"{layer}.self_attn.{proj}.weight"] = torch.randn(W, W, generator=g) * W ** -0.5
                state[f"{layer}.self_attn.{proj}.bias"] = torch.zeros(W)
            state[f"{layer}.mlp.fc1.weight"] = torch.randn(M, W, generator=g) * W ** -0.5
            state[f"{layer}.mlp.fc1.bias"] = torch.zeros(M)
            state[f"{layer}.mlp.fc2.weight"] = torch.randn(W, M, generator=g) * M ** -0.5
            state[f"{layer}.mlp.fc2.bias"] = torch.zeros(W)
            for norm in ("layer_norm1", "layer_norm2"):
                state[f"{layer}.{norm}.weight"], state[f"{layer}.{norm}.bias"] = torch.ones(W), torch.zeros(W)

    v, t = config["vision_config"], config["text_config"]
    grid = v["image_size"] // v["patch_size"]
    tower("vision_model", v, {"class_embedding": (v["hidden_size"],),
                              "patch_embedding.weight": (v["hidden_size"], 3, v["patch_size"],
                                                         v["patch_size"]),
                              "position_embedding.weight": (1 + grid * grid, v["hidden_size"])})
    for norm in ("pre_layrnorm", "post_layernorm"):
        state[f"vision_model.{norm}.weight"], state[f"vision_model.{norm}.bias"] = (
            torch.ones(v["hidden_size"]), torch.zeros(v["hidden_size"]))
    tower("text_model", t, {"token_embedding.weight": (t["vocab_size"], t["hidden_size"]),
                            "position_embedding.weight": (t["max_position_embeddings"], t["hidden_size"])})
    state["text_model.final_layer_norm.weight"] = torch.ones(t["hidden_size"])
    state["text_model.final_layer_norm.bias"] = torch.zeros(t["hidden_size"])
    state["visual_projection.weight"] = torch.randn(config["projection_dim"], v["hidden_size"],
                                                    generator=g) * 0.02
    state["text_projection.weight"] = torch.randn(config["projection_dim"], t["hidden_size"],
                                                  generator=g) * 0.02
    state["logit_scale"] = torch.tensor(config["logit_scale_init_value"])
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out, "config.json"), config)
    return out

# -----------------------------------------------------------------------------
# COCO 2017 and Karpathy's split


def caption(rng):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))).capitalize() + "."


def photo(rng, size):
    """A JPEG-sized photo stand-in: smooth colour gradients and noise (it compresses like one)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None, :] + rng.uniform(-0.3, 0.3, 3) * x[..., None] + \
        rng.uniform(-0.3, 0.3, 3) * y[..., None]
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def coco_world(root, train=6, val=3, seed=0):
    """
    train2017/ and val2017/ with real-size JPEGs and 5 captions each, COCO 2017's file names and caption
    files, and Karpathy's dataset_coco.json over the same images: COCO 2014 paths; his test split takes the
    last val2017 image AND the first train2017 image (as ~4,400 of his 5,000 test images are in train2017),
    the rest is his train (train2017) and val (val2017). Returns {"train": ids, "val": ids, "karpathy":
    {split: ids}}.
    """
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (640, 427), (500, 375), (612, 612)]
    ids = {"train": [391895 + 1000 * i for i in range(train)], "val": [522418 + 1000 * i for i in range(val)]}
    karpathy = []
    for split, image_ids in ids.items():
        os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
        images, annotations = [], []
        for k, image_id in enumerate(image_ids):
            size = sizes[(k + (split == "val")) % len(sizes)]
            file_name = f"{image_id:012d}.jpg"
            photo(rng, size).save(os.path.join(root, f"{split}2017", file_name), quality=90)
            captions = [caption(rng) for _ in range(5)]
            images.append(dict(id=image_id, file_name=file_name, width=size[0], height=size[1]))
            annotations += [dict(id=image_id * 10 + j, image_id=image_id, caption=c)
                            for j, c in enumerate(captions)]
            in_test = (split == "val" and k == len(image_ids) - 1) or (split == "train" and k == 0)
            karpathy.append(dict(filepath="val2014", filename=f"COCO_val2014_{image_id:012d}.jpg",
                                 imgid=len(karpathy),
                                 split="test" if in_test else "train" if split == "train" else "val",
                                 cocoid=image_id,
                                 sentences=[dict(raw=c, tokens=c.lower().rstrip(".").split())
                                            for c in captions]))
        write_json(os.path.join(root, "annotations", f"captions_{split}2017.json"),
                   dict(info={}, licenses=[], images=images, annotations=annotations))
    write_json(os.path.join(root, "dataset_coco.json"), dict(images=karpathy, dataset="coco"))
    splits = {s: [im["cocoid"] for im in karpathy if im["split"] == s] for s in ("train", "val", "test")}
    return dict(ids, karpathy=splits)

# -----------------------------------------------------------------------------
# VQAv2 on COCO 2014

THINGS = {"dog": "dogs", "cat": "cats", "person": "people", "bus": "buses", "train": "trains",
          "horse": "horses", "bike": "bikes", "plate": "plates", "table": "tables", "building": "buildings"}
# (question_type, answer_type, question, the answers humans give: most of them one, shuffled, the rest any)
VQA_KINDS = (
    ("what color is the", "other", "What color is the {}?", ("red", "blue", "green", "white", "black")),
    ("is there a", "yes/no", "Is there a {} in the picture?", ("yes", "no")),
    ("how many", "number", "How many {} are there?", ("2", "3", "1", "4", "two")),
    ("is the", "yes/no", "Is the {} on the street?", ("no", "yes")),
    ("what is the", "other", "What is the {} near?", ("table", "bus", "water", "building", "grass")),
)
VQA_INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
VQA_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
               "name": "Creative Commons Attribution 4.0 International License"}


def vqa_split(image_ids, split, rng, per_image=3):
    """
    VQAv2's two files for per_image questions about each of image_ids, with their keys:
    (questions file's dict, annotations file's dict).
    """
    common = dict(info=VQA_INFO, license=VQA_LICENSE, data_type="mscoco", data_subtype=f"{split}2014")
    questions, annotations = [], []
    for image_id in image_ids:
        for k, kind in enumerate(rng.choice(len(VQA_KINDS), size=per_image, replace=False)):
            question_type, answer_type, template, options = VQA_KINDS[kind]
            thing = str(rng.choice(list(THINGS)))
            options = [str(o) for o in rng.permutation(options)]
            agree = int(rng.integers(4, 11))  # most humans say one answer; the others, any (that one too)
            answers = [str(a) for a in rng.permutation(
                [options[0]] * agree + [str(rng.choice(options)) for _ in range(10 - agree)])]
            qid = image_id * 1000 + k  # VQAv2's question ids: the image's id and the question's number
            text = template.format(THINGS[thing] if question_type == "how many" else thing)
            questions.append(dict(image_id=image_id, question=text, question_id=qid))
            confidence = rng.choice(["yes", "yes", "yes", "maybe", "no"], size=10)
            annotations.append(dict(
                question_type=question_type, multiple_choice_answer=max(answers, key=answers.count),
                answers=[dict(answer=a, answer_confidence=str(c), answer_id=j + 1)
                         for j, (a, c) in enumerate(zip(answers, confidence))],
                image_id=image_id, answer_type=answer_type, question_id=qid))
    return dict(common, task_type="Open-Ended", questions=questions), dict(common, annotations=annotations)


def vqa_world(root, ids, seed=0):
    """
    VQAv2 over coco_world's images (ids: its return), in COCO 2014's layout: train2014/ holds its train2017
    images but the first, val2014/ its val2017 images and that first train2017 one (391895, which is
    COCO_val2014_000000391895.jpg in COCO too: most of val2014 is in train2017), each a hard link to the 2017
    file. The root's VQAv2 files: train2014's questions, and val2014's about its images in val2017 only;
    coco/leak/ holds val2014's two files over all its images. Returns {"train2014", "val2014", "leak": ids}.
    """
    rng = np.random.default_rng(seed + 1)
    leak = ids["train"][0]
    splits = {"train": [("train", i) for i in ids["train"][1:]],
              "val": [("val", i) for i in ids["val"]] + [("train", leak)]}
    for split, images in splits.items():
        os.makedirs(os.path.join(root, f"{split}2014"), exist_ok=True)
        for split2017, image_id in images:
            source = os.path.join(root, f"{split2017}2017", f"{image_id:012d}.jpg")
            target = os.path.join(root, f"{split}2014", f"COCO_{split}2014_{image_id:012d}.jpg")
            if os.path.exists(target):
                os.remove(target)
            try:
                os.link(source, target)
            except OSError:  # a file system without hard links
                shutil.copyfile(source, target)

    def write(folder, split, questions, annotations):
        write_json(os.path.join(folder, f"v2_OpenEnded_mscoco_{split}2014_questions.json"), questions)
        write_json(os.path.join(folder, f"v2_mscoco_{split}2014_annotations.json"), annotations)

    write(root, "train", *vqa_split([i for _, i in splits["train"]], "train", rng))
    questions, annotations = vqa_split([i for _, i in splits["val"]], "val", rng)
    write(os.path.join(root, "leak"), "val", questions, annotations)
    # the root's val files: the questions about val2014's images that are not in train2017
    unseen = [q for q in questions["questions"] if q["image_id"] != leak]
    write(root, "val", dict(questions, questions=unseen),
          dict(annotations, annotations=[a for a in annotations["annotations"] if a["image_id"] != leak]))
    return {"train2014": [i for _, i in splits["train"]], "val2014": [i for _, i in splits["val"]],
            "leak": [leak]}

# -----------------------------------------------------------------------------
# FineWeb-Edu's parquet layout and HellaSwag's jsonl


def fineweb_parquet(out, docs=400, files=2, seed=0):
    """sample/10BT/000_0000N.parquet with the columns of HuggingFaceFW/fineweb-edu."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    folder = os.path.join(out, "sample", "10BT")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for f in range(files):
        n = docs // files
        texts = [" ".join(" ".join(rng.choice(WORDS, size=int(rng.integers(8, 20)))) + "." for _ in
                          range(int(rng.integers(5, 60)))) for _ in range(n)]
        table = pa.table({"text": texts, "id": [f"<urn:uuid:{f}-{i}>" for i in range(n)],
                          "dump": ["CC-MAIN-2024-10"] * n,
                          "url": [f"https://example.org/{f}/{i}" for i in range(n)],
                          "file_path": ["s3://commoncrawl/x.warc.gz"] * n, "language": ["en"] * n,
                          "language_score": rng.uniform(0.9, 1.0, n).tolist(),
                          "token_count": [len(t.split()) for t in texts],
                          "score": rng.uniform(3, 5, n).tolist(),
                          "int_score": rng.integers(3, 6, n).tolist()})
        paths.append(os.path.join(folder, f"000_{f:05d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def hellaswag_jsonl(out, n=8, seed=0):
    """hellaswag_val.jsonl in the real schema (ctx, endings, label, ...)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "hellaswag_val.jsonl"), "w") as f:
        for i in range(n):
            ctx = " ".join(rng.choice(WORDS, size=12))
            f.write(json.dumps(dict(ind=i, activity_label="Smoke", ctx_a=ctx, ctx_b="", ctx=ctx, split="val",
                                    split_type="indomain", label=int(rng.integers(4)), source_id=f"smoke~{i}",
                                    endings=[" ".join(rng.choice(WORDS, size=6)) for _ in range(4)])) + "\n")
    return os.path.join(out, "hellaswag_val.jsonl")

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gpt2_hub_folder(os.path.join(args.out, "gpt2"))
    clip_hub_folder(os.path.join(args.out, "clip-vit-large-patch14"))
    vqa_world(os.path.join(args.out, "coco"), coco_world(os.path.join(args.out, "coco")))
    fineweb_parquet(os.path.join(args.out, "fineweb"))
    hellaswag_jsonl(os.path.join(args.out, "hellaswag"))
    write_json(os.path.join(args.out, "done.json"), {"complete": True})
    print(f"{args.out}: GPT-2 124M and CLIP ViT-L/14 (random, hub layouts), COCO + Karpathy + VQAv2, "
          f"FineWeb-Edu parquet, HellaSwag", file=sys.stderr)
