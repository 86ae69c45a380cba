"""
How many sequences fit in one micro-batch: train_lm.py's -B when the command line leaves it out.

The lecture's micro-batch (64 sequences of 1024 tokens of GPT-2 124M) was sized for an 80 GB GPU; on a 24 GB
card (RTX 3090/4090, A5000) or a Mac it runs out of memory in the first step. What a training step holds at
its peak, the start of backward, follows from the model's shapes:

- per sequence: the activations autograd saved for backward, block by block, and the output layer's
  log-probabilities and first gradients, fp32 and (T, vocab_size) each (bytes_per_sequence: the arithmetic);
- once: the fp32 weights, their gradients and AdamW's two moments (fixed_bytes).

train_lm.py takes the largest micro-batch whose estimate fits in HEADROOM of the device's free memory and
that divides a process's share of the global batch, so --total-batch stays and the run trains the same; only
the number of gradient-accumulation steps changes. An out-of-memory error that still comes stops the run with
the -B to pass (out_of_memory_advice). tests/test_microbatch.py checks the estimate against what autograd
saves and what the allocator peaks at, on a CPU; the choice per GPU is in docs/full-scale.md.
"""
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist

from common import UsageError

GiB = 2**30
# The share of the free memory the estimate may fill. The rest: the CUDA allocator's fragmentation, cuBLAS
# and NCCL workspaces, and what the estimate leaves out (small per-block temporaries of backward).
HEADROOM = 0.85

# -----------------------------------------------------------------------------
# The estimate


def autocast_bytes(dtype):
    """Bytes per number of the matmuls' inputs and outputs: 2 under bf16/fp16 autocast, 4 in fp32."""
    return 4 if dtype == "fp32" else 2


def saved_bytes_per_token(config, dtype):
    """
    The bytes autograd saves for backward per token of a training step of gpt2.GPT (eager PyTorch): what
    every block saves, then the output layer and the loss. C = n_embd, V = vocab_size, a = autocast_bytes.
    LayerNorms and the loss run in fp32 under autocast; each Linear saves its input in a bytes (the cast copy
    under autocast, the same tensor in fp32).
    """
    C, V, a = config.n_embd, config.vocab_size, autocast_bytes(dtype)
    block = (2 * 4 * C            # the inputs of ln_1 and ln_2: the residual stream, fp32
             + 2 * 2 * 4          # their mean and 1/std, fp32
             + a * C              # c_attn's input (ln_1's output)
             + 3 * a * C          # q, k, v: c_attn's output, kept by attention's backward
             + 4 * config.n_head  # attention's logsumexp, fp32, per head
             + a * C              # attention's output, the input of its c_proj
             + a * C              # c_fc's input (ln_2's output)
             + 4 * a * C          # c_fc's output, the GELU's input
             + 4 * a * C)         # the GELU's output, the input of the MLP's c_proj
    head = (4 * C + 2 * 4         # ln_f's input, its mean and 1/std
            + a * C               # lm_head's input
            + 4 * V               # the log-probabilities, fp32: cross-entropy's backward needs them
            + 8 + 8 + 1)          # the token ids (embedding), the scored targets and their mask
    return config.n_layer * block + head


def bytes_per_sequence(config, T, dtype):
    """
    What one more sequence of T tokens adds to a training step's peak memory: the saved activations, plus
    the two fp32 (T, V) gradients alive at once at the start of backward (of the log-probabilities, then of
    the logits). The per-block temporaries of backward are smaller than the log-probabilities that are freed
    by then, so the peak is here. torch.compile (the default on CUDA) can fuse some of it away.
    """
    return T * (saved_bytes_per_token(config, dtype) + 2 * 4 * config.vocab_size)


def n_params(config):
    """gpt2.GPT's parameter count from its config (the output layer is tied to the token embedding)."""
    C = config.n_embd
    # c_attn 3C^2 + 3C, attn.c_proj C^2 + C, c_fc 4C^2 + 4C, mlp.c_proj 4C^2 + C, two LayerNorms 4C
    block = 12 * C * C + 13 * C
    return (config.vocab_size + config.block_size) * C + config.n_layer * block + 2 * C


def fixed_bytes(config, dtype, ddp=False):
    """
    What a training step holds whatever the micro-batch: per parameter 4 bytes of fp32 weight, 4 of gradient,
    8 of AdamW's two moments; under autocast a copy of the weights in 2 bytes (cast once per forward, kept
    for backward); under DDP its gradient buckets, another 4.
    """
    a = autocast_bytes(dtype)
    return n_params(config) * (4 + 4 + 8 + (a if a < 4 else 0) + (4 if ddp else 0))

# -----------------------------------------------------------------------------
# The choice


def free_memory(device):
    """Bytes this process may still allocate on device, or None on a CPU (its memory is the machine's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":  # unified memory: what Metal recommends for one process, less what it holds
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return None


def fit_micro_batch(free, config, T, dtype, share, cap, ddp=False):
    """
    (B, why): the largest micro-batch, cap or a power of two below it, that divides share (a process's
    sequences per optimizer step) and whose estimate fits in HEADROOM of `free` bytes (1 if none does), and
    a sentence with the numbers.
    """
    per_sequence, fixed = bytes_per_sequence(config, T, dtype), fixed_bytes(config, dtype, ddp)
    candidates = [cap] + [2**k for k in range(cap.bit_length(), -1, -1) if 2**k < cap]
    fitting = [b for b in candidates if share % b == 0 and fixed + b * per_sequence <= HEADROOM * free]
    B = fitting[0] if fitting else 1
    need = fixed + B * per_sequence
    return B, (f"{free / GiB:.1f} GiB free; estimate (eager, {dtype}): {fixed / GiB:.1f} GiB for weights, "
               f"gradients and AdamW + {per_sequence / GiB:.2f} GiB per sequence of {T} tokens = "
               f"{need / GiB:.1f} GiB at -B {B}" + (f", within {HEADROOM:.0%} of the free memory"
                                                    if fitting else ": more than fits"))


def choose_micro_batch(config, T, dtype, dist, share, cap):
    """
    fit_micro_batch for this process's device, or (cap, None) on a CPU. Under DDP every process takes the
    smallest of their choices, so that all of them run the same number of micro-steps.
    """
    free = free_memory(dist.device)
    if free is None:
        return cap, None
    B, why = fit_micro_batch(free, config, T, dtype, share, cap, dist.ddp)
    if dist.ddp:
        smallest = torch.tensor(B, device=dist.device)
        torch_dist.all_reduce(smallest, op=torch_dist.ReduceOp.MIN)
        B, why = int(smallest), f"{why} on {dist.device}; the smallest over the processes: {int(smallest)}"
    return B, why

# -----------------------------------------------------------------------------
# When memory runs out all the same


@contextmanager
def out_of_memory_advice(args, dist):
    """
    Inside the block, a torch.OutOfMemoryError becomes a UsageError that names the -B to pass (about half
    of args.batch_size, the micro-batch the run had) and says that the global batch stays: train_lm.py then
    stops with that line and exit status 2, as with its other usage errors, not the allocator's traceback.
    """
    try:
        yield
    except torch.OutOfMemoryError as e:
        if args.batch_size is None:  # before the micro-batch was set: nothing to advise
            raise
        raise UsageError(out_of_memory_message(args.batch_size, args.seq_len, args.total_batch,
                                               dist.world_size, dist.device)) from e


def out_of_memory_message(B, T, total_batch, world_size, device):
    where = f"out of memory on {device} with a micro-batch of -B {B} sequences of -T {T} tokens"
    if B == 1:
        return (f"{where}: even one sequence does not fit; pass a smaller -T, or a smaller model "
                f"(--preset, --n-layer, --n-embd)")
    share = total_batch // T // world_size  # one process's sequences per optimizer step
    smaller = max(b for b in range(1, B // 2 + 1) if share % b == 0)
    return (f"{where}: pass -B {smaller}. The global batch stays --total-batch {total_batch:,} tokens "
            f"(gradient accumulation goes from {share // B} to {share // smaller} micro-steps per step), "
            f"so the run trains the same. (Left out, -B is chosen from the memory free at the start, by "
            f"the estimate of microbatch.py; a run stopped after a checkpoint continues from it with "
            f"--resume auto.)")
