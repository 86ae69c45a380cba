"""
data/fineweb.py: shards round-trip from jsonl and parquet, resume, refusal of a changed source, the loader.
"""
import glob
import json
import os

import numpy as np
import pytest
import torch

from data import fineweb
from gpt2 import EOT, get_tokenizer

DOCS = [f"Document {i}: " + "the cat sat on the mat, and then it ran away. " * (i % 5 + 1) for i in range(40)]


def write_jsonl(path, docs=DOCS):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return str(path)


def write_parquet(path, docs=DOCS):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), str(path))
    return str(path)


def expected_tokens(docs=DOCS):
    enc = get_tokenizer()
    return np.concatenate([[EOT] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)


def read_all(out_dir):
    m = fineweb.read_manifest(out_dir)
    return np.concatenate([np.load(os.path.join(out_dir, s["file"])) for s in m["shards"]]), m

# -----------------------------------------------------------------------------
# writing shards


@pytest.mark.parametrize("fmt,workers", [("jsonl", 1), ("parquet", 2)])
def test_shards_round_trip(tmp_path, fmt, workers):
    src = write_jsonl(tmp_path / "d.jsonl") if fmt == "jsonl" else write_parquet(tmp_path / "d.parquet")
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[src]), name="t", shard_size=300, workers=workers)
    tokens, m = read_all(out)
    want = expected_tokens()
    # every document, EOT first, in order, nothing lost at shard boundaries
    assert np.array_equal(tokens, want)
    assert m["complete"] and m["shards"][0]["file"] == "t_val_000000.npy"
    assert all(s["file"] == f"t_train_{k:06d}.npy" for k, s in enumerate(m["shards"]) if k > 0)
    assert [s["tokens"] for s in m["shards"]][:-1] == [300] * (len(m["shards"]) - 1)
    assert sum(s["tokens"] for s in m["shards"]) == len(want)
    for s in m["shards"]:
        a = np.load(os.path.join(out, s["file"]))
        assert a.dtype == np.uint16 and len(a) == s["tokens"]


def test_resume_keeps_finished_shards_and_rewrites_partial(tmp_path):
    src = fineweb.describe_source(data_files=[write_jsonl(tmp_path / "d.jsonl")])
    out = str(tmp_path / "shards")
    fineweb.prepare(out, src, name="t", shard_size=250, max_shards=2)  # "interrupted" after 2 shards
    finished = [os.path.join(out, f"t_{s}_{k:06d}.npy") for k, s in [(0, "val"), (1, "train")]]
    mtimes = [os.stat(p).st_mtime_ns for p in finished]
    np.save(os.path.join(out, "t_train_000002.npy"), np.zeros(7, dtype=np.uint16))  # a stale partial shard
    fineweb.prepare(out, src, name="t", shard_size=250)
    assert [os.stat(p).st_mtime_ns for p in finished] == mtimes  # kept, not rewritten
    tokens, m = read_all(out)
    assert np.array_equal(tokens, expected_tokens()) and m["complete"]


def test_rerun_with_other_source_or_shard_size_is_refused(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl")
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[:5])
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[a]), name="t", shard_size=250, max_shards=1)
    with pytest.raises(ValueError, match="was made with"):
        fineweb.prepare(out, fineweb.describe_source(data_files=[b]), name="t", shard_size=250)
    with pytest.raises(ValueError, match="was made with"):
        fineweb.prepare(out, fineweb.describe_source(data_files=[a]), name="t", shard_size=999)


def test_offline_hub_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"Offline\?.*--data-files"):
        fineweb.prepare(str(tmp_path / "s"), fineweb.describe_source("sample-10BT"), shard_size=100)

# -----------------------------------------------------------------------------
# reading shards


@pytest.fixture
def shards(tmp_path):
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[write_jsonl(tmp_path / "d.jsonl")]), name="t",
                    shard_size=400)
    return out


def test_loader_batches_ranks_and_exact_state(shards):
    B, T = 2, 16
    train = np.concatenate([np.load(p) for p in sorted(glob.glob(f"{shards}/t_train_*.npy"))[:1]])
    one = fineweb.ShardLoader(shards, "train", B, T)
    x, y = one.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == (B, T)
    assert np.array_equal(x.flatten().numpy(), train[:B * T]) and \
        np.array_equal(y.flatten().numpy(), train[1:B * T + 1])
    # two ranks read, side by side, what one process reads in two consecutive batches
    one.reset()
    first, second = one.next_batch()[0], one.next_batch()[0]
    r0 = fineweb.ShardLoader(shards, "train", B, T, rank=0, world_size=2)
    r1 = fineweb.ShardLoader(shards, "train", B, T, rank=1, world_size=2)
    assert np.array_equal(r0.next_batch()[0], first) and np.array_equal(r1.next_batch()[0], second)
    # state() / load_state() resume mid-stream, across a shard change, on any rank
    for _ in range(15):
        r1.next_batch()
    state = r1.state()
    want = [r1.next_batch()[0] for _ in range(20)]
    other = fineweb.ShardLoader(shards, "train", B, T, rank=1, world_size=2)
    other.load_state(state)
    assert all(np.array_equal(other.next_batch()[0], w) for w in want)


def test_loader_vocab_subset_maps_ids(shards):
    ids = fineweb.token_ids(shards)
    assert EOT in ids and ids == sorted(ids)
    plain = fineweb.ShardLoader(shards, "val", 2, 8).next_batch()[0]
    mapped = fineweb.ShardLoader(shards, "val", 2, 8, vocab=ids).next_batch()[0]
    assert int(mapped.max()) < len(ids)
    assert np.array_equal(np.asarray(ids)[mapped.numpy()], plain.numpy())


def test_loader_clear_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fineweb.ShardLoader(str(tmp_path / "nowhere"), "train", 2, 8)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no train shards"):
        fineweb.ShardLoader(str(tmp_path / "empty"), "train", 2, 8)
    with pytest.raises(ValueError, match="fewer than one step needs"):
        fineweb.ShardLoader(shards, "train", 64, 64)
    path = os.path.join(shards, "t_train_000001.npy")
    good = np.load(path)
    with open(path, "r+b") as f:  # truncated: cut the file in half
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="t_train_000001.npy is truncated"):
        fineweb.ShardLoader(shards, "train", 2, 8)
    np.save(path, good.astype(np.int32))  # wrong dtype
    with pytest.raises(ValueError, match="t_train_000001.npy holds int32"):
        fineweb.ShardLoader(shards, "train", 2, 8)
    np.save(path, good[:-3])  # not what the manifest says
    with pytest.raises(ValueError, match=r"t_train_000001.npy holds 397 tokens but manifest.json says 400"):
        fineweb.ShardLoader(shards, "train", 2, 8)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="t_train_000001.npy is missing"):
        fineweb.ShardLoader(shards, "train", 2, 8)
    np.save(path, good)
    np.save(os.path.join(shards, "t_train_000099.npy"), good)  # a stray file the manifest never listed
    with pytest.raises(ValueError, match="t_train_000099.npy is not listed"):
        fineweb.ShardLoader(shards, "train", 2, 8)
