# data/coco.py and data/feature_cache.py on a tiny COCO-format folder written here: odd image modes, a
# corrupt, a truncated and an empty file; the feature cache's contents, resume, refusal of other settings;
# downloads resumed with HTTP Range.
import dataclasses
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loader
from data import coco, feature_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER = "random-vit:tiny:seed0"  # 32 px, 17 tokens x 32


def write_tiny_coco(root):
    """train2017/ with 7 good images in odd modes and 3 bad files, and its caption file."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    good = {
        "rgb.jpg": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0], mode="L"),
        "gray_alpha.png": Image.fromarray(rgb).convert("LA"),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), mode="RGBA"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)),  # I;16
    }
    folder = root / "train2017"
    folder.mkdir(parents=True)
    for name, image in good.items():
        image.save(folder / name)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"this is not an image" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    names = list(good)[:3] + ["truncated.jpg"] + list(good)[3:5] + ["corrupt.jpg", "empty.jpg"] + \
        list(good)[5:]
    images = [dict(id=100 + i, file_name=n, width=70, height=50) for i, n in enumerate(names)]
    annotations = [dict(id=1000 + 5 * i + k, image_id=100 + i, caption=f" caption {k} of {n} ")
                   for i, n in enumerate(names) for k in range(5)]
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(dict(images=images,
                                                                                  annotations=annotations)))
    return names


@pytest.fixture
def tiny_coco(tmp_path):
    names = write_tiny_coco(tmp_path / "coco")
    return str(tmp_path / "coco"), names


def test_load_records(tiny_coco):
    root, names = tiny_coco
    records = coco.load_records(root, "train")
    assert [r["image_id"] for r in records] == list(range(100, 100 + len(names)))
    assert records[0]["path"] == os.path.join(root, "train2017", names[0]) and \
        os.path.isfile(records[0]["path"])
    assert records[0]["captions"] == [f"caption {k} of {names[0]}" for k in range(5)]  # stripped, all five
    with pytest.raises(FileNotFoundError, match="captions_val2017.json"):
        coco.load_records(root, "val")


def test_karpathy_split(tmp_path):
    root = tmp_path / "coco"
    for split, ids in (("train", [1, 2, 3]), ("val", [4, 5])):
        (root / f"{split}2017").mkdir(parents=True)
        for i in ids:
            Image.new("RGB", (8, 8)).save(root / f"{split}2017" / f"{i:012d}.jpg")
    splits = {1: "train", 2: "restval", 3: "test", 4: "val", 5: "restval"}
    images = [dict(filepath="val2014" if i > 3 else "train2014", filename=f"COCO_x2014_{i:012d}.jpg",
                   cocoid=i, split=s, sentences=[dict(raw=f"A caption of {i}. "), dict(raw="another")])
              for i, s in splits.items()]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(dict(images=images)))
    train = coco.load_records(str(root), "train", karpathy_json=str(path))
    assert [r["image_id"] for r in train] == [1, 2, 5]  # train + restval
    assert train[2]["path"] == str(root / "val2017" / "000000000005.jpg")  # found in 2017's folders by id
    assert train[0]["captions"] == ["A caption of 1.", "another"]
    assert [r["image_id"] for r in coco.load_records(str(root), "test", karpathy_json=str(path))] == [3]
    os.remove(root / "val2017" / "000000000004.jpg")
    with pytest.raises(FileNotFoundError, match="COCO id 4"):
        coco.load_records(str(root), "val", karpathy_json=str(path))


def expected_tokens(records, model, grid):
    """What the cache must hold: our own preprocessing and model, one image at a time, in fp16."""
    images = [clip_loader.to_rgb(Image.open(r["path"])) for r in records]
    return clip_loader.encode_images(model, images, grid).half()


def test_feature_cache_contents_and_bad_images(tiny_coco, tmp_path, capsys):
    root, names = tiny_coco
    records = coco.load_records(root, "train")
    model = clip_loader.load_clip(ENCODER)
    out = str(tmp_path / "cache")
    cache = feature_cache.build_feature_cache(records, model, out, batch_size=4, pool_grid=(2, 2),
                                              num_workers=2)
    err = capsys.readouterr().err
    bad = {"truncated.jpg", "corrupt.jpg", "empty.jpg"}
    for name in bad:
        assert name in err  # reported with its path
    assert "skipped 3 unreadable image(s) of 10" in err
    good = [r for r in records if os.path.basename(r["path"]) not in bad]
    assert len(cache) == 7 and cache.features.shape == (7, 5, 32) and cache.features.dtype == np.float16
    assert list(cache.image_ids) == [r["image_id"] for r in good]
    torch.testing.assert_close(torch.from_numpy(np.array(cache.features)),
                               expected_tokens(good, model, (2, 2)), atol=2e-3, rtol=2e-3)
    row = cache.row_of(good[4]["image_id"])
    assert row == 4 and cache.batch([row]).shape == (1, 5, 32) and cache.batch([row]).dtype == torch.float32
    m = cache.manifest
    assert cache.spec == clip_loader.VisualFeatures(ENCODER, -1, (2, 2), 32, 32) and cache.spec.tokens == 5
    assert m["format"] == feature_cache.FORMAT and m["tokens"] == 5
    assert m["visual_features"] == cache.spec.as_dict()
    assert m["complete"] and m["count"] == 7 and m["untrained"] and len(m["skipped"]) == 3
    assert {os.path.basename(s["path"]) for s in m["skipped"]} == bad and \
        all(s["reason"] for s in m["skipped"])
    feats = np.asarray(cache.features, dtype=np.float64)
    np.testing.assert_allclose(cache.mean, feats.mean(0), atol=1e-4)
    np.testing.assert_allclose(cache.std, feats.std(0), atol=1e-3)
    # the sixteen-bit image was scaled, not clipped to white
    assert cache.batch([cache.row_of(records[names.index("sixteen.png")]["image_id"])]).std() > 0
    # features preloaded to a device are gathered there, and are the same
    ids = [good[i]["image_id"] for i in (5, 0, 3)]
    assert torch.equal(feature_cache.FeatureCache(out).load_to("cpu").tokens(ids)[1], cache.tokens(ids)[1])
    # a second run has nothing to do; re-opening with the right expectations works
    feature_cache.build_feature_cache(records, model, out, batch_size=4, pool_grid=(2, 2))
    assert "nothing to do" in capsys.readouterr().err
    feature_cache.FeatureCache(out, expect=clip_loader.VisualFeatures.of(model, (2, 2)))


def test_interrupted_build_resumes_without_recomputing(tiny_coco, tmp_path):
    root, _ = tiny_coco
    records = coco.load_records(root, "train")
    model = clip_loader.load_clip(ENCODER)
    out = str(tmp_path / "cache")
    calls = []
    forward = model.forward

    def dies_on_second_batch(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed ctrl-C during batch 2
        return forward(pixels)

    model.forward = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        feature_cache.build_feature_cache(records, model, out, batch_size=3, pool_grid=(2, 2))
    with pytest.raises(ValueError, match="incomplete"):
        feature_cache.FeatureCache(out)
    calls.clear()
    model.forward = lambda pixels: (calls.append(len(pixels)), forward(pixels))[1]
    cache = feature_cache.build_feature_cache(records, model, out, batch_size=3, pool_grid=(2, 2))
    # batch 1 (3 images) was kept; batch 2 died before it was recorded and is redone; of the 7 images left, 3
    # are unreadable, so the model sees exactly 4
    assert sum(calls) == 4
    fresh = feature_cache.build_feature_cache(records, clip_loader.load_clip(ENCODER),
                                              str(tmp_path / "fresh"), batch_size=5, pool_grid=(2, 2))
    # the same numbers up to fp16 rounding (a batch of 3 and a batch of 5 may round a last bit differently)
    np.testing.assert_allclose(np.asarray(cache.features, dtype=np.float32),
                               np.asarray(fresh.features, dtype=np.float32), atol=2e-3, rtol=2e-3)
    assert list(cache.image_ids) == list(fresh.image_ids)


def test_progress_is_recorded_every_flush_every_batches(tiny_coco, tmp_path, monkeypatch):
    # each record forces the rows out to disk and waits: every 2nd batch here, and once at the end
    records = coco.load_records(tiny_coco[0], "train")
    flushes = []
    flush = np.memmap.flush
    monkeypatch.setattr(np.memmap, "flush", lambda self: (flushes.append(1), flush(self))[1])
    for flush_every, records_written in ((1, 5), (2, 3)):  # 5 batches of 2
        flushes.clear()
        feature_cache.build_feature_cache(records, ENCODER, str(tmp_path / f"every_{flush_every}"),
                                          batch_size=2, pool_grid=(2, 2), flush_every=flush_every)
        assert len(flushes) == records_written


KILL_AT_FOURTH_BATCH = """
import os, signal, sys
sys.path.insert(0, {root!r})
import clip_loader
from data import coco, feature_cache
records = coco.load_records(sys.argv[1], "train")
model = clip_loader.load_clip("random-vit:tiny:seed0")
forward, calls = model.forward, []
def dies_on_fourth_batch(pixels):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all: a re-run finds only what was recorded
    return forward(pixels)
model.forward = dies_on_fourth_batch
feature_cache.build_feature_cache([r for r in records if r["image_id"] in {ids}], model, sys.argv[2],
                                  batch_size=2, pool_grid=(2, 2), num_workers=1, flush_every=2)
"""


def test_a_hard_kill_between_records_redoes_only_the_unrecorded_batches(tiny_coco, tmp_path):
    root, names = tiny_coco
    bad = {"truncated.jpg", "corrupt.jpg", "empty.jpg"}
    records = [r for r in coco.load_records(root, "train") if os.path.basename(r["path"]) not in bad]
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_FOURTH_BATCH.format(root=ROOT, ids={r["image_id"] for r in records}))
    out = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, str(script), root, out], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    model = clip_loader.load_clip(ENCODER)
    calls = []
    forward = model.forward
    model.forward = lambda pixels: (calls.append(len(pixels)), forward(pixels))[1]
    cache = feature_cache.build_feature_cache(records, model, out, batch_size=2, pool_grid=(2, 2),
                                              flush_every=2)
    # 4 batches of 7 images: batches 1-2 were recorded, batch 3 was computed but not recorded, and is redone
    assert calls == [2, 1]
    fresh = feature_cache.build_feature_cache(records, ENCODER, str(tmp_path / "fresh"), batch_size=2,
                                              pool_grid=(2, 2))
    assert list(cache.image_ids) == list(fresh.image_ids)
    np.testing.assert_array_equal(np.asarray(cache.features), np.asarray(fresh.features))


def test_encoding_on_the_fly_decodes_in_threads_with_the_same_results(tiny_coco, capsys):
    root, names = tiny_coco
    records = coco.load_records(root, "train")
    model = clip_loader.load_clip(ENCODER)
    ids = [r["image_id"] for r in records][::-1]
    serial = feature_cache.EncodedImages(model, (2, 2), records, workers=1)
    threaded = feature_cache.EncodedImages(model, (2, 2), records, workers=4)
    kept, tokens = serial.tokens(ids)
    serial_err = capsys.readouterr().err
    threaded_kept, threaded_tokens = threaded.tokens(ids)
    threaded_err = capsys.readouterr().err
    assert threaded_kept == kept and torch.equal(threaded_tokens, tokens)
    # the unreadable files are left out and reported, in the order asked for, as the serial loop does
    bad = [r for r in records[::-1] if feature_cache.load_pixels(r["path"], 32)[0] is None]
    assert [os.path.basename(r["path"]) for r in bad] == ["empty.jpg", "corrupt.jpg", "truncated.jpg"]
    assert kept == [i for i in ids if i not in {r["image_id"] for r in bad}] and len(tokens) == 7
    assert threaded.skipped == serial.skipped == \
        [dict(image_id=r["image_id"], path=r["path"], reason=feature_cache.load_pixels(r["path"], 32)[1])
         for r in bad]
    assert threaded_err == serial_err and all(r["path"] in serial_err for r in bad)


def test_other_settings_are_refused(tiny_coco, tmp_path):
    root, _ = tiny_coco
    records = coco.load_records(root, "train")[:4]
    out = str(tmp_path / "cache")
    feature_cache.build_feature_cache(records, ENCODER, out, batch_size=4, pool_grid=(2, 2))
    with pytest.raises(ValueError, match=r"grid: cache has \[2, 2\], expected \[4, 4\]"):
        feature_cache.build_feature_cache(records, ENCODER, out, batch_size=4, pool_grid=None)
    with pytest.raises(ValueError, match="encoder"):
        feature_cache.build_feature_cache(records, "random-vit:tiny:seed1", out, batch_size=4,
                                          pool_grid=(2, 2))
    with pytest.raises(ValueError, match="image_list_sha256"):
        feature_cache.build_feature_cache(records[:3], ENCODER, out, batch_size=4, pool_grid=(2, 2))
    spec = feature_cache.FeatureCache(out).spec
    with pytest.raises(ValueError, match="layer: cache has -1, expected -2"):
        feature_cache.FeatureCache(out, expect=dataclasses.replace(spec, layer=-2))
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        feature_cache.FeatureCache(str(tmp_path))

# -----------------------------------------------------------------------------
# Downloads


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD, honouring 'Range: bytes=N-' (Python's own http.server ignores Range)."""
    PAYLOAD = bytes(range(256)) * 400
    ranges = []

    def do_GET(self):
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.ranges.append(start)
        body = self.PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_with_http_range(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/annotations.zip"
        dest = str(tmp_path / "annotations.zip")
        with open(dest + ".part", "wb") as f:
            f.write(RangeHandler.PAYLOAD[:30000])  # an interrupted earlier download
        coco.download(url, dest, chunk_size=4096)
        assert RangeHandler.ranges == [30000]  # only the missing bytes were asked for
        assert open(dest, "rb").read() == RangeHandler.PAYLOAD and not os.path.exists(dest + ".part")
    finally:
        server.shutdown()
        server.server_close()
    # offline (nothing listens there any more): a clear error, not a traceback from deep inside urllib
    with pytest.raises(RuntimeError, match="Offline"):
        coco.download(url, str(tmp_path / "other.zip"))
