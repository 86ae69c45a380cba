"""
The few helpers the three trainers (train_lm.py, train_caption.py, miniature/train_clip.py) would otherwise
repeat: device and DDP setup, the flags every trainer takes, rank-0 printing, GPU speed-ups, the learning-rate
schedule, a clear stop on a NaN loss, MFU. Their run folders (checkpoints, resuming, the log) are
checkpoints.py's.
"""
import argparse
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from common import UsageError, best_device, device_flag, resolve_dtype

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
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: then join the process group; else one process on the best
    device."""
    if "RANK" in os.environ:
        rank, local_rank, world_size = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                                        int(os.environ["WORLD_SIZE"]))
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
    parser.add_argument("--resume", default=None,
                        help="a checkpoint to continue from, or 'auto' (the newest in --out-dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the files of a run already in --out-dir (its log, checkpoints, model)")
    parser.add_argument("--device", type=device_flag, default=None,
                        help="cuda / mps / cpu (default: the best present; torchrun: per rank)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on CUDA)")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"],
                        help="torch.compile's backend; aot_eager traces forward and backward as inductor "
                             "would, without generating kernels: a quick check that a model compiles")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype (auto: bf16 on GPUs with bf16 tensor cores, compute capability "
                             "8.0 and up; fp16 with loss scaling on older ones; else fp32)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="AdamW's fused kernel (default: on CUDA)")


def launch(train, args):
    """
    Run train(args, dist) as this process's part of the run (one of torchrun's, or alone), then clean up.
    A UsageError (a flag that does not fit the data, the model or the out-dir) ends the process as argparse
    would: the message and exit status 2.
    """
    dist = setup_distributed(args.device)
    # The GPU speed-ups switch on by themselves on CUDA; each can be forced either way (make smoke forces them
    # on a CPU, where torch has them too: inductor compiles C++ with gcc, autocast runs in bf16, AdamW has a
    # fused kernel).
    args.dtype = resolve_dtype(args.dtype, dist.device_type)
    if args.compile is None:
        # torch.compile pays off on GPUs; on a CPU it mostly costs time
        args.compile = dist.device_type == "cuda"
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
    optimizer step. The micro-batch is the one asked for, or the largest smaller one that fits: with many
    processes each one's share of the step can be less than a micro-batch (256 pairs on 8 GPUs are 32 each,
    not 64).
    """
    if total % world_size:
        raise ValueError(f"the batch of {total} {unit} per step cannot be split evenly over {world_size} "
                         f"processes: choose a --total-batch that {world_size} divides")
    share = total // world_size
    fitting = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    if fitting != micro:
        print0(f"note: micro-batch {micro} -> {fitting} {unit}, so that {world_size} process(es) x "
               f"accumulation steps make the {total} {unit} of one step")
    return fitting, share // fitting


def print0(*args, **kw):
    """print, on rank 0 only (the rank comes from the process group, or torchrun's environment)."""
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kw, flush=True)


def from_rank0(value):
    """Rank 0's value on every process (the identity without a process group)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def enable_speedups(device_type):
    if device_type == "cuda":
        # TF32 matmuls: ~8x the fp32 rate on A100/H100, 10-bit mantissa
        torch.set_float32_matmul_precision("high")


def grad_scaler(device_type, dtype):
    """fp16's small exponent range underflows small gradients: scale the loss up, the gradients back down
    (GradScaler skips a step whose gradients overflowed). bf16 and fp32 need none: a disabled scaler does
    nothing."""
    return torch.amp.GradScaler(device_type, enabled=dtype == "fp16")

# -----------------------------------------------------------------------------
# Learning-rate schedule


def note_short_schedule(args):
    """A run shorter than its warmup never reaches --lr: legal (the smoke runs do it), but say so."""
    max_steps, warmup = args.max_steps, args.warmup_steps  # (train_caption.py's may be None: one epoch)
    if max_steps and warmup and max_steps < warmup:
        print0(f"note: --max-steps {max_steps} ends inside the {warmup}-step warmup: the learning rate rises "
               f"to {max_steps / warmup:.0%} of --lr {args.lr:g} and never reaches it "
               "(lower --warmup-steps if that is not what you want)")


def lr_at(step, max_steps, warmup_steps, max_lr, min_lr):
    """Linear warmup over warmup_steps (step 0 gets max_lr / warmup_steps), then cosine decay to min_lr at
    max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)

# -----------------------------------------------------------------------------
# A step's end: the loss over processes, a stop at a NaN; throughput


def mean_over_processes(x, dist):
    """x averaged over the processes (in place; the same value on each): the loss every process logs."""
    if dist.ddp:
        torch_dist.all_reduce(x)  # gloo has no AVG: sum, then divide
        x /= dist.world_size
    return x


def check_finite(loss, step, last_ckpt):
    """Stop at the first non-finite loss: every later step would only spread the NaN into the weights."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss is {value} at step {step}; stopping; "
            f"last good checkpoint: {last_ckpt or 'none written yet'}; "
            f"try a lower --lr or a longer --warmup-steps, and resume with --resume {last_ckpt or 'auto'}")


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Dense bf16 tensor-core peaks (fp32 accumulate, no 2:4 sparsity: datasheets print twice these with sparsity),
# keyed by a part of the name torch.cuda.get_device_name() gives ("NVIDIA H100 80GB HBM3" is the SXM board).
PEAK_BF16_FLOPS = {
    "H200": 989e12,        # H200 datasheet (SXM)
    "H200 NVL": 835e12,    # H200 datasheet
    "H100": 989e12,        # H100 datasheet, SXM
    "H100 PCIe": 756e12,   # H100 datasheet
    "H100 NVL": 835e12,    # H100 datasheet
    "A100": 312e12,        # A100 datasheet (SXM and PCIe alike)
    "A10": 125e12,         # A10 datasheet
    "A10G": 70e12,         # AWS's A10 variant: no NVIDIA datasheet, the figure AWS users quote
    "L40S": 362e12,        # L40S datasheet
    "L40": 181e12,         # L40 datasheet
    "L4": 121e12,          # L4 datasheet
    "RTX 4090": 165.2e12,  # Ada Lovelace (AD102) whitepaper
    "RTX 3090": 71e12,     # Ampere GA102 whitepaper
    "A5000": 111e12,       # RTX A5000 datasheet (222 TFLOPS with sparsity)
}


def gpu_peak_flops(device=None):
    """
    Dense bf16 peak of this GPU (by its name), or None for one not in PEAK_BF16_FLOPS: MFU is then left out.
    """
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name):
    """
    The PEAK_BF16_FLOPS row of the most specific key found in `name` as whole words: "NVIDIA H100 PCIe" is
    an H100 PCIe, not the SXM "H100", and "NVIDIA L40S" is no "L4".
    """
    found = [gpu for gpu in PEAK_BF16_FLOPS if re.search(rf"\b{re.escape(gpu)}\b", name, re.IGNORECASE)]
    return PEAK_BF16_FLOPS[max(found, key=len)] if found else None


def estimate_mfu(n_params, n_layer, n_head, head_size, T, tokens_per_s_per_gpu, peak_flops):
    """
    Model FLOPs utilization of ONE GPU (PaLM appendix B): 6N FLOPs per token for the weights (forward +
    backward), plus 12 * L * H * hs * T for attention, over the GPU's peak. Pass one GPU's tokens/s: with 8
    GPUs the run's tokens/s divided by 8 (all of them over one GPU's peak would read 8x too high).
    """
    flops_per_token = 6 * n_params + 12 * n_layer * n_head * head_size * T
    return flops_per_token * tokens_per_s_per_gpu / peak_flops
