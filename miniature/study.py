"""
The bridge comparison as a distribution over seeds: `make study` trains every bridge of the miniature with
several seeds, on two worlds, under two recipes, and evaluates each run with evaluate.py; this file reads
those results.

    python -m miniature.study report runs/study      # study.md, study.png and miniature/bands.json
    python -m miniature.study check runs/demo/results/results.json --world 0
        # is one demo run inside the bands?

The layout `make study` writes: runs/study/w<world>/<recipe>/s<seed>/results/results.json, one evaluate.py
comparison per (world, recipe, seed), where the recipe is "own" (each bridge's own recipe, as `make demo`
trains it) or "common" (every bridge the same steps, features and learning rate: it compares bridges, not
tuning).

One run of the demo is one draw from these distributions. The bands (mean +- 2 std over the study's seeds,
never narrower than BAND_FLOOR) say where a run of `make demo` should fall on any machine; `check` says
whether it does.
"""
import argparse
import glob
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python miniature/study.py`
from common import cpu_info, read_json, write_json  # noqa: E402

BANDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bands.json")
# what a band is drawn for, and the narrowest half-width it may have: a measure that never varied over the
# seeds (every seed 1.00) still moves by a few images on another CPU
BAND_FLOOR = {"objects": 0.02, "scene": 0.02, "CIDEr": 0.10}
# The blind row is the frozen LM's alone, and the study trains one LM per world: over its seeds the blind row
# never varies, yet an LM trained on another CPU (other floats) guesses other words, and its CIDEr moves
# outside a band of zero width. What the blind row must never do is name the scene: only that is banded.
BLIND_BANDED = ("objects", "scene")
RUN_PATH = re.compile(r"w(?P<world>[^/]+)/(?P<recipe>[^/]+)/s(?P<seed>[^/]+)/results/results\.json$")

# -----------------------------------------------------------------------------
# Reading the runs


def read_runs(study_dir):
    """Every finished run under study_dir: a list of {world, recipe, seed, rows} (rows: evaluate.py's)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(study_dir, "w*", "*", "s*", "results", "results.json"))):
        m = RUN_PATH.search(path.replace(os.sep, "/"))
        if m is None:
            continue
        result = read_json(path, "evaluation result")
        if sum(bool(row.get("blind")) for row in result["rows"]) > 1:  # evaluate.py: one blind row per LM
            raise ValueError(f"{path} compares bridges on more than one frozen LM (a blind row for each): a "
                             f"study's run holds every bridge on one LM")
        runs.append(dict(world=m["world"], recipe=m["recipe"], seed=int(m["seed"]), rows=result["rows"],
                         path=path))
    return runs


def measures(row):
    """The numbers the study follows for one row of evaluate.py's table."""
    a = row.get("attributes", {})
    out = {"CIDEr": row.get("CIDEr"), "objects": a.get("objects"), "scene": a.get("scene")}
    if row.get("query_similarity") is not None:
        out["query similarity"] = row["query_similarity"]
    return out


def collect(runs):
    """
    {(world, recipe): {bridge: {measure: [value per seed]}, ...}} with the seeds in order; bridge "blind" too.
    """
    groups = {}
    for run in sorted(runs, key=lambda r: (r["world"], r["recipe"], r["seed"])):
        group = groups.setdefault((run["world"], run["recipe"]), {})
        for row in run["rows"]:
            bridge = "blind" if row.get("blind") else row["bridge"]
            entry = group.setdefault(bridge, {"seeds": [], "params": row.get("trainable_params")})
            entry["seeds"].append(run["seed"])
            for name, value in measures(row).items():
                entry.setdefault(name, []).append(value)
    return groups


def summary(values):
    """mean, std (n - 1; 0 for one value), min, max of a list of numbers."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))

# -----------------------------------------------------------------------------
# The report: study.md, study.png, bands.json


def fmt(s, spec=".2f"):
    return f"{s['mean']:{spec}} ± {s['std']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def report(study_dir, out_dir, bands_path, machine):
    runs = read_runs(study_dir)
    if not runs:
        raise SystemExit(f"no finished runs under {study_dir} "
                         f"(expected w*/own|common/s*/results/results.json): run `make study` first")
    groups = collect(runs)
    lines = ["# The bridge comparison over seeds", "",
             f"Made by `make study` from {len(runs)} evaluated runs under `{study_dir}` on {machine}. "
             "Each cell: mean ± std over the seeds (min–max). *objects*: fraction of the 500 held-out images "
             "whose caption names both objects right (size, colour, shape); *scene*: that and their "
             "relation. *own*: each bridge's own recipe (`make demo`'s); *common*: every bridge the same "
             "steps, features and learning rate. Query similarity: how alike the Q-Former's queries' "
             "attention maps are (1 = collapsed).",
             ""]
    bands = {"machine": machine, "made_by": "make study", "worlds": {}}
    for (world, recipe), bridges in sorted(groups.items()):
        lines += [f"## World {world}, {recipe} recipe", "",
                  "| bridge | trainable params | seeds | CIDEr-D | objects | scene | query similarity |",
                  "|---|---|---|---|---|---|---|"]
        for bridge, entry in bridges.items():
            cells = [bridge, "—" if bridge == "blind" else f"{entry['params'] / 1e6:.2f}M",
                     str(len(entry["seeds"])), fmt(summary(entry["CIDEr"]), ".3f"),
                     fmt(summary(entry["objects"])), fmt(summary(entry["scene"])),
                     fmt(summary(entry["query similarity"])) if "query similarity" in entry else "—"]
            lines.append("| " + " | ".join(cells) + " |")
            if recipe == "own":
                banded = BLIND_BANDED if bridge == "blind" else BAND_FLOOR
                bands["worlds"].setdefault(world, {})[bridge] = band(entry, banded)
        seeds = next(iter(bridges.values()))["seeds"]
        lines += ["", "Per seed (objects / scene, CIDEr-D):", "",
                  "| bridge | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for bridge, entry in bridges.items():
            cells = [f"{o:.2f} / {s:.2f}, {c:.3f}"
                     for o, s, c in zip(entry["objects"], entry["scene"], entry["CIDEr"])]
            lines.append(f"| {bridge} | " + " | ".join(cells) + " |")
        lines.append("")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(groups, os.path.join(out_dir, "study.png"))
    write_json(bands_path, bands)
    print("\n".join(lines))
    print(f"wrote {out_dir}/study.md, {out_dir}/study.png and {bands_path}", file=sys.stderr)


def band(entry, banded):
    """
    Where a run of this bridge should fall: mean +- max(2 std, floor) of each banded measure (names of
    BAND_FLOOR), clipped to [0, 1].
    """
    out = {}
    for name in banded:
        floor = BAND_FLOOR[name]
        s = summary(entry[name])
        half = max(2 * s["std"], floor)
        low, high = s["mean"] - half, s["mean"] + half
        if name != "CIDEr":
            low, high = max(low, 0.0), min(high, 1.0)
        out[name] = dict(mean=s["mean"], std=s["std"], low=low, high=high, n=s["n"])
    return out


def plot(groups, out_path):
    """objects and scene per seed per bridge, one panel per (world, recipe): every seed a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted(groups)
    fig, axes = plt.subplots(2, len(keys), figsize=(3.4 * len(keys), 6), squeeze=False)
    for j, key in enumerate(keys):
        bridges = [b for b in groups[key] if b != "blind"] + ["blind"]
        for i, measure in enumerate(("objects", "scene")):
            ax = axes[i, j]
            for x, bridge in enumerate(bridges):
                values = groups[key][bridge][measure]
                jitter = [x + 0.08 * (k - (len(values) - 1) / 2) for k in range(len(values))]
                ax.scatter(jitter, values, s=18)
                ax.hlines(statistics.fmean(values), x - 0.3, x + 0.3, color="black", linewidth=1)
            ax.set_xticks(range(len(bridges)), bridges, fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"world {key[0]}, {key[1]}: {measure}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)

# -----------------------------------------------------------------------------
# The check `make demo` prints under its table


def check(results_path, world, bands_path, floor=False):
    """
    Print, per bridge, the study's band and whether this run falls inside it; return the bridges outside.
    floor: a bridge's band is only a floor (make vqa: its bridges train on another LM, and questions too, and
    their captions must be no worse than the study's); the blind row's stays a window.
    """
    if not os.path.exists(bands_path):
        print(f"(no study bands in {bands_path}: `make study` writes them)")
        return []
    bands = read_json(bands_path, "study bands")
    known = bands["worlds"].get(str(world))
    if known is None:
        print(f"(the study ran on worlds {', '.join(sorted(bands['worlds']))}, "
              f"not on world {world}: no band to check)")
        return []
    rows = read_json(results_path, "evaluation result")["rows"]
    outside = []
    print(f"\nwhere this run should fall (make study on world {world}, {bands['machine']}: mean ± 2 std "
          f"over {next(iter(known.values()))['objects']['n']} seeds):")
    for row in rows:
        bridge = "blind" if row.get("blind") else row["bridge"]
        if bridge not in known:
            continue
        got = measures(row)
        verdicts = []
        for name, b in known[bridge].items():
            high = math.inf if floor and bridge != "blind" else b["high"]
            inside = b["low"] - 1e-9 <= got[name] <= high + 1e-9
            band = f">= {b['low']:.3f}" if high == math.inf else f"in [{b['low']:.3f}, {high:.3f}]"
            verdicts.append(f"{name} {got[name]:.3f} {band}{'' if inside else ' OUTSIDE'}")
            if not inside:
                outside.append((bridge, name))
        print(f"  {bridge:8s} " + "; ".join(verdicts))
    if outside:
        print("This run is outside the study's band for " + ", ".join(f"{b} ({m})" for b, m in outside) + ". "
              "Please report it with the table above, your CPU model (`lscpu | grep 'Model name'`), "
              f"`{results_path}` and the stage logs: the comparison is meant to hold on every machine.")
    else:
        print("Every bridge is inside its band.")
    return outside


def machine_name():
    """The CPU as `lscpu` names it (model name, family and model, native bf16 or not) and its core count."""
    import platform
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:  # one marketing name covers several generations (an AMD EPYC: Zen 3 or Zen 4)
        bf16 = "avx512_bf16" if "avx512_bf16" in info.get("flags", "").split() else "no avx512_bf16"
        name += f" (family {info['cpu family']} model {info.get('model', '?')}, {bf16})"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="study.md, study.png and the bands from the finished runs")
    p.add_argument("study_dir", nargs="?", default="runs/study")
    p.add_argument("--out", default=None, help="where study.md and study.png go (default: the study folder)")
    p.add_argument("--bands", default=BANDS)
    p = sub.add_parser("check", help="is a demo run inside the study's bands?")
    p.add_argument("results", help="evaluate.py's results.json of the run")
    p.add_argument("--world", default="0", help="the world's seed (SHAPES_SEED)")
    p.add_argument("--bands", default=BANDS)
    p.add_argument("--floor", action="store_true",
                   help="the bands are floors: captions no worse than the study's (make vqa's bridges)")
    args = parser.parse_args()
    if args.command == "report":
        report(args.study_dir, args.out or args.study_dir, args.bands, machine_name())
    else:
        check(args.results, args.world, args.bands, args.floor)
