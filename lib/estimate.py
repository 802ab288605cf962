"""
How long a train.py run will take, said before its first step: a timed forward and backward pass of the model on a
probe of each sequence length, times the steps still to come. On a CPU and over 12 hours it also names a run sized
for the CPU. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked
Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    for line in estimate_lines(model, args, step, total, autocast, seq_len_at): log(line)
    # -> "estimate: 2,450 steps of 8,192 tokens on cpu (bf16) take about 1.2 h (from ...)"
"""
import time

import torch

from lib.fast import FastMaskedLM
from lib.progress import duration
from model import SIZES, MaskedLM, ModelConfig
from tokenizer import MASK

CPU_SIZED = dict(size="tiny", vocab_size=16384, batch_tokens=8192, max_steps=2450, amlm_update_every=100, eval_every=350)
# the tiny shape on 20 M tokens (12.8 M words), the recipe of docs/results.md

def seconds_per_token(model, seq_lens, tokens, device, autocast, rate):
    """{T: seconds of one forward + backward pass per token at sequence length T}, timed on `tokens` tokens of random
    ids with a fraction `rate` of them masked, after a warm-up pass of the same shape; the model's gradients are cleared after (its
    dropout draws come from the global RNG: estimate_lines restores it). Example: the tiny shape, [64, 256],
    2,048 tokens -> {64: 1.6e-4, 256: 2.1e-4} (seconds; longer rows cost more per token)."""
    g, V, out = torch.Generator().manual_seed(0), model.config.vocab_size, {}
    for T in sorted(set(seq_lens)):
        rows = max(1, tokens // T)
        for _ in range(2):  # the first pass warms up at the same shape (kernels chosen and set up); the second is timed
            x = torch.randint(MASK + 1, V, (rows, T), generator=g)
            selected = torch.rand(rows, T, generator=g) < rate
            selected[:, 0] = True  # at least one target a row, whatever the rate and length
            labels = torch.where(selected, x, -100)
            x, labels = torch.where(labels != -100, MASK, x).to(device), labels.to(device)
            t0 = time.perf_counter()
            with autocast:
                _, loss = model(x, labels=labels)
            loss.backward()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            out[T] = (time.perf_counter() - t0) / (rows * T)
    model.zero_grad(set_to_none=True)
    return out

def run_seconds(spt, lengths, step_tokens, n_evals=0, eval_tokens=0):
    """Seconds for steps at the given sequence lengths (one per step), `step_tokens` tokens each, and n_evals
    validation passes (forward only: about a third of a forward and backward pass).
    Example: spt {64: 1e-4}, lengths [64] * 10, 1000 tokens per step -> 1.0."""
    return sum(spt[T] for T in lengths) * step_tokens + n_evals * eval_tokens * spt[max(spt)] / 3

def estimate_lines(model, args, step, total, autocast, schedule, world=1, val_tokens=0):
    """Before the first step: how long the rest of the run will take on this device, from seconds_per_token on a
    probe of this process's share of a step (at most 2,048 tokens on a CPU); schedule(step, total, seq_lens) gives a
    step's sequence length. On a CPU and over 12 hours, a second line names a run sized for it, with its estimate.
    Example: -> ["estimate: 400 steps of 8,192 tokens on cpu (fp32) take about 11.7 min (from ...)"]"""
    cuda = [torch.cuda.current_device()] if args.device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):  # the probes draw dropout masks and a model's weights: the run's RNG stays
        device = torch.device(args.device)
        share = args.batch_tokens // world // args.grad_accum
        probe = share if device.type == "cuda" else min(share, 2048)
        rate = (args.mask_rate_start + args.mask_rate_end) / 2
        spt = seconds_per_token(model, args.seq_lens, probe, device, autocast, rate)
        evals = min(val_tokens, args.eval_tokens)
        e = args.eval_every
        n_evals = (len(range((step // e + 1) * e, total, e)) if e else 0) + 1  # those still to come, and the final one
        lengths = [schedule(s, total, args.seq_lens) for s in range(step, total)]
        secs = run_seconds(spt, lengths, args.batch_tokens // world, n_evals, evals)
        lines = [f"estimate: {total - step:,} steps of {args.batch_tokens:,} tokens on {args.device} ({args.dtype}) take "
                 f"about {duration(secs)} (from a timed forward and backward pass of {probe:,} tokens per sequence length)"]
        if device.type == "cpu" and secs > 12 * 3600:
            c = CPU_SIZED
            tiny = (FastMaskedLM if args.fast else MaskedLM)(ModelConfig(vocab_size=c["vocab_size"], **SIZES[c["size"]])).to(device)
            spt = seconds_per_token(tiny, [64, 256], 2048, device, autocast, rate)
            lengths = [schedule(s, c["max_steps"], [64, 256]) for s in range(c["max_steps"])]
            small = run_seconds(spt, lengths, c["batch_tokens"], c["max_steps"] // c["eval_every"] + 1, evals)
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in c.items())
            lines.append(f"note: this is a GPU-sized run. Sized for this CPU, the tiny shape on 20 M tokens "
                         f"(docs/results.md) takes about {duration(small)}: python train.py --corpus {args.corpus} {flags}")
    return lines
