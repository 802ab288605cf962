"""
What a train.py run tells its user: the progress bar and log.txt (a speed and ETA line at the first step, every 100
steps and every 5 minutes), amlm.csv (the curriculum at each AMLM update) and summary.json. Part of a PyTorch
reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM 2025).

    progress = Progress(out, step, total, args)   # then progress.step(...) after every optimizer step
    progress.log("step 100: validation loss 4.97")  # the bar, the terminal and log.txt
"""
import csv, json, math, os, resource, time
from dataclasses import asdict

from tqdm import tqdm

from amlm import top1_hits

LOG_EVERY_SECONDS = 300  # a speed line at least this often, so a piped log says something on a slow device


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
        self.log(f"step {step}: {amlm.log_line(tokens)}")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()

def append_csv(path, row):
    """One row of amlm.csv (the header first, when the file is new). Example: {"step": 200, "w_rank_1_10": 0.08, ...}
    -> "step,w_rank_1_10,...\n200,0.08,..." in a new file, one more line in an old one."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)

def run_summary(path, step, total, words, losses, progress, start, args, model):
    """summary.json: where the run is, its losses, speed, memory, model and flags. A value this sitting does not know
    yet (a loss or speed of None or nan) keeps the one the file at path already holds, so no value is ever lost.
    Example: -> {"steps": 400, "total_steps": 400, "tokens_seen": 3276800, "val_loss": 4.525, "tokens_per_second": 5322.4, ...}"""
    new = {"steps": step, "total_steps": total, "tokens_seen": step * args.batch_tokens, "words_seen": words,
           **losses, "tokens_per_second": progress.tokens_per_second(), "wall_seconds": time.time() - start,
           "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": args.device,
           "processes": progress.world,
           "dtype": args.dtype, "parameters": model.num_params(), "parameters_without_embeddings": model.num_params(False),
           "model_config": asdict(model.config), "config": dict(vars(args))}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    unknown = lambda v: v is None or (isinstance(v, float) and math.isnan(v))
    return {k: old[k] if unknown(v) and not unknown(old.get(k)) else v for k, v in new.items()}

def duration(seconds):
    """Example: 50 -> "50 s", 754 -> "12.6 min", 694800 -> "193.0 h (8.0 days)"."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 2 * 86400 else "")
