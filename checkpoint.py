"""
Checkpoints and the run folder of amlm: the one loader that train.py, evaluate.py and export.py share, the atomic
save, restore for --resume, and the run folder's lock. Part of a PyTorch reimplementation of Edman & Fraser,
"Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    model, tokenizer, ckpt = load_model("out/run/latest.pt")   # evaluation: a model in eval mode, on the CPU
    ckpt, config, tokenizer = read_checkpoint("out/run/ckpt_5M.pt")   # export: checked, no model built
    out = open_run(args)                                        # train.py: made and locked before any work

A checkpoint is a dict of plain tensors, numbers and strings, loaded with weights_only=True, so a file never
executes code. latest.pt holds everything an exact resume needs; ckpt_<N>M.pt (N million words seen) what
evaluation needs. Every file is written to a temporary name and renamed into place, so a crash or a full disk
leaves the previous file intact, and a temporary file a killed run left is removed at the next start.

The run folder: one train.py per folder, a lock file (train.lock, holding pid@host) for the run's lifetime; a lock
whose process is gone from this host is taken over with a warning. A new run refuses a folder that holds one:
--resume continues it, --overwrite deletes the files train.py wrote there first.
"""
import argparse, errno, functools, hashlib, json, math, os, re, shutil, socket, sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model import MaskedLM, ModelConfig
from tokenizer import DataError, Tokenizer

RUN_FILES = re.compile(r"latest\.pt|ckpt_\d+M\.pt|summary\.json|log\.txt|amlm\.csv")  # what train.py writes there
TEMP_FILES = re.compile(r"(latest\.pt|ckpt_\d+M\.pt|summary\.json)\.tmp\d+")  # ... and its temporary names
RESUME_NEEDS = ("model", "config", "tokenizer", "args", "step", "optimizer", "amlm", "batches", "rng")


class CheckpointError(Exception):
    """A file that is not a checkpoint of this version, or one that cannot be written, said in one sentence."""

# -----------------------------------------------------------------------------
# reading: the one loader

def expected_shapes(config):
    """The state_dict's keys and shapes for a ModelConfig, read off a MaskedLM built on the meta device (no memory,
    no compute). Example: ModelConfig(vocab_size=10, n_layer=1, d_model=4, d_ff=8, n_head=2) ->
    {"tok.weight": (10, 4), "blocks.0.ln1.weight": (4,), "blocks.0.qkv.weight": (12, 4), ..., "out_bias": (10,)}"""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MaskedLM(ModelConfig(**asdict(config))).state_dict().items()}

def read_checkpoint(path, mmap=False):
    """A checkpoint file -> (checkpoint dict, ModelConfig, Tokenizer), each checked, or CheckpointError naming the
    first problem. mmap: map the tensors instead of reading them (export reads a latest.pt without its optimizer).
    Example: read_checkpoint("out/run/latest.pt") -> ({"model": {...}, "step": 1000, ...}, ModelConfig(...), Tokenizer)"""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a .pt file, such as {path / 'latest.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, pickled code that weights_only refuses to run...
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch checkpoint: {type(e).__name__})")
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not an amlm checkpoint (it needs the keys model, config and tokenizer)")
    mismatch = f"{path} does not match this version of model.py/tokenizer.py"
    try:  # older checkpoints saved fast.py's switch in the config: it was a way to run, not part of the model
        config = ModelConfig(**{k: v for k, v in ckpt["config"].items() if k != "fast"})
        tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
        want = expected_shapes(config)
    except (TypeError, AttributeError, DataError) as e:
        raise CheckpointError(f"{mismatch}: {str(e).splitlines()[0]}") from None
    sd = ckpt["model"]
    got = {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()} if isinstance(sd, dict) else {}
    if got != want or tokenizer.vocab_size != config.vocab_size:
        bad = sorted(set(want.items()) ^ set(got.items()))[:1] or [("vocab_size", tokenizer.vocab_size)]
        raise CheckpointError(f"{mismatch} (first mismatch: {bad[0][0]})")
    return ckpt, config, tokenizer

def load_model(path, device="cpu", model_class=MaskedLM):
    """A checkpoint -> (model in eval mode on device, tokenizer, checkpoint dict). model_class: MaskedLM or fast.py's
    FastMaskedLM (the same state_dict). Example: load_model("out/run/latest.pt") -> (MaskedLM, Tokenizer, {"step": 1000, ...})"""
    ckpt, config, tokenizer = read_checkpoint(path)
    model = model_class(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer, ckpt

# -----------------------------------------------------------------------------
# writing: atomic, so a crash or a full disk never leaves half a file where a later run would trust it

def atomic_write(path, write):
    """write(tmp) to a temporary name beside path, then rename it into place: a crash or a full disk leaves the old
    file (or none) at path, never half a file, and the temporary file is removed whatever happens.
    Example: atomic_write("out/run/summary.json", lambda tmp: open(tmp, "w").write("{}")) -> summary.json is "{}"."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def save_atomic(obj, path):
    """torch.save through atomic_write; CheckpointError in one sentence if it cannot be written (the old file intact).
    Example: a full disk -> CheckpointError("cannot write out/run/latest.pt (No space left on device); ...")"""
    def write(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch.save reports a failed write, a full disk among them, as a RuntimeError
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free < 1 << 20  # before tmp is removed
            raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else str(e).splitlines()[0])
    try:
        atomic_write(path, write)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}); the previous {os.path.basename(path)} there, if "
                              "any, is intact") from None

def write_json(obj, path):
    """Atomic, and standard JSON: NaN and infinity are written as null. OSError (the temporary file removed) if it
    cannot be written. Example: {"val_loss": nan} -> {"val_loss": null}."""
    clean = lambda v: (None if isinstance(v, float) and not math.isfinite(v) else
                       {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else
                       [clean(x) for x in v] if isinstance(v, (list, tuple)) else v)
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(clean(obj), f, indent=1)
    atomic_write(path, write)

def save_checkpoint(out, step, words, args, model, opt, amlm, batches, gen, tokenizer, milestone=None, rank=0):
    """latest.pt: everything an exact resume needs. With a milestone (words), also ckpt_<N>M.pt: what evaluation
    needs, without the optimizer. Every process calls it (it gathers their RNGs and AMLM statistics); rank 0 writes.
    Example: step 1535, milestone 8_000_000 -> out/latest.pt (model, optimizer, amlm, batches, rng, ...) and
    out/ckpt_8M.pt (model, config, tokenizer, args, step, tokens_seen, words_seen)."""
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

# -----------------------------------------------------------------------------
# --resume: read latest.pt, then put it back into the run's objects

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
        ck, config, tokenizer = read_checkpoint(path)
    except CheckpointError as e:
        sys.exit(f"error: cannot resume from {run}: {e}")
    missing = [k for k in RESUME_NEEDS if k not in ck]
    if missing or not isinstance(ck["args"], dict):
        sys.exit(f"error: cannot resume from {run}: its latest.pt lacks {', '.join(missing) or 'the flags (args)'} "
                 "(a ckpt_<N>M.pt holds no optimizer state and cannot be resumed)")
    return {**ck, "path": path, "config": config, "tokenizer": tokenizer}

def resumed_args(get_parser, argv, args, saved, may_change):
    """The saved run's flags (saved: its args), with those typed now (argv) that may_change allows. Any other typed
    flag must agree with the saved run, else --resume RUN --lr 0.5 would go on at the old rate without a word.
    Example: saved lr 0.001, typed --lr 0.5 -> error "... --lr 0.5 (the run has 0.001) ..." """
    p, q, unset = get_parser(), get_parser(), object()
    q.set_defaults(**dict.fromkeys(vars(args), unset))  # the same flags with a default no flag gives: what remains was typed
    typed = {k: v for k, v in vars(q.parse_args(argv)).items() if v is not unset}
    run = {**{k: p.get_default(k) for k in vars(args)}, **saved, "out": args.resume}  # defaults: flags added since
    same = lambda k, v: os.path.realpath(v) == os.path.realpath(args.resume) if k == "out" else v == run.get(k)
    clash = [k for k, v in typed.items() if k not in may_change + ("resume",) and not same(k, v)]
    if clash:
        p.error("--resume keeps the saved run's settings, but " + ", ".join(
            f"--{k.replace('_', '-')} {typed[k]} (the run has {run.get(k)})" for k in clash) + " differ")
    changed = {k: v for k, v in typed.items() if k in may_change}
    return argparse.Namespace(**{**run, **changed, "stop_after": args.stop_after, "resume": args.resume, "overwrite": False})

def restore(resume, tokenizer, model, opt, amlm, batches, gen, rank=0, world=1):
    """Load a load_resume() checkpoint into the run's objects and RNGs; returns its step. Each process gets its own
    dropout RNG back when the world size is the one saved (else a fresh one: resuming on another world size is not
    bit-exact). Example: a latest.pt saved at step 780 -> 780, and the next step draws the masks it would have."""
    run = resume["path"]
    if resume["config"] != model.config or resume["tokenizer"].to_json() != tokenizer.to_json():
        sys.exit(f"error: {run} was trained with another model shape or tokenizer; refusing to resume")
    try:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        amlm.load_state_dict(resume["amlm"], stats=rank == 0)  # the saved statistics are the sum over all processes
        batches.load_state_dict(resume["batches"])
        gen.set_state(resume["rng"]["mask"])
    except (RuntimeError, ValueError, KeyError, TypeError, DataError) as e:
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
# the run folder: one process per folder, never overwritten by accident

HELD = []  # (lock file, the run folder if this process made it) for release_run

def open_run(args, rank=0):
    """The run folder, made and locked: one process per folder, and a new run never replaces an old one by
    accident (--resume continues it, --overwrite deletes its files first). Sets args.out. Under torchrun only
    rank 0 touches the folder; the others wait for its verdict (a refusal stops them all).
    Example: `train.py --out X` while another train.py runs in X -> "error: X is in use by pid 4242@host ..." """
    out = args.out = args.out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.corpus))}-{args.size}-{args.masking}")
    if rank != 0:
        dist.barrier()
        return out
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: --out {out} is a file, not a folder")
    made = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        take_lock(os.path.join(out, "train.lock"))
    except OSError as e:
        sys.exit(f"error: cannot write to the run folder {out} ({e.strerror})")
    HELD.append((os.path.join(out, "train.lock"), out if made else None))
    for f in sorted(f for f in os.listdir(out) if TEMP_FILES.fullmatch(f)):  # a killed run's half-written files
        os.remove(os.path.join(out, f))
        print(f"note: removed {os.path.join(out, f)}, a temporary file an interrupted run left", file=sys.stderr)
    found = sorted(f for f in os.listdir(out) if RUN_FILES.fullmatch(f))
    if found and not args.resume and not args.overwrite:
        sys.exit(f"error: {out} already holds a run (latest.pt); continue it with --resume {out}, replace it with "
                 "--overwrite, or pick another --out" if "latest.pt" in found else
                 f"error: {out} holds files of an earlier run ({', '.join(found)}) but no latest.pt to resume from; "
                 "replace them with --overwrite, or pick another --out")
    for f in found if args.overwrite else []:
        os.remove(os.path.join(out, f))
    if dist.is_initialized():
        dist.barrier()  # the folder is ours: the other processes may go on
    return out

def lock_owner():
    """What a lock file holds. Example: "4242@gpu-node-3" """
    return f"{os.getpid()}@{socket.gethostname()}"

def take_lock(path):
    """Create the lock file, holding pid@host, or exit naming who holds it. A lock left on this host by a process
    that is gone (killed, or its machine restarted) is taken over with a warning. Example: a lock "999999@here"
    with no process 999999 -> "warning: taking over ..." and the lock now holds this process."""
    for _ in range(3):
        try:
            with open(path, "x") as f:  # "x": create, or fail if it exists, in one step
                f.write(lock_owner())
            return
        except FileExistsError:
            pass
        try:
            holder = open(path).read().strip()
        except FileNotFoundError:
            continue  # released meanwhile: try again
        pid, _, host = holder.partition("@")
        if not (host == socket.gethostname() and pid.isdigit() and not alive(int(pid))):
            sys.exit(f"error: {os.path.dirname(path)} is in use by another train.py (pid {holder or '?'}, see {path}); "
                     "wait for it, pick another --out, or delete the lock file if that process is gone")
        print(f"warning: taking over {path}, left by pid {pid}, which is no longer running", file=sys.stderr)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    sys.exit(f"error: {os.path.dirname(path)} is being claimed by another train.py at the same moment")

def alive(pid):
    """Whether a process with this pid exists on this host. Example: alive(os.getpid()) -> True"""
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to someone else
    return True

def release_run():
    """Remove this process's lock files, and a run folder it made and left empty (a run refused early).
    Example: a new run refused for a bad flag after open_run made out/x -> out/x is gone again."""
    while HELD:
        lock, made = HELD.pop()
        try:
            if open(lock).read() == lock_owner():
                os.remove(lock)
            if made:
                os.rmdir(made)
        except OSError:
            pass  # not ours any more, or the folder holds files: keep it

def releases_run(main):
    """main, ended the same way however it ends: a return, sys.exit, Ctrl-C before the training loop (which handles
    Ctrl-C itself; this one exits 130 with one line), a checkpoint or log that cannot be written (a full disk: one
    sentence). The run folder is released. Under torchrun the process then destroys its process group and leaves
    with os._exit: a gloo worker thread can still hold the last reference to a tensor of the last collective, and if
    it drops it while the interpreter shuts down it cannot take the GIL and the process aborts (C++ terminate); DDP
    keeps the group, and so those threads, alive until then. Example: a full disk -> exit 1, "error: ... (No space
    left on device)"."""
    @functools.wraps(main)
    def wrapped(argv=None):
        code, finished = 0, False
        try:
            code = main(argv) or 0
            finished = True
        except KeyboardInterrupt:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
            code = 130
        except CheckpointError as e:
            code = f"error: {e}"
        except OSError as e:  # log.txt, amlm.csv or summary.json on a full disk
            code = f"error: {e.strerror or e}: {e.filename or 'the run folder'}"
        except SystemExit as e:
            code = e.code
        finally:
            release_run()
        if dist.is_initialized():
            if finished:
                dist.barrier()  # every process got to the end, and rank 0 may still be writing a checkpoint
            dist.destroy_process_group()
            if isinstance(code, str):
                print(code, file=sys.stderr)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
        if code:
            sys.exit(code)
    return wrapped
