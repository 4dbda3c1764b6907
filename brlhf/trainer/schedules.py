"""The learning-rate schedules of the three optimisers (``x``, ``y``, ``z``): one ``transformers`` schedule
each, over the outer steps; the rates they set, the base rates of the reward-model warm-up, and their
restoration from a checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainingArguments, get_scheduler

VARIABLES = ("x", "y", "z")


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser whose ``param_groups`` hold the learning rates: ``optimizer`` itself, or the one
    wrapped by a :class:`ZeroVariable` and DeepSpeed's ZeRO optimiser (``.optimizer`` attributes)."""
    inner = optimizer
    for _ in range(4):
        if isinstance(inner, torch.optim.Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(f"no torch optimiser found in {type(optimizer).__name__} to schedule its learning rate")


def build_schedulers(args: TrainingArguments, optimizers: list[Any], num_steps: int) -> dict[str, Any]:
    """One ``transformers.get_scheduler`` schedule per optimiser (``"x"``, ``"y"``, ``"z"``) over
    ``num_steps`` outer steps, from ``lr_scheduler_type`` / ``warmup_steps`` / ``lr_scheduler_kwargs``.

    A schedule drives the torch optimiser that holds the learning rates: the optimiser itself, or, under
    DeepSpeed, the torch optimiser inside the engine's ZeRO optimiser (its ``param_groups`` are the ones
    the engine's step reads). Stepped once per outer step, after ``solver.step()``."""
    return {
        name: get_scheduler(
            args.lr_scheduler_type,
            torch_optimizer(optimizer),
            num_warmup_steps=args.get_warmup_steps(num_steps),
            num_training_steps=num_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        for name, optimizer in zip(VARIABLES, optimizers)
    }


def learning_rates(schedulers: dict[str, Any]) -> dict[str, float]:
    """The current learning rates of ``x``, ``y`` and ``z`` (``lr/x``, ``lr/y``, ``lr/z``)."""
    return {f"lr/{name}": float(s.optimizer.param_groups[0]["lr"]) for name, s in schedulers.items()}


@contextmanager
def base_learning_rates(scheduler: Any) -> Iterator[None]:
    """Inside the context, ``scheduler``'s optimiser runs at its base rates (those the schedule starts
    from); on exit the scheduled rates are back."""
    groups = scheduler.optimizer.param_groups
    scheduled = [group["lr"] for group in groups]
    for group, base in zip(groups, scheduler.base_lrs):
        group["lr"] = base
    try:
        yield
    finally:
        for group, lr in zip(groups, scheduled):
            group["lr"] = lr


def load_schedulers(schedulers: dict[str, Any], states: dict[str, Any] | None) -> None:
    """Restores the schedules from their saved states, and their optimisers' rates."""
    for name, scheduler in schedulers.items():
        if states is not None:  # (checkpoints written before the schedules: constant rates)
            scheduler.load_state_dict(states[name])
        # the rates in force: a ZeRO optimiser's shard need not carry its param_groups' "lr"
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
