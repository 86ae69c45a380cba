"""
COCO 2017 captions: download them, and read any COCO-format root as records.

    python data/coco.py --root data/coco          # download and unzip train, val and the annotations

A COCO-format root holds annotations/captions_{split}2017.json and the images in {split}2017/ (data/shapes.py
writes the offline miniature in this format). With --karpathy-json dataset_coco.json the split is Karpathy's
(train 113k incl. restval / val 5k / test 5k), the one published CIDEr numbers use; its images are found in
train2017/ or val2017/ by their COCO id. The frozen encoder's features of a split: data/feature_cache.py.
"""
import argparse
import os
import sys
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

# runnable as `python data/coco.py` from the repo root as well as `import data.coco`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import read_json  # noqa: E402

# -----------------------------------------------------------------------------
# Download (with resume), or use a COCO folder that is already there

COCO_URLS = {
    "train": "http://images.cocodataset.org/zips/train2017.zip",          # 118k images, 18 GB
    "val": "http://images.cocodataset.org/zips/val2017.zip",              # 5k images, 0.8 GB
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",  # 241 MB
}


def download(url, dest, chunk_size=1 << 20):
    """
    Fetch url to dest with a progress bar. An interrupted download leaves dest + ".part"; the next call asks
    the server only for the missing bytes (an HTTP Range request) and appends them. dest exists only when
    complete.
    """
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part file is already the whole file
            os.replace(part, dest)
            return dest
        raise RuntimeError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). Offline? Fetch it on a machine with internet, unzip it under "
            f"the COCO root (annotations/captions_{{train,val}}2017.json, train2017/, val2017/) and pass "
            f"that root; or run the offline miniature: python data/shapes.py --out data/shapes") from e
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                           unit_scale=True, unit_divisor=1024,
                                                           desc=os.path.basename(dest)) as bar:
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)
    return dest


def has_split(root, split):
    return (os.path.isfile(os.path.join(root, "annotations", f"captions_{split}2017.json"))
            and os.path.isdir(os.path.join(root, f"{split}2017")))


def ensure_coco(root, splits=("train", "val")):
    """COCO 2017 under root: used as it is when present, otherwise downloaded and unzipped there."""
    os.makedirs(root, exist_ok=True)
    wanted = ["annotations"] * (not all(
        os.path.isfile(os.path.join(root, "annotations", f"captions_{s}2017.json")) for s in splits))
    wanted += [s for s in splits if not os.path.isdir(os.path.join(root, f"{s}2017"))]
    for name in wanted:
        url = COCO_URLS[name]
        zip_path = download(url, os.path.join(root, os.path.basename(url)))
        print(f"unzipping {zip_path}", file=sys.stderr)
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(root)
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{zip_path} is not a valid zip ({e}); delete it and download again") from e
        os.remove(zip_path)  # 19 GB we no longer need
    return root

# -----------------------------------------------------------------------------
# Records: (image, its reference captions)


def load_records(root, split, karpathy_json=None):
    """
    [{"image_id": int, "path": str, "captions": [str, ...]}, ...] for one split, in the annotation file's
    order.
    Without karpathy_json: COCO's own split (annotations/captions_{split}2017.json, images in {split}2017/).
    With it: Karpathy's split; "train" includes his "restval" images, as every paper using it does.
    """
    if karpathy_json is not None:
        return load_karpathy_records(root, split, karpathy_json)
    path = os.path.join(root, "annotations", f"captions_{split}2017.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a COCO-format root (run `python data/coco.py "
                                f"--root {root}`, or `python data/shapes.py --out {root}` for the miniature)")
    coco = read_json(path, "COCO caption file")
    if not isinstance(coco, dict) or not {"images", "annotations"} <= set(coco):
        raise ValueError(f"{path} is not a COCO caption file: it needs 'images' and 'annotations' lists "
                         f"(found {sorted(coco) if isinstance(coco, dict) else type(coco).__name__})")
    captions = {}
    for a in coco["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    images_dir = os.path.join(root, f"{split}2017")
    records = [dict(image_id=im["id"], path=inside(images_dir, im["file_name"], path, im["id"]),
                    captions=captions.get(im["id"], [])) for im in coco["images"]]
    return unique_ids(records, path)


def inside(folder, name, source, image_id):
    """
    folder/name, refused if name leads out of folder (an absolute path, or ../): a caption file names its
    images.
    """
    path = os.path.normpath(os.path.join(folder, name))
    if os.path.isabs(name) or os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) != \
            os.path.abspath(folder):
        raise ValueError(f"{source}: image {image_id}'s file name {name!r} points outside {folder}; "
                         f"a COCO file names images inside its split's folder: fix the entry")
    return path


def unique_ids(records, source):
    """
    Refuse a split that lists one image id twice: its captions would be paired with either file, silently.
    """
    seen, repeated = set(), []
    for r in records:
        if r["image_id"] in seen:
            repeated.append(r["image_id"])
        seen.add(r["image_id"])
    if repeated:
        raise ValueError(f"{source}: image id {repeated[0]} is listed more than once"
                         f"{f' (and {len(repeated) - 1} more repeated ids)' if len(repeated) > 1 else ''}; "
                         f"every image needs an id of its own: fix or remove the repeated entries")
    return records


def load_karpathy_records(root, split, karpathy_json):
    """Karpathy's dataset_coco.json: images[] with filepath, filename, cocoid, split, sentences[].raw."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"Karpathy split {split!r}: use train, val or test")
    keep = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}[split]
    data = read_json(karpathy_json, "Karpathy split file")
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{karpathy_json} is not Karpathy's dataset_coco.json: it has no 'images' list")
    images = data["images"]
    records, missing = [], []
    for im in images:
        if im["split"] not in keep:
            continue
        # his paths are COCO 2014's (val2014/COCO_val2014_000000391895.jpg); 2017 holds the same images by id
        candidates = [os.path.join(root, im.get("filepath", ""), im["filename"])]
        candidates += [os.path.join(root, f"{s}2017", f"{im['cocoid']:012d}.jpg") for s in ("train", "val")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            missing.append(im["cocoid"])
            continue
        records.append(dict(image_id=im["cocoid"],
                            path=inside(root, os.path.relpath(path, root), karpathy_json, im["cocoid"]),
                            captions=[s["raw"].strip() for s in im["sentences"]]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of Karpathy's {split} split are not under {root} "
                                f"(e.g. COCO id {missing[0]}): expected train2017/ and val2017/ there")
    return unique_ids(records, karpathy_json)

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="COCO 2017 captions: download and unzip (resumes interrupted downloads). "
                    "Feature caches: data/feature_cache.py.")
    parser.add_argument("--root", default="data/coco")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = parser.parse_args()
    ensure_coco(args.root, args.splits)
    print(f"COCO 2017 ready under {args.root}", file=sys.stderr)
