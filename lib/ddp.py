"""
train.py on several processes (torchrun): one global batch per optimizer step, split over the processes and, in
each, over --grad-accum micro-steps, so that the run is the same whatever the split. Part of a PyTorch
reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM 2025). With plain `python train.py` every function here is a no-op or a plain call.

    rank, world = init(args)                      # (0, 1) without torchrun
    fmodel = wrap(model, world)                   # DDP averages the gradients over processes
    loss = agree(loss, interrupted, device)       # the global loss; a Ctrl-C in one process stops all

The micro-step loop itself is in train.py's main(). Every process draws the mask of the whole global batch (the
same generator everywhere) and keeps its own rows; the loss is the mean over all targets of the global batch;
AMLM sums its statistics over the processes before each update (amlm.AMLM.all_reduce), so every process holds the
same masking weights. Only rank 0 writes the run folder; checkpoint.save_checkpoint gathers every process's RNG.
"""
import datetime, os, sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def init(args):
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

def wrap(model, world):
    """DistributedDataParallel around the model on several processes (it averages the gradients), else the model.
    Example: wrap(model, 1) -> model; wrap(model, 4) -> DistributedDataParallel(model)."""
    return DistributedDataParallel(model) if world > 1 else model

@contextmanager
def rank_0_first(rank):
    """Run the block on rank 0 first, then on the others (rank 0 builds the token cache that they then load).
    A failure in rank 0 ends it before the barrier; the others stop at their next collective.
    Example: with rank_0_first(rank): d = data.prepare(...)   # rank 0 trains the tokenizer, the others load it"""
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0 and dist.is_initialized():
        dist.barrier()

def agree(loss, interrupted, device):
    """Under torch.distributed, one all-reduce: the global loss (each process holds its share), and whether any
    process was interrupted (then all stop after this step). Without it: the loss as a float.
    Example: shares 1.5 and 1.5, Ctrl-C seen by process 1 only -> 3.0 on both, and both lists now hold True."""
    if not dist.is_initialized():
        return float(loss)
    t = torch.tensor([float(loss), float(bool(interrupted))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if t[1] > 0 and not interrupted:
        interrupted.append(True)
    return t[0].item()

def leave(code, finished):
    """Under torchrun: destroy the process group and exit with `code` (a message is printed first) through os._exit;
    without it, return. os._exit, because a gloo worker thread can still hold the last reference to a tensor of the
    last collective: if it drops it while the interpreter shuts down it cannot take the GIL and the process aborts
    (C++ terminate); DDP keeps the group, and so those threads, alive until now.
    Example: leave("error: disk full", False) under torchrun -> prints the message, exit status 1."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()  # every process got to the end, and rank 0 may still be writing a checkpoint
    dist.destroy_process_group()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
