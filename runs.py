"""
The run folder of train.py: made and locked before any work, never overwritten by accident, and released
however the run ends. Part of amlm, a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall
Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    out = open_run(args)     # exits with one sentence if the folder is in use or holds a run
    @releases_run            # on main(): the lock goes however main ends

One train.py per folder: a lock file (train.lock, holding pid@host) for the run's lifetime; a lock whose
process is gone from this host is taken over with a warning. A new run refuses a folder that holds one:
--resume continues it, --overwrite deletes the files train.py wrote there first.
"""
import functools, os, re, socket, sys

import torch.distributed as dist

RUN_FILES = re.compile(r"latest\.pt|ckpt_\d+M\.pt|summary\.json|log\.txt|amlm\.csv")  # what train.py writes there
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
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to someone else
    return True

def release_run():
    """Remove this process's lock files, and a run folder it made and left empty (a run refused early)."""
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
    """main, with the run folder released however it ends: a return, sys.exit, an exception, or Ctrl-C before
    the training loop (which handles Ctrl-C itself); that one exits 130 with one line."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
            sys.exit(130)
        finally:
            release_run()
    return wrapped
