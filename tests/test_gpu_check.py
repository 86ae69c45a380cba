"""
bench/gpu_check.py, the check prepared for the first GPU lent (issue #27), run here at its tiny preset on a
CPU: the same code the GPU run takes, so that it cannot rot while no GPU is lent. Every row of its table must
be there with a positive number, except what a CPU cannot give: MFU (no dense-bf16 peak for a CPU) and the
compiled caption steps (inductor's C++ compiles took 40-64 s per bridge on the 2-core CPU; --compile runs
them).
"""
import json
import os
import subprocess
import sys

from bridges import BRIDGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (part, the start of its measure) of every row; the caption part has two per registered bridge
ROWS = [("lm", "micro-batch -B"), ("lm", "tokens/s"), ("lm", "model FLOP/s"), ("lm", "MFU"),
        ("lm", "peak memory"), ("features", "tiny ViT feature cache"), ("features", "JPEG decode"),
        ("features", "tiny ViT forward alone"), ("decode", "evaluate.py's defaults"), ("decode", "greedy"),
        ("decode", "beam 3, batch"), ("decode", "the reference project's loop"),
        ("agreement", "LM loss, bf16 against fp32")]
ROWS += [("caption", f"{bridge}, {mode}") for bridge in BRIDGES for mode in ("eager", "compiled")]
CPU_HAS_NONE = [("lm", "MFU")] + [("caption", f"{bridge}, compiled") for bridge in BRIDGES]


def test_gpu_check_runs_every_part_at_tiny_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    # one thread each: toy-sized ops split over 2 threads wait on each other when other jobs share the cores
    # (the whole run took 11 s with one thread, 29 s with two, beside other jobs on the 2-core CPU)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--preset", "tiny",
                          "--device", "cpu", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["environment"]["preset"] == "tiny"

    rows = result["rows"]
    for part, measure in ROWS:
        found = [r for r in rows if r["part"] == part and r["measure"].startswith(measure)]
        assert len(found) == 1, (part, measure, [r["measure"] for r in rows if r["part"] == part])
        value = found[0]["value"]
        if (part, measure) in CPU_HAS_NONE:
            assert value is None, found[0]
        else:
            assert isinstance(value, (int, float)) and value > 0, found[0]
        # the printed table has the same row
        assert f"| {part} | {found[0]['measure']} |" in run.stdout
    assert len(rows) == len(ROWS)
    # bf16 training follows fp32's loss closely over its 20 steps
    agreement = next(r for r in rows if r["part"] == "agreement")
    assert agreement["value"] < 1, agreement


def test_bench_decode_batch_prints_every_setting(tmp_path):
    """bench/bench_decode_batch.py (decoding's captions/s against batch size and dtype) at toy sizes."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_decode_batch.py"),
                          "--preset", "tiny", "--batch-sizes", "2", "4", "--bridges", "qformer", "xattn",
                          "--repeats", "1", "--device", "cpu", "--work-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| qformer |")
            or line.startswith("| xattn |")]
    # 2 bridges x 2 batch sizes x 2 dtypes x 2 methods, each rate positive, the first batch size's at 1.0x
    assert len(rows) == 16, run.stdout
    assert all(float(r[4].replace(",", "")) > 0 for r in rows), run.stdout
    assert all(r[5] == "1.0x" for r in rows if r[3] == "2"), run.stdout
