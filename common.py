"""
What every script of the project shares: reading and writing files safely, and checking command-line numbers.

- Atomic writes. A run killed mid-write (Ctrl-C, a time limit, a full disk) must never leave a half-written
  file that looks finished: we write to `<path>.tmp`, flush it to disk, then rename it over `<path>` (a rename
  within one folder is atomic on POSIX). JSON files (manifests, results) and torch checkpoints both go this
  way.
- Safe loads. A checkpoint is read with `weights_only=True`: tensors, dicts, lists and numbers only, so
  opening a file from somewhere else never runs pickled code. A missing, truncated or foreign file is an error
  that names it.
- The Hugging Face hub's model folders (config.json + model.safetensors, or an older pytorch_model.bin), for
  OpenAI's GPT-2 (gpt2.py) and CLIP (clip_loader.py) weights: a local folder is used as it is, a hub id is
  downloaded (or found in the hub's cache), and offline that fails with the command to run elsewhere.
- Devices and precision. The best device present (CUDA, else Apple's MPS, else the CPU) unless --device says
  otherwise, and the autocast dtype each device can use (bf16 where the GPU has it, fp16 with loss scaling on
  older GPUs, fp32 elsewhere; --dtype bf16 on a CPU runs the GPU code path there, which is how `make smoke`
  tests it).
- Numbers on the command line. `-B -16` or `--top-p 0` must stop the script at once with argparse's usual
  "error: argument ..." (exit status 2), not train silently on nothing or fail an assertion an hour later:
  the argparse types at the end of this file say what each number may be.
"""
import argparse
import errno
import hashlib
import json
import math
import os
import pickle
import tempfile
from contextlib import contextmanager, nullcontext

import torch

# -----------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_open(path, mode="w"):
    """
    Open path + ".tmp" to write; when the block ends without error, flush it to disk and rename it to path.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX when both are in the same folder


def write_json(path, obj, indent=1):
    """json.dump to path, atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)


def read_json(path, what="file"):
    """json.load with an error that names the file (and what it should have been) when it is not JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}): a truncated or hand-edited file? "
                         f"Restore or rebuild it") from e


def save_checkpoint(path, state):
    """torch.save to path, atomically: a crash mid-write never leaves a half-written checkpoint at path."""
    try:
        with atomic_open(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # a full disk: torch's zip writer says "unexpected pos ..."
        if getattr(e, "errno", None) != errno.ENOSPC and "unexpected pos" not in str(e):
            raise
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")  # give back what the half-written file took
        need = sum(t.numel() * t.element_size() for t in _tensors(state))
        raise OSError(errno.ENOSPC, f"no space left on the device for {path} (about {need / 2**20:,.0f} MiB "
                      f"needed): it was not written, and the checkpoints written before it are intact. "
                      f"Free some space, then continue with --resume auto") from None


def _tensors(obj):
    """Every tensor inside nested dicts, lists and tuples (a checkpoint's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def load_checkpoint(path, what="checkpoint", mmap=False):
    """
    Tensors, dicts, lists and numbers only (weights_only=True): loading never runs pickled code.
    mmap: map the file instead of reading it, so tensors never used (a training checkpoint's optimizer
    moments, when only the weights are wanted) are never read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's own message would suggest weights_only=False: never do that
        raise RuntimeError(f"{what} {path} holds pickled Python objects besides tensors, so it was not "
                           f"written by this project's scripts; it is refused without being unpickled "
                           f"(unpickling can run any code). Use a checkpoint this code wrote.") from None
    # truncated zip, foreign format...
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise RuntimeError(f"{what} {path} is corrupt or not a torch checkpoint this code wrote "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


_held_locks = {}  # folder -> its open lock file: the lock lasts as long as the process


def lock_folder(folder, flag):
    """
    Hold folder/.lock for the rest of this process, or stop at once if another process holds it: two runs
    writing one run folder (or one feature cache) would interleave their checkpoints and logs. The kernel
    releases the lock when the process ends, however it ends (Ctrl-C, kill -9), so no stale lock is ever left
    behind.
    """
    import fcntl
    folder = os.path.abspath(folder)
    if folder in _held_locks:
        return
    check_writable(folder, flag)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UsageError(f"{flag} {folder} is in use by another process (pid {holder}): "
                         f"two runs in one folder would mix their files. "
                         f"Wait for it to finish or stop it, or choose another {flag}") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _held_locks[folder] = f


def sha256_of(path):
    """A file's sha256, read 1 MiB at a time (a corpus or a cache need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(folder, flag):
    """
    Make folder (if it is not there) and create a file in it, or stop with the fix: a read-only or full
    folder must stop a run before its work, not after it (evaluate.py used to decode and score first).
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write there ({e.strerror}): choose another {flag}, or "
                         f"make it writable") from None

# -----------------------------------------------------------------------------
# Model folders in the Hugging Face hub's layout


def looks_like_path(name):
    """A name with a path's shape (./x, /x, ~/x, x.pt, a/b/c) is a file or folder, never a hub id."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))


def hub_folder(name_or_dir, weights=("model.safetensors", "pytorch_model.bin")):
    """
    The folder holding a model's config.json and weights: name_or_dir itself if it is a folder, else the hub
    repository of that id, downloaded into (or found in) the hub's cache.
    weights: the file names to try, in order.
    """
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.isfile(name_or_dir):  # its weights or config file, or a training checkpoint beside them
        folder = os.path.dirname(name_or_dir) or "."
        fix = (f"pass the folder that holds it with its config.json: {folder}"
               if os.path.isfile(os.path.join(folder, "config.json"))
               else f"pass a folder holding config.json and {weights[0]}")
        raise ValueError(f"{name_or_dir} is a file, "
                         f"but a model in the Hugging Face hub's layout is a folder: {fix}")
    if looks_like_path(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir} does not exist (it names a file or folder, not a hub id like "
                                f"openai-community/gpt2); was it moved or deleted?")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        config = hf_hub_download(name_or_dir, "config.json")
        for i, name in enumerate(weights):
            try:
                hf_hub_download(name_or_dir, name)
                break
            except EntryNotFoundError:  # an older repository with only the pickled weights
                if i == len(weights) - 1:
                    raise
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise RuntimeError(
            f"could not get config.json and {weights[0]} of '{name_or_dir}' from the Hugging Face hub "
            f"({type(e).__name__}). Offline? On a machine with internet run\n"
            f"    hf download {name_or_dir} config.json {weights[0]} "
            f"--local-dir checkpoints/{name_or_dir.split('/')[-1]}\n"
            f"copy that folder here, and pass its path instead of '{name_or_dir}'.") from e
    return os.path.dirname(config)


def read_hub_weights(folder):
    """
    A hub folder's tensors: model.safetensors if present, else pytorch_model.bin
    (loaded without pickled code).
    """
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(safetensors_path)
        except (SafetensorError, OSError) as e:
            raise RuntimeError(f"{safetensors_path} is corrupt or truncated ({e}): download it again") from e
    if os.path.exists(bin_path):
        return load_checkpoint(bin_path, "weights file")
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin "
                            f"(expected the hub's layout: config.json + model.safetensors)")

# -----------------------------------------------------------------------------
# Devices and precision


def best_device():
    """cuda if a GPU is present, else Apple's mps, else cpu: every script's default --device."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype -> the autocast dtype


def resolve_dtype(dtype, device_type):
    """
    --dtype auto: bf16 on CUDA GPUs that compute it natively (A100, H100, RTX 30xx and later: fp32's exponent
    range, so no loss scaling), fp16 on older ones (T4, V100, RTX 20xx: the trainers then scale the loss),
    fp32 on CPUs and MPS. An explicit fp32 / bf16 / fp16 is used as given, on any device.
    """
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bf16" if native_bf16() else "fp16"
    return "fp32"


def native_bf16():
    """
    Whether this CUDA GPU has bf16 tensor cores: compute capability 8.0 (Ampere) and up. Not
    torch.cuda.is_bf16_supported(), which also says yes where bf16 is only emulated (T4, V100): there the
    matmuls run slowly, inductor leaves bf16 graphs uncompiled, and fp16 with loss scaling is the fast path.
    """
    return torch.cuda.get_device_capability() >= (8, 0)


def cpu_info():
    """/proc/cpuinfo's first processor as a dict ("model name", "cpu family", "model", "flags", ...); empty
    where there is no such file (macOS, Windows)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def native_bf16_cpu():
    """Whether this CPU computes in bf16 (avx512_bf16 or AMX): one without emulates bf16 autocast, many times
    slower than fp32 (docs/testing.md). The Makefile's SMOKE_DTYPE asks /proc/cpuinfo the same question."""
    flags = cpu_info().get("flags", "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def to_device(t, device):
    """
    Tensor t copied to device. Non-blocking only on CUDA, where the copy overlaps the GPU's work; on MPS a
    non-blocking copy of a temporary CPU tensor (one about to be freed, like a freshly stacked batch) can
    read memory already freed (pytorch issues 139550, 189690), and on a CPU there is nothing to overlap.
    """
    return t.to(device, non_blocking=torch.device(device).type == "cuda")


def autocast(device_type, dtype):
    """Mixed precision for the forward pass: matmuls in bf16/fp16, reductions and the loss in fp32."""
    return torch.autocast(device_type, dtype=DTYPES[dtype]) if DTYPES[dtype] is not None else nullcontext()

# -----------------------------------------------------------------------------
# Command-line numbers: argparse types that refuse values outside their range


class UsageError(ValueError):
    """
    A flag that does not fit what it meets (the model's depth, an existing run folder):
    exit status 2 at the top.
    """


def _number(kind, low, high=math.inf, low_open=False, what=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:  # no flag wants NaN or infinity
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def int_at_least(n):
    return _number(int, n, what=f">= {n}")


positive_int = int_at_least(1)
natural_int = _number(int, 0, what=">= 0 (0: never / off)")
positive_float = _number(float, 0.0, low_open=True, what="> 0")
nonneg_float = _number(float, 0.0, what=">= 0")
finite_float = _number(float, -math.inf, what="a finite number")
probability = _number(float, 0.0, 1.0, low_open=True, what="in (0, 1]")


def device_flag(text):
    """
    --device: cpu, cuda, cuda:N or mps, and present on this machine. Checked when the flags are read: torch's
    own answer comes later (after the data and model are loaded) and names no flag ("Torch not compiled with
    CUDA enabled").
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N or mps") from None
    usual = "leave --device out to use the best device present"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA (a CPU wheel)" if torch.version.cuda is None
                   else "torch sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise argparse.ArgumentTypeError(f"{text}: {why}; {usual} ({best_device()} here)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"GPU(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: Apple's MPS is not available here; {usual} "
                                         f"({best_device()} here)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: this project runs on cpu, cuda or mps")
    return text
