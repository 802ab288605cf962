"""
Pretrain a masked language model with adaptive masking (AMLM) and N-hot sub-token embeddings.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). The defaults are the paper's best configuration:
hard AMLM with the mask rate decaying 0.40 -> 0.15, N-hot embeddings, the paper's shape, 10 epochs
of the 10 M-word strict-small corpus, sequences of 64 then 256 tokens at 16,384 tokens per step.

    python train.py --corpus babylm_10M                                   # the paper recipe (overnight on CPU)
    python train.py --corpus synthetic --size tiny --max-steps 200        # a one-minute smoke test
    python train.py --resume out/run                                      # continue exactly where it stopped
    torchrun --nproc_per_node 4 train.py --corpus babylm_10M              # data parallel: the same run on 4 GPUs

The run folder holds latest.pt, ckpt_<N>M.pt (N = million words seen), summary.json, log.txt, amlm.csv, and
train.lock while a process uses it. A new run refuses a folder that holds one (--resume or --overwrite).
"""
import argparse, csv, datetime, hashlib, json, math, os, resource, signal, sys, time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from runs import open_run, release_run, releases_run
from amlm import AMLM, mask_rate, top1_hits
from model import SIZES, MaskedLM, ModelConfig, pick_device, pick_dtype

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

RESUME_MAY_CHANGE = ("max_steps", "epochs", "stop_after", "device", "compile", "fast", "eval_blimp", "data_dir",
                     "grad_accum")  # how to run, not what: the batch per optimizer step stays --batch-tokens
RESUME_HELP = ("--resume RUN_DIR keeps every setting of the saved run. Only --max-steps, --epochs, --stop-after, "
               "--device, --compile, --fast, --eval-blimp, --data-dir and --grad-accum may be given with it (and it "
               "may run on another number of processes); any other flag that differs from the saved run is an error "
               "that names it.")

def get_parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=RESUME_HELP)
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (see --help)\n")  # one line, not the usage block
    a = p.add_argument
    a("--corpus", default="babylm_10M",
      help="babylm_10M, babylm_100M, synthetic, or a path to a text file or folder (default: %(default)s)")
    a("--data-dir", default="data",
      help="where corpora are looked up / downloaded and token caches are kept (default: %(default)s)")
    a("--out", default=None, help="run folder (default: out/<corpus>-<size>-<masking>); a new run refuses a folder "
                                  "that holds one already, and a folder another train.py is using")
    a("--overwrite", action="store_true", help="start a new run in an --out that holds one: deletes the files train.py "
                                               "wrote there (latest.pt, ckpt_*M.pt, summary.json, log.txt, amlm.csv) "
                                               "and keeps the rest (default: off)")
    a("--size", default="paper", choices=list(SIZES), help="model shape preset (default: %(default)s)")
    for name in ("n-layer", "n-head", "d-model", "d-ff"):
        a(f"--{name}", type=positive(int), default=None,
          help=f"override the preset's {name.replace('-', '_')} (default: the preset's)")
    a("--vocab-size", type=positive(int), default=None, help="BPE vocabulary size (default: 40000 for --size paper, else 16384)")
    a("--dropout", type=fraction, default=0.1, help="dropout on embeddings and residual branches, in [0, 1) (default: %(default)s)")
    a("--masking", default="hard", choices=["uniform", "hard", "soft"],
      help="uniform MLM, or AMLM's difficulty metric (default: %(default)s)")
    a("--mask-rate", type=rate, default=None,
      help="constant mask rate, setting --mask-rate-start and --mask-rate-end (default: off, the decay below)")
    a("--mask-rate-start", type=rate, default=0.40, help="mask rate at step 0, decaying linearly (default: %(default)s)")
    a("--mask-rate-end", type=rate, default=0.15, help="mask rate at the last step (default: %(default)s)")
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
    a("--seq-len", default="64,256",
      help="sequence lengths, comma-separated, each used for an equal share of the steps (default: %(default)s)")
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
    a("--fast", action=argparse.BooleanOptionalAction, default=True,
      help="run the model through fast.py; --no-fast runs model.py's plain code, the same maths (default: on)")
    a("--compile", action="store_true", help="torch.compile the model (default: off)")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue the run in RUN_DIR from its latest.pt, with its settings (see below) (default: a new run)")
    a("--eval-every", type=non_negative(int), default=500,
      help="steps between validation losses, 0 = only at the end (default: %(default)s)")
    a("--eval-tokens", type=positive(int), default=262144, help="validation tokens per evaluation (default: %(default)s)")
    a("--eval-blimp", default=None, metavar="DIR",
      help="score the BLiMP-style tasks in DIR at each milestone checkpoint; checked at start (default: off)")
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
# setup: flags -> a run

RESUME_NEEDS = ("model", "config", "tokenizer", "args", "step", "optimizer", "amlm", "batches", "rng")

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
    if args.batch_tokens is None:  # the synthetic corpus is for smoke tests: small steps finish in a minute
        args.batch_tokens = 4096 if args.corpus == "synthetic" else 16384
    if args.mask_rate is not None:
        args.mask_rate_start = args.mask_rate_end = args.mask_rate
    try:
        args.seq_lens = [int(t) for t in args.seq_len.split(",")]
        assert all(t > 0 for t in args.seq_lens)
    except (ValueError, AssertionError):
        p.error(f"--seq-len must be positive integers separated by commas, got {args.seq_len!r}")
    block, world = max(args.seq_lens), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE
    if any(block % t for t in args.seq_lens) or args.batch_tokens % block:
        p.error(f"every --seq-len must divide {block}, and --batch-tokens ({args.batch_tokens}) must be a multiple of it")
    if (args.batch_tokens // block) % (world * args.grad_accum):
        p.error(f"--batch-tokens {args.batch_tokens} makes {args.batch_tokens // block} sequences of {block} per step, "
                f"which do not split evenly over {world} process(es) x --grad-accum {args.grad_accum}")
    if args.vocab_size is None:
        args.vocab_size = 40000 if args.size == "paper" else 16384
    shape = {**SIZES[args.size], **{k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "d_ff") if getattr(args, k)}}
    if shape["d_model"] % shape["n_head"] or (shape["d_model"] // shape["n_head"]) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    try:
        args.device = str(pick_device(args.device))
    except ValueError as e:
        p.error(str(e))
    args.dtype = pick_dtype(torch.device(args.device), args.dtype)
    if args.eval_blimp:  # read now: a typo must not surface at the first milestone, minutes into training
        import evaluate
        try:
            if not evaluate.read_tasks([args.eval_blimp])[0]:
                p.error(f"--eval-blimp {args.eval_blimp} holds no file of a task format evaluate.py scores")
        except (evaluate.EvalError, data.DataError) as e:
            p.error(f"--eval-blimp: {e}")
    return args, shape, resume

def load_resume(run):
    """A run folder's latest.pt, checked to hold everything an exact resume needs; else exit with one sentence.
    Example: a folder whose latest.pt is a copied ckpt_1M.pt -> "error: cannot resume from X: its latest.pt lacks
    optimizer, amlm, batches, rng ..." """
    path = os.path.join(run, "latest.pt")
    if os.path.isfile(run):
        sys.exit(f"error: --resume takes the run folder, not a file: try --resume {os.path.dirname(run) or '.'}")
    if not os.path.isfile(path):
        sys.exit(f"error: cannot resume from {run}: it holds no latest.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled code that weights_only refuses to run
        sys.exit(f"error: cannot resume from {run}: its latest.pt is unreadable (truncated or not a checkpoint: "
                 f"{type(e).__name__})")
    missing = [k for k in RESUME_NEEDS if k not in ck] if isinstance(ck, dict) else list(RESUME_NEEDS)
    if missing or not isinstance(ck["args"], dict):
        sys.exit(f"error: cannot resume from {run}: its latest.pt lacks {', '.join(missing) or 'the flags (args)'} "
                 "(a ckpt_<N>M.pt holds no optimizer state and cannot be resumed)")
    ck["path"] = path  # for the messages of restore()
    return ck

def resumed_args(p, argv, args, saved):
    """The saved run's flags, with those typed now that RESUME_MAY_CHANGE allows. Any other typed flag must agree
    with the saved run, else --resume RUN --lr 0.5 would go on at the old rate without a word.
    Example: saved lr 0.001, typed --lr 0.5 -> error "... --lr 0.5 (the run has 0.001) ..." """
    q, unset = get_parser(), object()  # the same flags with a default no flag can give: what remains was typed
    q.set_defaults(**dict.fromkeys(vars(args), unset))
    typed = {k: v for k, v in vars(q.parse_args(argv)).items() if v is not unset}
    run = {**{k: p.get_default(k) for k in vars(args)}, **saved, "out": args.resume}  # defaults: flags added since
    same = lambda k, v: os.path.realpath(v) == os.path.realpath(args.resume) if k == "out" else v == run.get(k)
    clash = [k for k, v in typed.items() if k not in RESUME_MAY_CHANGE + ("resume",) and not same(k, v)]
    if clash:
        p.error("--resume keeps the saved run's settings, but " + ", ".join(
            f"--{k.replace('_', '-')} {typed[k]} (the run has {run.get(k)})" for k in clash) + " differ")
    changed = {k: v for k, v in typed.items() if k in RESUME_MAY_CHANGE}
    return argparse.Namespace(**{**run, **changed, "stop_after": args.stop_after, "resume": args.resume, "overwrite": False})

def load_data(args, rank=0):
    """data.prepare for this run, its complaints in one line. A corpus shorter than one block is an error; a
    validation split shorter than one block is a note, and the run goes on without validation (val_loss null).
    Under torchrun rank 0 builds the tokenizer and cache while the others wait, then they load it."""
    if rank != 0:
        dist.barrier()  # until rank 0's cache is complete
    try:
        d = data.prepare(args.corpus, args.data_dir, args.vocab_size, quiet=rank != 0)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    block = max(args.seq_lens)
    if len(d.train) < block:
        sys.exit(f"error: the corpus gives {len(d.train)} training tokens, fewer than the {block} of one block "
                 "(the longest --seq-len); use a larger corpus or a shorter --seq-len")
    if len(d.val) < block and rank == 0:
        print(f"note: the validation split has {len(d.val)} tokens, fewer than the {block} of one block; "
              "the run goes on without validation losses", file=sys.stderr)
    return d

def build(args, shape, d):
    """The model, its optimizer and the two maskers (the run's AMLM, and uniform 15 % for validation)."""
    V = d.tokenizer.vocab_size
    cfg = ModelConfig(vocab_size=V, max_len=max(args.seq_lens), dropout=args.dropout, fast=args.fast, **shape)
    model = MaskedLM(cfg, nhot_table=d.nhot_table if args.nhot else None).to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices, not on norms or biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if args.optimizer == "lamb":
        opt = Lamb(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    else:  # fused: one kernel, not one per tensor
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    specials = [data.PAD, data.CLS, data.SEP, data.UNK, data.MASK]
    freqs = torch.bincount(torch.from_numpy(d.train[: 50_000_000].astype("int64")), minlength=V)
    amlm = AMLM(V, specials, data.MASK, rate=args.mask_rate_start, metric=args.masking, ema=args.amlm_ema,
                update_every=args.amlm_update_every, frequencies=freqs).to(args.device)
    amlm15 = AMLM(V, specials, data.MASK, rate=0.15, metric="uniform").to(args.device)
    return model, opt, amlm, amlm15

class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam's step with decoupled weight
    decay, u = m_hat / (sqrt(v_hat) + eps) + wd * w, rescaled per tensor by the trust ratio ||w|| / ||u||, so each
    layer moves by about lr times its own size. Example: w [3, 4], gradient [1, 0], first step, wd 0, lr 0.1:
    m_hat [1, 0], v_hat [1, 0], u [1, 0], trust 5 / 1 -> w [3 - 0.1 * 5, 4] = [2.5, 4]."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g, state = w.grad.to_dense(), self.state[w]
                if not state:
                    state.update(step=0, m=torch.zeros_like(w), v=torch.zeros_like(w))
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.lerp_(g, 1 - b1)                    # m = b1 m + (1 - b1) g
                v.mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w
                w_norm, u_norm = w.norm(), u.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                w.sub_(lr * trust * u)

def init_distributed(args):
    """Under torchrun (WORLD_SIZE is set): join the process group, gloo on CPU and nccl on CUDA with one GPU per
    process, and return (rank, world size); plain `python train.py` -> (0, 1), no process group."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        if local >= torch.cuda.device_count():
            sys.exit(f"error: process {rank} needs GPU {local}, but this machine has {torch.cuda.device_count()}; "
                     f"start at most one process per GPU")
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU
    # generous timeout: the other processes wait for rank 0 while it writes checkpoints or scores --eval-blimp
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return rank, world

def leave_process_group(code):
    """End a torchrun process: destroy the process group and exit with `code`, skipping the interpreter's shutdown.
    A gloo worker thread can still hold the last reference to a tensor of the last collective; if it drops it while
    the interpreter shuts down, it cannot take the GIL and the process aborts (C++ terminate). DDP keeps the group,
    and so those threads, alive until then, so the process leaves with os._exit, after flushing and unlocking."""
    dist.barrier()  # rank 0 may still be writing a checkpoint
    dist.destroy_process_group()
    release_run()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

def accumulate(model, amlm, inputs, labels, rank, world, micro, autocast):
    """Forward and backward over this process's rows of the global batch, in `micro` micro-batches, so that the
    summed gradient (DDP averages it over processes) is that of the mean loss over ALL targets of the global
    batch: a micro-batch with k of the N targets weighs its mean loss by k / N. Returns (this process's share of
    that loss, which agree() sums; the last micro-batch's logits and labels). Example: 3 + 1 targets on 2
    processes, mean losses 2.0 and 6.0 -> shares 1.5 and 1.5, global loss 3.0 (not (2.0 + 6.0) / 2)."""
    n = int((labels != -100).sum())  # every process masked the whole global batch: N is known everywhere
    rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)  # this process's rows
    total = torch.zeros((), dtype=torch.float64)
    for i, (inp, lab) in enumerate(zip(inputs[rows].chunk(micro), labels[rows].chunk(micro))):
        sync = world == 1 or i == micro - 1  # DDP all-reduces the gradients on the last micro-batch only
        with nullcontext() if sync else model.no_sync(), autocast:
            logits, loss = model(inp, labels=lab)
        k = int((lab != -100).sum())
        (loss * (k * world / max(n, 1))).backward()
        amlm.observe(lab, logits.detach(), inp)
        total += loss.detach().double().cpu() * k
    return total / max(n, 1), logits, lab

def restore(resume, d, model, opt, amlm, batches, gen, rank=0, world=1):
    """Load a latest.pt into the run's objects and RNGs; returns its step. Each process gets its own dropout RNG
    back when the world size is the one saved (else a fresh one: resuming on another world size is not bit-exact)."""
    same = lambda c: {k: v for k, v in c.items() if k != "fast"}  # fast is a way to run, not part of the model
    run = resume["path"]
    if same(resume["config"]) != same(asdict(model.config)) or resume["tokenizer"] != d.tokenizer.to_json():
        sys.exit(f"error: {run} was trained with another model shape or tokenizer; refusing to resume")
    try:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        amlm.load_state_dict(resume["amlm"], stats=rank == 0)  # the saved statistics are the sum over all processes
        batches.load_state_dict(resume["batches"])
        gen.set_state(resume["rng"]["mask"])
    except (RuntimeError, ValueError, KeyError, TypeError, data.DataError) as e:
        sys.exit(f"error: {run} does not fit this run ({str(e).splitlines()[0]}); refusing to resume")
    per_rank = resume["rng"].get("ranks") or [{"torch": resume["rng"]["torch"], "cuda": resume["rng"].get("cuda")}]
    if len(per_rank) == world:
        torch.set_rng_state(per_rank[rank]["torch"])
        if gen.device.type == "cuda" and per_rank[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(per_rank[rank]["cuda"])
    else:
        torch.manual_seed(hash((resume["args"]["seed"], rank, resume["step"])) % 2**63)
    return resume["step"]

# -----------------------------------------------------------------------------
# what a run writes: checkpoints (atomic; evaluate.load_checkpoint loads them without executing code), logs

def save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the old file intact, never a truncated one
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        sys.exit(f"error: cannot write {path} ({e.strerror or e}); the previous checkpoint there is intact")

def save_checkpoint(out, step, words, args, model, opt, amlm, batches, gen, tokenizer, milestone=None, rank=0):
    """latest.pt: everything an exact resume needs. With a milestone (words), also ckpt_<N>M.pt: what evaluation
    needs, without the optimizer. Every process calls it (it gathers their RNGs and AMLM statistics); rank 0 writes."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if gen.device.type == "cuda" else None}
    ranks, amlm_state = [rng], amlm.state_dict()
    if dist.is_initialized():  # each process's dropout RNG, and a digest of its masking weights (all must agree)
        ranks = [None] * dist.get_world_size()
        digest = hashlib.blake2b(amlm.weights.cpu().numpy().tobytes(), digest_size=8).hexdigest()
        dist.all_gather_object(ranks, {**rng, "amlm_weights": digest})
    if rank != 0:
        return
    state = {"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tokenizer.to_json(),
             "args": {k: v for k, v in vars(args).items() if k != "seq_lens"}, "step": step,
             "tokens_seen": step * args.batch_tokens, "words_seen": words,
             "optimizer": opt.state_dict(), "amlm": amlm_state, "batches": batches.state_dict(),
             "rng": {"mask": gen.get_state(), **rng, "ranks": ranks}}
    save_atomic(state, os.path.join(out, "latest.pt"))
    if milestone is not None:
        keep = ("model", "config", "tokenizer", "args", "step", "tokens_seen", "words_seen")
        save_atomic({k: state[k] for k in keep}, os.path.join(out, f"ckpt_{milestone // 1_000_000}M.pt"))

def write_json(obj, path):
    """Atomic, and standard JSON: NaN and infinity are written as null. Example: {"val_loss": nan} -> {"val_loss": null}."""
    clean = lambda v: (None if isinstance(v, float) and not math.isfinite(v) else
                       {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else v)
    with open(f"{path}.tmp", "w") as f:
        json.dump(clean(obj), f, indent=1)
    os.replace(f"{path}.tmp", path)

def append_csv(path, row):
    """One row of amlm.csv (the header first, when the file is new)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)

class Progress:
    """The progress bar, log.txt, and the steady-state throughput (the first steps of a sitting warm up)."""

    def __init__(self, out, step, total, batch_tokens, world=1, active=True):
        self.file = open(os.path.join(out, "log.txt"), "a") if active else None  # only rank 0 shows and writes
        self.bar = tqdm(total=total, initial=step, dynamic_ncols=True, disable=None if active else True)
        self.first, self.total, self.batch_tokens = step, total, batch_tokens
        self.seconds, self.tokens, self.acc, self.world = 0.0, 0, None, world

    def log(self, msg):
        if self.file:
            tqdm.write(msg)
            self.file.write(msg + "\n")
            self.file.flush()

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
        if step == 10 or step % 100 == 0:
            eta = (self.total - step) * self.batch_tokens / tps
            self.log(f"step {step}/{self.total}: loss {loss:.4f}, masked acc {self.acc:.3f}, rate {rate:.3f}, "
                     f"lr {lr:.2e}, {tps:,.0f} tok/s, ETA {eta / 3600:.1f} h")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()

def summary(step, total, words, losses, progress, start, args, model):
    return {"steps": step, "total_steps": total, "tokens_seen": step * args.batch_tokens, "words_seen": words,
            **losses, "tokens_per_second": progress.tokens_per_second(), "wall_seconds": time.time() - start,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": args.device,
            "processes": dist.get_world_size() if dist.is_initialized() else 1,
            "dtype": args.dtype, "parameters": model.num_params(), "parameters_without_embeddings": model.num_params(False),
            "model_config": asdict(model.config), "config": {k: v for k, v in vars(args).items()}}

@torch.no_grad()
def evaluate_loss(model, val, amlm15, args, autocast):
    """Mean MLM loss on the held-out split at fixed uniform 15 % masking and a fixed seed (comparable across runs)."""
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

def blimp_line(model, tokenizer, args, words):
    """The --eval-blimp tasks scored at a milestone, as one log line (accuracy and correlation tasks apart)."""
    import evaluate
    try:
        res = evaluate.evaluate_paths(model, tokenizer, [args.eval_blimp], device=args.device, progress=False)
    except (evaluate.EvalError, data.DataError) as e:  # the files changed since the start: say so, train on
        return f"{args.eval_blimp}: not scored at {words // 1_000_000}M words ({e})"
    return f"{args.eval_blimp}: {evaluate.headline_text(res)} at {words // 1_000_000}M words"


def log_header(log, args, d, model, total, words, out, world):
    log(f"config: {json.dumps(vars(args))}")
    log(f"data: {len(d.train):,} train tokens ({d.n_train_words:,} words), {len(d.val):,} validation tokens, vocab "
        f"{d.tokenizer.vocab_size}, {len(d.units) if args.nhot else 0} sub-token units")
    log(f"model: {model.num_params() / 1e6:.2f} M parameters ({model.num_params(False) / 1e6:.2f} M without embeddings); "
        f"device {args.device}, dtype {args.dtype}, {world} process(es) x {args.grad_accum} micro-step(s); {total} steps "
        f"of {args.batch_tokens} tokens ({words / 1e6:.1f} M words seen); run folder {out}")

def agree(loss, interrupted, device):
    """Under torch.distributed, one all-reduce: the global loss (each process holds its share), and whether any
    process was interrupted (then all stop after this step). Without it: the loss as a float."""
    if not dist.is_initialized():
        return float(loss)
    t = torch.tensor([float(loss), float(bool(interrupted))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if t[1] > 0 and not interrupted:
        interrupted.append(True)
    return t[0].item()

# -----------------------------------------------------------------------------
# the run

@releases_run
def main(argv=None):
    args, shape, resume = parse_args(argv)
    rank, world = init_distributed(args)
    out = open_run(args, rank)  # before any work: a folder in use or holding a run is refused in a second
    torch.manual_seed(args.seed)
    d = load_data(args, rank)
    batches = data.Batches(d.train, block_size=max(args.seq_lens), seed=args.seed)  # the same global stream everywhere
    epoch_tokens = batches.n_blocks * batches.block_size
    total = args.max_steps if args.max_steps is not None else int(args.epochs * epoch_tokens // args.batch_tokens)
    warmup = max(1, int(args.warmup * total) if args.warmup < 1 else int(args.warmup))
    words_at = lambda step: int(step * args.batch_tokens * d.n_train_words / max(1, d.n_train_tokens))
    model, opt, amlm, amlm15 = build(args, shape, d)
    if world > 1:  # the same initial weights everywhere (DDP checks), but each process its own dropout stream
        torch.manual_seed(hash((args.seed, rank)) % 2**63)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)  # all masking randomness, the same everywhere
    step = restore(resume, d, model, opt, amlm, batches, gen, rank, world) if resume else 0
    fmodel = DistributedDataParallel(model) if world > 1 else model
    fmodel = torch.compile(fmodel) if args.compile else fmodel
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    milestones = [m for m in milestones_words() if m > words_at(step)]
    progress, start = Progress(out, step, total, args.batch_tokens, world, active=rank == 0), time.time()
    losses, log = {"train_loss": math.nan, "val_loss": math.nan}, progress.log
    log_header(log, args, d, model, total, words_at(total), out, world)
    save = lambda milestone=None: save_checkpoint(out, step, words_at(step), args, model, opt, amlm, batches, gen,
                                                  d.tokenizer, milestone, rank)
    interrupted = []  # Ctrl-C, or torchrun/a scheduler stopping us: finish the step, save, exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.append(True))
    stop = min(total, step + args.stop_after) if args.stop_after is not None else total
    while step < stop and not interrupted:
        t0 = time.perf_counter()
        lr, T = lr_at(step, total, args.lr, warmup), seq_len_at(step, total, args.seq_lens)
        p = mask_rate(step, total, args.mask_rate_start, args.mask_rate_end)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches.next(args.batch_tokens, T).to(args.device, non_blocking=True)  # (B, T): the global batch
        # --- the AMLM cycle: mask by difficulty -> predict -> record how hard each type was -> adapt ---
        inputs, labels = amlm.mask(x, rate=p, generator=gen)  # one mask per row, whatever the world size
        loss, logits, labels = accumulate(fmodel, amlm, inputs, labels, rank, world, args.grad_accum, autocast)
        loss = agree(loss, interrupted, args.device)  # the global loss; all processes stop together
        if not math.isfinite(loss):
            log(f"step {step}: the loss is {loss}; stopping. {out}/latest.pt holds the last good state.")
            sys.exit(1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        amlm.step(rate=p)  # the weights follow the decaying rate, as in the paper
        step += 1
        # --- hooks: display, curriculum record, validation, milestone checkpoints ---
        losses["train_loss"] = loss
        progress.step(step, loss, logits, labels, p, lr, time.perf_counter() - t0)
        if amlm.steps % amlm.update_every == 0 and rank == 0:
            append_csv(os.path.join(out, "amlm.csv"), {**amlm.diagnostics(d.tokenizer.tokens), "step": step, "mask_rate": p})
            log(f"step {step}: {amlm.summary(d.tokenizer.tokens)}")
        if args.eval_every and step % args.eval_every == 0 and step < total:
            losses["val_loss"] = evaluate_loss(model, d.val, amlm15, args, autocast)
            if math.isfinite(losses["val_loss"]):  # nan: the split is shorter than one block (said at start)
                log(f"step {step}: validation loss {losses['val_loss']:.4f}")
        while milestones and words_at(step) >= milestones[0]:
            save(milestones[0])
            if args.eval_blimp and rank == 0:
                log(f"step {step}: {blimp_line(model, d.tokenizer, args, milestones[0])}")
            milestones.pop(0)
            if rank == 0:
                write_json(summary(step, total, words_at(step), losses, progress, start, args, model), f"{out}/summary.json")
    if step == total and not interrupted:
        losses["val_loss"] = evaluate_loss(model, d.val, amlm15, args, autocast)
        log(f"done: {step} steps, train loss {losses['train_loss']:.4f}, validation loss {losses['val_loss']:.4f}")
    save()
    if rank == 0:
        write_json(summary(step, total, words_at(step), losses, progress, start, args, model), f"{out}/summary.json")
    if interrupted or step < total:
        log(f"{'interrupted' if interrupted else 'paused'} at step {step}; saved {out}/latest.pt (continue with --resume {out})")
    progress.close()
    if dist.is_initialized():
        leave_process_group(130 if interrupted else 0)
    if interrupted:
        sys.exit(130)

if __name__ == "__main__":
    main()
