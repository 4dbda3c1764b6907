"""The trainer's own collectives over the data-parallel processes, each a no-op in a single process.

Every process takes the same decisions and makes the same forward passes (see :mod:`brlhf.trainer.trainer`).
Here: the process's rank and the world size, a barrier, gradients averaged over the processes (DDP; the
DeepSpeed engines reduce their own), a loss value replaced by its mean over the processes, Python objects
gathered from every process, and logged statistics averaged over the processes that report them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def average_gradients(params: list[Tensor], world_size: int) -> None:
    """Each tensor's ``.grad`` replaced by its mean over the processes (a missing gradient counts as 0)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def process_mean(value: Tensor, world_size: int) -> Tensor:
    """``value`` with the mean over the processes as its value and its own gradient. The solver decides on
    the value gap ``g(x, y) - g(x, z)`` (``keep_better_pure`` copies y into z): every process must take
    the same decision, or the replicas diverge (and under ZeRO-3 the collective gathers get out of step).
    """
    if world_size == 1:
        return value
    mean = value.detach().clone()
    dist.all_reduce(mean)
    return value + (mean / world_size - value.detach())


def sum_over_processes(value: Tensor, world_size: int) -> Tensor:
    """``value`` summed over the processes, in place."""
    if world_size > 1:
        dist.all_reduce(value)
    return value


def gather(obj: Any, world_size: int) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if world_size == 1:
        return [obj]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def mean_over_processes(logs: dict[str, float], world_size: int) -> dict[str, float]:
    """Each statistic averaged over the processes that report it (a process without labels this step
    has no reward-model accuracy, for instance)."""
    if world_size == 1:
        return logs
    everyone = gather(logs, world_size)
    keys = sorted({k for d in everyone for k in d})
    return {k: sum(d[k] for d in everyone if k in d) / sum(k in d for d in everyone) for k in keys}
