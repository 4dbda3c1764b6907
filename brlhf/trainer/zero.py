"""DeepSpeed ZeRO for the three variables of Algorithm 1: one engine per variable.

DeepSpeed pairs one engine with one optimiser, and Algorithm 1 has three (``x``, ``y``, ``z``), stepped
separately. Each variable therefore gets its own engine:

* ZeRO-1/2 (LoRA or full fine-tuning): an engine over a holder module that registers exactly that
  variable's tensors (the same ``Parameter`` objects, so the policy and the reward model are trained in
  place). Gradients and optimiser states are sharded over the data-parallel processes; parameters stay
  replicated, and the forward passes run on the plain modules.
* ZeRO-3 (full fine-tuning only): parameters are sharded too, and an engine gathers them with hooks on the
  module it wraps, so it must wrap the module whose forward pass runs: the ``y`` model, the ``z`` model and
  the reward model get one training engine each, the frozen reference an inference engine
  (:func:`inference_engine`, as TRL does for reference models). All forward passes go through the engines,
  and every process must make the same forward passes (the gathers are collective). LoRA is refused:
  the two adapters and the reference share the base weights of one module, which can carry only one
  ZeRO-3 engine and hence one optimiser.

The solver sees an engine through :class:`ZeroVariable`, which has the optimiser interface it uses
(``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``, ``param_groups``) plus ``backward``.
Gradient clipping is DeepSpeed's (``gradient_clipping`` = ``max_grad_norm``). :func:`gathered` and
:func:`full_state_dict` read (and write) ZeRO-3-partitioned tensors in full; they are no-ops otherwise.
Optimiser and parameter offload are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
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
    if stage not in (1, 2, 3):
        raise NotImplementedError(f"BilevelRLHFTrainer supports DeepSpeed ZeRO stages 1 to 3, got {stage}")
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


def is_zero3(config: dict[str, Any] | None) -> bool:
    """Whether a :func:`zero_config` is ZeRO-3 (``None``: no DeepSpeed)."""
    return config is not None and config["zero_optimization"].get("stage") == 3


def _module_config(config: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """ZeRO-3 sizes not set in the config, from the model's hidden size (as transformers resolves "auto"):
    tensors smaller than ``10 * hidden`` stay unpartitioned; buckets of ``hidden²``."""
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if not is_zero3(config) or hidden is None:
        return config
    sizes = {
        "stage3_param_persistence_threshold": 10 * hidden,
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
    }
    return {**config, "zero_optimization": {**sizes, **config["zero_optimization"]}}


def inference_engine(module: nn.Module, config: dict[str, Any]) -> Any:
    """A ZeRO-3 engine without optimiser over a frozen module (the reference policy): its parameters are
    partitioned and gathered module by module in the forward pass."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, config=_module_config(config, module))
    engine.eval()  # (DeepSpeed's eval() returns None)
    return engine


class ZeroVariable:
    """One solver variable trained by its own DeepSpeed engine: over a holder of ``params`` (ZeRO-1/2), or
    over ``module``, the model whose forward pass computes the variable (ZeRO-3)."""

    def __init__(
        self,
        params: list[Tensor],
        optimizer: torch.optim.Optimizer,
        config: dict[str, Any],
        module: nn.Module | None = None,
    ) -> None:
        import deepspeed

        if is_zero3(config) and module is None:
            raise ValueError("under ZeRO-3 a variable's engine must wrap the module that computes it")
        self.params = params
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module if module is not None else _Holder(params),
            optimizer=optimizer,
            config=_module_config(config, module) if module is not None else config,
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
        """This process's shard of the optimiser state (each process saves its own; under ZeRO-3 it includes
        the process's fp32 partition of the weights)."""
        return self.optimizer.state_dict()

    def reload_params(self) -> None:
        """Rebuilds the optimiser's fp32 master copy from the weights, after they were overwritten."""
        self.optimizer.refresh_fp32_params()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads this process's shard. ZeRO-1/2: the fp32 master copy is rebuilt from the (already restored)
        weights; ZeRO-3: the shard holds the process's fp32 partition of the weights, which is restored."""
        shards = [state] * dist.get_world_size()
        self.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=False)
        if hasattr(self.optimizer, "checkpoint_event_epilogue"):  # ZeRO-3: re-gathers unpartitioned tensors
            self.optimizer.checkpoint_event_epilogue()


def zero_optimizer(
    optimizer: Callable[..., torch.optim.Optimizer],
    config: dict[str, Any],
    modules: dict[int, nn.Module],
    params: list[Tensor],
    lr: float,
) -> ZeroVariable:
    """A solver's optimiser factory (with the first three arguments bound): ``optimizer(params, lr=lr)`` in
    a :class:`ZeroVariable`, whose engine wraps ``modules[id(params[0])]`` under ZeRO-3."""
    return ZeroVariable(params, optimizer(params, lr=lr), config, modules.get(id(params[0])))


def is_partitioned(t: Tensor) -> bool:
    """Whether ``t`` is a ZeRO-3 parameter (its full value lives in shards over the processes)."""
    return hasattr(t, "ds_id")


def gathered(params: Iterable[Tensor], modifier_rank: int | None = None) -> Any:
    """Context in which the ZeRO-3-partitioned ``params`` hold their full value on every process (collective:
    every process must enter it). With ``modifier_rank``, that process's in-place writes are kept (broadcast
    and re-partitioned on exit). A no-op for ordinary tensors."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """``module``'s state dict on the CPU, every ZeRO-3-partitioned or FSDP-sharded tensor gathered one by one
    (collective: every process must call it; those with ``keep=False`` only take part and get ``{}``)."""
    from brlhf.trainer.fsdp import full_value

    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        with gathered([t]):
            value = full_value(t)
            if keep:
                out[name] = value.cpu().clone()
    return out
