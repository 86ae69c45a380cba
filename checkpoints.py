"""
A trainer's run folder (--out-dir), the same for train_lm.py, train_caption.py and miniature/train_clip.py:
the checkpoint a run resumes from, the checkpoints it writes (atomically, by rank 0, never with non-finite
weights), and its log.jsonl. A resumed run continues exactly: weights, optimizer moments, data position and
every RNG come back.

    run = RunFolder(args, dist, "train_caption.py")  # refuses another run's folder (--resume, --overwrite)
    ckpt = run.resume(optimizer, args)           # None, or the checkpoint (optimizer, RNGs already restored)
    run.start_log(start_step, config, dist.device)
    run.save("ckpt_000500.pt", state, params)    # state: dict of tensors, plain data (weights_only loads it)
    run.finish(step=end_step)
"""
import glob
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as torch_dist

from common import UsageError, atomic_open, load_checkpoint, lock_folder, save_checkpoint
from train_utils import from_rank0, print0

TRAINERS = ("train_lm.py", "train_caption.py", "miniature/train_clip.py",  # a checkpoint's "trainer" wrote it
            "qformer_stage1.py", "tune_lm.py")


class RunFolder:

    def __init__(self, args, dist, trainer, outputs=()):
        """
        Claim args.out_dir for this run of `trainer` (one of TRAINERS) and read the checkpoint --resume names
        ('auto': the newest there).
        outputs: what the trainer writes besides its log and checkpoints (--overwrite deletes those too).
        """
        self.out_dir, self.master, self.device_type = args.out_dir, dist.master, dist.device_type
        self.resumed_from, self.ckpt = find_resume(args.resume, args.out_dir, args.overwrite, outputs)
        check_trainer(self.ckpt, self.resumed_from, trainer)
        # the newest good checkpoint: where a run stopped by a NaN can resume from
        self.last = self.resumed_from
        self.logger = None

    def resume(self, optimizer, args):
        """The checkpoint to go on from, with the optimizer's moments and every RNG restored (the trainer
        loads its own weights and data position from it), or None for a fresh run."""
        ckpt, self.ckpt = self.ckpt, None  # a big model's optimizer state is large: keep no second copy
        if ckpt is not None:
            restore_training_state(ckpt, optimizer, args)
            if self.device_type == "cpu":
                note_thread_count(ckpt, self.resumed_from)
        return ckpt

    def start_log(self, start_step, config, device):
        """Open log.jsonl (rank 0): a fresh one, or the resumed run's, cut back to start_step."""
        if self.master:
            self.logger = JsonlLogger(os.path.join(self.out_dir, "log.jsonl"), resume_step=start_step or None,
                                      config=config, device=device)

    def log(self, **record):
        if self.logger:
            self.logger.log(**record)

    def save(self, name, state, params):
        """
        Write state to out_dir/name unless `params` (the trained weights) hold a NaN or inf; return its path.
        """
        if not all_finite(params):
            raise FloatingPointError(f"weights are not finite; not checkpointing them; last good checkpoint: "
                                     f"{self.last}")
        if self.master:
            self.last = os.path.join(self.out_dir, name)
            # the CPU thread count: the order of a CPU's float sums depends on it (see note_thread_count)
            save_checkpoint(self.last, {**state, "threads": torch.get_num_threads()})
        return self.last

    def finish(self, **record):
        """The log's last record: the run (or this job of it, with --stop-step) ended here."""
        self.log(event="end", **record)
        if self.logger:
            self.logger.close()


def check_trainer(ckpt, path, trainer):
    """A UsageError unless ckpt is a checkpoint of this trainer (or None)."""
    if ckpt is None or (isinstance(ckpt, dict) and ckpt.get("trainer") == trainer):
        return
    found = ckpt.get("trainer") if isinstance(ckpt, dict) else None
    whose = f"{found} wrote it" if found in TRAINERS else "none of this project's trainers wrote it"
    raise UsageError(f"--resume {path} is not a {trainer} checkpoint ({whose}): resume from one of the "
                     f"ckpt_*.pt files {trainer} writes, or start over with --overwrite")

# -----------------------------------------------------------------------------
# Which checkpoint to resume from, and whose folder it is


def latest_checkpoint(out_dir):
    """The newest checkpoint in out_dir (what --resume auto continues from): ckpt_final.pt, else the highest
    numbered ckpt_NNNNNN.pt; None if there is none."""
    final = os.path.join(out_dir, "ckpt_final.pt")
    paths = sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt")))
    return final if os.path.exists(final) else paths[-1] if paths else None


def find_resume(resume, out_dir, overwrite=False, outputs=()):
    """
    (path, contents) of the checkpoint --resume names ('auto': the newest in out_dir), or (None, None). Rank 0
    decides and reads it, and every process gets what rank 0 found: on several machines only rank 0's disk is
    sure to hold the run's checkpoints. Without --resume, an out_dir that holds another run is refused (two
    runs in one folder would mix their logs and checkpoints), unless --overwrite deletes that run's files
    first: its log, its checkpoints and its other outputs (file names in out_dir), so that an interrupted new
    run leaves none of them.
    """
    path, ckpt = None, None
    if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        lock_folder(out_dir, "--out-dir")  # one run at a time in a run folder
        if resume is None:
            claim_out_dir(out_dir, overwrite, outputs)
        path = latest_checkpoint(out_dir) if resume == "auto" else resume
        if resume == "auto" and path is None:
            print0(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
        ckpt = load_checkpoint(path) if path else None
    return from_rank0((path, ckpt))


def claim_out_dir(out_dir, overwrite, outputs=()):
    """Refuse an out_dir that holds a run (a log, checkpoints, outputs); with overwrite, delete those files
    instead."""
    named = [os.path.join(out_dir, name) for name in ("log.jsonl", *outputs)]
    run_files = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt"))
                       + [p for p in named if os.path.exists(p)])
    if not run_files:
        return
    if not overwrite:
        raise UsageError(f"--out-dir {out_dir} already holds a run "
                         f"({', '.join(map(os.path.basename, run_files[:4]))}"
                         f"{' ...' if len(run_files) > 4 else ''}): continue it with --resume auto, "
                         "train into a new or empty --out-dir, "
                         "or pass --overwrite to delete that run's files first")
    for path in run_files:
        os.remove(path)
    print0(f"--overwrite: deleted {len(run_files)} file(s) of the earlier run in {out_dir}")


# -----------------------------------------------------------------------------
# What a resumed run takes back besides its weights: the optimizer and every RNG


def load_optimizer_state(optimizer, state, keep=("lr", "base_lr", "weight_decay")):
    """
    optimizer.load_state_dict(state), keeping this run's hyper-parameters: the checkpoint brings back the
    moments and step counts, but not its learning rate or weight decay. So a run resumed with another --lr
    (after a NaN, say) really trains with it.
    """
    now = [{k: group[k] for k in keep if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, now):
        group.update(settings)


def restore_training_state(ckpt, optimizer, args):
    """
    What a resumed run takes back besides its weights: the optimizer's moments (with this run's
    hyper-parameters, see load_optimizer_state) and every RNG. The flags this run changes are printed, so
    nothing changes unseen.
    """
    load_optimizer_state(optimizer, ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    changed = changed_args(ckpt["args"], args)
    if changed:
        print0(f"note: resuming with changed arguments (checkpoint, now), applied from here on: {changed}")


def note_thread_count(ckpt, path):
    """
    On a CPU the sums inside a matmul are split over the threads, so another thread count adds the same
    numbers in another order: a run resumed with another count continues close to, but not bit for bit like,
    the run it continues. Said, not refused: the run is still right, only not exactly reproducible.
    """
    then, now = ckpt.get("threads"), torch.get_num_threads()
    if then is not None and then != now:
        print0(f"note: {path} was trained with {then} CPU thread(s), this run has {now}: it continues close "
               f"to the uninterrupted run, but not bit for bit (for that: OMP_NUM_THREADS={then})")


def changed_args(ckpt_args, args, ignore=("resume", "stop_step", "overwrite")):
    """{flag: (in the checkpoint, now)} for every argument a resumed run changes: printed, so nothing changes
    unseen."""
    return {k: (ckpt_args.get(k), v) for k, v in vars(args).items()
            if k not in ignore and ckpt_args.get(k) != v}


def all_finite(params):
    """True when every parameter is finite: the check before a checkpoint may replace the last good one."""
    return all(bool(torch.isfinite(p).all()) for p in params)


def rng_state():
    """Every RNG a training step touches. numpy's state tuple becomes a dict of a str, a tensor and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": _to_lists(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving machine; a machine with fewer GPUs restores those it has
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


# python's random state is nested tuples; weights_only loads lists back, so convert both ways
def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x

# -----------------------------------------------------------------------------
# The log


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout, or git not installed


class JsonlLogger:
    """
    One JSON object per line; the first record of every run holds its config and environment. A run resumed at
    step N continues the same file, without the records of steps >= N that the interrupted job logged after
    its last checkpoint: those steps are done again, and the log must read as one run.
    """

    def __init__(self, path, resume_step=None, config=None, device=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f
                           if line.strip().startswith("{") and line.strip().endswith("}")]
            kept = [r for r in records if r.get("step") is None or r["step"] < resume_step]
        with atomic_open(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.f = open(path, "a")
        self.log(event="start", resume=resume_step is not None, config=config, git=git_revision(),
                 torch=torch.__version__, device=device, argv=sys.argv, time=time.time())

    def log(self, **record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()
