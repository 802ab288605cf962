"""
What a train.py run tells its user: the time the whole run will take (said before the first step, from a timed
probe), the progress bar and log.txt (a speed and ETA line at the first step, every 100 steps and every 5 minutes),
amlm.csv (the curriculum at each AMLM update), summary.json, and the validation loss. Part of a PyTorch
reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM 2025).

    for line in estimate_lines(model, ...): log(line)  # "estimate: 2,450 steps of 8,192 tokens on cpu (bf16) take about 1.2 h ..."
    progress = Progress(out, step, total, args)        # then progress.step(...) after every optimizer step
"""
import csv, json, os, resource, signal, sys, time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from amlm import top1_hits
from fast import FastMaskedLM
from model import SIZES, MaskedLM, ModelConfig

LOG_EVERY_SECONDS = 300  # a speed line at least this often, so a piped log says something on a slow device
CPU_SIZED = dict(size="tiny", vocab_size=16384, batch_tokens=8192, max_steps=2450, amlm_update_every=100, eval_every=350)
# the recipe of docs/results.md's rounds 2 and 3: 20 M tokens, 12.8 M words


class Progress:
    """The progress bar, log.txt, and the steady-state throughput (the first steps of a sitting warm up)."""

    def __init__(self, out, step, total, args, world=1, active=True):
        self.file = open(os.path.join(out, "log.txt"), "a") if active else None  # only rank 0 shows and writes
        self.out = out
        self.bar = tqdm(total=total, initial=step, dynamic_ncols=True, disable=None if active else True)
        self.first, self.total, self.batch_tokens = step, total, args.batch_tokens
        self.seconds, self.tokens, self.acc, self.world, self.last_log = 0.0, 0, None, world, time.time()

    def log(self, msg):
        if self.file:
            tqdm.write(msg)
            self.file.write(msg + "\n")
            self.file.flush()

    def header(self, args, d, model, total, words):
        self.log(f"config: {json.dumps(vars(args))}")
        self.log(f"data: {len(d.train):,} train tokens ({d.n_train_words:,} words), {len(d.val):,} validation tokens, "
                 f"vocab {d.tokenizer.vocab_size}, {len(d.units) if args.nhot else 0} sub-token units")
        self.log(f"model: {type(model).__name__}, {model.num_params() / 1e6:.2f} M parameters ({model.num_params(False) / 1e6:.2f} M "
                 f"without embeddings); device {args.device}, dtype {args.dtype}, {self.world} process(es) x {args.grad_accum} "
                 f"micro-step(s); {total} steps of {args.batch_tokens} tokens ({words / 1e6:.1f} M words seen); run folder {self.out}")
        start, end = args.mask_rate_start, args.mask_rate_end
        trend = "constant" if start == end else "decaying" if start > end else "rising"
        self.log(f"masking: {args.masking}, rate {start:.2f} -> {end:.2f} ({trend})" + (
            f", weights updated every {args.amlm_update_every} steps" if args.masking != "uniform" else ""))
        if args.masking != "uniform" and 0 < total and total // args.amlm_update_every < 3:
            self.log(f"note: {total} steps with --amlm-update-every {args.amlm_update_every} update the masking weights "
                     f"{total // args.amlm_update_every} time(s): the curriculum has little room to move")

    def tokens_per_second(self):
        return self.tokens / self.seconds if self.seconds else None

    def step(self, step, loss, logits, labels, rate, lr, seconds):
        if step % 10 == 1 or self.acc is None:  # masked-token accuracy, sampled: a row-max over (n, V) is not free
            acc = top1_hits(logits, labels[labels != -100]).float().mean().item()
            self.acc = acc if self.acc is None else 0.7 * self.acc + 0.3 * acc
        if step - self.first > 3:
            self.seconds, self.tokens = self.seconds + seconds, self.tokens + self.batch_tokens
        tps = self.tokens_per_second() or self.batch_tokens / seconds
        self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{self.acc:.3f}", rate=f"{rate:.3f}", lr=f"{lr:.2e}",
                             tok_s=f"{tps:,.0f}", **({"procs": self.world} if self.world > 1 else {}))
        self.bar.update(1)
        now = time.time()
        if step == self.first + 1 or step == 10 or step % 100 == 0 or now - self.last_log >= LOG_EVERY_SECONDS:
            eta = (self.total - step) * self.batch_tokens / tps
            self.log(f"step {step}/{self.total}: loss {loss:.4f}, masked acc {self.acc:.3f}, rate {rate:.3f}, "
                     f"lr {lr:.2e}, {tps:,.0f} tok/s, ETA {duration(eta)}")
            self.last_log = now

    def curriculum(self, step, amlm, tokens, rate):
        """After an AMLM update: a row of amlm.csv, and one log line with the masking weights by frequency rank and
        the hardest and easiest frequent types (the curriculum moving)."""
        append_csv(os.path.join(self.out, "amlm.csv"), {**amlm.diagnostics(tokens), "step": step, "mask_rate": rate})
        self.log(f"step {step}: {amlm.summary(tokens)}")

    def blimp_line(self, model, tokenizer, args, words):
        """The --eval-blimp tasks scored at a milestone, as one log line (accuracy and correlation tasks apart)."""
        import evaluate
        try:
            res = evaluate.evaluate_paths(model, tokenizer, [args.eval_blimp], device=args.device, progress=False)
        except (evaluate.EvalError, data.DataError) as e:  # the files changed since the start: say so, train on
            return f"{args.eval_blimp}: not scored at {words // 1_000_000}M words ({e})"
        return f"{args.eval_blimp}: {evaluate.headline_text(res)} at {words // 1_000_000}M words"

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()

def catch_ctrl_c(out, rank=0):
    """From now on, Ctrl-C (and SIGTERM from torchrun or a scheduler) appends to the returned list, which the loop
    checks after each step: the run then saves and exits. Said at once; a second Ctrl-C says the step still runs.
    Example: Ctrl-C -> "stopping: the step in progress ends, then out/run/latest.pt is saved ..." and the list is [True]."""
    interrupted = []
    def handler(*_):
        if rank == 0:
            print(f"\nstopping: the step in progress ends, then {out}/latest.pt is saved (--resume {out} continues it)"
                  if not interrupted else "\nstill finishing the step, then saving; kill the process to stop without "
                  "saving (the previous latest.pt stays intact)", file=sys.stderr, flush=True)
        interrupted.append(True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return interrupted

def append_csv(path, row):
    """One row of amlm.csv (the header first, when the file is new). Example: {"step": 200, "w_rank_1_10": 0.08, ...}
    -> "step,w_rank_1_10,...\n200,0.08,..." in a new file, one more line in an old one."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)

def summary(step, total, words, losses, progress, start, args, model):
    """summary.json: where the run is, its losses, speed, memory, model and flags.
    Example: -> {"steps": 400, "total_steps": 400, "tokens_seen": 3276800, "val_loss": 4.525, "tokens_per_second": 5322.4, ...}"""
    return {"steps": step, "total_steps": total, "tokens_seen": step * args.batch_tokens, "words_seen": words,
            **losses, "tokens_per_second": progress.tokens_per_second(), "wall_seconds": time.time() - start,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": args.device,
            "processes": dist.get_world_size() if dist.is_initialized() else 1,
            "dtype": args.dtype, "parameters": model.num_params(), "parameters_without_embeddings": model.num_params(False),
            "model_config": asdict(model.config), "config": dict(vars(args))}

@torch.no_grad()
def evaluate_loss(model, val, amlm15, args, autocast):
    """Mean MLM loss on the held-out split at fixed uniform 15 % masking and a fixed seed (comparable across runs).
    Example: an untrained tiny model on babylm_10M -> 9.58 (about ln 16384); after 400 steps -> 4.53."""
    T = max(args.seq_lens)
    n = min(len(val) // T, max(1, args.eval_tokens // T))
    if n == 0:
        return float("nan")
    x = torch.from_numpy(val[: n * T].astype("int64")).view(n, T)
    g = torch.Generator(device=args.device).manual_seed(1234)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, 64):
        inputs, labels = amlm15.mask(x[i:i + 64].to(args.device), generator=g)
        with autocast:
            _, loss = model(inputs, labels=labels)
        k = int((labels != -100).sum())
        total, count = total + loss.item() * k, count + k
    model.train()
    return total / max(1, count)

# -----------------------------------------------------------------------------
# the time a run will take, said before its first step

def duration(seconds):
    """Example: 50 -> "50 s", 754 -> "12.6 min", 694800 -> "193.0 h (8.0 days)"."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 2 * 86400 else "")

def seconds_per_token(model, seq_lens, tokens, device, autocast, rate):
    """{T: seconds of one forward + backward pass per token at sequence length T}, timed on `tokens` tokens of random
    ids with a fraction `rate` of them masked, after a warm-up pass; the model's gradients are cleared after (its
    dropout draws come from the global RNG: estimate_lines restores it). Example: the tiny shape on 2 CPU cores,
    [64, 256], 2,048 tokens -> {64: 1.6e-4, 256: 2.1e-4}."""
    g, V, out = torch.Generator().manual_seed(0), model.config.vocab_size, {}
    for T in sorted(set(seq_lens)):
        for rows in (1, max(1, tokens // T)):  # the first pass warms up; the second is timed
            x = torch.randint(data.MASK + 1, V, (rows, T), generator=g)
            selected = torch.rand(rows, T, generator=g) < rate
            selected[:, 0] = True  # at least one target a row, whatever the rate and length
            labels = torch.where(selected, x, -100)
            x, labels = torch.where(labels != -100, data.MASK, x).to(device), labels.to(device)
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
