"""The gradient oracles of bilevel RL (ALGORITHM.md §3), as surrogate losses for autograd.

Every function returns a scalar whose *gradient* is the paper's estimator and whose *value* is the
estimate of the objective itself, so the same tensor serves the optimiser and the diagnostics
(the solver's value gap ``g(x, y) - g(x, z)`` is read off these values).

Shapes: trajectories are ``(N, H)`` (N sampled trajectories, horizon H); a bandit / language model
is the special case ``(N,)`` (one step per episode: a prompt and its whole completion).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_trajectories(t: Tensor) -> Tensor:
    return t.unsqueeze(-1) if t.dim() == 1 else t


def discount_weights(horizon: int, gamma: float, device: torch.device | None = None) -> Tensor:
    """``γ^t`` for ``t = 0..H-1`` (the discounted occupancy's weights, truncated at the horizon H)."""
    return gamma ** torch.arange(horizon, dtype=torch.float32, device=device)


def _valid(mask: Tensor | None, like: Tensor) -> Tensor:
    return torch.ones_like(like) if mask is None else _as_trajectories(mask).to(like.dtype)


def return_surrogate(rewards: Tensor, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Eq. 11 (Lemma 5): the return's gradient in the reward parameters.

        Ĵ(x) = (1/N) Σ_i Σ_{t<H} γ^t r_x(s_t^i, a_t^i),    ∇_x Ĵ is unbiased for ∇_x J(x, π)

    ``rewards`` holds ``r_x`` on the policy's sampled state-action pairs (differentiable in ``x``);
    ``mask`` marks the valid steps (episodes that ended or were truncated early). The KL term of the
    regularised return does not depend on ``x``, so it is absent; the lower loss ``g = -J`` has
    ``∇_x g = -∇_x Ĵ``.
    """
    rewards = _as_trajectories(rewards)
    weights = discount_weights(rewards.shape[1], gamma, rewards.device) * _valid(mask, rewards)
    return (rewards * weights).sum(dim=1).mean()


def rewards_to_go(rewards: Tensor, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """``G_t = Σ_{k≥t} γ^{k-t} r_k`` along each trajectory (zero past the mask)."""
    rewards = _as_trajectories(rewards) * _valid(mask, _as_trajectories(rewards))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out


def leave_one_out_baseline(values: Tensor, group_size: int) -> Tensor:
    """RLOO baseline: ``b_i = (1/(k-1)) Σ_{j≠i} v_j`` within consecutive groups of ``k = group_size``
    samples of the same start state (prompt). Unbiased, since ``b_i`` does not depend on sample i."""
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs group_size >= 2, got {group_size}")
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} samples do not split into groups of {group_size}")
    grouped = values.reshape(-1, group_size, *values.shape[1:])
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return baseline.reshape(values.shape)


def reinforce(logprobs: Tensor, returns: Tensor, group_size: int | None = None) -> Tensor:
    """Score-function estimator: a scalar whose value is the mean return ``(1/N) Σ_i G_0^i`` and whose
    gradient is ``(1/N) Σ_i Σ_t ∇ log π(a_t^i|s_t^i) (G_t^i - b_t^i)``.

    ``returns`` are the (discount-weighted) returns-to-go ``G_t``, treated as constants; ``b`` is the
    leave-one-out baseline over groups of ``group_size`` samples (None: no baseline).
    """
    logprobs, returns = _as_trajectories(logprobs), _as_trajectories(returns).detach()
    advantages = returns - leave_one_out_baseline(returns, group_size) if group_size else returns
    score = (logprobs * advantages).sum(dim=1).mean()
    value = returns[:, 0].mean()
    return value + (score - score.detach())


def kl_policy_gradient_surrogate(
    logprobs: Tensor,
    rewards: Tensor,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    gamma: float = 1.0,
    mask: Tensor | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Eq. 12: the lower loss ``g = -J`` of the KL-regularised return, as a REINFORCE / RLOO surrogate.

        J(π) = E_τ Σ_t γ^t [r_t - β log(π(a_t|s_t) / π_ref(a_t|s_t))]
        ∇J   = E_τ Σ_t γ^t ∇ log π(a_t|s_t) (Q̃_t - b_t),   Q̃_t = Σ_{k≥t} γ^{k-t} r̃_k,
        r̃_t  = r_t - β log(π/π_ref)(a_t|s_t)

    (the extra term ``-β E[∇ log π]`` of the KL's gradient has mean zero). Returns a scalar whose
    value is the estimate of ``-J`` and whose gradient in the policy's parameters is ``-∇Ĵ``; the
    rewards and log-ratios are treated as constants (``∇_x g`` comes from :func:`return_surrogate`).
    ``logprobs`` are ``log π(a_t|s_t)`` with gradient (per step ``(N, H)``, or per sequence ``(N,)``
    for a language model, where the sequence log-ratio is the KL sample).
    """
    logprobs, rewards = _as_trajectories(logprobs), _as_trajectories(rewards).detach()
    soft_rewards = rewards
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        soft_rewards = rewards - beta * (logprobs.detach() - _as_trajectories(ref_logprobs).detach())
    valid = _valid(mask, rewards)
    weights = discount_weights(rewards.shape[1], gamma, rewards.device)
    returns = rewards_to_go(soft_rewards, gamma, valid) * weights  # γ^t Q̃_t
    return -reinforce(logprobs * valid, returns, group_size)
