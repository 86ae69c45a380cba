"""
FineWeb-Edu -> GPT-2 token shards, and the loader that feeds them to train_lm.py.

    python data/fineweb.py                             # sample-10BT: ~10B tokens, 100 shards of 100M (~20 GB)
    python data/fineweb.py --remote-name sample-100BT  # a bigger sample
    python data/fineweb.py --data-files my.jsonl --out-dir data/fineweb_edu_local --shard-size 1000000

Every document becomes [<|endoftext|>] + its GPT-2 tokens (the EOT *starts* each document, so the model
always sees a document boundary before new text); the token stream is cut into shards of --shard-size
tokens saved as uint16 .npy (GPT-2 ids < 2**16), named <name>_{val|train}_{k:06d}.npy; shard 0 is val.
--data-files (jsonl / parquet / txt with a `text` field; txt: one document per line) goes through exactly
the same code as the hub download, which is how the tests and the offline miniature make their shards.

A manifest.json next to the shards records what they were made from (the source, and each data file's
size and sha256; the tokenizer; the shard size) and each finished shard (its token count and where in the
document stream the next shard starts), so an interrupted run restarted with the same arguments keeps its
finished shards and rewrites only the partial one. A rerun whose input changed since (the same path, other
text) is refused, never reported done or resumed into a mix of two corpora.
"""
import glob
import itertools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python data/fineweb.py`
from common import UsageError, atomic_open, positive_int, read_json, sha256_of, write_json  # noqa: E402
from gpt2 import EOT, GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256, get_tokenizer  # noqa: E402

MANIFEST = "manifest.json"

# -----------------------------------------------------------------------------
# Reading documents: the hub's FineWeb-Edu or local files, both as a stream of `text` strings


def describe_source(remote_name=None, data_files=None):
    """What the shards were made from; a resumed run must name the same source."""
    if data_files:
        return {"data_files": [os.path.abspath(f) for f in data_files]}
    return {"dataset": "HuggingFaceFW/fineweb-edu", "name": remote_name}


def fingerprint(source):
    """
    What the shards are made from, beyond the arguments: each data file's path, size and sha256, so that a
    rerun notices a corpus changed at the same path. Hashing reads each file once: seconds per GB, far less
    than tokenizing it. A hub dataset is its name (streamed from the hub's main branch, not pinned to a
    revision).
    """
    if "data_files" not in source:
        return {"dataset": source["dataset"], "name": source["name"]}
    files = []
    for f in source["data_files"]:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--data-files: {f} does not exist")
        files.append({"path": f, "bytes": os.path.getsize(f), "sha256": sha256_of(f)})
    return {"data_files": files}


def iter_texts(source):
    """The `text` field of every document, in a fixed order (so a resumed run can skip what is done)."""
    import datasets
    if "data_files" in source:
        files = source["data_files"]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--data-files: {f} does not exist")
        exts = {os.path.splitext(f)[1].lower() for f in files}
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
        if len(exts) != 1 or next(iter(exts)) not in builders:
            raise ValueError(f"--data-files must all be .jsonl/.json, .parquet or .txt (got {sorted(exts)})")
        ds = datasets.load_dataset(builders[exts.pop()], data_files=files, split="train", streaming=True)
    else:
        try:
            ds = datasets.load_dataset(source["dataset"], name=source["name"], split="train", streaming=True)
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
            # offline, HF_DATASETS_OFFLINE=1, or the hub unreachable: no partial download can help here
            raise RuntimeError(
                f"could not reach {source['dataset']} ({source['name']}) on the Hugging Face hub "
                f"({type(e).__name__}: {e}).\nOffline? Either run `python data/fineweb.py` on a machine with "
                f"internet and copy the shard folder here, or make shards from local files with "
                f"`python data/fineweb.py --data-files docs.jsonl --out-dir data/fineweb_edu_local`.") from e
    return (row["text"] for row in ds if _has_text(row))  # the dataset is opened now, read lazily


def _has_text(row):
    if "text" not in row:
        raise KeyError(f"documents need a `text` field; got fields {sorted(row)}")
    return bool(row["text"])  # an empty line of a .txt file is not a document


def tokenize(text):
    """One document -> uint16 tokens, EOT first. Runs in the worker processes (one tokenizer each)."""
    tokens = np.array([EOT] + get_tokenizer().encode_ordinary(text), dtype=np.int64)
    assert tokens.max() < 2**16, "GPT-2 ids fit in uint16"
    return tokens.astype(np.uint16)


def tokenizer_identity():
    """What identifies the encoder: its name, vocabulary size and the sha256 of the files it is made of."""
    enc = get_tokenizer()
    return {"encoding": enc.name, "n_vocab": enc.n_vocab, "eot": EOT,
            "vocab_bpe_sha256": GPT2_VOCAB_BPE_SHA256, "encoder_json_sha256": GPT2_ENCODER_JSON_SHA256}

# -----------------------------------------------------------------------------
# Writing shards, resumably


def shard_path(out_dir, name, k):
    split = "val" if k == 0 else "train"  # the first shard is the validation set
    return os.path.join(out_dir, f"{name}_{split}_{k:06d}.npy")


def save_npy(path, array):
    """np.save through a temporary file and a rename: a shard on disk is always whole."""
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    return read_json(path, "shard manifest") if os.path.exists(path) else None


def prepare(out_dir, source, name="edufineweb", shard_size=100_000_000, workers=1, max_shards=None):
    """
    Tokenize `source` into shards under out_dir;
    continue where a previous run with the same arguments, on the same input, stopped.
    """
    from tqdm import tqdm
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 token, got {shard_size}")
    settings = {"source": source, "name": name, "shard_size": shard_size, "dtype": "uint16",
                "tokenizer": tokenizer_identity(), "inputs": fingerprint(source)}
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(out_dir)
    if manifest is not None:
        check_made_from(out_dir, manifest, settings)
        if manifest["complete"]:
            print(f"{out_dir}: all {len(manifest['shards'])} shards already done")
            return manifest
        for s in manifest["shards"]:  # finished shards must still be there, whole
            check_shard(os.path.join(out_dir, s["file"]), s["tokens"])
    else:
        manifest = {**settings, "shards": [], "complete": False}
    shards = manifest["shards"]
    # where the next shard starts: after `next_doc` whole documents and `next_offset` tokens of the next one
    next_doc, next_offset = (shards[-1]["next_doc"], shards[-1]["next_offset"]) if shards else (0, 0)
    if shards:
        print(f"resuming: {len(shards)} shards done, skipping {next_doc:,} documents")

    buf = np.empty(shard_size, dtype=np.uint16)  # the shard being filled
    count = 0
    k = len(shards)
    texts = itertools.islice(iter_texts(source), next_doc, None)
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.Pool(workers)
        docs = pool.imap(tokenize, texts, chunksize=16)
    else:
        docs = map(tokenize, texts)
    bar = tqdm(total=shard_size, unit="tok", unit_scale=True, desc=f"shard {k}")

    def finish_shard(doc, offset):
        nonlocal k, count
        save_npy(shard_path(out_dir, name, k), buf[:count])
        shards.append({"file": os.path.basename(shard_path(out_dir, name, k)), "tokens": int(count),
                       "next_doc": doc, "next_offset": offset})
        write_json(os.path.join(out_dir, MANIFEST), manifest)
        k, count = k + 1, 0

    try:
        for doc, tokens in enumerate(docs, start=next_doc):
            # the resumed document's first tokens are in the last shard
            start = next_offset if doc == next_doc else 0
            while start < len(tokens):
                # a document may spill into the next shard
                take = min(shard_size - count, len(tokens) - start)
                buf[count:count + take] = tokens[start:start + take]
                count, start = count + take, start + take
                bar.update(take)
                if count == shard_size:
                    finish_shard(doc + (start == len(tokens)), 0 if start == len(tokens) else start)
                    if max_shards is not None and k >= max_shards:
                        return manifest  # enough (a test, or a quick look); a rerun continues from here
                    bar.close()
                    bar = tqdm(total=shard_size, unit="tok", unit_scale=True, desc=f"shard {k}")
        if count > 0:
            finish_shard(doc + 1, 0)  # the last, shorter shard
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest["complete"] = True
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    print(f"{out_dir}: {len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens")
    return manifest


def input_changes(old, new):
    """Each data file that differs between two fingerprints, as "path: what changed"."""
    was = {f["path"]: f for f in old.get("data_files", [])}
    changes = []
    for f in new.get("data_files", []):
        before = was.get(f["path"])
        if before is None:
            changes.append(f"{f['path']}: not among the files they were made from")
        elif before["bytes"] != f["bytes"]:
            changes.append(f"{f['path']}: size {before['bytes']:,} -> {f['bytes']:,} bytes, contents changed")
        elif before["sha256"] != f["sha256"]:
            changes.append(f"{f['path']}: same size ({f['bytes']:,} bytes), contents changed "
                           f"(sha256 {before['sha256'][:12]}... -> {f['sha256'][:12]}...)")
    return changes or [f"{old} -> {new}"]


def check_made_from(out_dir, manifest, settings):
    """UsageError unless the shards in out_dir were made (or begun) with these settings, from these inputs."""
    redo = f"use another --out-dir, or delete {out_dir} to start over"
    if "inputs" not in manifest:  # written before the shards recorded their inputs: nothing to compare
        raise UsageError(f"{out_dir}/{MANIFEST} was made before the shards recorded their inputs (each "
                         f"data file's size and sha256, the tokenizer), so a rerun cannot tell whether its "
                         f"shards are what the input makes now: {redo}")
    old = {k: manifest.get(k) for k in settings if k != "inputs"}
    new = {k: v for k, v in settings.items() if k != "inputs"}
    if old != new:
        raise UsageError(f"{out_dir}/{MANIFEST} was made with {old}, not {new}: {redo}")
    if manifest["inputs"] != settings["inputs"]:
        changes = "; ".join(input_changes(manifest["inputs"], settings["inputs"]))
        raise UsageError(f"the input changed since the shards in {out_dir} were made: {changes}. "
                         f"Kept or resumed, they would be the old corpus, or a mix of two: {redo}")

# -----------------------------------------------------------------------------
# Reading shards back: validation, and the batch loader


def check_shard(path, expected_tokens=None):
    """Open a shard memory-mapped, with a clear error for anything that is not a whole uint16 token array."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} is missing (listed in {MANIFEST})")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # bad header, or a file shorter than its header says
        raise ValueError(f"shard {path} is truncated or not a .npy file ({e}); "
                         "delete it and rerun data/fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, "
                         "expected 1-D uint16 tokens")
    if expected_tokens is not None and len(tokens) != expected_tokens:
        raise ValueError(f"shard {path} holds {len(tokens):,} tokens "
                         f"but {MANIFEST} says {expected_tokens:,}: "
                         f"it was changed after it was written; delete it and rerun data/fineweb.py")
    return tokens


def list_shards(data_dir, split):
    """The sorted shard files of one split, each checked (against manifest.json when there is one)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data dir {data_dir} does not exist: make shards with "
                                f"`python data/fineweb.py --out-dir {data_dir}` "
                                "(or --data-files for local text)")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.npy) in {data_dir}")
    manifest = read_manifest(data_dir)
    counts = {s["file"]: s["tokens"] for s in manifest["shards"]} if manifest else {}
    if manifest:
        for p in paths:
            if os.path.basename(p) not in counts:
                raise ValueError(f"shard {p} is not listed in {data_dir}/{MANIFEST}: "
                                 "a leftover of another run?")
        listed = [os.path.join(data_dir, f) for f in counts if f"_{split}_" in f]
        paths = sorted(listed)  # check_shard names any listed shard that has gone missing
    return [(p, check_shard(p, counts.get(os.path.basename(p)))) for p in paths]


def token_ids(data_dir):
    """Sorted GPT-2 ids that occur in any shard: the vocabulary of train_lm.py --vocab-subset."""
    seen = np.zeros(2**16, dtype=bool)
    for split in ("val", "train"):
        for _, tokens in list_shards(data_dir, split):
            seen |= np.bincount(tokens, minlength=2**16) > 0
    return np.nonzero(seen)[0].tolist()


class ShardLoader:
    """
    (x, y) batches of B sequences of T tokens from one split, each rank reading its own part:
    rank r starts at offset r*B*T and every rank steps by world_size*B*T, so the ranks read
    interleaved, non-overlapping windows of the same stream. y is x shifted by one token.
    step_tokens (default B*T*world_size; train_lm passes its total batch) is what one optimizer step reads
    over all ranks and micro-steps: the loader moves to the next shard only between steps, when a whole step
    no longer fits, so the data of step s is the same however a step is split into ranks and micro-batches
    (which is what lets 2 processes reproduce 1 process with gradient accumulation exactly).
    `vocab` (sorted GPT-2 ids) maps tokens to a SubsetTokenizer's indices.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, vocab=None, step_tokens=None):
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.step_tokens = step_tokens or B * T * world_size
        assert self.step_tokens % (B * T * world_size) == 0, \
            "a step is a whole number of B*T*world_size reads"
        self.shards = list_shards(data_dir, split)
        need = self.step_tokens + 1
        for path, tokens in self.shards:
            if len(tokens) < need:
                raise ValueError(f"shard {path} holds {len(tokens):,} tokens, fewer than one step needs "
                                 f"(tokens per step + 1 = {need:,}): make bigger shards or a smaller batch")
        self.lut = None
        if vocab is not None:  # GPT-2 id -> subset index; -1 marks ids outside the subset
            self.lut = np.full(2**16, -1, dtype=np.int64)
            self.lut[np.asarray(vocab)] = np.arange(len(vocab))
        self.reset()

    def reset(self):
        self.load_state({"shard": 0, "offset": 0})

    def state(self):
        """
        The read position, the same on every rank (rank 0's offset), so any rank's checkpoint resumes all.
        """
        return {"shard": self.shard, "offset": self.pos - self.B * self.T * self.rank}

    def load_state(self, state):
        if not 0 <= state["shard"] < len(self.shards):
            raise ValueError(f"loader state {state} points past the {len(self.shards)} shards found")
        self.shard = state["shard"]
        self.pos = state["offset"] + self.B * self.T * self.rank

    def next_batch(self):
        B, T = self.B, self.T
        path, tokens = self.shards[self.shard]
        buf = np.asarray(tokens[self.pos:self.pos + B * T + 1], dtype=np.int64)  # (B*T + 1,)
        if self.lut is not None:
            buf = self.lut[buf]
            if (buf < 0).any():
                raise ValueError(f"shard {path} holds tokens outside the model's vocabulary subset")
        buf = torch.from_numpy(buf)
        x = buf[:-1].view(B, T)  # (B, T) inputs
        y = buf[1:].view(B, T)   # (B, T) targets: the next token of each input position
        self.pos += B * T * self.world_size
        offset = self.pos - B * T * self.rank  # rank 0's position: the same on every rank
        if offset % self.step_tokens == 0 and offset + self.step_tokens + 1 > len(tokens):
            self.shard = (self.shard + 1) % len(self.shards)  # the next step would run off this shard
            self.pos = B * T * self.rank
        return x, y

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remote-name", default="sample-10BT",
                        help="FineWeb-Edu subset: sample-10BT, sample-100BT, sample-350BT")
    parser.add_argument("--data-files", nargs="+", default=None,
                        help="local .jsonl/.parquet/.txt files instead of the hub")
    parser.add_argument("--out-dir", default="data/fineweb_edu10B")
    parser.add_argument("--name", default="edufineweb", help="shard file prefix")
    parser.add_argument("--shard-size", type=positive_int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenizer processes")
    parser.add_argument("--max-shards", type=positive_int, default=None,
                        help="stop after this many shards (rerun to continue)")
    args = parser.parse_args()
    try:
        prepare(args.out_dir, describe_source(args.remote_name, args.data_files), args.name, args.shard_size,
                args.workers, args.max_shards)
    except UsageError as e:  # out_dir holds shards of other settings or another input: the message says what
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
