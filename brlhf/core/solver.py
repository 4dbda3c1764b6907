"""Algorithm 1: the penalty-based, fully first-order (Hessian-free) bilevel solver.

The bilevel problem

    min_x f(x, w*(x))    with    w*(x) ∈ argmin_w g(x, w)

is replaced by the penalty proxy (ALGORITHM.md §2, eqs. 9-10)

    Φ_λ(x) = min_y [f(x, y) + λ g(x, y)] - λ min_z g(x, z)
    ∇Φ_λ(x) = ∇_x f(x, y) + λ [∇_x g(x, y) - ∇_x g(x, z)]

which needs first derivatives only. The solver keeps two copies of the lower variable, the
penalised one ``y`` and the pure one ``z``, and alternates

    K times:  z ← z - α_z ∇_z g(x, z)
              y ← y - α_y [∇_y g(x, y) + ∇_y f(x, y) / λ]
    then:     x ← x - η [∇_x f(x, y) + λ (∇_x g(x, y) - ∇_x g(x, z))]

with any ``torch.optim`` optimiser in place of the plain gradient steps. It knows nothing of
language models or simulators: the problem is given as stochastic loss closures.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from brlhf.core.rng import get_rng_state, set_rng_state
from brlhf.core.schedule import LambdaSchedule

LossClosure = Callable[[Any, Any], Tensor]
"""``loss(lower, batch) -> scalar tensor``; ``lower`` is ``solver.penalised`` or ``solver.pure``."""
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
Backward = Callable[[Tensor, Sequence[Tensor]], None]
OPTIMIZERS = ("upper_optimizer", "penalised_optimizer", "pure_optimizer")
"""The optimisers of ``x``, ``y`` and ``z``: attribute names of the solver, keys of its ``state_dict``."""


class BilevelLossError(ValueError):
    """A loss closure returned something the solver cannot descend on (not a scalar, NaN, no graph)."""


@dataclass
class PenaltyConfig:
    """Hyper-parameters of Algorithm 1.

    Args:
        lam: the penalty weight λ (> 0). ``‖∇Φ_λ - ∇Φ‖ = O(1/λ)``.
        lam_power: λ_t = lam (1 + t)^lam_power; 0 keeps λ fixed (the paper's choice).
        lam_max: cap of the increasing schedule.
        inner_steps: K, the warm-started lower-level steps per outer step (both copies).
        penalised_upper_grad: add ∇_y f / λ to the penalised copy's step. Switching it off makes
            ``y`` follow exactly the same path as ``z`` (the method collapses to "fit x, then
            optimise the lower level"); it exists to test and to measure that collapse.
        common_random_numbers: evaluate each pair of ``y``/``z`` terms on the same batch and the
            same random stream, so that their O(1/λ) difference is not drowned by O(1) noise.
        max_grad_norm: clip each variable's gradient to this norm (None: no clipping).
        check_finite: raise as soon as a closure returns NaN or inf (one device sync per call).
        gap_patience: warn (once) when a running mean of the value gap ``g(x, y) - g(x, z)`` has stayed
            negative for this many upper steps: ``z`` is then not tracking ``argmin g(x, ·)`` and the
            penalty term pushes ``x`` the wrong way (None: never warn).
        keep_better_pure: ``z`` stands for ``argmin g(x, ·)``, so ``min_w g(x, w) ≤ min(g(x, y), g(x, z))``.
            When an upper step measures ``g(x, y) < g(x, z)`` (``y`` minimises ``g`` better than ``z``),
            use the tighter estimate ``g(x, y)`` of ``min_w g``: that step's penalty term is zero (``x``
            moves on ``∇_x f`` alone) and ``z ← y`` (its optimiser state is kept). Without it a lagging
            ``z`` lets ``x`` drive the gap below zero without bound: ``r_x`` learns to tell ``y``'s samples
            from ``z``'s instead of fitting ``f``.
    """

    lam: float = 10.0
    lam_power: float = 0.0
    lam_max: float | None = None
    inner_steps: int = 1
    penalised_upper_grad: bool = True
    common_random_numbers: bool = True
    max_grad_norm: float | None = None
    check_finite: bool = True
    gap_patience: int | None = 50
    keep_better_pure: bool = False

    def __post_init__(self) -> None:
        self.schedule = LambdaSchedule(self.lam, self.lam_power, self.lam_max)
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")


def trainable_parameters(obj: nn.Module | Iterable[Tensor], what: str) -> list[Tensor]:
    """The tensors a variable is made of: a module's trainable parameters, or an explicit list."""
    if isinstance(obj, Tensor):
        obj = [obj]
    if hasattr(obj, "parameters"):
        params = [p for p in obj.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{what} has no parameter that requires gradients")
        return params
    params = list(obj)
    if not params:
        raise ValueError(f"{what} is empty")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"{what}[{i}] (shape {tuple(p.shape)}) does not require gradients")
    return params


def _variable_state(obj: Any, params: list[Tensor]) -> Any:
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    return [p.detach().clone() for p in params]


def _load_variable_state(obj: Any, params: list[Tensor], state: Any) -> None:
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
        return
    with torch.no_grad():
        for p, saved in zip(params, state, strict=True):
            p.copy_(saved)


def _make_optimizer(spec: OptimizerFactory | torch.optim.Optimizer, params: list[Tensor]) -> Any:
    return spec if isinstance(spec, torch.optim.Optimizer) else spec(params)


def _default_backward(loss: Tensor, params: Sequence[Tensor]) -> None:
    loss.backward(inputs=list(params))


class PenaltySolver:
    """Algorithm 1 on torch parameters.

    Args:
        upper: the upper variable ``x``: a module (its trainable parameters) or a list of tensors.
        lower: the initial lower variable (a module); the solver deep-copies it into
            ``self.penalised`` (``y``) and ``self.pure`` (``z``), so ``y0 = z0``. Alternatively pass
            both copies yourself as ``penalised=`` and ``pure=`` (any objects with ``parameters()``,
            for instance two LoRA adapters on one base model), with matching shapes.
        upper_loss: ``f(lower, batch)``: a stochastic estimate of the upper objective. Its gradient in
            ``x`` is the oracle of eq. 13; its gradient in the lower copy is the ``∇_y f`` term.
        lower_loss: ``g(lower, batch)``: its gradient in the lower copy is the oracle ∇_w g (eq. 12).
        lower_loss_x: the estimate of ``g`` whose gradient in ``x`` is used in the upper step (eq. 11);
            defaults to ``lower_loss``. RL problems use a different surrogate for each gradient.
        upper_optimizer, lower_optimizer: ``torch.optim`` optimisers, or factories ``params -> optimiser``
            (``functools.partial(torch.optim.Adam, lr=1e-3)``). ``lower_optimizer`` serves both copies
            unless ``penalised_optimizer`` / ``pure_optimizer`` are given.
        upper_batches, lower_batches: ``() -> batch`` samplers whose output is passed to the closures
            (``None`` passes ``None``: the closure samples by itself).
        project_upper: applied to ``x``'s tensors in place after every upper step (a projection).
        backward: ``backward(loss, params)`` accumulating ``d loss / d params`` into ``.grad`` of those
            params only; override it for distributed wrappers.
    """

    def __init__(
        self,
        upper: nn.Module | Sequence[Tensor],
        lower: nn.Module | None = None,
        *,
        upper_loss: LossClosure,
        lower_loss: LossClosure,
        lower_loss_x: LossClosure | None = None,
        upper_optimizer: OptimizerFactory | torch.optim.Optimizer,
        lower_optimizer: OptimizerFactory | None = None,
        penalised_optimizer: OptimizerFactory | torch.optim.Optimizer | None = None,
        pure_optimizer: OptimizerFactory | torch.optim.Optimizer | None = None,
        config: PenaltyConfig | None = None,
        penalised: Any = None,
        pure: Any = None,
        upper_batches: Callable[[], Any] | None = None,
        lower_batches: Callable[[], Any] | None = None,
        project_upper: Callable[[list[Tensor]], None] | None = None,
        backward: Backward = _default_backward,
    ) -> None:
        self.config = config if config is not None else PenaltyConfig()
        if (lower is None) == (penalised is None and pure is None):
            raise ValueError("give either `lower` (copied into y and z) or both `penalised` and `pure`")
        if lower is not None:
            penalised, pure = copy.deepcopy(lower), copy.deepcopy(lower)
        elif penalised is None or pure is None:
            raise ValueError("`penalised` and `pure` must be given together")
        for name, fn in [("upper_loss", upper_loss), ("lower_loss", lower_loss)]:
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")

        self.upper, self.penalised, self.pure = upper, penalised, pure
        self.upper_params = trainable_parameters(upper, "upper variable x")
        self.penalised_params = trainable_parameters(penalised, "penalised lower copy y")
        self.pure_params = trainable_parameters(pure, "pure lower copy z")
        self._check_shapes()

        self.upper_loss, self.lower_loss = upper_loss, lower_loss
        self.lower_loss_x = lower_loss_x if lower_loss_x is not None else lower_loss
        self.upper_batches, self.lower_batches = upper_batches, lower_batches
        self.project_upper, self.backward = project_upper, backward

        penalised_optimizer = penalised_optimizer or lower_optimizer
        pure_optimizer = pure_optimizer or lower_optimizer
        if penalised_optimizer is None or pure_optimizer is None:
            raise ValueError("give `lower_optimizer` (or both `penalised_optimizer` and `pure_optimizer`)")
        self.upper_optimizer = _make_optimizer(upper_optimizer, self.upper_params)
        self.penalised_optimizer = _make_optimizer(penalised_optimizer, self.penalised_params)
        self.pure_optimizer = _make_optimizer(pure_optimizer, self.pure_params)
        self.outer_step = 0
        self.inner_step_count = 0
        self.stage: str | None = None  # "inner" / "upper" while that step runs: for closures that differ
        self._gap_mean, self._gap_var, self._negative_gap_steps = 0.0, 0.0, 0
        self.pure_restarts = 0

    # ------------------------------------------------------------------ checks
    def _check_shapes(self) -> None:
        y, z = self.penalised_params, self.pure_params
        if len(y) != len(z):
            raise ValueError(f"penalised copy y has {len(y)} trainable tensors, pure copy z has {len(z)}")
        for i, (a, b) in enumerate(zip(y, z)):
            if a.shape != b.shape:
                raise ValueError(
                    f"penalised copy y and pure copy z have mismatched shapes at tensor {i}: "
                    f"{tuple(a.shape)} vs {tuple(b.shape)}"
                )
            if a is b:
                raise ValueError(f"y and z share tensor {i}: the two lower copies must be separate")
        lower_ids = {id(p) for p in y + z}
        if any(id(p) in lower_ids for p in self.upper_params):
            raise ValueError("a tensor of the upper variable x is also a tensor of a lower copy")

    def _checked(self, value: Any, closure: str, where: str) -> Tensor:
        if not isinstance(value, Tensor):
            raise BilevelLossError(
                f"{closure} returned a {type(value).__name__} at {where}; expected a tensor"
            )
        if value.numel() != 1:
            raise BilevelLossError(
                f"{closure} returned a tensor of shape {tuple(value.shape)} at {where}; expected a scalar"
            )
        if self.config.check_finite and not torch.isfinite(value.detach()).item():
            raise BilevelLossError(f"{closure} returned {value.item()} at {where}")
        return value.reshape(())

    def _where(self, what: str) -> str:
        return f"outer step {self.outer_step} ({what})"

    # ------------------------------------------------------------------ steps
    @property
    def lam(self) -> float:
        """The current penalty weight λ_t."""
        return self.config.schedule(self.outer_step)

    def _descend(
        self, loss: Tensor, params: list[Tensor], optimizer: Any, name: str, norm: bool = False
    ) -> Tensor:
        """One optimiser step on ``params`` only; returns the gradient norm before clipping (if asked)."""
        if not loss.requires_grad:
            raise BilevelLossError(f"the loss of {name} does not depend on its parameters (no graph)")
        for p in params:
            p.grad = None
        self.backward(loss, params)
        grad_norm = torch.zeros(())
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        elif norm:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        optimizer.step()
        if hasattr(grad_norm, "full_tensor"):  # FSDP's sharded gradients give a DTensor norm
            grad_norm = grad_norm.full_tensor()
        return grad_norm.detach()

    def inner_step(self) -> dict[str, float]:
        """One step of each lower copy: ``z`` on ``g``; ``y`` on ``g + f/λ`` (same batch and randomness)."""
        self.stage = "inner"
        lam, where = self.lam, self._where(f"inner step {self.inner_step_count}")
        batch = self.lower_batches() if self.lower_batches is not None else None
        rng = get_rng_state() if self.config.common_random_numbers else None

        g_pure = self._checked(self.lower_loss(self.pure, batch), "lower loss g", where + ", pure copy z")
        self._descend(g_pure, self.pure_params, self.pure_optimizer, "the pure copy z")

        if rng is not None:
            set_rng_state(rng)
        g_penalised = self._checked(
            self.lower_loss(self.penalised, batch), "lower loss g", where + ", penalised copy y"
        )
        penalised_loss = g_penalised
        if self.config.penalised_upper_grad:
            upper_batch = self.upper_batches() if self.upper_batches is not None else None
            f = self._checked(
                self.upper_loss(self.penalised, upper_batch), "upper loss f", where + ", penalised copy y"
            )
            penalised_loss = g_penalised + f / lam
        self._descend(penalised_loss, self.penalised_params, self.penalised_optimizer, "the penalised copy y")
        self.inner_step_count += 1
        return {"pure_lower_loss": g_pure.item(), "penalised_lower_loss": g_penalised.item()}

    def upper_step(self) -> dict[str, float]:
        """``x ← x - η [∇_x f(x, y) + λ (∇_x g(x, y) - ∇_x g(x, z))]``; returns the diagnostics."""
        self.stage = "upper"
        lam, where = self.lam, self._where("upper step")
        batch = self.lower_batches() if self.lower_batches is not None else None
        rng = get_rng_state() if self.config.common_random_numbers else None
        g_pure = self._checked(self.lower_loss_x(self.pure, batch), "lower loss g", where + ", pure copy z")
        if rng is not None:
            set_rng_state(rng)
        g_penalised = self._checked(
            self.lower_loss_x(self.penalised, batch), "lower loss g", where + ", penalised copy y"
        )
        upper_batch = self.upper_batches() if self.upper_batches is not None else None
        f = self._checked(self.upper_loss(self.penalised, upper_batch), "upper loss f", where)

        value_gap = g_penalised - g_pure
        restart_pure = self.config.keep_better_pure and value_gap.item() < 0
        proxy_loss = f + lam * value_gap * (0.0 if restart_pure else 1.0)
        grad_norm = self._descend(
            proxy_loss, self.upper_params, self.upper_optimizer, "the upper variable x", norm=True
        )
        if self.project_upper is not None:
            with torch.no_grad():
                self.project_upper(self.upper_params)
        if restart_pure:
            self.copy_penalised_to_pure()
        self.outer_step += 1
        self.pure_restarts += int(restart_pure)
        values = torch.stack(
            [f.detach(), value_gap.detach(), grad_norm.to(f.device), g_pure.detach()]
        ).tolist()
        self._watch_value_gap(values[1], values[3])
        return {
            "upper_loss": values[0],
            "value_gap": values[1],
            "proxy_grad_norm": values[2],
            "lam": lam,
            "pure_restarts": float(self.pure_restarts),
        }

    def copy_penalised_to_pure(self) -> None:
        """``z ← y``: the whole state when both copies have ``state_dict`` with the same keys (a module:
        buffers too), otherwise the trainable tensors in order. An optimiser that keeps its own master copy
        of the parameters (DeepSpeed's) is told through its ``reload_params()``."""
        state = _variable_state(self.penalised, self.penalised_params)
        if isinstance(state, dict) and state.keys() == _variable_state(self.pure, self.pure_params).keys():
            _load_variable_state(self.pure, self.pure_params, state)
        else:
            with torch.no_grad():
                torch._foreach_copy_(self.pure_params, self.penalised_params)
        if hasattr(self.pure_optimizer, "reload_params"):
            self.pure_optimizer.reload_params()

    def _watch_value_gap(self, gap: float, scale: float) -> None:
        """The gap is ≥ 0 when ``z`` minimises ``g(x, ·)``. Its running mean ``m`` and variance ``v``
        (weight 0.1) flag a lag of ``z`` when ``m`` stays more than 3 standard errors below 0 (and below
        round-off, relative to ``|g|``) for ``gap_patience`` upper steps; noise alone does not."""
        if self.outer_step == 1:
            self._gap_mean, self._gap_var = gap, 0.0
        else:
            delta = gap - self._gap_mean
            self._gap_mean += 0.1 * delta
            self._gap_var = 0.9 * (self._gap_var + 0.1 * delta * delta)
        stderr = (self._gap_var * 0.1 / 1.9) ** 0.5
        lagging = self._gap_mean < -3 * stderr and self._gap_mean < -1e-6 * (1 + abs(scale))
        self._negative_gap_steps = self._negative_gap_steps + 1 if lagging else 0
        if self._negative_gap_steps == self.config.gap_patience:
            warnings.warn(
                f"the value gap g(x, y) - g(x, z) has averaged {self._gap_mean:.3g} < 0 (standard error "
                f"{stderr:.2g}) over the last {self._negative_gap_steps} upper steps (outer step "
                f"{self.outer_step}): the pure copy z is not tracking the lower-level optimum, so the "
                "penalty term moves x the wrong way. Raise inner_steps or z's learning rate, or lower x's "
                "learning rate.",
                stacklevel=3,
            )

    def step(self) -> dict[str, float]:
        """One outer iteration of Algorithm 1: ``K`` inner steps on both copies, then the upper step."""
        for _ in range(self.config.inner_steps):
            inner = self.inner_step()
        return {**inner, **self.upper_step()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the three variables, their optimisers, counters, RNG."""
        return {
            "outer_step": self.outer_step,
            "inner_step": self.inner_step_count,
            "pure_restarts": self.pure_restarts,
            "upper": _variable_state(self.upper, self.upper_params),
            "penalised": _variable_state(self.penalised, self.penalised_params),
            "pure": _variable_state(self.pure, self.pure_params),
            **{name: getattr(self, name).state_dict() for name in OPTIMIZERS},
            "rng": get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], restore_rng: bool = True) -> None:
        _load_variable_state(self.upper, self.upper_params, state["upper"])
        _load_variable_state(self.penalised, self.penalised_params, state["penalised"])
        _load_variable_state(self.pure, self.pure_params, state["pure"])
        # torch's Optimizer.load_state_dict keeps the given tensors: copy them, so that a state taken
        # from a live solver never makes two optimisers share their moment estimates.
        for name in OPTIMIZERS:
            getattr(self, name).load_state_dict(copy.deepcopy(state[name]))
        self.outer_step, self.inner_step_count = state["outer_step"], state["inner_step"]
        self.pure_restarts = state.get("pure_restarts", 0)
        if restore_rng:
            set_rng_state(state["rng"])
