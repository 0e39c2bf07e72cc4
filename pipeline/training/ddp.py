"""Distributed data parallel, switched on by ``torchrun``'s environment (nanoGPT style), never forced.

A single process is the default path (no process group at all). Under ``torchrun --nproc_per_node N``
(``WORLD_SIZE > 1``) a process group is created: NCCL on CUDA, gloo on the CPU. Only the trainable
(plugin) parameters are broadcast from rank 0 at start and have their gradients all-reduced (averaged)
after each backward pass: the frozen SAM never crosses the wire.

    torchrun --standalone --nproc_per_node 2 -m stages.train --params params.yaml --method stable_sam ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process created the process group (and destroys it in shutdown)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU) when available, else CPU; ``cuda`` without a GPU fails clearly."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; set train.device: auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; join the process group when world size > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        owns = True
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it (no-op for a single process)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Copy rank 0's values of ``params`` to every rank (identical plugin init)."""
    if not ctx.distributed or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def all_reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of ``params`` over ranks, in one flat all-reduce (missing grads count as 0)."""
    if not ctx.distributed or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sums of Python floats over ranks (one small all-reduce; identity for one process)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (a list of length world size; ``[obj]`` for a single process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
