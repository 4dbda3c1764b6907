"""The penalty weight λ and its schedule (ALGORITHM.md §4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LambdaSchedule:
    """λ_t = min(λ_max, λ_0 (1 + t)^p).

    ``power = 0`` (the default) keeps λ fixed, as in the paper's theorems (λ of order ε^-1/2);
    ``power > 0`` is the increasing schedule of F2SA (Kwon et al. 2023), capped at ``lam_max``.
    """

    lam: float
    power: float = 0.0
    lam_max: float | None = None

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"the penalty weight λ must be positive, got lam={self.lam}")
        if self.power < 0:
            raise ValueError(f"the λ schedule's power must be >= 0, got {self.power}")
        if self.lam_max is not None and self.lam_max < self.lam:
            raise ValueError(f"lam_max={self.lam_max} is smaller than the initial lam={self.lam}")

    def __call__(self, step: int) -> float:
        value = self.lam * (1.0 + step) ** self.power
        return value if self.lam_max is None else min(value, self.lam_max)
