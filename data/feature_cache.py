"""
The frozen encoder's features of a COCO-format split, computed once and cached on disk.

Captioning trains for many epochs over the same images, and the image tower is frozen, so its output never
changes: we run it once per image and keep the (pooled) tokens on disk as fp16 memory-mapped arrays. Training
then reads features at disk speed instead of running a ViT-L/14 on every step.

    python data/feature_cache.py --root data/coco --split train --encoder openai/clip-vit-large-patch14 \\
        --out data/cache/coco_train_L14_4x8
    python data/feature_cache.py --root data/shapes --split train --encoder random-vit:mini:seed0 \\
        --out data/cache/shapes_train      # the offline miniature (data/shapes.py writes the same format)

The cache folder (--out):
    manifest.json   the visual features (clip_loader.VisualFeatures: encoder, layer, grid, image size, width),
                    how many images, a hash of the image list, the images skipped and why; "complete": true
                    once finished
    features.fp16   raw float16 array (count, tokens, width), one row per image, memory-mapped
    image_ids.npy   the COCO image id of each row
    stats.npz       per-(token, channel) mean and std over this cache: standardising is the CONSUMER's job
                    (use the training cache's stats for every split); the stored features are never altered
"""
import argparse
import hashlib
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# runnable as `python data/feature_cache.py` from the repo root as well as `import data.feature_cache`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_loader  # noqa: E402
from common import (UsageError, atomic_open, best_device, device_flag, lock_folder,  # noqa: E402
                    positive_int, read_json, resolve_dtype, sha256_of, to_device, write_json)
from data.coco import load_records  # noqa: E402

# -----------------------------------------------------------------------------
# Reading one image, robustly


def load_pixels(path, size):
    """
    One image file -> (size, size, 3) uint8, exactly as CLIP preprocesses it; or the reason it cannot be read.
    Zero-byte, corrupt and truncated files are reported, not fatal:
    one bad file in 118k must not kill the run.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decoding happens here: a truncated file fails now, not later
            # a phone's photo stored sideways, shown upright by viewers
            image = ImageOps.exif_transpose(image)
            return clip_loader.resize_crop(image, size), None  # any mode (L, LA, P, RGBA, CMYK, I;16) -> RGB
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"


def usable_cpus():
    """The CPUs this process may run on (a job scheduler or taskset may grant fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# -----------------------------------------------------------------------------
# The feature cache

FORMAT = 2  # of the cache's files: a cache of another format is refused by name (build it again)
# What a cache must match to be reused or resumed: its format, the features, and the very same list of images.
REUSED_IF_SAME = ("format", "visual_features", "images", "image_list_sha256")


def cache_manifest(model, spec, records):
    """
    What a cache of these features (a clip_loader.VisualFeatures) of these images records, and must match.
    """
    listing = "".join(f"{r['image_id']}\t{os.path.basename(r['path'])}\n" for r in records)
    return dict(format=FORMAT, visual_features=spec.as_dict(), tokens=spec.tokens,
                untrained=clip_loader.is_untrained(model), images=len(records),
                image_list_sha256=hashlib.sha256(listing.encode()).hexdigest())


def differences(have, want):
    """'field: cache has X, expected Y' for every field of `want` that `have` records differently (the
    features' own fields one by one)."""
    out = []
    for k, v in want.items():
        if isinstance(v, dict) and isinstance(have.get(k), dict):
            out += differences(have[k], v)
        elif have.get(k) != v:
            out.append(f"{k}: cache has {have.get(k)!r}, expected {v!r}")
    return out


def build_feature_cache(records, encoder, out_dir, batch_size=256, pool_grid=clip_loader.POOL, layer=-1,
                        device=None, num_workers=None, dtype="auto", flush_every=32):
    """
    Run the frozen encoder once over every record's image; write the cache described at the top of this file.
    encoder: a model from clip_loader.load_clip, or its id (then loaded with `layer`).
    num_workers: threads decoding images (default: every CPU this process may use): decoding JPEGs is CPU
    work a GPU's encoder would otherwise wait for. batch_size: images per encoder call; the threads decode
    the next batch while the model runs this one, and a larger batch waits less often for its slowest image.
    flush_every: batches between progress records (rows written to disk, then status.npy saying so). Each
    record forces the rows out to disk and waits for it; Ctrl-C or an error records the finished batches too,
    so only a hard kill (or a power cut) loses work: the batches since the last record, redone on re-running.
    Re-running finishes an interrupted build (rows already recorded are not recomputed); a folder holding a
    cache made with other settings or another image list is refused with a ValueError naming what differs.
    Returns the FeatureCache.
    """
    if batch_size < 1 or flush_every < 1:
        raise ValueError(f"batch_size and flush_every must be >= 1, got {batch_size} and {flush_every}")
    if not records:
        raise ValueError("no images to encode")
    model = clip_loader.load_clip(encoder, layer=layer) if isinstance(encoder, str) else encoder
    device = device or best_device()
    dtype = resolve_dtype(dtype, torch.device(device).type)
    model.to(device)
    spec = clip_loader.VisualFeatures.of(model, pool_grid)
    settings = dict(cache_manifest(model, spec, records), compute_dtype=dtype)  # compute_dtype: a record only
    lock_folder(out_dir, "--out")  # one builder at a time
    if finished(out_dir, settings):
        return FeatureCache(out_dir)
    manifest_path = os.path.join(out_dir, "manifest.json")

    # The rows are written into rows.fp16 (one per record, in order), and status.npy says which are done:
    # 0 = to do, 1 = written, 2 = unreadable image (skipped). finalize() then makes features.fp16 of the
    # good rows.
    N, S, C = len(records), spec.tokens, spec.width
    rows_path, status_path = os.path.join(out_dir, "rows.fp16"), os.path.join(out_dir, "status.npy")
    skipped_path = os.path.join(out_dir, "skipped.json")
    status = np.load(status_path) if os.path.exists(status_path) else np.zeros(N, dtype=np.uint8)
    skipped = read_json(skipped_path, "feature cache progress file") if os.path.exists(skipped_path) else []
    # only the skips status.npy records (a kill between the two files' writes leaves skips of rows to redo)
    unreadable = {records[r]["image_id"] for r in np.flatnonzero(status == 2)}
    skipped = [s for s in skipped if s["image_id"] in unreadable]
    if not os.path.exists(rows_path) and (status == 0).any():
        reserve(rows_path, N * S * C * 2)  # a full disk fails here, before any work, not as a bus error later
    todo = np.flatnonzero(status == 0)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    size = model.config.image_size

    def load_batch(rows):
        return list(pool.map(lambda r: load_pixels(records[r]["path"], size), rows))

    def record_progress(features):
        # the rows first, then the record of what is done: status.npy never claims a row not yet on disk
        features.flush()
        write_json(skipped_path, skipped)
        with atomic_open(status_path, "wb") as f:
            np.save(f, status)

    t0 = time.time()
    with ThreadPoolExecutor(num_workers or usable_cpus()) as pool, ThreadPoolExecutor(1) as prefetch, \
            tqdm(total=N, initial=N - len(todo), unit="img", desc=f"features {spec.encoder}") as bar:
        features = np.memmap(rows_path, dtype=np.float16, mode="r+", shape=(N, S, C)) if batches else None
        # decoding and resizing (PIL releases the GIL) overlap with the model: batch k+1 loads while k runs
        upcoming = prefetch.submit(load_batch, batches[0]) if batches else None
        unrecorded = 0  # batches done since the last record
        try:
            for k, rows in enumerate(batches):
                loaded = upcoming.result()
                upcoming = prefetch.submit(load_batch, batches[k + 1]) if k + 1 < len(batches) else None
                good = [r for r, (pixels, _) in zip(rows, loaded) if pixels is not None]
                for r, (pixels, reason) in zip(rows, loaded):
                    if pixels is None:
                        tqdm.write(f"skipping {records[r]['path']}: {reason}", file=sys.stderr)
                        skipped.append(dict(image_id=records[r]["image_id"], path=records[r]["path"],
                                            reason=reason))
                        status[r] = 2
                if good:
                    tokens = clip_loader.encode_pixels(model, [p for p, _ in loaded if p is not None],
                                                       spec.grid, dtype)
                    features[good] = tokens.to(torch.float16).numpy()
                    status[good] = 1  # (only once the rows are in the memory map)
                unrecorded += 1
                if unrecorded == flush_every:
                    record_progress(features)
                    unrecorded = 0
                bar.update(len(rows))
        finally:  # the end, Ctrl-C or an error: keep what the finished batches computed
            if unrecorded:
                record_progress(features)
        del features
    seconds = time.time() - t0
    finalize(out_dir, records, status, skipped, settings, spec)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) of {N}; listed in {manifest_path}",
              file=sys.stderr)
    if todo.size:
        print(f"{len(todo)} images in {seconds:.1f}s ({len(todo) / max(seconds, 1e-9):.1f} images/s)",
              file=sys.stderr)
    return FeatureCache(out_dir)


def finished(out_dir, settings):
    """
    True if out_dir holds this very cache, finished; False if it holds none yet (its manifest is then written,
    marked incomplete) or this one half-built. A cache of other settings or another image list is refused.
    """
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        write_json(manifest_path, dict(settings, complete=False, count=None, skipped=[]))
        return False
    old = read_json(manifest_path, "feature cache manifest")
    diff = differences(old, {k: settings[k] for k in REUSED_IF_SAME})
    if diff:
        raise ValueError(f"{out_dir} holds a feature cache made with different settings ({'; '.join(diff)}). "
                         f"Delete that folder or pass another --out; it is never silently reused.")
    if old.get("complete"):
        print(f"{out_dir}: complete ({old['count']} images), nothing to do", file=sys.stderr)
    return bool(old.get("complete"))


def reserve(path, nbytes):
    """
    Create path with nbytes of disk space allocated now: OSError naming the path and the size if they do
    not fit.
    """
    with open(path, "wb") as f:
        try:
            if nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            f.close()
            os.remove(path)
            raise OSError(e.errno, f"cannot reserve {nbytes / 2**30:.2f} GiB ({nbytes:,} bytes) for {path}: "
                                   f"{e.strerror}. Free disk space or pass an --out on a larger disk") from e


def finalize(out_dir, records, status, skipped, settings, spec):
    """
    features.fp16 of the good rows, image ids, statistics, then the manifest that marks the cache complete.
    It never changes rows.fp16 or status.npy, and every file it writes appears whole (written, then renamed):
    a run killed at any moment of it and started again simply finalizes again, from the same inputs.
    """
    N, S, C = len(records), spec.tokens, spec.width
    rows_path, features_path = os.path.join(out_dir, "rows.fp16"), os.path.join(out_dir, "features.fp16")
    good = np.flatnonzero(status == 1)
    row_bytes = S * C * 2
    if len(good) == N and os.path.exists(rows_path):
        os.replace(rows_path, features_path)  # nothing to drop: the rows are the features (atomic rename)
    elif len(good) < N:  # copy the good rows, in order, into a new file: rows.fp16 is never moved in place
        rows = np.memmap(rows_path, dtype=np.float16, mode="r", shape=(N, S, C))
        reserve(features_path + ".tmp", len(good) * row_bytes)
        with atomic_open(features_path, "r+b") as f:
            for i in range(0, len(good), 4096):
                f.write(np.ascontiguousarray(rows[good[i:i + 4096]]).tobytes())
        del rows
    if os.path.getsize(features_path) != len(good) * row_bytes:
        raise RuntimeError(f"{features_path} holds {os.path.getsize(features_path):,} bytes, expected "
                           f"{len(good) * row_bytes:,}: delete {out_dir} and build the cache again")
    with atomic_open(os.path.join(out_dir, "image_ids.npy"), "wb") as f:
        np.save(f, np.array([records[r]["image_id"] for r in good], dtype=np.int64))
    # per-(token, channel) statistics, accumulated in float64 over chunks of rows
    total, total_sq = np.zeros((S, C)), np.zeros((S, C))
    if len(good):
        features = np.memmap(features_path, dtype=np.float16, mode="r", shape=(len(good), S, C))
        for i in range(0, len(good), 4096):
            chunk = features[i:i + 4096].astype(np.float64)  # (b, S, C)
            total += chunk.sum(0)
            total_sq += (chunk ** 2).sum(0)
        del features
    mean = total / max(len(good), 1)
    std = np.sqrt(np.maximum(total_sq / max(len(good), 1) - mean ** 2, 0))
    with atomic_open(os.path.join(out_dir, "stats.npz"), "wb") as f:
        np.savez(f, mean=mean.astype(np.float32), std=std.astype(np.float32))
    files = {"features.fp16": {"bytes": len(good) * row_bytes}}
    files.update({name: {"sha256": sha256_of(os.path.join(out_dir, name))}
                  for name in ("image_ids.npy", "stats.npz")})
    write_json(os.path.join(out_dir, "manifest.json"),
               dict(settings, complete=True, count=int(len(good)), dtype="float16", skipped=skipped,
                    files=files))
    for name in ("rows.fp16", "status.npy", "skipped.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


class FeatureCache:
    """
    A finished feature cache, memory-mapped: features[row] is one image's (S, C) fp16 tokens, image_ids[row]
    its COCO id; spec: the clip_loader.VisualFeatures they are. expect: the features a caller needs (== spec,
    else ValueError).
    Opening checks the files against the manifest (the features' size, the small files' sha256), so a
    truncated or damaged cache is an error naming the broken file, not a crash or silently wrong features
    later.
    """

    def __init__(self, out_dir, expect=None):
        manifest_path = os.path.join(out_dir, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{out_dir} holds no feature cache (no manifest.json): build it with "
                                    f"`python data/feature_cache.py ... --out {out_dir}`")
        self.manifest = read_json(manifest_path, "feature cache manifest")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{out_dir} holds a feature cache of format {self.manifest.get('format')}, made "
                             f"by an earlier version of this code; this one reads format {FORMAT}: delete "
                             f"{out_dir} and build it again "
                             f"(python data/feature_cache.py ... --out {out_dir})")
        if not self.manifest.get("complete"):
            raise ValueError(f"{out_dir}: the feature cache is incomplete; run the same "
                             f"data/feature_cache.py command again to finish it")
        self.out_dir = out_dir
        self.spec = clip_loader.VisualFeatures.from_dict(self.manifest["visual_features"], f"{manifest_path}")
        self.verify()
        self.features = np.memmap(
            os.path.join(out_dir, "features.fp16"), dtype=np.float16, mode="r",
            shape=(self.manifest["count"], self.spec.tokens, self.spec.width))  # (N, S, C)
        self.image_ids = load_numbers(os.path.join(out_dir, "image_ids.npy"), "the feature cache's image ids")
        self._rows = {int(i): row for row, i in enumerate(self.image_ids)}
        self._stats = None
        self.on_device = None  # the features as one tensor on a GPU, after load_to()
        self.unreadable = {s["image_id"] for s in self.manifest.get("skipped", [])}  # left out when built
        if expect is not None:
            self.check_compatible(expect)

    def verify(self):
        """ValueError naming the first file that is missing, of the wrong size, or not what was written."""
        m, spec = self.manifest, self.spec
        rebuild = (f"delete {self.out_dir} and build it again "
                   f"(python data/feature_cache.py ... --out {self.out_dir})")
        expected = {"features.fp16": {"bytes": m["count"] * spec.tokens * spec.width * 2},
                    "image_ids.npy": {}, "stats.npz": {}, **m.get("files", {})}
        for name, want in expected.items():
            path = os.path.join(self.out_dir, name)
            if not os.path.isfile(path):
                raise ValueError(f"feature cache file {path} is missing: {rebuild}")
            if "bytes" in want and os.path.getsize(path) != want["bytes"]:
                raise ValueError(f"feature cache file {path} holds {os.path.getsize(path):,} bytes, the "
                                 f"manifest says {want['bytes']:,} (truncated?): {rebuild}")
            if "sha256" in want and sha256_of(path) != want["sha256"]:
                raise ValueError(f"feature cache file {path} is not the file this cache wrote "
                                 f"(sha256 differs): {rebuild}")

    def check_compatible(self, expected):
        """ValueError naming each field of the features `expected` that this cache's differ in."""
        if self.spec != expected:
            raise ValueError(f"feature cache {self.out_dir} does not match: "
                             f"{'; '.join(self.spec.differences(expected, 'cache has'))}")

    def __len__(self):
        return len(self.image_ids)

    def __contains__(self, image_id):
        return int(image_id) in self._rows

    def row_of(self, image_id):
        return self._rows[int(image_id)]

    def batch(self, rows):
        """Rows of features as a float32 tensor (B, S, C)."""
        return torch.from_numpy(self.features[np.asarray(rows)].astype(np.float32))

    # A "visual source", like EncodedImages below: spec, `image_id in source`, tokens(image_ids).
    def tokens(self, image_ids):
        """(image_ids, visual tokens (B, S, C) float32) of images that are all in the cache."""
        rows = [self.row_of(i) for i in image_ids]
        if self.on_device is not None:
            # one gather on the GPU: only the B row numbers cross from the host, queued behind the GPU's work
            # (torch.tensor(rows, device=...) would wait for all of it first)
            index = to_device(torch.tensor(rows), self.on_device.device)  # (B,)
            return list(image_ids), self.on_device[index].float()
        return list(image_ids), self.batch(rows)

    def load_to(self, device):
        """
        Copy all the features to `device` once (fp16, as stored), so that a training step gathers its rows
        there instead of indexing the memory map and copying from the host every step. COCO's 118k x 33 x 1024
        fp16 features are 8.0 GB: they fit an 80 GB GPU easily.
        """
        with warnings.catch_warnings():  # the memory map is read-only, and so is every use of this tensor
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            features = torch.from_numpy(np.ascontiguousarray(self.features))
        self.on_device = features.to(device)  # (N, S, C) fp16
        return self

    @property
    def mean(self):
        """
        (S, C) float32 mean over this cache's images; standardise with the TRAINING cache's mean and std.
        """
        return self.stats["mean"]

    @property
    def std(self):
        return self.stats["std"]

    @property
    def stats(self):
        if self._stats is None:
            self._stats = load_numbers(os.path.join(self.out_dir, "stats.npz"),
                                       "the feature cache's statistics")
        return self._stats


def load_numbers(path, what):
    """
    np.load of plain numbers (a .npy array, or an .npz's arrays as a dict): pickled objects are refused by
    name.
    """
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        return np.load(path)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise ValueError(f"{what} {path} holds pickled Python objects, not numbers: it was not written by "
                         f"this code and is refused without being unpickled; build the cache again "
                         f"(`python data/feature_cache.py ...`)") from None


class EncodedImages:
    """
    The other visual source: images read and encoded by the frozen encoder when asked for (no cache; slower,
    see bench/bench_caption.py). tokens() leaves out an image that cannot be read and appends it to
    self.skipped as {"image_id", "path", "reason"}: evaluation reports such images, training refuses them.
    workers: threads decoding a batch's images (default: up to 8, as every process of a multi-GPU run has its
    own and they share the machine's CPUs).
    """

    def __init__(self, encoder, grid, records, device="cpu", dtype="fp32", workers=None):
        self.model, self.dtype = encoder.to(device), dtype
        self.workers = workers or min(8, usable_cpus())
        self.paths = {r["image_id"]: r["path"] for r in records}
        self.spec = clip_loader.VisualFeatures.of(encoder, grid)
        self.skipped = []
        self.unreadable = set()  # every image is read when asked for

    def __contains__(self, image_id):
        return image_id in self.paths

    def tokens(self, image_ids):
        size = self.model.config.image_size
        with ThreadPoolExecutor(self.workers) as pool:  # PIL releases the GIL while decoding; map keeps order
            loaded = list(pool.map(lambda image_id: load_pixels(self.paths[image_id], size), image_ids))
        kept, pixels = [], []
        for image_id, (array, reason) in zip(image_ids, loaded):
            if array is None:
                tqdm.write(f"skipping {self.paths[image_id]}: {reason}", file=sys.stderr)
                self.skipped.append(dict(image_id=image_id, path=self.paths[image_id], reason=reason))
            else:
                kept.append(image_id)
                pixels.append(array)
        if not kept:
            return kept, None
        return kept, clip_loader.encode_pixels(self.model, pixels, self.spec.grid, self.dtype)  # (B, S, C)

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Run a frozen encoder once over a COCO-format split; "
                                            "write the feature cache.")
    p.add_argument("--root", default="data/coco", help="a COCO-format root (COCO itself, or data/shapes)")
    p.add_argument("--split", default="train")
    p.add_argument("--karpathy-json", default=None, help="dataset_coco.json: use Karpathy's split")
    p.add_argument("--encoder", default="openai/clip-vit-large-patch14",
                   help="hub id, local hub-format folder, or random-vit:<preset>:seed<k>")
    p.add_argument("--layer", type=int, default=-1, help="-1 = last block, -2 = penultimate (LLaVA)")
    p.add_argument("--pool", default=clip_loader.POOL_FLAG,
                   help="ROWSxCOLS grid for the patch tokens (4x8 -> 33 tokens), or none")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per encoder call, decoded ahead by all the threads together")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="threads decoding images (default: every CPU this process may use)")
    p.add_argument("--flush-every", type=positive_int, default=32,
                   help="batches between progress records (a hard kill redoes at most this many)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images (smoke runs)")
    p.add_argument("--device", type=device_flag, default=None,
                   help="cuda / mps / cpu (default: the best present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype of the encoder (auto: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    records = load_records(args.root, args.split, args.karpathy_json)[:args.limit]
    model = clip_loader.load_clip(args.encoder, layer=args.layer)
    print(clip_loader.describe(model), file=sys.stderr)
    try:
        cache = build_feature_cache(records, model, args.out, args.batch_size,
                                    clip_loader.parse_grid(args.pool), device=args.device,
                                    num_workers=args.workers, dtype=args.dtype,
                                    flush_every=args.flush_every)
    except UsageError as e:  # --out in use by another builder, or not writable: exit as argparse does
        p.error(str(e))
    print(f"{args.out}: {len(cache)} images x {cache.spec.tokens} tokens x {cache.spec.width}",
          file=sys.stderr)
