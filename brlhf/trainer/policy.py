"""The two policy copies of Algorithm 1 (penalised ``y``, pure ``z``) and the frozen reference.

* LoRA (default, ALGORITHM.md §5.2): two adapters ``"y"`` and ``"z"`` on one base model; the reference
  is the base with the adapters disabled. ``y0 = z0``: ``z`` starts as a copy of ``y`` (LoRA B = 0 gives
  ``y0 = z0 = π_ref``).
* Full fine-tuning: two full copies of the model, and a third frozen copy as the reference.

peft pitfall: ``set_adapter`` and leaving ``disable_adapter()`` freeze the inactive adapters, and a
frozen adapter gets no gradient. Every switch here re-enables ``requires_grad`` on both adapters (the
inactive one takes no part in the forward pass, so it still gets no gradient from it).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from brlhf.trainer.fsdp import full_value, load_full
from brlhf.trainer.zero import gathered, is_partitioned


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model or already carries LoRA layers."""
    from peft import PeftModel

    return isinstance(model, PeftModel) or any("lora_" in n for n, _ in model.named_modules())


class PolicyView:
    """One copy of the lower variable as the solver sees it (or, under ZeRO-3 and FSDP, the reward model's
    trainable tensors): its tensors, state_dict and load_state_dict. ZeRO-3-partitioned and FSDP-sharded
    tensors are gathered one by one (collective: every process must call these); their state_dict is on the
    CPU, and load_state_dict takes process 0's values."""

    def __init__(self, name: str, params: dict[str, Tensor]) -> None:
        if not params:
            raise ValueError(f"policy copy {name!r} has no trainable tensor")
        self.name, self._params = name, params

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._params.items())

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._params.values())

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for n, p in self._params.items():
            with gathered([p]):
                out[n] = p.detach().cpu().clone() if is_partitioned(p) else full_value(p).clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                with gathered([p], modifier_rank=0):
                    load_full(p, state[n])


class PolicyPair:
    """``y``, ``z`` and the reference, on one peft model (LoRA) or as full copies.

    Full fine-tuning: ``copy_model()`` makes each further copy (default: a deep copy of ``model``; a
    ZeRO-3-partitioned model cannot be deep-copied and is loaded again instead). ``engines`` (set by the
    trainer under ZeRO-3) maps ``"y"``, ``"z"`` and ``"reference"`` to the DeepSpeed engines that wrap those
    models: :meth:`active` and :meth:`reference` then yield the engines, through which forward passes must go.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: Any = None,
        full_finetuning: bool = False,
        copy_model: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.full_finetuning = full_finetuning
        self.engines: dict[str, nn.Module] = {}
        if full_finetuning:
            copy_model = copy_model or (lambda: copy.deepcopy(model))
            self.models = {"y": model, "z": copy_model()}
            self.ref_model = copy_model().requires_grad_(False).eval()
            for m in self.models.values():
                m.requires_grad_(True).eval()
            self.y = PolicyView("y", dict(self.models["y"].named_parameters()))
            self.z = PolicyView("z", dict(self.models["z"].named_parameters()))
            self.model = self.models["y"]
            return
        from peft import LoraConfig, get_peft_model

        if has_adapters(model):
            raise ValueError(
                "pass a base model without adapters (and a `peft_config`): the trainer creates the "
                "adapters 'y' and 'z' in place, so a model can serve one trainer only"
            )
        if peft_config is None:
            peft_config = LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
            )
        self.model = get_peft_model(model, peft_config, adapter_name="y").eval()
        self.model.add_adapter("z", peft_config)
        self.y, self.z = (PolicyView(a, self._adapter_params(a)) for a in ("y", "z"))
        self.z.load_state_dict(
            {nz: py for (nz, _), py in zip(self.z.named_parameters(), self.y.parameters())}
        )
        self._unfreeze()

    def _adapter_params(self, adapter: str) -> dict[str, Tensor]:
        pattern = re.compile(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{re.escape(adapter)}(\.|$)")
        return {n: p for n, p in self.model.named_parameters() if pattern.search(n)}

    def _unfreeze(self) -> None:
        for view in (self.y, self.z):
            for p in view.parameters():
                p.requires_grad_(True)

    @contextmanager
    def active(self, name: str) -> Iterator[nn.Module]:
        """The model computing policy ``name`` (``"y"`` or ``"z"``)."""
        if self.full_finetuning:
            yield self.engines.get(name, self.models[name])
            return
        self.model.set_adapter(name)
        self._unfreeze()
        yield self.model

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference policy π_ref (the base model with adapters disabled)."""
        if self.full_finetuning:
            yield self.engines.get("reference", self.ref_model)
            return
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self._unfreeze()

    def save(self, output_dir: str, state_dicts: dict[str, dict[str, Tensor]] | None = None) -> None:
        """``<dir>/y`` and ``<dir>/z``: the two LoRA adapters, or the two full models (with the given full
        state dicts of ``"y"`` / ``"z"``, e.g. gathered from ZeRO-3 partitions)."""
        if self.full_finetuning:
            for name, m in self.models.items():
                m.save_pretrained(os.path.join(output_dir, name), state_dict=(state_dicts or {}).get(name))
        else:
            for name in ("y", "z"):
                self.model.save_pretrained(output_dir, selected_adapters=[name])
