"""DeepSpeed ZeRO-1/2 for the three variables of Algorithm 1: one engine per variable.

DeepSpeed pairs one engine with one optimiser, and Algorithm 1 has three (``x``, ``y``, ``z``), two of
which (the LoRA adapters) live in one module. Each variable therefore gets its own engine over a holder
module that registers exactly that variable's tensors (the same ``Parameter`` objects, so the policy and
the reward model are trained in place). ZeRO-2 shards each variable's gradients and optimiser state over
the data-parallel processes; parameters stay replicated (ZeRO-3 / FSDP, which shard them, are not
supported: the three forward passes would need one engine each around the same base weights).

The solver sees an engine through :class:`ZeroVariable`, which has the optimiser interface it uses
(``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``, ``param_groups``) plus ``backward``.
Gradient clipping is DeepSpeed's (``gradient_clipping`` = ``max_grad_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _Holder(nn.Module):
    """Registers existing tensors (not copies) so that an engine owns exactly them."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the holder of a variable's tensors has no forward pass")


def zero_config(plugin_config: dict[str, Any], max_grad_norm: float | None) -> dict[str, Any]:
    """A concrete DeepSpeed config (no ``"auto"``) for one variable, from accelerate's plugin config."""
    zero = {k: v for k, v in plugin_config.get("zero_optimization", {}).items() if v != "auto"}
    stage = zero.get("stage", 0)
    if stage not in (1, 2):
        raise NotImplementedError(
            f"BilevelRLHFTrainer supports DeepSpeed ZeRO stages 1 and 2 (got stage {stage}): ZeRO-3 shards "
            "the base weights that the two adapters and the reference share; use ZeRO-2 or DDP"
        )
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", None):
            raise NotImplementedError(f"ZeRO {key} is not supported by BilevelRLHFTrainer yet")
        zero.pop(key, None)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }


class ZeroVariable:
    """One solver variable trained by its own DeepSpeed engine (ZeRO-1/2)."""

    def __init__(
        self, params: list[Tensor], optimizer: torch.optim.Optimizer, config: dict[str, Any]
    ) -> None:
        import deepspeed

        self.params = params
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_Holder(params), optimizer=optimizer, config=config
        )
        self.param_groups = self.optimizer.param_groups

    def owns(self, params: list[Tensor]) -> bool:
        return bool(params) and params[0] is self.params[0]

    def backward(self, loss: Tensor) -> None:
        """Back-propagates and reduce-scatters this variable's gradients (the closures are built so that
        ``loss`` depends on no other trainable tensor)."""
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """This process's shard of the optimiser state (each process saves its own)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads this process's shard; the fp32 master copy is rebuilt from the (already restored) weights."""
        shards = [state] * dist.get_world_size()
        self.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=False)
