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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class PolicyView:
    """One copy of the lower variable as the solver sees it: its tensors, state_dict and load_state_dict."""

    def __init__(self, name: str, params: dict[str, Tensor]) -> None:
        if not params:
            raise ValueError(f"policy copy {name!r} has no trainable tensor")
        self.name, self._params = name, params

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._params.items())

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._params.values())

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self._params.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(state[n])


class PolicyPair:
    """``y``, ``z`` and the reference, on one peft model (LoRA) or as full copies."""

    def __init__(self, model: nn.Module, peft_config: Any = None, full_finetuning: bool = False) -> None:
        self.full_finetuning = full_finetuning
        if full_finetuning:
            self.models = {"y": model, "z": copy.deepcopy(model)}
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
            for m in self.models.values():
                m.requires_grad_(True).eval()
            self.y = PolicyView("y", dict(self.models["y"].named_parameters()))
            self.z = PolicyView("z", dict(self.models["z"].named_parameters()))
            self.model = self.models["y"]
            return
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel) or any("lora_" in n for n, _ in model.named_modules()):
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

    def view(self, name: str) -> PolicyView:
        return {"y": self.y, "z": self.z}[name]

    @contextmanager
    def active(self, name: str) -> Iterator[nn.Module]:
        """The model computing policy ``name`` (``"y"`` or ``"z"``)."""
        if self.full_finetuning:
            yield self.models[name]
            return
        self.model.set_adapter(name)
        self._unfreeze()
        yield self.model

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference policy π_ref (the base model with adapters disabled)."""
        if self.full_finetuning:
            yield self.ref_model
            return
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self._unfreeze()

    def save(self, output_dir: str) -> None:
        """``<dir>/y`` and ``<dir>/z``: the two LoRA adapters, or the two full models."""
        if self.full_finetuning:
            for name, m in self.models.items():
                m.save_pretrained(os.path.join(output_dir, name))
        else:
            for name in ("y", "z"):
                self.model.save_pretrained(output_dir, selected_adapters=[name])
