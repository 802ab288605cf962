"""
Checkpoints of amlm: the one loader that train.py, evaluate.py and export.py share, the atomic save, and restore
for --resume. Part of a PyTorch reimplementation of Edman & Fraser,
"Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    model, tokenizer, ckpt = load_model("out/run/latest.pt")   # evaluation: a model in eval mode, on the CPU
    ckpt, config, tokenizer = read_checkpoint("out/run/ckpt_5M.pt")   # export: checked, no model built
    save_checkpoint(out, step, ...); restore(load_resume(run), ...)   # train.py: an exact resume

A checkpoint is a dict of plain tensors, numbers and strings, loaded with weights_only=True, so a file never
executes code. latest.pt holds everything an exact resume needs; ckpt_<N>M.pt (N million words seen) what
evaluation needs. Every file is written to a temporary name and renamed into place, so a crash or a full disk
leaves the previous file intact, and a temporary file a killed run left is removed at the next start.
"""
import errno, hashlib, json, math, os, shutil, sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from lib.errors import CheckpointError, DataError
from model import MaskedLM, ModelConfig
from tokenizer import Tokenizer

RESUME_NEEDS = ("model", "config", "tokenizer", "args", "step", "optimizer", "amlm", "batches", "rng")

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
    try:  # a config may hold "fast", lib/fast.py's switch: a way to run, not part of the model
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
    """A checkpoint -> (model in eval mode on device, tokenizer, checkpoint dict). model_class: MaskedLM or lib/fast.py's
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
    if dist.is_initialized():  # each process's dropout RNG, and a digest of its masking weights, kept so that a test can check they agree
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

def check_resume_point(step, total, args):
    """A resumed run must have steps left: at its end there is nothing to do (exit 0, no file touched), and a
    --max-steps below the step reached is refused. Example: step 60 of 60 -> "... already finished at step 60 ..." """
    if step == total:
        print(f"{args.out} already finished at step {step}; nothing to do", file=sys.stderr)
        sys.exit(0)
    if step > total:
        sys.exit(f"error: {args.out} is at step {step}, past the {total} steps that " +
                 (f"--max-steps {args.max_steps}" if args.max_steps is not None else f"--epochs {args.epochs}") +
                 " give; a run cannot go back: give a --max-steps of at least its step, or start a new run")

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
