"""
Pretrain a masked language model with adaptive masking (AMLM) and N-hot sub-token embeddings.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). The defaults are the paper's best configuration:
hard AMLM with the mask rate decaying 0.40 -> 0.15, N-hot embeddings, the paper's shape, 10 epochs
of the 10 M-word strict-small corpus, sequences of 64 then 256 tokens at 16,384 tokens per step.

    python train.py --corpus babylm_10M                                   # the paper recipe (overnight on CPU)
    python train.py --corpus synthetic --size tiny --max-steps 200        # a one-minute smoke test
    python train.py --resume out/run                                      # continue exactly where it stopped

The run folder holds latest.pt, ckpt_<N>M.pt (N = million words seen), summary.json, log.txt, amlm.csv.
"""
import argparse, csv, json, math, os, resource, signal, sys, time
from dataclasses import asdict

import torch
from tqdm import tqdm

import data
from amlm import AMLM, mask_rate, top1_hits
from model import SIZES, MaskedLM, ModelConfig

# -----------------------------------------------------------------------------
# command line

def positive(kind):
    def parse(s):
        v = kind(s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be non-negative, got {s}")
        return v
    return parse

def rate(s):
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"a mask rate must lie strictly between 0 and 1, got {s}")
    return v

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--corpus", default="babylm_10M", help="babylm_10M, babylm_100M, synthetic, or a path to a text file or folder")
    a("--data-dir", default="data", help="where corpora are looked up / downloaded and token caches are kept")
    a("--out", default=None, help="run folder (default: out/<corpus>-<size>-<masking>)")
    a("--size", default="paper", choices=list(SIZES), help="model shape preset")
    for name in ("n-layer", "n-head", "d-model", "d-ff"):
        a(f"--{name}", type=positive(int), default=None, help="override the preset's " + name.replace("-", "_"))
    a("--vocab-size", type=positive(int), default=None, help="BPE vocabulary size (default: 40000 for paper, else 16384)")
    a("--dropout", type=float, default=0.1, help="dropout on embeddings and residual branches")
    a("--masking", default="hard", choices=["uniform", "hard", "soft"], help="uniform MLM or AMLM's difficulty metric")
    a("--mask-rate", type=rate, default=None, help="constant mask rate (sets start = end)")
    a("--mask-rate-start", type=rate, default=0.40, help="mask rate at step 0 (linear decay to --mask-rate-end)")
    a("--mask-rate-end", type=rate, default=0.15, help="mask rate at the last step")
    a("--amlm-update-every", type=positive(int), default=200, help="optimizer steps between AMLM weight updates")
    a("--amlm-ema", type=float, default=0.2, help="EMA weight of the old masking weights")
    a("--nhot", action=argparse.BooleanOptionalAction, default=True, help="N-hot sub-token embeddings")
    a("--epochs", type=float, default=10, help="passes over the training split (strict-small: 10 x 10 M words)")
    a("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--stop-after", type=positive(int), default=None, help="save latest.pt and stop after this many steps in this sitting (resume later)")
    a("--batch-tokens", type=positive(int), default=None, help="tokens per optimizer step (default: 16384; 4096 for synthetic)")
    a("--seq-len", default="64,256", help="sequence lengths, comma-separated, each used for an equal share of the steps")
    a("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    a("--warmup", type=float, default=0.02, help="warmup steps (a value < 1 is a fraction of all steps)")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0)
    a("--seed", type=int, default=1337)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on AMX CPUs and bf16-capable GPUs")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest.pt")
    a("--eval-every", type=positive(int), default=500, help="steps between validation losses (0 = only at the end)")
    a("--eval-tokens", type=positive(int), default=262144, help="validation tokens per evaluation")
    a("--eval-blimp", default=None, metavar="DIR", help="score BLiMP-style minimal pairs at each milestone checkpoint")
    return p

# -----------------------------------------------------------------------------
# schedules: pure functions of the step

def lr_at(step, total, peak, warmup):
    """Linear warmup (non-zero at step 0), then cosine decay to 10 % of the peak.
    Example: total=100, peak=1e-3, warmup=10 -> step 0: 1e-4, step 9: 1e-3, step 99: 1e-4."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

def seq_len_at(step, total, lengths):
    """Equal shares of the steps for each length. Example: total=10, [64, 256] -> steps 0-4: 64, 5-9: 256."""
    return lengths[min(len(lengths) - 1, step * len(lengths) // max(1, total))]

def milestones_words():
    """BabyLM checkpoints: every 1 M words up to 10 M, then every 10 M up to 100 M (and beyond)."""
    return [m * 1_000_000 for m in list(range(1, 10)) + list(range(10, 1001, 10))]

# -----------------------------------------------------------------------------
# checkpoints: atomic writes here; evaluate.load_checkpoint loads them without executing code

def save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the old file intact, never a truncated one

# -----------------------------------------------------------------------------
# the run

def resolve(args):
    """Turn flags into the run's configuration, rejecting impossible combinations argparse-style."""
    p = get_parser()
    if args.batch_tokens is None:  # the synthetic corpus is for smoke tests: small steps finish in a minute
        args.batch_tokens = 4096 if args.corpus == "synthetic" else 16384
    if args.mask_rate is not None:
        args.mask_rate_start = args.mask_rate_end = args.mask_rate
    try:
        args.seq_lens = [int(t) for t in args.seq_len.split(",")]
        assert all(t > 0 for t in args.seq_lens)
    except (ValueError, AssertionError):
        p.error(f"--seq-len must be positive integers separated by commas, got {args.seq_len!r}")
    block = max(args.seq_lens)
    if any(block % t for t in args.seq_lens) or args.batch_tokens % block:
        p.error(f"every --seq-len must divide {block}, and --batch-tokens ({args.batch_tokens}) must be a multiple of it")
    if args.vocab_size is None:
        args.vocab_size = 40000 if args.size == "paper" else 16384
    if not 0 <= args.amlm_ema < 1:
        p.error("--amlm-ema must lie in [0, 1)")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must lie in [0, 1)")
    shape = dict(SIZES[args.size])
    for k in ("n_layer", "n_head", "d_model", "d_ff"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    if shape["d_model"] % shape["n_head"] or (shape["d_model"] // shape["n_head"]) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but CUDA is not available")
    if args.dtype == "auto":
        amx = args.device == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        args.dtype = "bf16" if amx or (args.device == "cuda" and torch.cuda.is_bf16_supported()) else "fp32"
    return shape

def evaluate_loss(model, val, amlm15, args, device, ctx):
    """Mean MLM loss on the held-out split at fixed uniform 15 % masking and a fixed seed (comparable across runs)."""
    T = max(args.seq_lens)
    n = min(len(val) // T, max(1, args.eval_tokens // T))
    if n == 0:
        return float("nan")
    x = torch.from_numpy(val[: n * T].astype("int64")).view(n, T)
    g = torch.Generator(device=device).manual_seed(1234)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 64):
            inputs, labels = amlm15.mask(x[i:i + 64].to(device), generator=g)
            with ctx():
                _, loss = model(inputs, labels=labels)
            k = int((labels != -100).sum())
            total, count = total + loss.item() * k, count + k
    model.train()
    return total / max(1, count)

def main(argv=None):
    args = get_parser().parse_args(argv)
    resume = None
    if args.resume:
        try:
            resume = torch.load(os.path.join(args.resume, "latest.pt"), map_location="cpu", weights_only=True)
            saved = resume["args"]
        except Exception as e:
            sys.exit(f"error: cannot resume from {args.resume}: no readable latest.pt there ({type(e).__name__})")
        # the saved flags win, except where the user now asks for more steps/epochs or another device
        keep = {k: getattr(args, k) for k in ("max_steps", "epochs", "device", "compile", "eval_blimp") if getattr(args, k) != get_parser().get_default(k)}
        args = argparse.Namespace(**{**saved, **keep, "stop_after": args.stop_after, "resume": args.resume, "out": args.resume})
    shape = resolve(args)
    device = args.device
    torch.manual_seed(args.seed)

    # data: tokenizer, cached token ids, N-hot table
    try:
        d = data.prepare(args.corpus, args.data_dir, args.vocab_size)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    V = d.tokenizer.vocab_size
    batches = data.Batches(d.train, block_size=max(args.seq_lens), seed=args.seed)
    tokens_per_epoch = len(d.train) // max(args.seq_lens) * max(args.seq_lens)
    total = args.max_steps if args.max_steps is not None else int(args.epochs * tokens_per_epoch // args.batch_tokens)
    warmup = max(1, int(args.warmup * total) if args.warmup < 1 else int(args.warmup))
    words_per_token = d.n_train_words / max(1, d.n_train_tokens)

    # model, optimizer, masking
    cfg = ModelConfig(vocab_size=V, max_len=max(args.seq_lens), dropout=args.dropout, **shape)
    model = MaskedLM(cfg, nhot_table=d.nhot_table if args.nhot else None).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices, not on norms or biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)  # fused: one kernel, not one per tensor
    specials = [data.PAD, data.CLS, data.SEP, data.UNK, data.MASK]
    freqs = torch.bincount(torch.from_numpy(d.train[: 50_000_000].astype("int64")), minlength=V)
    amlm = AMLM(V, specials, data.MASK, rate=args.mask_rate_start,
                metric=args.masking, ema=args.amlm_ema, update_every=args.amlm_update_every,
                frequencies=freqs).to(device)
    amlm15 = AMLM(V, specials, data.MASK, rate=0.15, metric="uniform").to(device)  # for validation only
    gen = torch.Generator(device=device).manual_seed(args.seed)  # all masking randomness
    step = 0
    out = args.out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.corpus))}-{args.size}-{args.masking}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create the run folder {out} ({e.strerror})")
    if resume is not None:
        if resume["config"] != asdict(cfg) or resume["tokenizer"] != d.tokenizer.to_json():
            sys.exit(f"error: {args.resume} was trained with another model shape or tokenizer; refusing to resume")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        amlm.load_state_dict(resume["amlm"])
        batches.load_state_dict(resume["batches"])
        gen.set_state(resume["rng"]["mask"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device == "cuda" and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
        step = resume["step"]
    fmodel = torch.compile(model) if args.compile else model
    use_bf16 = args.dtype == "bf16"
    ctx = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16)
    tokens_seen = step * args.batch_tokens
    milestones = [m for m in milestones_words() if m > tokens_seen * words_per_token]

    # logging
    log_file = open(os.path.join(out, "log.txt"), "a")
    def log(msg):
        tqdm.write(msg)
        log_file.write(msg + "\n")
        log_file.flush()
    log(f"config: {json.dumps({k: v for k, v in vars(args).items()})}")
    log(f"data: {len(d.train):,} train tokens ({d.n_train_words:,} words), {len(d.val):,} validation tokens, vocab {V}, "
        f"{len(d.units) if args.nhot else 0} sub-token units")
    log(f"model: {model.num_params() / 1e6:.2f} M parameters ({model.num_params(False) / 1e6:.2f} M without embeddings); "
        f"device {device}, dtype {args.dtype}; {total} steps of {args.batch_tokens} tokens "
        f"({total * args.batch_tokens * words_per_token / 1e6:.1f} M words seen); run folder {out}")

    stats = dict(train_seconds=0.0, timed_tokens=0, eval_seconds=0.0, start=time.time())
    last = {"train_loss": float("nan"), "val_loss": float("nan")}

    def state():
        return {"model": model.state_dict(), "config": asdict(cfg), "tokenizer": d.tokenizer.to_json(),
                "args": {k: v for k, v in vars(args).items() if k != "seq_lens"}, "step": step,
                "tokens_seen": tokens_seen, "words_seen": int(tokens_seen * words_per_token),
                "optimizer": opt.state_dict(), "amlm": amlm.state_dict(), "batches": batches.state_dict(),
                "rng": {"mask": gen.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if device == "cuda" else None}}

    def write_summary():
        tps = stats["timed_tokens"] / stats["train_seconds"] if stats["train_seconds"] > 0 else None
        summary = {"steps": step, "total_steps": total, "tokens_seen": tokens_seen,
                   "words_seen": int(tokens_seen * words_per_token), **last, "tokens_per_second": tps,
                   "wall_seconds": time.time() - stats["start"],
                   "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "device": device, "dtype": args.dtype, "parameters": model.num_params(),
                   "parameters_without_embeddings": model.num_params(False), "model_config": asdict(cfg),
                   "config": {k: v for k, v in vars(args).items()}}
        with open(os.path.join(out, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))

    def checkpoint(milestone=None):
        t0 = time.time()
        s = state()
        save_atomic(s, os.path.join(out, "latest.pt"))
        if milestone is not None:  # milestone files keep what evaluation needs, not the optimizer
            keep = ("model", "config", "tokenizer", "args", "step", "tokens_seen", "words_seen")
            save_atomic({k: s[k] for k in keep}, os.path.join(out, f"ckpt_{milestone // 1_000_000}M.pt"))
            if args.eval_blimp:
                import evaluate
                res = evaluate.evaluate_paths(model, d.tokenizer, [args.eval_blimp], device=device, progress=False)
                log(f"step {step}: BLiMP macro accuracy {res['overall']:.2f} at {milestone // 1_000_000}M words")
        write_summary()
        stats["eval_seconds"] += time.time() - t0

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # finish the step, save, exit

    diag_path = os.path.join(out, "amlm.csv")
    pbar = tqdm(total=total, initial=step, dynamic_ncols=True, disable=None)
    ema_acc = None
    stop = min(total, step + args.stop_after) if args.stop_after is not None else total
    while step < stop and not interrupted:
        t0 = time.perf_counter()
        lr = lr_at(step, total, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        p = mask_rate(step, total, args.mask_rate_start, args.mask_rate_end)
        T = seq_len_at(step, total, args.seq_lens)
        x = batches.next(args.batch_tokens, T).to(device, non_blocking=True)
        # --- the AMLM cycle: mask by difficulty -> predict -> record how hard each type was -> adapt ---
        inputs, labels = amlm.mask(x, rate=p, generator=gen)
        with ctx():
            logits, loss = fmodel(inputs, labels=labels)
        if not torch.isfinite(loss):
            log(f"step {step}: the loss is {loss.item()}; stopping. {out}/latest.pt holds the last good state.")
            sys.exit(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        amlm.observe(labels, logits.detach(), inputs)
        amlm.step(rate=p)  # the weights follow the decaying rate, as in the paper
        step += 1
        tokens_seen += args.batch_tokens
        # --- bookkeeping ---
        loss_v = loss.item()
        if step % 10 == 1 or ema_acc is None:  # masked-token accuracy for the display, sampled: a row-max over (n, V) is not free
            acc = top1_hits(logits, labels[labels != -100]).float().mean().item()
            ema_acc = acc if ema_acc is None else 0.7 * ema_acc + 0.3 * acc
        last["train_loss"] = loss_v
        dt = time.perf_counter() - t0
        if step - (resume["step"] if resume else 0) > 3:  # steady state: skip the first steps' warm-up
            stats["train_seconds"] += dt
            stats["timed_tokens"] += args.batch_tokens
        tps = stats["timed_tokens"] / stats["train_seconds"] if stats["train_seconds"] else args.batch_tokens / dt
        pbar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{ema_acc:.3f}", rate=f"{p:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        pbar.update(1)
        if step == 10 or step % 100 == 0:
            eta = (total - step) * args.batch_tokens / tps
            log(f"step {step}/{total}: loss {loss_v:.4f}, masked acc {ema_acc:.3f}, rate {p:.3f}, lr {lr:.2e}, "
                f"{tps:,.0f} tok/s, ETA {eta / 3600:.1f} h")
        if amlm.steps % amlm.update_every == 0:  # the weights just moved: record the curriculum
            row = amlm.diagnostics(d.tokenizer.tokens)
            row.update(step=step, mask_rate=p)
            new = not os.path.exists(diag_path)
            with open(diag_path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            log(f"step {step}: {amlm.summary(d.tokenizer.tokens)}")
        if args.eval_every and step % args.eval_every == 0 and step < total:
            t1 = time.time()
            last["val_loss"] = evaluate_loss(model, d.val, amlm15, args, device, ctx)
            stats["eval_seconds"] += time.time() - t1
            log(f"step {step}: validation loss {last['val_loss']:.4f}")
        while milestones and tokens_seen * words_per_token >= milestones[0]:
            checkpoint(milestones.pop(0))
    pbar.close()
    if interrupted or step < total:
        checkpoint()
        log(f"{'interrupted' if interrupted else 'paused'} at step {step}; saved {out}/latest.pt (continue with --resume {out})")
        log_file.close()
        if interrupted:
            sys.exit(130)
        return
    last["val_loss"] = evaluate_loss(model, d.val, amlm15, args, device, ctx)
    log(f"done: {step} steps, train loss {last['train_loss']:.4f}, validation loss {last['val_loss']:.4f}")
    checkpoint()
    log_file.close()


if __name__ == "__main__":
    main()
