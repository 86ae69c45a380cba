"""
The bad-input catalogue (tests/test_bad_inputs.py), continued: a corpus that changed under its shards.
"""
import hashlib
import json
import os
import pathlib
import runpy
import sys

import pytest

from data import fineweb
from tests.test_fineweb import DOCS, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shard_state(out):
    """Every file of a shard folder with its contents: what a refused rerun must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).iterdir())}

# -----------------------------------------------------------------------------
# 33. `data/fineweb.py --data-files w/corpus.jsonl --out-dir shards` run again after the corpus changed at the
#     same path (it said "all 4 shards already done" and kept the old shards: the manifest recorded only the
#     path), or an interrupted run resumed after the corpus changed (its shards mixed two corpora)


def fineweb_cli(argv, monkeypatch, capsys):
    """`python data/fineweb.py argv`, in this process (no second torch import): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["data/fineweb.py", *argv])
    try:
        runpy.run_path(os.path.join(ROOT, "data", "fineweb.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_33_a_corpus_changed_at_the_same_path_is_refused_not_reported_done(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data-files", "w/corpus.jsonl", "--out-dir", "shards", "--shard-size", "300", "--workers", "1"]
    (tmp_path / "w").mkdir()
    corpus = write_jsonl(tmp_path / "w" / "corpus.jsonl")
    assert fineweb_cli(argv, monkeypatch, capsys)[0] == 0
    before = shard_state("shards")
    size = os.path.getsize(corpus)
    write_jsonl(corpus, [d.replace("cat", "little dog") for d in DOCS])  # other text, at the same path
    code, out, err = fineweb_cli(argv, monkeypatch, capsys)  # the same command again
    assert code == 2 and "already done" not in out, out + err
    assert (f"fineweb.py: error: the input changed since the shards in shards were made: {corpus}: "
            f"size {size:,} -> {os.path.getsize(corpus):,} bytes, contents changed") in err
    assert err.endswith("use another --out-dir, or delete shards to start over\n")
    # the same length, other text: caught by the sha256, not the size
    write_jsonl(corpus, [d.replace("cat", "cow") for d in DOCS])
    assert os.path.getsize(corpus) == size
    code, out, err = fineweb_cli(argv, monkeypatch, capsys)
    assert code == 2 and f"{corpus}: same size ({size:,} bytes), contents changed (sha256 " in err
    assert shard_state("shards") == before  # nothing touched


def test_33_the_same_corpus_rerun_is_still_already_done_and_recorded(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=300)
    m = fineweb.read_manifest(out)
    # what the shards were made from: the file, byte for byte; the tokenizer; the shard size
    with open(corpus, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert m["inputs"] == {"data_files": [{"path": corpus, "bytes": os.path.getsize(corpus),
                                           "sha256": digest}]}
    assert m["tokenizer"]["encoding"] == "gpt2" and m["tokenizer"]["n_vocab"] == 50257
    assert m["shard_size"] == 300
    before = shard_state(out)
    os.utime(corpus, (1, 1))  # touched (copied, restored from a backup), not changed: its contents decide
    capsys.readouterr()
    fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=300)
    assert f"all {len(m['shards'])} shards already done" in capsys.readouterr().out
    assert shard_state(out) == before


def test_33_an_interrupted_run_on_a_changed_corpus_is_refused_not_resumed(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=250,
                    max_shards=2)  # "interrupted" after 2 shards
    before = shard_state(out)
    size = os.path.getsize(corpus)
    write_jsonl(corpus, DOCS[::-1])  # the same documents in another order: resumed, shards would repeat some
    with pytest.raises(ValueError, match=rf"the input changed since the shards in {out} were made: {corpus}: "
                                         rf"same size \({size:,} bytes\), contents changed"):
        fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=250)
    assert shard_state(out) == before and not fineweb.read_manifest(out)["complete"]


@pytest.mark.parametrize("complete", [True, False])
def test_33_shards_made_before_they_recorded_their_inputs_are_refused(tmp_path, complete):
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    out = str(tmp_path / "shards")
    fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=250,
                    max_shards=None if complete else 2)
    # the manifest as the previous version wrote it: the source's path, nothing of its contents
    path = os.path.join(out, fineweb.MANIFEST)
    with open(path) as f:
        m = json.load(f)
    m.pop("inputs", None)
    m["tokenizer"] = "gpt2"
    with open(path, "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match=rf"{out}/manifest.json was made before the shards recorded their "
                                         rf"inputs .*use another --out-dir, or delete {out} to start over"):
        fineweb.prepare(out, fineweb.describe_source(data_files=[corpus]), name="t", shard_size=250)
