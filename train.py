"""
Pretrain a masked language model with adaptive masking (AMLM) and N-hot sub-token embeddings.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). The defaults are the paper's best configuration:
hard AMLM with the mask rate decaying 0.40 -> 0.15, N-hot embeddings, the paper's shape, 10 epochs
of the 10 M-word strict-small corpus, sequences of 64 then 256 tokens at 16,384 tokens per step.

    python train.py --corpus babylm_10M                       # the paper recipe: a GPU job (it says how long, first)
    python train.py --resume out/babylm_10M-paper-hard        # continue exactly where it stopped
    torchrun --nproc_per_node 4 train.py --corpus babylm_10M  # data parallel: the same run on 4 GPUs

The run folder holds latest.pt, ckpt_<N>M.pt (N = million words seen), summary.json, log.txt, amlm.csv, and
train.lock while a process uses it. A new run refuses a folder that holds one (--resume or --overwrite).
"""
import argparse, math, os, sys, time
from contextlib import nullcontext

import torch

import data
import evaluate
from amlm import AMLM, METRICS, mask_rate
from lib import ddp
from lib.checkpoint import check_resume_point, load_resume, restore, save_checkpoint, write_json
from lib.errors import ArgumentParser, UserError
from lib.estimate import estimate_lines
from lib.fast import FastMaskedLM
from lib.optim import make_optimizer
from lib.progress import Progress, run_summary
from lib.run import catch_ctrl_c, clear_overwritten, open_run, pick_device, pick_dtype, releases_run, stop_on_nan
from model import SIZES, MaskedLM, ModelConfig

# -----------------------------------------------------------------------------
# command line

def number(kind, low, high=math.inf, low_ok=False, what="positive"):
    """An argparse type: a number of `kind` in (low, high), or [low, high) with low_ok.
    Example: number(int, 0)("3") -> 3; number(int, 0)("0") -> error "must be positive, got 0"."""
    def parse(s):
        v = kind(s)
        if not ((low <= v if low_ok else low < v) and v < high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    return parse

positive = lambda kind: number(kind, 0)
non_negative = lambda kind: number(kind, 0, low_ok=True, what="non-negative")
rate = number(float, 0, 1, what="a mask rate strictly between 0 and 1")
fraction = number(float, 0, 1, low_ok=True, what="in [0, 1)")
MIN_SEQ_LEN = 4  # a row must hold [CLS] x [SEP] and a target

RESUME_MAY_CHANGE = ("max_steps", "epochs", "stop_after", "device", "compile", "fast", "eval_blimp", "data_dir",
                     "grad_accum")  # how to run, not what: the batch per optimizer step stays --batch-tokens
RESUME_HELP = ("--resume RUN_DIR keeps every setting of the saved run. Only " + ", ".join(f"--{k.replace('_', '-')}" for k in
               RESUME_MAY_CHANGE) + " may be given with it (and it may run on another number of processes); any "
               "other flag that differs from the saved run is an error that names it.")

def get_parser():
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=RESUME_HELP)
    a = p.add_argument
    a("--corpus", default="babylm_10M",
      help="babylm_10M, babylm_100M, synthetic, or a path to a text file or folder (default: %(default)s)")
    a("--data-dir", default="data",
      help="where corpora are looked up / downloaded and token caches are kept (default: %(default)s)")
    a("--out", default=None, help="run folder, never shared or overwritten by accident (default: out/<corpus>-<size>-<masking>)")
    a("--overwrite", action="store_true", help="start a new run in an --out that holds one: delete the files train.py "
                                               "wrote there and keep the rest (default: off)")
    a("--size", default="paper", choices=list(SIZES), help="model shape preset (default: %(default)s)")
    for name in ("n-layer", "n-head", "d-model", "d-ff"):
        a(f"--{name}", type=positive(int), default=None,
          help=f"override the preset's {name.replace('-', '_')} (default: the preset's)")
    a("--vocab-size", type=positive(int), default=None, help="BPE vocabulary size (default: 40000 for --size paper, else 16384)")
    a("--dropout", type=fraction, default=0.1, help="dropout on embeddings and residual branches, in [0, 1) (default: %(default)s)")
    a("--masking", default="hard", choices=list(METRICS),
      help="uniform = standard MLM; hard or soft = AMLM scoring each type by top-1 accuracy or by cross-entropy "
           "(default: %(default)s)")
    a("--mask-rate", type=rate, default=None,
      help="constant mask rate, setting --mask-rate-start and --mask-rate-end (default: off, see those two)")
    a("--mask-rate-start", type=rate, default=None, help="mask rate at step 0; it moves linearly to --mask-rate-end, a "
      "decay when start > end (default: 0.40 for AMLM, 0.15 for --masking uniform, which is standard MLM)")
    a("--mask-rate-end", type=rate, default=None, help="mask rate at the last step; above the start it rises (default: 0.15)")
    a("--amlm-update-every", type=positive(int), default=200,
      help="optimizer steps between AMLM weight updates (default: %(default)s)")
    a("--amlm-ema", type=fraction, default=0.2, help="EMA weight of the old masking weights, in [0, 1) (default: %(default)s)")
    a("--nhot", action=argparse.BooleanOptionalAction, default=True, help="N-hot sub-token embeddings (default: on)")
    a("--epochs", type=positive(float), default=10,
      help="passes over the training split (default: %(default)s; strict-small: 10 x 10 M words)")
    a("--max-steps", type=non_negative(int), default=None,
      help="stop after this many optimizer steps, overriding --epochs (default: as many as --epochs takes)")
    a("--stop-after", type=positive(int), default=None,
      help="save latest.pt and stop after this many steps in this sitting, to resume later (default: run to the end)")
    a("--batch-tokens", type=positive(int), default=None,
      help="tokens per optimizer step, over all processes (default: 16384; 4096 for --corpus synthetic)")
    a("--grad-accum", type=positive(int), default=1,
      help="micro-steps per optimizer step in each process; the batch stays --batch-tokens (default: %(default)s)")
    a("--seq-len", default="64,256", help=f"sequence lengths of at least {MIN_SEQ_LEN}, comma-separated, each used for "
                                          "an equal share of the steps (default: %(default)s)")
    a("--lr", type=positive(float), default=1e-3, help="peak learning rate (default: %(default)s)")
    a("--optimizer", default="adamw", choices=["adamw", "lamb"],
      help="adamw, or lamb as in the paper's code (which used --lr 7e-3 --weight-decay 0.1) (default: %(default)s)")
    a("--warmup", type=non_negative(float), default=0.02,
      help="warmup steps; a value < 1 is a fraction of all steps (default: %(default)s)")
    a("--weight-decay", type=non_negative(float), default=0.01, help="weight decay on matrices (default: %(default)s)")
    a("--grad-clip", type=positive(float), default=1.0, help="clip the gradient's global norm to this (default: %(default)s)")
    a("--seed", type=number(int, 0, 2**63, low_ok=True, what="in [0, 2^63)"), default=1337,
      help="seeds the initialisation, the data order and the masking (default: %(default)s)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"],
      help="auto = cuda if there is a GPU, else cpu (default: %(default)s)")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto = bf16 where it is native: AMX or AVX512-BF16 CPUs, bf16 GPUs (default: %(default)s)")
    a("--fast", action=argparse.BooleanOptionalAction, default=None, help="lib/fast.py's FastMaskedLM; --no-fast: model.py's "
                                                                       "MaskedLM, the same maths (default: on, off with --compile)")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="torch.compile the plain model; meant for CUDA (default: off)")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue the run in RUN_DIR from its latest.pt, with its settings (see below) (default: a new run)")
    a("--eval-every", type=non_negative(int), default=500,
      help="steps between validation losses, 0 = only at the end (default: %(default)s)")
    a("--eval-tokens", type=positive(int), default=262144, help="validation tokens per evaluation (default: %(default)s)")
    a("--eval-blimp", default=None, metavar="DIR",
      help="score the BLiMP-style tasks in DIR at each milestone checkpoint; checked at start (default: off)")
    return p

def parse_args(argv=None):
    """The flags, checked and completed; with --resume, the saved run's flags (and its latest.pt) instead,
    except RESUME_MAY_CHANGE. Returns (args, model shape, resume checkpoint or None)."""
    p = get_parser()
    args, resume = p.parse_args(argv), None
    if args.resume:
        if args.overwrite:
            p.error("--overwrite starts a new run and --resume continues one; give one of them")
        resume = load_resume(args.resume)
        args = resumed_args(p, argv, args, resume["args"])
    if args.compile and args.fast:
        p.error("--compile compiles the plain model (torch.compile cannot trace lib/fast.py's pieces): add --no-fast")
    args.fast = not args.compile if args.fast is None else args.fast
    args.batch_tokens = args.batch_tokens or (4096 if args.corpus == "synthetic" else 16384)  # synthetic: smoke tests
    if not args.corpus.strip():
        p.error("--corpus is empty: give babylm_10M, babylm_100M, synthetic, or a path (is a shell variable unset?)")
    if args.mask_rate is not None:
        args.mask_rate_start = args.mask_rate_end = args.mask_rate
    if args.mask_rate_start is None:  # standard MLM is a constant 15 %; AMLM's best configuration decays 0.40 -> 0.15
        args.mask_rate_start = 0.15 if args.masking == "uniform" else 0.40
    args.mask_rate_end = 0.15 if args.mask_rate_end is None else args.mask_rate_end
    try:
        args.seq_lens = [int(t) for t in args.seq_len.split(",")]
        assert all(t > 0 for t in args.seq_lens)
    except (ValueError, AssertionError):
        p.error(f"--seq-len must be positive integers separated by commas, got {args.seq_len!r}")
    if min(args.seq_lens) < MIN_SEQ_LEN:
        p.error(f"--seq-len {args.seq_len}: every length must be at least {MIN_SEQ_LEN}, room for [CLS] x [SEP] and a target")
    block, world = max(args.seq_lens), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE
    if any(block % t for t in args.seq_lens) or args.batch_tokens % block:
        p.error(f"every --seq-len must divide {block}, and --batch-tokens ({args.batch_tokens}) must be a multiple of it")
    if (args.batch_tokens // block) % (world * args.grad_accum):
        p.error(f"--batch-tokens {args.batch_tokens} makes {args.batch_tokens // block} sequences of {block} per step, "
                f"which do not split evenly over {world} process(es) x --grad-accum {args.grad_accum}")
    args.vocab_size = args.vocab_size or (40000 if args.size == "paper" else 16384)
    shape = {**SIZES[args.size], **{k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "d_ff") if getattr(args, k)}}
    if shape["d_model"] % shape["n_head"] or (shape["d_model"] // shape["n_head"]) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    try:
        args.device = str(pick_device(args.device))
    except UserError as e:  # a run saved on a GPU, resumed without one: say how to go on here
        p.error(f"{e}; to continue the run in {args.resume} here, add --device cpu" if resume else str(e))
    args.dtype = pick_dtype(torch.device(args.device), args.dtype)
    if args.compile and args.device == "cpu":
        print("note: --compile on a CPU: where measured (docs/performance.md) the compiled plain model trained "
              "slower than lib/fast.py's", file=sys.stderr)
    if args.eval_blimp:  # read now: a typo must not surface at the first milestone, minutes into training
        if problem := evaluate.task_path_problem(args.eval_blimp):
            p.error(f"--eval-blimp {problem}")
    return args, shape, resume

def resumed_args(p, argv, args, saved):
    """The saved run's flags (saved: its args), with those typed now (argv) that RESUME_MAY_CHANGE allows. Any other
    typed flag must agree with the saved run, else --resume RUN --lr 0.5 would go on at the old rate without a word.
    Example: saved lr 0.001, typed --lr 0.5 -> error "... --lr 0.5 (the run has 0.001) ..." """
    q, unset = get_parser(), object()
    q.set_defaults(**dict.fromkeys(vars(args), unset))  # the same flags with a default no flag gives: what remains was typed
    typed = {k: v for k, v in vars(q.parse_args(argv)).items() if v is not unset}
    run = {**{k: p.get_default(k) for k in vars(args)}, **saved, "out": args.resume}  # a flag the saved run lacks: its default
    same = lambda k, v: os.path.realpath(v) == os.path.realpath(args.resume) if k == "out" else v == run.get(k)
    clash = [k for k, v in typed.items() if k not in RESUME_MAY_CHANGE + ("resume",) and not same(k, v)]
    if clash:
        p.error("--resume keeps the saved run's settings, but " + ", ".join(
            f"--{k.replace('_', '-')} {typed[k]} (the run has {run.get(k)})" for k in clash) + " differ")
    changed = {k: v for k, v in typed.items() if k in RESUME_MAY_CHANGE}
    return argparse.Namespace(**{**run, **changed, "stop_after": args.stop_after, "resume": args.resume, "overwrite": False})

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

def total_steps(args, epoch_tokens):
    """--max-steps, else the optimizer steps that --epochs takes; an --epochs that rounds to 0 steps is refused.
    Example: --epochs 2, 1,000,000 tokens an epoch, --batch-tokens 8192 -> 244."""
    if args.max_steps is not None:
        return args.max_steps
    total = int(args.epochs * epoch_tokens // args.batch_tokens)
    if total == 0:
        sys.exit(f"error: --epochs {args.epochs} is 0 steps of {args.batch_tokens} tokens on this corpus "
                 f"({epoch_tokens:,} tokens an epoch); give a larger --epochs, or --max-steps 0 for an untrained model")
    return total

def milestones_words():
    """BabyLM checkpoints: every 1 M words up to 10 M, then every 10 M up to 100 M (and beyond)."""
    return [m * 1_000_000 for m in list(range(1, 10)) + list(range(10, 1001, 10))]

# -----------------------------------------------------------------------------
# setup: the data, the model, the maskers

def load_data(args, rank=0):
    """data.prepare for this run (under torchrun rank 0 first: it builds the cache), its complaints in one line. A corpus
    shorter than one block is an error; a shorter validation split a note, and the run goes on without validation."""
    try:
        with ddp.rank_0_first(rank):
            d = data.prepare(args.corpus, args.data_dir, args.vocab_size, quiet=rank != 0)
    except UserError as e:
        sys.exit(f"error: {e}")
    block = max(args.seq_lens)
    if len(d.train) < block:
        sys.exit(f"error: the corpus gives {len(d.train)} training tokens, fewer than the {block} of one block "
                 "(the longest --seq-len); use a larger corpus or a shorter --seq-len")
    if len(d.val) < block and rank == 0:
        print(f"note: the validation split has {len(d.val)} tokens, fewer than the {block} of one block; "
              "the run goes on without validation losses", file=sys.stderr)
    return d

def build(args, shape, d):
    """The model (lib/fast.py's FastMaskedLM, or model.py's MaskedLM with --no-fast), its optimizer, and the two
    maskers: the run's AMLM, and uniform 15 % for the validation loss."""
    V = d.tokenizer.vocab_size
    cfg = ModelConfig(vocab_size=V, max_len=max(args.seq_lens), dropout=args.dropout, **shape)
    model = (FastMaskedLM if args.fast else MaskedLM)(cfg, nhot_table=d.nhot_table if args.nhot else None).to(args.device)
    opt = make_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    specials = [data.PAD, data.CLS, data.SEP, data.UNK, data.MASK]
    freqs = torch.bincount(torch.from_numpy(d.train[: 50_000_000].astype("int64")), minlength=V)
    amlm = AMLM(V, specials, data.MASK, rate=args.mask_rate_start, metric=args.masking, ema=args.amlm_ema,
                update_every=args.amlm_update_every, frequencies=freqs).to(args.device)
    val_masker = AMLM(V, specials, data.MASK, rate=0.15, metric="uniform").to(args.device)
    return model, opt, amlm, val_masker

@torch.no_grad()
def validation_loss(model, val, masker, args, autocast):
    """Mean MLM loss on the held-out split at fixed uniform 15 % masking and a fixed seed (comparable across runs).
    Example: an untrained tiny model on babylm_10M -> 9.58 (about ln 16384); after 400 steps -> 4.53."""
    T = max(args.seq_lens)
    n = min(len(val) // T, max(1, args.eval_tokens // T))
    if n == 0:
        return float("nan")
    x = torch.from_numpy(val[: n * T].astype("int64")).view(n, T)  # (n, T)
    g = torch.Generator(device=args.device).manual_seed(1234)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, 64):
        inputs, labels = masker.mask(x[i:i + 64].to(args.device), generator=g)
        with autocast:
            _, loss = model(inputs, labels=labels)
        k = int((labels != -100).sum())
        total, count = total + loss.item() * k, count + k
    model.train()
    return total / max(1, count)

@releases_run
def main(argv=None):
    args, shape, resume = parse_args(argv)
    rank, world = ddp.init(args)
    out = open_run(args, rank)  # before any work: a folder in use or holding a run is refused in a second
    torch.manual_seed(args.seed)
    d = load_data(args, rank)
    batches = data.Batches(d.train, block_size=max(args.seq_lens), seed=args.seed)  # the same global stream everywhere
    total = total_steps(args, epoch_tokens=batches.n_blocks * batches.block_size)
    warmup = max(1, int(args.warmup * total) if args.warmup < 1 else int(args.warmup))
    words_at = lambda step: int(step * args.batch_tokens * d.n_train_words / max(1, d.n_train_tokens))
    model, opt, amlm, val_masker = build(args, shape, d)
    if world > 1:  # the same initial weights everywhere (DDP checks), but each process its own dropout stream
        torch.manual_seed(hash((args.seed, rank)) % 2**63)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)  # all masking randomness, the same everywhere
    step = restore(resume, d.tokenizer, model, opt, amlm, batches, gen, rank, world) if resume else 0
    if resume:
        check_resume_point(step, total, args)  # before anything is written
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    milestones = [m for m in milestones_words() if m > words_at(step)]
    clear_overwritten(args, rank)  # only now: a new run that cannot start leaves the old one as it was
    progress = Progress(out, step, total, args, world, active=rank == 0)
    losses, log, start = {"train_loss": math.nan, "val_loss": math.nan}, progress.log, time.time()
    progress.header(args, d, model, total, words_at(total))
    if step < total and rank == 0:  # the time it will take, from a probe of the model (the others wait in DDP)
        log("\n".join(estimate_lines(model, args, step, total, autocast, seq_len_at, world, len(d.val))))
    fmodel = torch.compile(ddp.wrap(model, world)) if args.compile else ddp.wrap(model, world)
    save = lambda milestone=None: save_checkpoint(out, step, words_at(step), args, model, opt, amlm, batches, gen,
                                                  d.tokenizer, milestone, rank)
    write_summary = lambda: rank == 0 and write_json(run_summary(f"{out}/summary.json", step, total, words_at(step),
                                                                 losses, progress, start, args, model), f"{out}/summary.json")
    interrupted = catch_ctrl_c(out, rank)  # Ctrl-C, or torchrun/a scheduler stopping us: finish the step, save, exit
    stop = min(total, step + args.stop_after) if args.stop_after is not None else total
    micro = args.grad_accum
    while step < stop and not interrupted:
        t0 = time.perf_counter()
        lr, T = lr_at(step, total, args.lr, warmup), seq_len_at(step, total, args.seq_lens)
        p = mask_rate(step, total, args.mask_rate_start, args.mask_rate_end)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches.next(args.batch_tokens, T).to(args.device, non_blocking=True)  # (B, T): the global batch
        # --- the AMLM cycle: mask by difficulty -> predict -> record how difficult each type was -> adapt ---
        inputs, labels = amlm.mask(x, rate=p, generator=gen)  # (B, T) each; one mask per row, whatever the world size
        n = int((labels != -100).sum())  # targets in the global batch (every process masked all of it)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this process's rows
        loss = torch.zeros((), dtype=torch.float64)
        for i, (inp, lab) in enumerate(zip(inputs[rows].chunk(micro), labels[rows].chunk(micro))):
            sync = world == 1 or i == micro - 1  # DDP all-reduces the gradients on the last micro-step only
            with nullcontext() if sync else fmodel.no_sync(), autocast:
                logits, micro_loss = fmodel(inp, labels=lab)  # logits (k, V): only the k targets' rows
            k = int((lab != -100).sum())
            (micro_loss * (k * world / max(n, 1))).backward()  # DDP averages over processes: the gradient of the mean over all n
            amlm.observe(lab, logits.detach(), inp)  # per type: how often predicted right (hard), or its loss (soft)
            loss += micro_loss.detach().double().cpu() * k
        loss = ddp.agree(loss / max(n, 1), interrupted, args.device)  # the global batch's mean; all stop together
        if not math.isfinite(loss):
            sys.exit(stop_on_nan(out, step, loss, f"--lr {args.lr}", new_run=not resume, rank=rank))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        amlm.step(rate=p)  # every update_every steps: new weights from the statistics, rescaled to the rate p
        step += 1
        # --- what the user sees: display, curriculum record, validation, milestone checkpoints ---
        losses["train_loss"] = loss
        progress.step(step, loss, logits, lab, p, lr, time.perf_counter() - t0)  # the last micro-step's predictions
        if amlm.steps % amlm.update_every == 0 and rank == 0:  # the weights just moved: amlm.csv and the log say how
            progress.curriculum(step, amlm, d.tokenizer.tokens, p)
        if args.eval_every and step % args.eval_every == 0 and step < total:
            losses["val_loss"] = validation_loss(model, d.val, val_masker, args, autocast)
            if math.isfinite(losses["val_loss"]):  # nan: the split is shorter than one block (said at start)
                log(f"step {step}: validation loss {losses['val_loss']:.4f}")
        while milestones and words_at(step) >= milestones[0]:
            save(milestones[0])
            if args.eval_blimp and rank == 0:
                log(f"step {step}: {evaluate.milestone_line(model, d.tokenizer, args.eval_blimp, args.device, milestones[0])}")
            milestones.pop(0)
            write_summary()
    if step == total and not interrupted:
        losses["val_loss"] = validation_loss(model, d.val, val_masker, args, autocast)
        trained = f"train loss {losses['train_loss']:.4f}" if total else "the untrained model"
        log(f"done: {step} steps, {trained}, validation loss {losses['val_loss']:.4f}")
    save()
    write_summary()
    if interrupted or step < total:
        log(f"{'interrupted' if interrupted else 'paused'} at step {step}; saved {out}/latest.pt (continue with --resume {out})")
    progress.close()
    return 130 if interrupted else 0  # the exit code (releases_run exits with it)

if __name__ == "__main__":
    main()
