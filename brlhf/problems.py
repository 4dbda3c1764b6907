"""Bilevel problems with known answers (ALGORITHM.md §7), stated for :class:`brlhf.core.PenaltySolver`.

Each problem gives the closures ``upper_loss(lower, batch)`` / ``lower_loss(lower, batch)``, its
initial variables, the bilevel solution ``x_star``, the penalty-proxy solution ``x_lam(lam)`` where
it has a closed form, and the exact hyper-gradient ``∇Φ(x)``. They are the ground truth of the tests
and the benchmarks, and a quick way to check a new solver setting.

Stochastic oracles: with ``noise > 0`` a batch is a Gaussian perturbation (mean of ``batch_size``
draws) of the linear terms, so each closure's gradient is an unbiased estimate with variance
``noise² / batch_size``, as in the paper's Theorem 2 setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class Vector(nn.Module):
    """A free vector variable (a lower-level "model" whose parameters are the variable itself)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(value.detach().clone().float())

    def forward(self) -> Tensor:
        return self.w


def _noise(dim: int, sigma: float, batch_size: int, generator: torch.Generator | None) -> Tensor:
    if sigma == 0:
        return torch.zeros(dim)
    return torch.randn(batch_size, dim, generator=generator).mean(0) * sigma


@dataclass
class QuadraticProblem:
    """Strongly convex lower level:

        g(x, y) = ½ yᵀHy - yᵀ(Bx + c),    f(x, y) = ½‖y - y_t‖² + (ρ/2)‖x‖²

    ``x*`` solves ``(BᵀH⁻²B + ρI) x = BᵀH⁻¹(y_t - H⁻¹c)`` and the proxy minimiser ``x_λ`` solves
    ``(Bᵀ(H + I/λ)⁻¹H⁻¹B + ρI) x = Bᵀ(H + I/λ)⁻¹(y_t - H⁻¹c)``; ``‖x_λ - x*‖ = Θ(1/λ)``.
    """

    H: Tensor
    B: Tensor
    c: Tensor
    y_target: Tensor
    rho: float = 1.0
    noise: float = 0.0
    batch_size: int = 1
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def scalar(cls, **kwargs) -> QuadraticProblem:
        """H = B = y_t = ρ = 1, c = 0: ``x* = 1/2``, ``x_λ = λ / (1 + 2λ)``."""
        one = torch.ones(1, 1)
        return cls(H=one, B=one.clone(), c=torch.zeros(1), y_target=torch.ones(1), rho=1.0, **kwargs)

    @classmethod
    def random(
        cls, dim_x: int, dim_y: int, seed: int = 0, condition: float = 10.0, **kwargs
    ) -> QuadraticProblem:
        """A random instance with H's eigenvalues spread over [1, condition]."""
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim_y, dim_y, generator=gen, dtype=torch.float64))
        eig = torch.logspace(0, math.log10(condition), dim_y, dtype=torch.float64)
        H = (q * eig) @ q.T
        B = torch.randn(dim_y, dim_x, generator=gen, dtype=torch.float64) / math.sqrt(dim_x)
        c = torch.randn(dim_y, generator=gen, dtype=torch.float64)
        y_t = torch.randn(dim_y, generator=gen, dtype=torch.float64)
        return cls(H=H.float(), B=B.float(), c=c.float(), y_target=y_t.float(), **kwargs)

    @property
    def dims(self) -> tuple[int, int]:
        return self.B.shape[1], self.B.shape[0]

    def init(self) -> tuple[Tensor, Vector]:
        dim_x, dim_y = self.dims
        return torch.zeros(dim_x, requires_grad=True), Vector(torch.zeros(dim_y))

    def lower_batch(self) -> Tensor:
        return _noise(self.dims[1], self.noise, self.batch_size, self.generator)

    def upper_batch(self) -> Tensor:
        return _noise(self.dims[1], self.noise, self.batch_size, self.generator)

    def closures(self, x: Tensor) -> tuple[Callable, Callable]:
        H, B, c, y_t = (t.to(x.dtype) for t in (self.H, self.B, self.c, self.y_target))

        def lower_loss(lower: Vector, xi: Tensor | None) -> Tensor:
            y = lower()
            linear = B @ x + c + (0 if xi is None else xi)
            return 0.5 * y @ H @ y - y @ linear

        def upper_loss(lower: Vector, xi: Tensor | None) -> Tensor:
            y = lower()
            return (
                0.5 * (y - y_t - (0 if xi is None else xi)).square().sum() + 0.5 * self.rho * x.square().sum()
            )

        return upper_loss, lower_loss

    def _solve(self, M: Tensor) -> Tensor:
        H, B, c, y_t = (t.double() for t in (self.H, self.B, self.c, self.y_target))
        H_inv = torch.linalg.inv(H)
        lhs = B.T @ M @ H_inv @ B + self.rho * torch.eye(B.shape[1], dtype=torch.float64)
        return torch.linalg.solve(lhs, B.T @ M @ (y_t - H_inv @ c))

    def x_star(self) -> Tensor:
        return self._solve(torch.linalg.inv(self.H.double()))

    def x_lam(self, lam: float) -> Tensor:
        H = self.H.double()
        return self._solve(torch.linalg.inv(H + torch.eye(H.shape[0], dtype=torch.float64) / lam))

    def hyper_gradient(self, x: Tensor) -> Tensor:
        """``∇Φ(x) = BᵀH⁻¹(y*(x) - y_t) + ρx`` with ``y*(x) = H⁻¹(Bx + c)``."""
        H, B, c, y_t = (t.double() for t in (self.H, self.B, self.c, self.y_target))
        x = x.detach().double()
        y_star = torch.linalg.solve(H, B @ x + c)
        return B.T @ torch.linalg.solve(H, y_star - y_t) + self.rho * x


@dataclass
class PLLineProblem:
    """PL but not strongly convex: a line of lower-level solutions.

        g(x, y) = ½(y₁ + y₂ - x)²,   f(x, y) = ½‖y‖² + ½(x - 2)²,   y ∈ R²

    ``x* = 4/3``; ``x_λ = 2(1 + 2λ)/(1 + 3λ)``; ``∇_x g(x, z) = 0`` on the whole solution line, so the
    answer must not depend on where ``z`` lands. Hessian ``∇²_yy g`` is singular: implicit methods fail.
    """

    x_star: float = 4.0 / 3.0

    @staticmethod
    def x_lam(lam: float) -> float:
        return 2 * (1 + 2 * lam) / (1 + 3 * lam)

    @staticmethod
    def init(y0: tuple[float, float] = (0.0, 0.0), x0: float = 0.0) -> tuple[Tensor, Vector]:
        return torch.tensor([x0], requires_grad=True), Vector(torch.tensor(y0))

    @staticmethod
    def closures(x: Tensor) -> tuple[Callable, Callable]:
        def lower_loss(lower: Vector, batch: object = None) -> Tensor:
            return 0.5 * (lower().sum() - x.sum()).square()

        def upper_loss(lower: Vector, batch: object = None) -> Tensor:
            return 0.5 * lower().square().sum() + 0.5 * (x.sum() - 2).square()

        return upper_loss, lower_loss

    @staticmethod
    def hyper_gradient(x: Tensor) -> Tensor:
        """Optimistic ``Φ(x) = x²/4 + ½(x - 2)²`` (the line's min-norm point): ``∇Φ = 1.5x - 2``."""
        return 1.5 * x.detach().double() - 2


@dataclass
class NonconvexPLProblem:
    """Non-convex lower level satisfying PL: ``h(u) = u² + 3 sin²u``,

        g(x, y) = h(y - x),   f(x, y) = ½(y - 1)² + ½x²

    ``y*(x) = x``, ``x* = 1/2``; ``x_λ ≈ 0.4705, 0.49689, 0.499688`` for λ = 1, 10, 100.
    ``noise`` adds Gaussian noise to the lower level's linear term (an unbiased stochastic oracle).
    """

    noise: float = 0.0
    batch_size: int = 1
    generator: torch.Generator | None = field(default=None, repr=False)
    x_star: float = 0.5
    tabulated_x_lam: tuple[tuple[float, float], ...] = ((1.0, 0.4705), (10.0, 0.49689), (100.0, 0.499688))

    @staticmethod
    def init(y0: float = 0.0, x0: float = 0.0) -> tuple[Tensor, Vector]:
        return torch.tensor([x0], requires_grad=True), Vector(torch.tensor([y0]))

    def lower_batch(self) -> Tensor:
        return _noise(1, self.noise, self.batch_size, self.generator)

    def upper_batch(self) -> Tensor:
        return _noise(1, self.noise, self.batch_size, self.generator)

    @staticmethod
    def closures(x: Tensor) -> tuple[Callable, Callable]:
        def lower_loss(lower: Vector, xi: Tensor | None = None) -> Tensor:
            u = lower().sum() - x.sum()
            perturbation = 0 if xi is None else xi.sum() * lower().sum()
            return u.square() + 3 * torch.sin(u).square() - perturbation

        def upper_loss(lower: Vector, xi: Tensor | None = None) -> Tensor:
            shift = 0 if xi is None else xi.sum()
            return 0.5 * (lower().sum() - 1 - shift).square() + 0.5 * x.sum().square()

        return upper_loss, lower_loss

    @staticmethod
    def hyper_gradient(x: Tensor) -> Tensor:
        """``Φ(x) = ½(x - 1)² + ½x²``: ``∇Φ = 2x - 1``."""
        return 2 * x.detach().double() - 1


@dataclass
class KLBanditProblem:
    """One-prompt RLHF: a KL-regularised bandit over ``n`` actions (ALGORITHM.md §7).

        r_x(a) = x_a,   g(x, θ) = -(E_{π_θ}[r_x] - β KL(π_θ ‖ π_ref)),   f(θ) = -Σ_a p_t(a) log π_θ(a)

    ``π*_x ∝ π_ref exp(x/β)``; the penalty fixed point is exact for every λ: ``π_y = π_z = p_t``.
    ``samples > 0`` replaces the exact expectations by the RL oracles on ``samples`` sampled actions
    (eq. 12 with a leave-one-out baseline for ``∇_θ g``, eq. 11 for ``∇_x g``, a sampled ``a ~ p_t``
    log-likelihood for ``f``).
    """

    target: Tensor
    beta: float = 1.0
    reference: Tensor | None = None
    samples: int = 0

    def __post_init__(self) -> None:
        n = self.target.numel()
        if self.reference is None:
            self.reference = torch.full((n,), 1.0 / n)

    def init(self) -> tuple[Tensor, nn.Module]:
        n = self.target.numel()
        return torch.zeros(n, requires_grad=True), Vector(self.reference.log())

    def closures(self, x: Tensor) -> tuple[Callable, Callable, Callable]:
        from brlhf.rl.oracles import kl_policy_gradient_surrogate, return_surrogate

        log_ref = self.reference.log()

        def log_policy(lower: Vector) -> Tensor:
            return torch.log_softmax(lower(), dim=-1)

        if self.samples == 0:

            def lower_loss(lower: Vector, batch: object = None) -> Tensor:
                logp = log_policy(lower)
                p = logp.exp()
                return -(p @ x - self.beta * (p @ (logp - log_ref)))

            def upper_loss(lower: Vector, batch: object = None) -> Tensor:
                return -(self.target @ log_policy(lower))

            return upper_loss, lower_loss, lower_loss

        def lower_loss(lower: Vector, batch: object = None) -> Tensor:
            logp = log_policy(lower)
            actions = torch.multinomial(logp.exp().detach(), self.samples, replacement=True)
            return kl_policy_gradient_surrogate(
                logp[actions], x[actions], log_ref[actions], beta=self.beta, group_size=self.samples
            )

        def lower_loss_x(lower: Vector, batch: object = None) -> Tensor:
            logp = log_policy(lower)
            actions = torch.multinomial(logp.exp().detach(), self.samples, replacement=True)
            return -return_surrogate(x[actions])

        def upper_loss(lower: Vector, batch: object = None) -> Tensor:
            labels = torch.multinomial(self.target, self.samples, replacement=True)
            return -log_policy(lower)[labels].mean()

        return upper_loss, lower_loss, lower_loss_x


@dataclass
class TabularMDP:
    """A small discounted MDP with a KL-regularised return (ALGORITHM.md §1 and §7).

        J(x, π) = ρ₀ᵀ V^π,   V^π = (I - γ P_π)⁻¹ r̃_π,
        r̃_π(s) = Σ_a π(a|s) [r_x(s, a) - β log(π(a|s) / π_ref(a|s))]

    with a tabular reward ``r_x(s, a) = x[s, a]`` and a softmax policy ``π_θ(a|s) ∝ exp θ[s, a]``.
    Everything is exact and differentiable (a linear solve), which makes it the reference for the
    RL oracles: the occupancy ``d^π(s, a) = [(I - γ P_πᵀ)⁻¹ ρ₀](s) π(a|s)`` gives ``∇_x J = d^π``
    (eq. 11), and soft value iteration gives the optimal policy ``π*_x``.
    """

    P: Tensor  # (S, A, S) transition probabilities
    rho0: Tensor  # (S,) initial distribution
    gamma: float = 0.9
    beta: float = 1.0

    @classmethod
    def random(cls, n_states: int = 3, n_actions: int = 2, seed: int = 0, **kwargs) -> TabularMDP:
        gen = torch.Generator().manual_seed(seed)
        P = torch.rand(n_states, n_actions, n_states, generator=gen, dtype=torch.float64) ** 2
        P = P / P.sum(-1, keepdim=True)
        rho0 = torch.rand(n_states, generator=gen, dtype=torch.float64) + 0.5
        return cls(P=P, rho0=rho0 / rho0.sum(), **kwargs)

    @property
    def shape(self) -> tuple[int, int]:
        return self.P.shape[0], self.P.shape[1]

    def log_reference(self) -> Tensor:
        n_states, n_actions = self.shape
        return torch.full((n_states, n_actions), -math.log(n_actions), dtype=torch.float64)

    def value(self, reward: Tensor, policy_logits: Tensor) -> Tensor:
        """``J(x, π_θ)`` exactly."""
        logp = torch.log_softmax(policy_logits.double(), dim=-1)
        pi = logp.exp()
        soft_reward = (pi * (reward.double() - self.beta * (logp - self.log_reference()))).sum(-1)
        P_pi = torch.einsum("sa,sat->st", pi, self.P)
        V = torch.linalg.solve(torch.eye(self.shape[0], dtype=torch.float64) - self.gamma * P_pi, soft_reward)
        return self.rho0 @ V

    def occupancy(self, policy_logits: Tensor) -> Tensor:
        """``d^π(s, a) = [(I - γ P_πᵀ)⁻¹ ρ₀](s) π(a|s)`` (unnormalised discounted occupancy)."""
        pi = torch.softmax(policy_logits.double(), dim=-1)
        P_pi = torch.einsum("sa,sat->st", pi, self.P)
        d_s = torch.linalg.solve(
            torch.eye(self.shape[0], dtype=torch.float64) - self.gamma * P_pi.T, self.rho0
        )
        return d_s[:, None] * pi

    def soft_optimal_logits(self, reward: Tensor, iterations: int = 2000) -> Tensor:
        """Soft value iteration: ``Q = r + γ P V``, ``V = β log Σ_a π_ref(a|s) exp(Q(s, a)/β)``; returns
        ``log π*_x = log π_ref + (Q - V)/β`` (differentiable in ``reward``)."""
        log_ref = self.log_reference()
        V = torch.zeros(self.shape[0], dtype=torch.float64)
        for _ in range(iterations):
            Q = reward.double() + self.gamma * torch.einsum("sat,t->sa", self.P, V)
            V = self.beta * torch.logsumexp(log_ref + Q / self.beta, dim=-1)
        return log_ref + (Q - V[:, None]) / self.beta

    def sample(
        self, policy_logits: Tensor, n: int, horizon: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` trajectories of ``horizon`` steps: ``(states, actions)``, each ``(n, horizon)``."""
        pi = torch.softmax(policy_logits.detach().double(), dim=-1)
        states = torch.empty(n, horizon, dtype=torch.long)
        actions = torch.empty(n, horizon, dtype=torch.long)
        s = torch.multinomial(self.rho0, n, replacement=True, generator=generator)
        for t in range(horizon):
            a = torch.multinomial(pi[s], 1, generator=generator).squeeze(1)
            states[:, t], actions[:, t] = s, a
            s = torch.multinomial(self.P[s, a], 1, generator=generator).squeeze(1)
        return states, actions
