"""
The few helpers the training loops (train_lm.py, train_caption.py) would otherwise repeat:
device / DDP setup, rank-0 printing, GPU speed-ups, the learning-rate schedule, finding the checkpoint to resume
from and writing new ones (atomically, by files.py), RNG state that survives a weights_only load, a JSONL log,
and a clear stop on a NaN loss.
"""
import argparse
import glob
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from common import (UsageError, atomic_open, best_device, load_checkpoint, lock_folder, resolve_dtype,
                    save_checkpoint)

# -----------------------------------------------------------------------------
# Devices and distributed training


@dataclass
class Dist:
    ddp: bool          # launched by torchrun with a process group
    rank: int          # this process's index among all processes
    local_rank: int    # its index on this machine (picks the GPU)
    world_size: int    # number of processes
    device: str        # "cuda:3", "mps", "cpu"
    device_type: str   # "cuda", "mps" or "cpu": what autocast and the optimizer need

    @property
    def master(self):
        return self.rank == 0  # the one process that logs, evaluates and writes checkpoints


def setup_distributed(device=None):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: then join the process group; else one process on the best device."""
    if "RANK" in os.environ:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and device != "cpu":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
            torch_dist.init_process_group(backend="nccl")
        else:
            device = "cpu"  # gloo: DDP on CPU, used by the tests
            torch_dist.init_process_group(backend="gloo")
        return Dist(True, rank, local_rank, world_size, device, device.split(":")[0])
    device = device or best_device()
    return Dist(False, 0, 0, 1, device, device.split(":")[0])


def teardown(dist):
    if dist.ddp and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def add_run_flags(parser):
    """The flags every trainer takes for what launch() and the checkpoints decide."""
    parser.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' (the newest in --out-dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the files of a run already in --out-dir (its log, checkpoints, model)")
    parser.add_argument("--device", default=None, help="cuda / mps / cpu (default: the best present; torchrun: per rank)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on CUDA)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype (auto: bf16 on GPUs that have it, fp16 with loss scaling on older ones, "
                             "else fp32)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="AdamW's fused kernel (default: on CUDA)")


def launch(train, args):
    """
    Run train(args, dist) as this process's part of the run (one of torchrun's, or alone), then clean up.
    A UsageError (a flag that does not fit the data, the model or the out-dir) ends the process as argparse
    would: the message and exit status 2.
    """
    dist = setup_distributed(args.device)
    # The GPU speed-ups switch on by themselves on CUDA; each can be forced either way (make smoke forces them on a
    # CPU, where torch has them too: inductor compiles C++ with gcc, autocast runs in bf16, AdamW has a fused kernel).
    args.dtype = resolve_dtype(args.dtype, dist.device_type)
    if args.compile is None:
        args.compile = dist.device_type == "cuda"  # torch.compile pays off on GPUs; on a CPU it mostly costs time
    if args.fused is None:
        args.fused = dist.device_type == "cuda"
    note_short_schedule(args)
    try:
        return train(args, dist)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    finally:
        teardown(dist)


def micro_batches(total, micro, world_size, unit="examples"):
    """
    (micro-batch, accumulation steps) such that micro-batch x world_size x steps == total, the examples of one
    optimizer step. The micro-batch is the one asked for, or the largest smaller one that fits: with many processes
    each one's share of the step can be less than a micro-batch (256 pairs on 8 GPUs are 32 each, not 64).
    """
    if total % world_size:
        raise ValueError(f"the batch of {total} {unit} per step cannot be split evenly over {world_size} processes: "
                         f"choose a --total-batch that {world_size} divides")
    share = total // world_size
    fitting = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    if fitting != micro:
        print0(f"note: micro-batch {micro} -> {fitting} {unit}, so that {world_size} process(es) x accumulation "
               f"steps make the {total} {unit} of one step")
    return fitting, share // fitting


def print0(*args, **kw):
    """print, on rank 0 only (the rank comes from the process group, or torchrun's environment)."""
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kw, flush=True)


def enable_speedups(device_type):
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x the fp32 rate on A100/H100, 10-bit mantissa


def grad_scaler(device_type, dtype):
    """fp16's small exponent range underflows small gradients: scale the loss up, the gradients back down
    (GradScaler skips a step whose gradients overflowed). bf16 and fp32 need none: a disabled scaler does nothing."""
    return torch.amp.GradScaler(device_type, enabled=dtype == "fp16")

# -----------------------------------------------------------------------------
# Learning-rate schedule


def note_short_schedule(args):
    """A run shorter than its warmup never reaches --lr: legal (the smoke runs do it), but say so."""
    max_steps, warmup = args.max_steps, args.warmup_steps  # (train_caption.py's may be None: one epoch)
    if max_steps and warmup and max_steps < warmup:
        print0(f"note: --max-steps {max_steps} ends inside the {warmup}-step warmup: the learning rate rises to "
               f"{max_steps / warmup:.0%} of --lr {args.lr:g} and never reaches it (lower --warmup-steps if that is "
               f"not what you want)")


def lr_at(step, max_steps, warmup_steps, max_lr, min_lr):
    """Linear warmup over warmup_steps (step 0 gets max_lr / warmup_steps), then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)

# -----------------------------------------------------------------------------
# Checkpoints (written atomically and loaded safely by files.py) and resuming from them


def latest_checkpoint(out_dir):
    """The newest checkpoint in out_dir (what --resume auto continues from): ckpt_final.pt, else the highest
    numbered ckpt_NNNNNN.pt; None if there is none."""
    final = os.path.join(out_dir, "ckpt_final.pt")
    paths = sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt")))
    return final if os.path.exists(final) else paths[-1] if paths else None


def find_resume(resume, out_dir, overwrite=False, outputs=()):
    """
    (path, contents) of the checkpoint --resume names ('auto': the newest in out_dir), or (None, None). Rank 0
    decides and reads it, and every process gets what rank 0 found: on several machines only rank 0's disk is sure
    to hold the run's checkpoints. Without --resume, an out_dir that holds another run is refused (two runs in one
    folder would mix their logs and checkpoints), unless --overwrite deletes that run's files first: its log, its
    checkpoints and its other outputs (file names in out_dir), so that an interrupted new run leaves none of them.
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


def from_rank0(value):
    """Rank 0's value on every process (the identity without a process group)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def claim_out_dir(out_dir, overwrite, outputs=()):
    """Refuse an out_dir that holds a run (a log, checkpoints, outputs); with overwrite, delete those files instead."""
    named = [os.path.join(out_dir, name) for name in ("log.jsonl", *outputs)]
    run_files = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")) + [p for p in named if os.path.exists(p)])
    if not run_files:
        return
    if not overwrite:
        raise UsageError(f"--out-dir {out_dir} already holds a run ({', '.join(map(os.path.basename, run_files[:4]))}"
                         f"{' ...' if len(run_files) > 4 else ''}): continue it with --resume auto, train into a new or "
                         f"empty --out-dir, or pass --overwrite to delete that run's files first")
    for path in run_files:
        os.remove(path)
    print0(f"--overwrite: deleted {len(run_files)} file(s) of the earlier run in {out_dir}")


def load_optimizer_state(optimizer, state, keep=("lr", "base_lr", "weight_decay")):
    """
    optimizer.load_state_dict(state), keeping this run's hyper-parameters: the checkpoint brings back the moments
    and step counts, but not its learning rate or weight decay. So a run resumed with another --lr (after a NaN,
    say) really trains with it.
    """
    now = [{k: group[k] for k in keep if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, now):
        group.update(settings)


def restore_training_state(ckpt, optimizer, args):
    """
    What a resumed run takes back besides its weights: the optimizer's moments (with this run's hyper-parameters,
    see load_optimizer_state) and every RNG. The flags this run changes are printed, so nothing changes unseen.
    """
    load_optimizer_state(optimizer, ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    changed = changed_args(ckpt["args"], args)
    if changed:
        print0(f"note: resuming with changed arguments (checkpoint, now), applied from here on: {changed}")


def changed_args(ckpt_args, args, ignore=("resume", "stop_step", "overwrite")):
    """{flag: (in the checkpoint, now)} for every argument a resumed run changes: printed, so nothing changes unseen."""
    return {k: (ckpt_args.get(k), v) for k, v in vars(args).items() if k not in ignore and ckpt_args.get(k) != v}


def all_finite(params):
    """True when every parameter is finite: the check before a checkpoint may replace the last good one."""
    return all(bool(torch.isfinite(p).all()) for p in params)


class Checkpoints:
    """A run's checkpoints in out_dir: written by rank 0 only, atomically, and never with non-finite weights."""

    def __init__(self, out_dir, master, last=None):
        self.out_dir, self.master = out_dir, master
        self.last = last  # the newest good checkpoint: where a run stopped by a NaN can resume from

    def save(self, name, state, params):
        """Write state to out_dir/name unless `params` (the trained weights) hold a NaN or inf; return its path."""
        if not all_finite(params):
            raise FloatingPointError(f"weights are not finite; not checkpointing them; last good checkpoint: {self.last}")
        if self.master:
            self.last = os.path.join(self.out_dir, name)
            save_checkpoint(self.last, state)
        return self.last


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
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving machine; a machine with fewer GPUs restores those it has
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def _to_lists(x):  # python's random state is nested tuples; weights_only loads lists back, so convert both ways
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x

# -----------------------------------------------------------------------------
# Logging and sanity


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout, or git not installed


class JsonlLogger:
    """
    One JSON object per line; the first record of every run holds its config and environment. A run resumed at
    step N continues the same file, without the records of steps >= N that the interrupted job logged after its
    last checkpoint: those steps are done again, and the log must read as one run.
    """

    def __init__(self, path, resume_step=None, config=None, device=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip().startswith("{") and line.strip().endswith("}")]
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


def optimizer_step(optimizer, scaler, params, loss_accum, step, grad_clip, lr_of, dist, last_ckpt):
    """
    The end of an optimizer step, the same in both trainers: the loss averaged over processes (for the log), a stop
    at a NaN, gradient clipping, each group's learning rate (lr_of(group)), the update. Returns (loss, grad norm).
    """
    if dist.ddp:
        torch_dist.all_reduce(loss_accum)  # gloo has no AVG: sum, then divide
        loss_accum /= dist.world_size
    check_finite(loss_accum, step, last_ckpt)
    scaler.unscale_(optimizer)  # the true gradients, for clipping
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not scaler.is_enabled():  # (with fp16 an overflow is the scaler's to skip)
        check_finite(norm, step, last_ckpt)  # an inf gradient would put inf into every weight
    for group in optimizer.param_groups:
        group["lr"] = lr_of(group)
    scaler.step(optimizer)
    scaler.update()
    if dist.device_type == "cuda":
        torch.cuda.synchronize()  # wait for the GPU, so that the step's time is its own
    return loss_accum.item(), norm.item()


def check_finite(loss, step, last_ckpt):
    """Stop at the first non-finite loss: every later step would only spread the NaN into the weights."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss is {value} at step {step}; stopping; last good checkpoint: {last_ckpt or 'none written yet'}; "
            f"try a lower --lr or a longer --warmup-steps, and resume with --resume {last_ckpt or 'auto'}")


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 70e12, "L4": 121e12, "A5000": 111e12}


def gpu_peak_flops(device=None):
    """Dense bf16 peak of this GPU (by its name), or None for one not in PEAK_BF16_FLOPS: MFU is then left out."""
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def estimate_mfu(n_params, n_layer, n_head, head_size, T, tokens_per_s_per_gpu, peak_flops):
    """
    Model FLOPs utilization of ONE GPU (PaLM appendix B): 6N FLOPs per token for the weights (forward + backward),
    plus 12 * L * H * hs * T for attention, over the GPU's peak. Pass one GPU's tokens/s: with 8 GPUs the run's
    tokens/s divided by 8 (all of them over one GPU's peak would read 8x too high).
    """
    flops_per_token = 6 * n_params + 12 * n_layer * n_head * head_size * T
    return flops_per_token * tokens_per_s_per_gpu / peak_flops
