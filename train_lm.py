"""
Pretrain GPT-2 on FineWeb-Edu token shards (made by data/fineweb.py), the "Let's reproduce GPT-2 (124M)" way.

    python train_lm.py                                              # GPT-2 124M on 10B tokens, one GPU
    torchrun --standalone --nproc_per_node=8 train_lm.py            # the same run on 8 GPUs (not yet run)
    python train_lm.py --preset tiny --data-dir data/fineweb_edu_local --vocab-subset   # a CPU smoke run

Defaults reproduce the lecture's run: 524,288 tokens per step (2**19, ~0.5M as in GPT-3 small) reached by
gradient accumulation over micro-batches of 64 x 1024; AdamW (0.9, 0.95), weight decay 0.1; lr warmup over
715 steps to 6e-4, cosine decay to 6e-5 at step 19,073 (one epoch of 10B tokens); grad-norm clip 1.0;
vocabulary padded 50,257 -> 50,304 (a multiple of 128: faster matmuls, the extra rows learn to be never used).

Writes to --out-dir: log.jsonl (config + environment, then one record per step, val loss, HellaSwag) and
ckpt_<step>.pt checkpoints {"trainer", "model", "config", "vocab", "optimizer", "step", "loader", "rng",
"args"}, read by gpt2.load_lm and by --resume, which continues exactly (same weights, bit for bit, on CPU).
"""
import argparse
import dataclasses
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import RunFolder, rng_state
from common import autocast, natural_int, nonneg_float, positive_float, positive_int, to_device
from data import fineweb, hellaswag
from gpt2 import GPT, GPTConfig, PRESETS, SubsetTokenizer, get_tokenizer
from microbatch import choose_micro_batch, out_of_memory_advice
from train_utils import (add_run_flags, check_finite, enable_speedups, estimate_mfu, format_eta, from_rank0,
                         gpu_peak_flops, grad_scaler, launch, lr_at, mean_over_processes, micro_batches,
                         print0)

# -----------------------------------------------------------------------------
# The training loop


def train(args, dist):
    job = setup(args, dist)  # the model, its optimizer, the data loaders, the run folder: see setup() below
    raw_model, model, optimizer, scaler, run = job.raw_model, job.model, job.optimizer, job.scaler, job.run
    T, grad_accum, (start_step, end_step) = args.seq_len, job.grad_accum, job.steps
    if start_step >= end_step:
        print0(f"{run.resumed_from} is at step {start_step}: nothing left to train up to step {end_step}")
        return raw_model
    dts = []  # recent step times, for tokens/s and the ETA
    for step in range(start_step, end_step):
        last = step == args.max_steps - 1
        # ---- evaluation (timed apart from training: it does not count in tokens/s)
        if args.val_every and (step % args.val_every == 0 or last):
            loss = val_loss(model, job.val_loader, args.val_steps, dist, args.dtype)
            report(run, f"step {step:6d} | val loss {loss:.4f}", step=step, val_loss=loss)
        if job.examples is not None and (step % args.hellaswag_every == 0 or last):
            # through raw_model: its shapes change every batch, which would make the compiled module recompile
            acc, n = hellaswag.evaluate(raw_model, job.examples, dist.device, job.tokenizer, rank=dist.rank,
                                        world_size=dist.world_size, dtype=args.dtype)
            report(run, f"step {step:6d} | hellaswag acc_norm {acc:.4f} ({n} examples)", step=step,
                   hellaswag=acc, hellaswag_n=n)
        if dist.master and args.sample_every and step > 0 and (step % args.sample_every == 0 or last):
            print_samples(raw_model, job.prompt, job.tokenizer, dist, args.dtype)

        # ---- one optimizer step over grad_accum micro-batches
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=dist.device)
        for micro_step in range(grad_accum):
            x, y = job.train_loader.next_batch()  # (B, T) each, in CPU memory
            # on CUDA, copied from page-locked memory without waiting: the CPU goes on queueing the GPU's work
            cuda = dist.device_type == "cuda"
            x, y = [to_device(t.pin_memory() if cuda else t, dist.device) for t in (x, y)]
            # DDP all-reduces gradients during backward; between micro-steps we only accumulate locally,
            # so the (expensive) sync happens once per optimizer step, on the last micro-step
            sync = nullcontext() if not dist.ddp or micro_step == grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(dist.device_type, args.dtype):
                    _, loss = model(x, y)
                # The loss is a mean over the B*T tokens of one micro-batch, and backward() *adds* gradients
                # up over micro-steps: without dividing by grad_accum we would get the sum of grad_accum
                # means, i.e. a gradient grad_accum times too large. Dividing makes it the mean over the
                # whole batch, exactly what one big batch of total_batch tokens would give.
                loss = loss / grad_accum
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        mean_over_processes(loss_accum, dist)  # the loss to log: the whole step's, over all processes
        check_finite(loss_accum, step, run.last)
        scaler.unscale_(optimizer)  # the true gradients, for clipping (a no-op but with fp16)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        if not scaler.is_enabled():  # (with fp16 an overflow is the scaler's to skip)
            check_finite(norm, step, run.last)  # an inf gradient would put inf into every weight
        lr = lr_at(step, args.max_steps, args.warmup_steps, args.lr, 0.1 * args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        if dist.device_type == "cuda":
            torch.cuda.synchronize()  # wait for the GPU, so that the step's time is its own
        dt = time.time() - t0
        dts = (dts + [dt])[-20:]

        # ---- log, checkpoint
        record = dict(step=step, loss=loss_accum.item(), lr=lr, grad_norm=norm.item(),
                      tokens_per_s=args.total_batch / dt, dt=dt)
        if job.peak_flops:  # one GPU's MFU: the run's tokens/s over world_size GPUs
            record["mfu"] = estimate_mfu(raw_model.num_params(), job.config.n_layer, job.config.n_head,
                                         job.config.n_embd // job.config.n_head, T,
                                         record["tokens_per_s"] / dist.world_size, job.peak_flops)
        run.log(**record)
        if step % args.log_every == 0 or step == end_step - 1:
            # the ETA from the mean time of the last 20 steps
            print_step(record, args.max_steps, eta=sum(dts) / len(dts) * (end_step - step - 1))
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < end_step:
            path = run.save(f"ckpt_{step + 1:06d}.pt", checkpoint(job, args, step + 1),
                            raw_model.parameters())
            print0(f"saved {path}")

    # the end of the run, or of this job (--stop-step): --resume continues from here
    path = run.save(f"ckpt_{end_step:06d}.pt", checkpoint(job, args, end_step), raw_model.parameters())
    print0(f"saved {path}")
    run.finish(step=end_step)
    return raw_model

# -----------------------------------------------------------------------------
# Setting up: the model, its optimizer, the data, what --resume brings back, HellaSwag, the sampling prompt


def setup(args, dist):
    """Everything the loop reads, as one namespace (job.raw_model, job.train_loader, ...)."""
    enable_speedups(dist.device_type)
    T = args.seq_len
    run = RunFolder(args, dist, "train_lm.py")  # the checkpoint --resume names, if any
    # token i = vocab[i]
    vocab = SubsetTokenizer(fineweb.token_ids(args.data_dir)).ids if args.vocab_subset else None
    config = model_config(args, vocab)
    check_resumable(run.ckpt, run.resumed_from, vocab, config)
    B, grad_accum = micro_batch(args, config, dist)  # -B, or what fits the device's memory: see below
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = GPT(config).to(dist.device)
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.lr, betas=(0.9, 0.95),
                                               fused=args.fused)
    scaler = grad_scaler(dist.device_type, args.dtype)  # fp16 only: see train_utils.grad_scaler
    train_loader = fineweb.ShardLoader(args.data_dir, "train", B, T, dist.rank, dist.world_size, vocab,
                                       step_tokens=args.total_batch)
    val_loader = fineweb.ShardLoader(args.data_dir, "val", B, T, dist.rank, dist.world_size, vocab)
    ckpt = run.resume(optimizer, args)  # optimizer moments and RNGs; weights and data position next
    if ckpt is not None:  # before DDP: it starts from these weights
        raw_model.load_state_dict(ckpt["model"])
        train_loader.load_state(ckpt["loader"])
    start_step, end_step = ckpt["step"] if ckpt else 0, min(args.max_steps, args.stop_step or args.max_steps)
    del ckpt  # the optimizer state of a big model is large; it now lives in `optimizer`
    # the compiled model shares raw_model's parameters
    model = torch.compile(raw_model, backend=args.compile_backend) if args.compile else raw_model
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device_type == "cuda" else None)

    tokenizer = SubsetTokenizer(vocab) if vocab is not None else get_tokenizer()
    if start_step < end_step:  # (a finished run's log stays as it is)
        run.start_log(start_step, {"args": vars(args), "model": dataclasses.asdict(config),
                                   "grad_accum": grad_accum, "world_size": dist.world_size,
                                   "compile": args.compile}, dist.device)
    print0(f"model {raw_model.num_params() / 1e6:.2f}M params {config}; {dist.world_size} process(es) on "
           f"{dist.device}; {args.total_batch:,} tokens/step = {B} x {T} x {dist.world_size} x {grad_accum} "
           f"accumulation steps")
    return SimpleNamespace(
        raw_model=raw_model, model=model, optimizer=optimizer, scaler=scaler, run=run, config=config,
        vocab=vocab, tokenizer=tokenizer, train_loader=train_loader, val_loader=val_loader,
        grad_accum=grad_accum, steps=(start_step, end_step),
        examples=hellaswag_examples(args, dist, vocab, run),
        prompt=sample_prompt(tokenizer, args.sample_prompt, run),
        peak_flops=gpu_peak_flops(dist.device) if dist.device_type == "cuda" else None)


def micro_batch(args, config, dist):
    """
    (B, accumulation steps). B, the micro-batch each process runs, is -B, or when -B is left out the largest
    that fits the device's free memory (microbatch.py: at most the preset's, which a CPU keeps), made to
    divide a process's share of the step (train_utils.micro_batches). The global batch (--total-batch)
    never changes, only the number of micro-steps; validation, counted in batches of the preset's -B, reads
    as many tokens in more batches. B goes into args.batch_size, for the log, the checkpoints and the
    advice on running out of memory.
    """
    asked = args.batch_size or TRAIN_PRESETS[args.preset]["batch_size"]
    B, grad_accum = micro_batches(args.total_batch // args.seq_len, asked, dist.world_size, "sequences")
    if args.batch_size is None:
        share = B * grad_accum  # this process's sequences per optimizer step
        fit, why = choose_micro_batch(config, args.seq_len, args.dtype, dist, share, cap=B)
        if why:
            print0(f"micro-batch -B {fit}, the largest that fits (-B chooses another): {why}")
        args.val_steps = args.val_steps * B // fit
        B, grad_accum = fit, share // fit
    args.batch_size = B
    return B, grad_accum


def checkpoint(job, args, step):
    """A checkpoint: the model and its config for gpt2.load_lm, the rest to resume exactly."""
    return {"trainer": "train_lm.py", "model": job.raw_model.state_dict(),
            "config": dataclasses.asdict(job.config), "vocab": job.vocab,
            "optimizer": job.optimizer.state_dict(), "step": step,
            "loader": job.train_loader.state(), "rng": rng_state(), "args": vars(args)}


def model_config(args, vocab):
    """The preset's GPT config with the --n-layer/--n-head/--n-embd overrides; vocabulary padded to 50304."""
    model_kw = dict(PRESETS[TRAIN_PRESETS[args.preset]["model"]])
    model_kw.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd")
                     if getattr(args, k) is not None})
    model_kw["vocab_size"] = len(vocab) if vocab is not None else 50304
    model_kw["block_size"] = max(model_kw.get("block_size", 1024), args.seq_len)
    return GPTConfig(**model_kw)


def check_resumable(ckpt, ckpt_path, vocab, config):
    """ValueError unless the checkpoint holds a model of this config and vocabulary."""
    if ckpt is None:
        return
    if ckpt["vocab"] != vocab:
        raise ValueError(f"{ckpt_path} was trained with a vocabulary of "
                         f"{'50304 (all GPT-2)' if ckpt['vocab'] is None else len(ckpt['vocab'])} tokens, "
                         f"this run has {'50304 (all GPT-2)' if vocab is None else len(vocab)}: "
                         "use the same --data-dir/--vocab-subset")
    if ckpt["config"] != dataclasses.asdict(config):
        diff = {k: (ckpt["config"].get(k), v) for k, v in dataclasses.asdict(config).items()
                if ckpt["config"].get(k) != v}
        raise ValueError(f"{ckpt_path} holds a model with a different config: (checkpoint, this run) = "
                         f"{diff}; resume with the same --preset/--n-layer/--n-head/--n-embd/-T")


def report(run, line, **record):
    """Print line on rank 0 and add record to the run's log."""
    print0(line)
    run.log(**record)


def note(run, message):
    """A remark every reader of the run should see, printed and logged."""
    report(run, message, event="note", message=message)


def hellaswag_examples(args, dist, vocab, run):
    """
    The HellaSwag examples to score every --hellaswag-every steps, or None (with a note saying why not).
    Rank 0 downloads and reads them, and every rank gets rank 0's examples: on several machines the others
    may not see the file, and a rank that skipped the evaluation would leave the rest waiting in its
    all_reduce.
    """
    if not args.hellaswag_every:
        return None
    if vocab is not None:
        note(run, "HellaSwag skipped: the vocabulary is a subset of GPT-2's, its endings cannot be tokenized")
        return None
    examples = None
    if dist.master:
        try:
            hellaswag.download("val", args.hellaswag_dir)
            examples = hellaswag.load_examples("val", args.hellaswag_dir,
                                               download_if_missing=False)[:args.hellaswag_limit]
        except RuntimeError as e:
            note(run, f"HellaSwag skipped: {e}")
    return from_rank0(examples)


def sample_prompt(tokenizer, text, run):
    """<|endoftext|> + the prompt's tokens; with a vocabulary subset the prompt may use tokens outside it."""
    try:
        return [tokenizer.eot_token] + tokenizer.encode_ordinary(text)
    except ValueError as e:
        note(run, f"samples start from <|endoftext|> alone: {e}")
        return [tokenizer.eot_token]

# -----------------------------------------------------------------------------
# What the loop does besides training: validation loss and samples


@torch.no_grad()
def val_loss(model, val_loader, val_steps, dist, dtype):
    """Mean loss over the first val_steps batches of the val shard, over all processes."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=dist.device)
    steps = max(1, val_steps // dist.world_size)  # per rank: the same val tokens on any world size
    for _ in range(steps):
        x, y = val_loader.next_batch()
        with autocast(dist.device_type, dtype):
            _, loss = model(x.to(dist.device), y.to(dist.device))
        total += loss.detach() / steps
    if dist.ddp:
        torch_dist.all_reduce(total)  # gloo has no AVG: sum, then divide
        total /= dist.world_size
    model.train()
    return total.item()


def print_step(record, max_steps, eta):
    mfu = f" | mfu {record['mfu']:.0%}" if "mfu" in record else ""
    print0(f"step {record['step']:6d}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} "
           f"| norm {record['grad_norm']:.3f} | {record['dt'] * 1000:.0f} ms "
           f"| {record['tokens_per_s']:,.0f} tok/s{mfu} | eta {format_eta(eta)}")


def print_samples(raw_model, prompt, tokenizer, dist, dtype):
    """Four samples from the prompt, with their own RNG: training's stays untouched."""
    raw_model.eval()
    gen = torch.Generator(device=dist.device).manual_seed(42)
    idx = torch.tensor([prompt] * 4, device=dist.device)  # (4, P)
    with autocast(dist.device_type, dtype):
        out = raw_model.generate(idx, min(32, raw_model.config.block_size - len(prompt)), top_k=50, eot=None,
                                 generator=gen)
    raw_model.train()
    for row in out.tolist():
        print0(f"sample: {tokenizer.decode([t for t in row[1:] if t < tokenizer.n_vocab])!r}")

# -----------------------------------------------------------------------------
# The command line. Presets: the real run, and small runs for a CPU (defaults of every flag left unset)

TRAIN_PRESETS = {
    "gpt2-124m": dict(model="gpt2", batch_size=64, seq_len=1024, total_batch=524288, lr=6e-4,
                      warmup_steps=715, max_steps=19073, val_every=250, val_steps=160, hellaswag_every=250,
                      sample_every=250, ckpt_every=5000, log_every=1),
    "mini": dict(model="mini", batch_size=16, seq_len=256, total_batch=16 * 256, lr=1e-3, warmup_steps=100,
                 max_steps=2000, val_every=200, val_steps=10, hellaswag_every=0, sample_every=500,
                 ckpt_every=500, log_every=10),
    "tiny": dict(model="tiny", batch_size=8, seq_len=64, total_batch=8 * 64, lr=3e-3, warmup_steps=20,
                 max_steps=300, val_every=50, val_steps=5, hellaswag_every=0, sample_every=100,
                 ckpt_every=100, log_every=10),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(TRAIN_PRESETS),
                   help="model size and run length")
    p.add_argument("--data-dir", default="data/fineweb_edu10B", help="shards made by data/fineweb.py")
    p.add_argument("--out-dir", default="runs/lm", help="log.jsonl and checkpoints")
    p.add_argument("--seed", type=int, default=1337)
    # model (the preset's unless given)
    p.add_argument("--n-layer", type=positive_int, default=None)
    p.add_argument("--n-head", type=positive_int, default=None)
    p.add_argument("--n-embd", type=positive_int, default=None)
    p.add_argument("--vocab-subset", action="store_true",
                   help="restrict the vocabulary to the tokens present in the shards "
                        "(small corpora; disables HellaSwag)")
    # batch and schedule
    p.add_argument("-B", "--batch-size", type=positive_int, default=None,
                   help="micro-batch sequences per process (default: the preset's, gpt2-124m: 64, or the "
                        "largest power of two below it that fits the GPU's free memory; printed)")
    p.add_argument("-T", "--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (gpt2-124m: 1024)")
    p.add_argument("--total-batch", type=positive_int, default=None,
                   help="tokens per optimizer step (gpt2-124m: 524288)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="max learning rate (gpt2-124m: 6e-4); min is 10%% of it")
    p.add_argument("--warmup-steps", type=natural_int, default=None, help="gpt2-124m: 715")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="length of the schedule (gpt2-124m: 19073)")
    p.add_argument("--stop-step", type=positive_int, default=None,
                   help="stop before this step, checkpointing (a job with a time limit); "
                        "the schedule still ends at --max-steps")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    # evaluation, logging, checkpoints (0 = never)
    p.add_argument("--val-every", type=natural_int, default=None)
    p.add_argument("--val-steps", type=positive_int, default=None,
                   help="val batches of B x T per evaluation, over all processes "
                        "(gpt2-124m: 160, ~10M tokens; if -B is lowered to fit the memory, the same tokens "
                        "in more batches)")
    p.add_argument("--hellaswag-every", type=natural_int, default=None)
    p.add_argument("--hellaswag-dir", default=hellaswag.DATA_DIR)
    p.add_argument("--hellaswag-limit", type=positive_int, default=None,
                   help="score only the first N examples")
    p.add_argument("--sample-every", type=natural_int, default=None)
    p.add_argument("--sample-prompt", default="Hello, I'm a language model,")
    p.add_argument("--ckpt-every", type=natural_int, default=None)
    p.add_argument("--log-every", type=positive_int, default=None)
    add_run_flags(p)  # --resume, --overwrite, --device, --compile, --dtype, --fused
    args = p.parse_args(argv)
    for k, v in TRAIN_PRESETS[args.preset].items():
        if getattr(args, k, None) is None and k != "batch_size":  # -B left out: what fits, see micro_batch
            setattr(args, k, v)
    n_head, n_embd = (args.n_head or PRESETS[args.model]["n_head"],
                      args.n_embd or PRESETS[args.model]["n_embd"])
    if n_embd % n_head:
        p.error(f"--n-head {n_head} does not divide --n-embd {n_embd} "
                f"(each head gets n_embd / n_head channels)")
    if args.total_batch % args.seq_len:
        p.error(f"--total-batch {args.total_batch} tokens is not a whole number of "
                f"-T {args.seq_len} sequences")
    return args


def train_or_advise(args, dist):
    """train(); out of GPU memory, a stop that names the -B to pass instead of a traceback (microbatch.py)."""
    with out_of_memory_advice(args, dist):
        return train(args, dist)


def main(argv=None):
    return launch(train_or_advise, get_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
