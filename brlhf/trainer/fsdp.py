"""FSDP2 (torch's ``fully_shard``) for the variables of Algorithm 1, full fine-tuning only.

The trainer shards the models itself (accelerate only starts the processes; on a CPU it even leaves its FSDP
plugin off, so the request is read from ``accelerate launch``'s environment): ``y``, ``z``, the reward model
``x`` and the frozen reference are each a separate FSDP module (each transformer block a unit of its own,
then the root), so every solver variable keeps its own plain torch optimiser over its own sharded
parameters (DTensors) and its own gradient reduce-scatter. The reference is sharded too, as under ZeRO-3:
it is as large as a policy. Forward passes run on the FSDP modules themselves, and the all-gathers they
make are collective: every process must make the same forward passes (as under ZeRO-3).

* Generation: :func:`unsharded` gathers every unit of the policy once and keeps it whole, so the sampling
  loop makes no collective call and each process may stop at its own EOS.
* Full values: :func:`full_value` (``state_dict`` of a variable, checkpoints, ``z ← y`` copies,
  ``save_model``) and :func:`load_full` (``load_state_dict``; process 0's value is scattered).
* Optimiser states: :class:`ShardedOptimizer` saves and loads each process's shard (local tensors).

LoRA is refused: the adapters ``y`` and ``z`` and the reference share one base module, which would be one
FSDP module whose gradient reduction and resharding cannot be split between two separately stepped
optimisers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def fsdp_version(accelerator: Any) -> int | None:
    """The FSDP version asked for: accelerate's plugin, or ``accelerate launch``'s environment (on a CPU
    accelerate runs MULTI_CPU and leaves the plugin off); ``None`` without FSDP."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        return int(plugin.fsdp_version)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_fsdp(version: int, full_finetuning: bool) -> None:
    if version != 2:
        raise NotImplementedError(
            f"BilevelRLHFTrainer supports FSDP2 (torch's fully_shard) only, got fsdp_version={version}: set "
            "fsdp_version: 2 in the accelerate config"
        )
    if not full_finetuning:
        raise NotImplementedError(
            "FSDP needs full_finetuning=True: FSDP shards the weights of the module it wraps and reduces its "
            "gradients as one unit, while the LoRA adapters y and z and the reference share one base module, "
            "so y and z cannot have separate sharded optimisers. Use full_finetuning=True (y, z, the "
            "reference and the reward model are then separate FSDP modules), or LoRA with DDP or ZeRO-2"
        )


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is an FSDP2-sharded tensor (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` on each transformer block (the classes of ``_no_split_modules``), then on ``model``;
    in place. The processes must hold the same weights: each keeps its own slice of them."""
    from torch.distributed.fsdp import fully_shard

    blocks = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(model)
    return model


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every FSDP unit gathered and kept whole through its forward passes (collective on
    entry and exit; none in between)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        for m in units:
            m.reshard()


def full_value(t: Tensor) -> Tensor:
    """The full value of ``t`` on the CPU (an all-gather for a sharded tensor: collective)."""
    return t.detach().full_tensor().cpu() if is_sharded(t) else t.detach()


def load_full(p: Tensor, value: Tensor) -> None:
    """``p ← value``; a sharded ``p`` takes process 0's ``value``, scattered (collective)."""
    if is_sharded(p):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
    p.copy_(value)


def _local(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    return obj.to_local().clone() if isinstance(obj, Tensor) and is_sharded(obj) else obj


class ShardedOptimizer:
    """A torch optimiser over sharded parameters whose ``state_dict`` is this process's shard (local
    tensors; each process saves and loads its own, as with DeepSpeed)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _local(self.optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor

        self.optimizer.load_state_dict(state)
        for p, s in self.optimizer.state.items():
            for k, v in s.items():
                if is_sharded(p) and isinstance(v, Tensor) and not is_sharded(v) and k != "step":
                    s[k] = DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )


def sharded_optimizer(optimizer: Any, params: list[Tensor], lr: float) -> ShardedOptimizer:
    """A solver's optimiser factory (with ``optimizer`` bound): ``optimizer(params, lr=lr)``, sharded."""
    return ShardedOptimizer(optimizer(params, lr=lr))
