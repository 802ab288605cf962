"""
Setting a run up, and ending it: where the model runs (device and precision), the run folder and its lock, Ctrl-C,
and the one way out of train.py. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall Receive:
Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    device, dtype = pick_device("auto"), pick_dtype(device, "auto")   # train.py and evaluate.py
    out = open_run(args)                 # train.py: the run folder, made and locked before any work
    interrupted = catch_ctrl_c(out)      # the loop checks it after each step: save, then exit

The run folder: one train.py per folder, a lock file (train.lock, holding pid@host) for the run's lifetime; a lock
whose process is gone from this host is taken over with a warning. A new run refuses a folder that holds one:
--resume continues it, --overwrite deletes the files train.py wrote there first.
"""
import functools, os, re, signal, socket, sys

import torch
import torch.distributed as dist

from lib import ddp
from lib.errors import UserError

RUN_FILES = re.compile(r"latest\.pt|ckpt_\d+M\.pt|summary\.json|log\.txt|amlm\.csv")  # what train.py writes there
TEMP_FILES = re.compile(r"(latest\.pt|ckpt_\d+M\.pt|summary\.json)\.tmp\d+")  # ... and its temporary names

# -----------------------------------------------------------------------------
# where the model runs: device and precision, for train.py and evaluate.py

def pick_device(name="auto"):
    """"auto" -> cuda if there is a GPU, else cpu; other names are checked. Example: "cpu" -> device(type='cpu')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported (use auto, cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for, but no CUDA GPU is available")
    return device

def native_bf16(device):
    """Whether bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AMX tiles or AVX512-BF16 (on other
    CPUs bf16 is emulated and slower than fp32). Example: an AMD EPYC with AVX2 only -> False."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch API: absent -> no
    kernels = torch.backends.cpu.get_cpu_capability()  # what the kernels use: ATEN_CPU_CAPABILITY=avx2 limits it
    return kernels.startswith(("AVX512", "AMX")) and any(getattr(torch.cpu, f, lambda: False)() for f in probes)

def pick_dtype(device, precision="auto"):
    """"auto" -> "bf16" where bf16 is native (autocast), else "fp32". Example: (cpu without AMX, "auto") -> "fp32"."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return ("bf16" if native_bf16(device) else "fp32") if precision == "auto" else precision

# -----------------------------------------------------------------------------
# the run folder: one process per folder, never overwritten by accident

HELD = []  # (lock file, the folders this process made for it, deepest first) for release_run

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
    corpus = os.path.realpath(args.corpus)
    if os.path.isdir(args.corpus) and os.path.commonpath([corpus, os.path.realpath(out)]) == corpus:
        sys.exit(f"error: --out {out} is inside the corpus folder {args.corpus}; a run folder there would mix the run's "
                 "files with the text it trains on: pick an --out outside it")
    made, d = [], os.path.abspath(out)
    while not os.path.exists(d):  # out/ and out/<run> when neither exists: both go again if the run is refused
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
        take_lock(os.path.join(out, "train.lock"))
    except OSError as e:
        sys.exit(f"error: cannot write to the run folder {out} ({e.strerror})")
    HELD.append((os.path.join(out, "train.lock"), made))
    for f in sorted(f for f in os.listdir(out) if TEMP_FILES.fullmatch(f)):  # a killed run's half-written files
        os.remove(os.path.join(out, f))
        print(f"note: removed {os.path.join(out, f)}, a temporary file an interrupted run left", file=sys.stderr)
    found = sorted(f for f in os.listdir(out) if RUN_FILES.fullmatch(f))
    if found and not args.resume and not args.overwrite:
        sys.exit(f"error: {out} already holds a run (latest.pt); continue it with --resume {out}, replace it with "
                 "--overwrite, or pick another --out" if "latest.pt" in found else
                 f"error: {out} holds files of an earlier run ({', '.join(found)}) but no latest.pt to resume from; "
                 "replace them with --overwrite, or pick another --out")
    if found and args.overwrite and not wrote_by_train(out):
        sys.exit(f"error: --overwrite deletes only a run train.py wrote, but {out}/log.txt is missing or not train.py's "
                 f"(it would delete {', '.join(found)}): move those files yourself, or pick another --out")
    if dist.is_initialized():
        dist.barrier()  # the folder is ours: the other processes may go on
    return out

def clear_overwritten(args, rank=0):
    """--overwrite: delete the earlier run's files (open_run checked that train.py wrote them), called only once the
    new run has its data and its steps, so a new run that cannot start leaves the old one as it was.
    Example: --overwrite on a folder with latest.pt, log.txt -> both removed, the user's other files kept."""
    if args.overwrite and rank == 0:
        remove_run_files(args.out)

def remove_run_files(out):
    """Delete the files train.py writes in a run folder (RUN_FILES), and nothing else.
    Example: out/run holding latest.pt, log.txt and notes.md -> only notes.md is left."""
    for f in sorted(os.listdir(out)):
        if RUN_FILES.fullmatch(f):
            os.remove(os.path.join(out, f))

def wrote_by_train(folder):
    """Whether folder is a run train.py wrote: its log.txt opens with train.py's "config: " line (written before any
    other file of a run). Example: a finished run's folder -> True; a folder whose log.txt says "old" -> False."""
    try:
        with open(os.path.join(folder, "log.txt"), "rb") as f:
            return f.read(8) == b"config: "
    except OSError:
        return False

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
    """Remove this process's lock files, and the folders it made for a run that left them empty (a run refused early).
    Example: a new run refused for a bad flag after open_run made out/ and out/x -> both are gone again."""
    while HELD:
        lock, made = HELD.pop()
        try:
            if open(lock).read() == lock_owner():
                os.remove(lock)
            for folder in made:
                os.rmdir(folder)
        except OSError:
            pass  # not ours any more, or the folder holds files: keep it and those above it

def releases_run(main):
    """main, ended the same way however it ends: a return, sys.exit, Ctrl-C before the training loop (which handles
    Ctrl-C itself; this one exits 130 with one line), a checkpoint or log that cannot be written (a full disk: one
    sentence). The run folder is released; under torchrun the process then leaves through ddp.leave.
    Example: a full disk -> exit 1, "error: ... (No space left on device)"."""
    @functools.wraps(main)
    def wrapped(argv=None):
        code, finished = 0, False
        try:
            code = main(argv) or 0
            finished = True
        except KeyboardInterrupt:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
            code = 130
        except UserError as e:  # a checkpoint that cannot be written
            code = f"error: {e}"
        except OSError as e:  # log.txt, amlm.csv or summary.json on a full disk
            code = f"error: {e.strerror or e}: {e.filename or 'the run folder'}"
        except SystemExit as e:
            code = e.code
        finally:
            release_run()
        ddp.leave(code, finished)  # under torchrun: never returns
        if code:
            sys.exit(code)
    return wrapped

# -----------------------------------------------------------------------------
# Ctrl-C, and a loss gone non-finite

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

def stop_on_nan(out, step, loss, lr, new_run, rank=0):
    """The exit for a loss that went non-finite at step index `step`: on rank 0 a message saying what is kept and the
    likely cause (lr: the flag, as typed), elsewhere exit code 1. A new run that saved nothing removes the files it
    wrote, so that the same command can start again.
    Example: --lr 1e6 -> "error: step 3: the loss is nan; stopping. Nothing was saved, ... (--lr 1000000.0) ..." """
    if rank != 0:
        return 1  # rank 0 says it, and removes the files
    kept = os.path.exists(os.path.join(out, "latest.pt"))
    if not kept and new_run:
        remove_run_files(out)
    return (f"error: step {step + 1}: the loss is {loss}; stopping. " +
            (f"{out}/latest.pt holds the last saved state (--resume {out} goes on from it). " if kept else
             "Nothing was saved, and the same command can start again. ") +
            f"The usual cause is a learning rate too high for this model ({lr}); try a smaller one")

