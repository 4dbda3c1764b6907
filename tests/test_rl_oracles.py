"""The RL oracles (eqs. 11-12) against an exact tabular MDP, and the solver on a bilevel MDP."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from brlhf.core import PenaltyConfig, PenaltySolver
from brlhf.problems import TabularMDP, Vector
from brlhf.rl import (
    kl_policy_gradient_surrogate,
    leave_one_out_baseline,
    return_surrogate,
    rewards_to_go,
)


@pytest.fixture
def mdp() -> TabularMDP:
    return TabularMDP.random(n_states=3, n_actions=2, seed=1, gamma=0.8, beta=0.5)


def test_leave_one_out_baseline_and_rewards_to_go_by_hand():
    v = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    assert leave_one_out_baseline(v, 3).tolist() == [4.0, 3.5, 1.5, 6.0, 4.0, 2.0]
    r = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(rewards_to_go(r, 0.5), torch.tensor([[3.0, 4.0, 4.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(rewards_to_go(r, 0.5, mask), torch.tensor([[2.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_baseline(v, 1)
    with pytest.raises(ValueError, match="do not split"):
        leave_one_out_baseline(v, 4)


def test_eq11_occupancy_matches_finite_differences(mdp):
    """∇_x J(x, π) = d^π (Lemma 5), checked against central differences of the exact J."""
    gen = torch.Generator().manual_seed(0)
    reward = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    logits = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    occupancy = mdp.occupancy(logits)
    eps = 1e-6
    fd = torch.zeros_like(reward)
    for s in range(3):
        for a in range(2):
            e = torch.zeros_like(reward)
            e[s, a] = eps
            fd[s, a] = (mdp.value(reward + e, logits) - mdp.value(reward - e, logits)) / (2 * eps)
    assert torch.allclose(fd, occupancy, atol=1e-8)


def _trajectory_batches(mdp, logits, n_batches, n, horizon, seed):
    gen = torch.Generator().manual_seed(seed)
    return [mdp.sample(logits, n, horizon, gen) for _ in range(n_batches)]


def _mean_and_stderr(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(samples)
    return stacked.mean(0), stacked.std(0) / len(samples) ** 0.5


def test_eq11_sampled_surrogate_is_unbiased(mdp):
    """The gradient of ``return_surrogate`` on sampled trajectories averages to d^π: within 4 standard
    errors plus the truncation bias γ^H / (1 - γ)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    horizon = 40
    estimates = []
    for states, actions in _trajectory_batches(mdp, logits, 20, 200, horizon, seed=2):
        reward = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
        return_surrogate(reward[states, actions], gamma=mdp.gamma).backward()
        estimates.append(reward.grad)
    mean, stderr = _mean_and_stderr(estimates)
    bias = mdp.gamma**horizon / (1 - mdp.gamma)
    assert ((mean - mdp.occupancy(logits)).abs() <= 4 * stderr + bias).all()


def test_eq12_kl_policy_gradient_is_unbiased(mdp):
    """The RLOO surrogate's gradient averages to the exact ∇_θ J of the KL-regularised return, and its
    value to -J."""
    gen = torch.Generator().manual_seed(3)
    reward = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    logits = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    exact_value = mdp.value(reward, logits)
    (exact_grad,) = torch.autograd.grad(exact_value, logits)
    horizon, grads, values = 40, [], []
    for states, actions in _trajectory_batches(mdp, logits, 20, 400, horizon, seed=4):
        logp = torch.log_softmax(logits, -1)[states, actions]
        ref = mdp.log_reference()[states, actions]
        loss = kl_policy_gradient_surrogate(
            logp, reward[states, actions], ref, beta=mdp.beta, gamma=mdp.gamma, group_size=4
        )
        (grad,) = torch.autograd.grad(loss, logits)
        grads.append(-grad)
        values.append(-loss.detach())
    mean, stderr = _mean_and_stderr(grads)
    bias = 3 * mdp.gamma**horizon / (1 - mdp.gamma)
    assert ((mean - exact_grad).abs() <= 4 * stderr + bias).all(), (mean, exact_grad, stderr)
    value_mean, value_err = _mean_and_stderr(values)
    assert abs(value_mean - exact_value.detach()) <= 4 * value_err + bias


def test_eq12_without_baseline_and_without_kl_is_plain_reinforce():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    rewards = torch.tensor([3.0, 5.0])
    loss = kl_policy_gradient_surrogate(logp, rewards)
    loss.backward()
    assert loss.item() == pytest.approx(-4.0)
    assert logp.grad.tolist() == [-1.5, -2.5]
    with pytest.raises(ValueError, match="reference"):
        kl_policy_gradient_surrogate(logp, rewards, beta=0.1)


def test_solver_reaches_exact_hyper_objective_minimiser_on_a_tabular_mdp(mdp):
    """Bilevel MDP: x = reward table, lower = softmax policy logits, g = -J(x, π) exact,
    f = Σ_s KL(π_target(·|s) ‖ π(·|s)) + (ρ/2)‖x‖². The exact hyper-objective Φ(x) = f(x, π*_x) with
    π*_x from soft value iteration is minimised by scipy; the solver must land within O(1/λ)."""
    rho = 0.1
    target = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64)

    def upper_value(log_pi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (target * (target.log() - log_pi)).sum() + 0.5 * rho * x.square().sum()

    def hyper_objective(x_flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.tensor(x_flat.reshape(3, 2), requires_grad=True)
        value = upper_value(mdp.soft_optimal_logits(x, iterations=200), x)
        (grad,) = torch.autograd.grad(value, x)
        return value.item(), grad.numpy().ravel()

    result = minimize(hyper_objective, np.zeros(6), jac=True, method="L-BFGS-B", options={"gtol": 1e-12})
    x_star = torch.tensor(result.x.reshape(3, 2))

    errors = {}
    for lam in [5.0, 50.0]:
        x = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
        solver = PenaltySolver(
            [x],
            Vector(torch.zeros(3, 2, dtype=torch.float64)).double(),
            upper_loss=lambda w, _, x=x: upper_value(torch.log_softmax(w(), -1), x),
            lower_loss=lambda w, _, x=x: -mdp.value(x, w()),
            upper_optimizer=functools.partial(torch.optim.SGD, lr=0.5),
            lower_optimizer=functools.partial(torch.optim.SGD, lr=2.0),
            config=PenaltyConfig(lam=lam, inner_steps=10),
        )
        for _ in range(1000):
            stats = solver.step()
        assert stats["proxy_grad_norm"] < 1e-6
        errors[lam] = torch.linalg.norm(x.detach() - x_star).item()
    assert 7 < errors[5.0] / errors[50.0] < 13  # Θ(1/λ): tenfold λ, tenfold smaller error (measured 9.8)
    assert errors[50.0] * 50.0 < 5 * torch.linalg.norm(x_star).item()
