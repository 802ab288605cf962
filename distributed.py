"""
train.py on several processes (torchrun): one global batch per optimizer step, split over the processes and, in
each, over --grad-accum micro-steps, so that the run is the same whatever the split. Part of a PyTorch
reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM 2025). With plain `python train.py` every function here is a no-op or a plain call.

    rank, world = init(args)                      # (0, 1) without torchrun
    loss, logits, labels = accumulate(wrap(model, world), amlm, inputs, labels, rank, world, micro, autocast)
    loss = agree(loss, interrupted, device)       # the global loss; a Ctrl-C in one process stops all

Every process draws the mask of the whole global batch (the same generator everywhere) and keeps its own rows; the
loss is the mean over all targets of the global batch; AMLM sums its statistics over the processes before each
update (amlm.AMLM.all_reduce), so every process holds the same masking weights. Only rank 0 writes the run folder.
"""
import datetime, os, sys
from contextlib import contextmanager, nullcontext

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
