"""Bilevel problems with closed-form answers (ALGORITHM.md §7), with stochastic oracles.

Every problem gives ``f(x, y, xi)`` and ``g(x, y, xi)`` as differentiable torch scalars, samplers for the
noise ``xi`` of a minibatch of ``B`` samples, and the exact hyper-gradient ``∇Φ(x)`` of
``Φ(x) = f(x, y*(x))``. The noise of a minibatch mean of ``B`` i.i.d. Gaussian samples of standard
deviation σ is drawn directly as one Gaussian of standard deviation ``s = σ/√B`` (same law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from brlhf.problems import NonconvexPLProblem, PLLineProblem

Noise = dict[str, Tensor]


@dataclass
class Quadratic:
    """Strongly convex lower level, random-design noise.

        g_ξ(x, y) = ½ yᵀ(H + s E_H) y − yᵀ((M + s E_M) x + c + s e_c)
        f_ξ(x, y) = ½ ‖y − y_t‖² + (ρ/2) ‖x‖² + s (e_fyᵀ y + e_fxᵀ x)

    with E_H symmetric Gaussian, E_M, e_c, e_fy, e_fx standard Gaussian, s = σ/√B. Then
    y*(x) = H⁻¹(Mx + c), ∇Φ(x) = MᵀH⁻¹(y*(x) − y_t) + ρ x, and ∇_x g = −(M + sE_M)ᵀ y carries noise
    proportional to y (so common random numbers cut the noise of λ(∇_x g(x,y) − ∇_x g(x,z))).
    """

    dx: int = 10
    dy: int = 20
    sigma: float = 1.0
    rho: float = 0.1
    cond: float = 10.0
    seed: int = 12345
    H: Tensor = field(init=False)
    M: Tensor = field(init=False)
    c: Tensor = field(init=False)
    y_t: Tensor = field(init=False)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        q, _ = torch.linalg.qr(torch.randn(self.dy, self.dy, generator=gen, dtype=torch.float64))
        eig = torch.logspace(0, math.log10(self.cond), self.dy, dtype=torch.float64)
        self.H = (q * eig) @ q.T
        self.M = torch.randn(self.dy, self.dx, generator=gen, dtype=torch.float64) / math.sqrt(self.dx)
        self.c = torch.randn(self.dy, generator=gen, dtype=torch.float64)
        self.y_t = torch.randn(self.dy, generator=gen, dtype=torch.float64)
        self.L_g = float(eig.max())
        self.mu_g = float(eig.min())

    def x0(self) -> Tensor:
        return torch.zeros(self.dx, dtype=torch.float64)

    def y0(self) -> Tensor:
        return torch.zeros(self.dy, dtype=torch.float64)

    def sample_g(self, batch: int, gen: torch.Generator) -> Noise:
        s = self.sigma / math.sqrt(batch)
        e = torch.randn(self.dy, self.dy, generator=gen, dtype=torch.float64)
        return {
            "E_H": s * (e + e.T) / math.sqrt(2.0),
            "E_M": s * torch.randn(self.dy, self.dx, generator=gen, dtype=torch.float64),
            "e_c": s * torch.randn(self.dy, generator=gen, dtype=torch.float64),
        }

    def sample_f(self, batch: int, gen: torch.Generator) -> Noise:
        s = self.sigma / math.sqrt(batch)
        return {
            "e_y": s * torch.randn(self.dy, generator=gen, dtype=torch.float64),
            "e_x": s * torch.randn(self.dx, generator=gen, dtype=torch.float64),
        }

    def g(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        H, M, c = self.H, self.M, self.c
        if xi is not None:
            H, M, c = H + xi["E_H"], M + xi["E_M"], c + xi["e_c"]
        return 0.5 * y @ (H @ y) - y @ (M @ x + c)

    def f(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        val = 0.5 * (y - self.y_t).square().sum() + 0.5 * self.rho * x.square().sum()
        if xi is not None:
            val = val + xi["e_y"] @ y + xi["e_x"] @ x
        return val

    def y_star(self, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.H, self.M @ x + self.c)

    def grad_phi(self, x: Tensor) -> Tensor:
        """∇Φ(x) = MᵀH⁻¹(y*(x) − y_t) + ρx."""
        return self.M.T @ torch.linalg.solve(self.H, self.y_star(x) - self.y_t) + self.rho * x

    def x_star(self) -> Tensor:
        """Solves (MᵀH⁻²M + ρI) x = MᵀH⁻¹(y_t − H⁻¹c)."""
        hinv_m = torch.linalg.solve(self.H, self.M)
        lhs = hinv_m.T @ hinv_m + self.rho * torch.eye(self.dx, dtype=torch.float64)
        return torch.linalg.solve(lhs, hinv_m.T @ (self.y_t - torch.linalg.solve(self.H, self.c)))


def _h(u: Tensor) -> Tensor:
    """h(u) = u² + 3 sin²u: non-convex, PL, unique minimiser u = 0."""
    return u.square() + 3.0 * torch.sin(u).square()


@dataclass
class NonconvexPL:
    """Separable non-convex PL lower level (ALGORITHM.md §7, one copy per coordinate).

        g_ξ(x, y) = (1 + s m) Σ_i h(y_i − x_i) + s e_gᵀ(y − x),   h(u) = u² + 3 sin²u
        f_ξ(x, y) = ½ ‖y − 1‖² + ½ ‖x‖² + s (e_fyᵀ y + e_fxᵀ x)

    y*(x) = x, Φ(x) = ½‖x − 1‖² + ½‖x‖², ∇Φ(x) = 2x − 1, x* = ½·1.
    """

    dim: int = 10
    sigma: float = 1.0
    L_g: float = 8.0
    mu_g: float = 2.0

    @property
    def dx(self) -> int:
        return self.dim

    @property
    def dy(self) -> int:
        return self.dim

    def x0(self) -> Tensor:
        return torch.full((self.dim,), -1.0, dtype=torch.float64)

    def y0(self) -> Tensor:
        return torch.full((self.dim,), 2.0, dtype=torch.float64)

    def sample_g(self, batch: int, gen: torch.Generator) -> Noise:
        s = self.sigma / math.sqrt(batch)
        return {
            "m": s * torch.randn((), generator=gen, dtype=torch.float64),
            "e": s * torch.randn(self.dim, generator=gen, dtype=torch.float64),
        }

    def sample_f(self, batch: int, gen: torch.Generator) -> Noise:
        s = self.sigma / math.sqrt(batch)
        return {
            "e_y": s * torch.randn(self.dim, generator=gen, dtype=torch.float64),
            "e_x": s * torch.randn(self.dim, generator=gen, dtype=torch.float64),
        }

    def g(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        u = y - x
        val = _h(u).sum()
        if xi is not None:
            val = (1.0 + xi["m"]) * val + xi["e"] @ u
        return val

    def f(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        val = 0.5 * (y - 1.0).square().sum() + 0.5 * x.square().sum()
        if xi is not None:
            val = val + xi["e_y"] @ y + xi["e_x"] @ x
        return val

    def grad_phi(self, x: Tensor) -> Tensor:
        return NonconvexPLProblem.hyper_gradient(
            x
        )  # separable: the one-dimensional closed form per coordinate

    def x_star(self) -> Tensor:
        return torch.full((self.dim,), NonconvexPLProblem.x_star, dtype=torch.float64)


@dataclass
class PLLine:
    """A line of lower-level solutions (ALGORITHM.md §7), deterministic.

        g(x, y) = ½ (y₁ + y₂ − x)²,   f(x, y) = ½ ‖y‖² + ½ (x − 2)²

    The optimistic hyper-objective min over the solution line gives x* = 4/3; the penalty proxy's
    minimiser is x_λ = 2(1 + 2λ)/(1 + 3λ). ∇²_yy g = [[1, 1], [1, 1]] is singular.
    """

    dx: int = 1
    dy: int = 2
    L_g: float = 2.0

    def g(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        return 0.5 * (y.sum() - x.sum()).square()

    def f(self, x: Tensor, y: Tensor, xi: Noise | None = None) -> Tensor:
        return 0.5 * y.square().sum() + 0.5 * (x.sum() - 2.0).square()

    @staticmethod
    def x_star() -> float:
        return PLLineProblem.x_star

    x_lam = staticmethod(PLLineProblem.x_lam)
