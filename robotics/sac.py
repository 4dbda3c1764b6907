"""Soft actor-critic as B-Pref configures it (Haarnoja et al. 2018; rll-research/BPref ``agent/sac.py``).

Critic (double Q, clipped):   y = r + γ (1 - d) [min_i Q̄_i(s', a') - α log π(a'|s')],   a' ~ π(·|s')
                              L_Q = Σ_i mean (Q_i(s, a) - y)²
Actor (reparameterised):      L_π = mean [α log π(ã|s) - min_i Q_i(s, ã)],               ã ~ π(·|s)
Temperature (learned):        L_α = mean [α (-log π(ã|s) - H̄)],   H̄ = -|A|,  α0 = 0.1
Targets:                      Q̄ ← (1 - τ) Q̄ + τ Q   every 2nd update.

The actor is a tanh-squashed Gaussian, ``a = tanh(u)``, ``u ~ N(μ(s), σ(s)²)``, log σ squashed into
[-5, 2], with ``log π(a|s) = log N(u; μ, σ) - Σ_j log(1 - tanh²(u_j))``.

For the bilevel solver a ``SAC`` object *is* a lower-level variable: ``parameters()`` yields the actor's
parameters (the policy ``π_y`` / ``π_z``), ``oracle_loss(batch)`` first takes this agent's critic,
temperature and target steps (they are the estimator of the policy gradient, eq. 12) and returns the
actor loss whose gradient in the actor is the oracle. ``update(batch)`` is the plain SAC step.

Speed (one CPU thread): the two Q networks are one batched network (``torch.baddbmm`` over a leading
ensemble axis), the target computation runs under ``no_grad``, the actor's backward computes gradients
for the actor's parameters only (``backward(inputs=...)``), Adam is the fused kernel, and the target
update is one ``torch._foreach_lerp_`` (``benchmarks/robotics_sac_speed.py`` compares with SB3).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SACConfig:
    hidden_dim: int = 1024
    hidden_depth: int = 2
    batch_size: int = 1024
    lr: float = 5e-4  # actor and critic
    alpha_lr: float = 1e-4
    init_temperature: float = 0.1
    gamma: float = 0.99
    tau: float = 0.005
    target_every: int = 2
    log_std_min: float = -5.0
    log_std_max: float = 2.0


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied at once: ``x [n, B, i] -> x W + b  [n, B, o]``."""

    def __init__(self, n: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(n, 1, out_dim))
        with torch.no_grad():  # orthogonal init per member, as B-Pref's ``weight_init``
            for w in self.weight:
                w.copy_(nn.init.orthogonal_(torch.empty(out_dim, in_dim)).T)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, depth: int, n: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    """B-Pref's ``utils.mlp``: ``depth`` hidden layers of ``hidden_dim`` units; ``n`` stacked copies."""
    dims = [in_dim] + [hidden_dim] * depth + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(EnsembleLinear(n, a, b))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Tanh-squashed diagonal Gaussian policy."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig) -> None:
        super().__init__()
        self.trunk = mlp(obs_dim, cfg.hidden_dim, 2 * act_dim, cfg.hidden_depth)
        self.log_std_min, self.log_std_max = cfg.log_std_min, cfg.log_std_max

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ)`` of the pre-tanh Gaussian, log σ squashed into [log_std_min, log_std_max]."""
        out = self.trunk(obs.reshape(1, -1, obs.shape[-1])).reshape(*obs.shape[:-1], -1)
        mu, log_std = out.chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        return mu, log_std

    @staticmethod
    def _log_prob(u: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
        gauss = -0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)²), stable
        return (gauss - log_det).sum(-1)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised action and its log-probability."""
        mu, log_std = self(obs)
        u = mu + log_std.exp() * torch.randn_like(mu)
        return torch.tanh(u), self._log_prob(u, mu, log_std)

    def log_prob(self, obs: Tensor, action: Tensor, trust: float | None = None) -> Tensor:
        """``log π(a|s)`` of given (stored) actions, for score-function gradients.

        A dimension stored as ±1 (tanh saturated in float32: ``|u| ≥ u_c = atanh(1 - 1e-6)``) is a censored
        observation: its term is ``log P(±u ≥ u_c) = log Φ((±μ - u_c)/σ)``, not a density at the clamp
        point (which, at σ = e^-5, reaches -1e15 and swamps every other gradient). With ``trust``, a step
        with a dimension more than ``trust`` standard deviations away from what the current policy does
        (``|u - μ|/σ``, or ``(u_c - ±μ)/σ`` for a saturated one) gives no gradient: its importance weight
        π_now / π_behaviour is ≈ 0, the current policy would not take that action."""
        mu, log_std = self(obs)
        std, u_c = log_std.exp(), math.atanh(1 - 1e-6)
        saturated = action.abs() >= 1 - 1e-6
        u = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
        gauss = -0.5 * ((u - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)²), stable
        tail_z = (torch.sign(action) * mu - u_c) / std
        tail = torch.special.log_ndtr(tail_z.clamp(min=-1e3))
        logp = torch.where(saturated, tail, gauss - log_det).sum(-1)
        if trust is not None:
            distance = torch.where(saturated, (-tail_z).clamp(min=0), ((u - mu) / std).abs())
            logp = torch.where((distance > trust).any(-1), logp.detach(), logp)
        return logp

    def mode(self, obs: Tensor) -> Tensor:
        return torch.tanh(self(obs)[0])


class DoubleQ(nn.Module):
    """Two Q networks evaluated as one batched network; returns ``[2, B]``."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig) -> None:
        super().__init__()
        self.net = mlp(obs_dim + act_dim, cfg.hidden_dim, 1, cfg.hidden_depth, n=2)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        x = torch.cat([obs, action], dim=-1)
        return self.net(x.unsqueeze(0).expand(2, -1, -1)).squeeze(-1)


class SAC:
    """One SAC agent. ``parameters()`` are the actor's: the lower-level variable of the bilevel solver."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig, device: str = "cpu") -> None:
        self.cfg, self.obs_dim, self.act_dim, self.device = cfg, obs_dim, act_dim, torch.device(device)
        self.actor = Actor(obs_dim, act_dim, cfg).to(self.device)
        self.critic = DoubleQ(obs_dim, act_dim, cfg).to(self.device)
        self.critic_target = DoubleQ(obs_dim, act_dim, cfg).to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr, fused=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, fused=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.num_updates = 0

    # -------------------------------------------------------------- the lower-level variable
    def parameters(self) -> Iterator[nn.Parameter]:
        return self.actor.parameters()

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    @torch.no_grad()
    def act(self, obs: Any, deterministic: bool = False) -> Any:
        """Action for one numpy observation (``deterministic``: the mean action ``tanh(μ)``)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device).unsqueeze(0)
        a = self.actor.mode(o) if deterministic else self.actor.sample(o)[0]
        return a.squeeze(0).cpu().numpy()

    # -------------------------------------------------------------- SAC steps
    def update_critic(self, batch: dict[str, Tensor], reward: Tensor | None = None) -> float:
        """One Adam step on L_Q; ``reward`` overrides ``batch["reward"]`` (state-entropy pre-training)."""
        r = batch["reward"] if reward is None else reward
        with torch.no_grad():
            next_action, next_logp = self.actor.sample(batch["next_obs"])
            target_v = (
                self.critic_target(batch["next_obs"], next_action).min(0).values - self.alpha * next_logp
            )
            target_q = r + batch["not_done"] * self.cfg.gamma * target_v
        q = self.critic(batch["obs"], batch["action"])
        loss = F.mse_loss(q[0], target_q) + F.mse_loss(q[1], target_q)
        self.critic_optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):  # a NaN reward, observation or weight reaches L_Q first: stop here
            raise FloatingPointError(
                f"SAC critic loss is {value} at update {self.num_updates}: a reward, an observation or a "
                "network weight is not finite"
            )
        loss.backward(inputs=list(self.critic.parameters()))
        self.critic_optimizer.step()
        return value

    def actor_loss(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_π, log π(ã|s))``; the critic is only read (gradients flow to the actor only)."""
        action, logp = self.actor.sample(obs)
        q = self.critic(obs, action).min(0).values
        return (self.alpha.detach() * logp - q).mean(), logp

    def update_alpha(self, logp: Tensor) -> None:
        loss = (self.alpha * (-logp.detach() - self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[self.log_alpha])
        self.alpha_optimizer.step()

    def update_target(self) -> None:
        self.num_updates += 1
        if self.num_updates % self.cfg.target_every == 0:
            with torch.no_grad():
                torch._foreach_lerp_(
                    list(self.critic_target.parameters()), list(self.critic.parameters()), self.cfg.tau
                )

    def oracle_loss(self, batch: dict[str, Tensor], reward: Tensor | None = None) -> Tensor:
        """Critic, temperature and target steps, then the actor loss (the policy-gradient oracle, eq. 12).

        The caller takes the actor's optimiser step on the returned loss (the solver does this for y, z).
        """
        self.update_critic(batch, reward)
        loss, logp = self.actor_loss(batch["obs"])
        self.update_alpha(logp)
        self.update_target()
        return loss

    def update(self, batch: dict[str, Tensor], reward: Tensor | None = None) -> float:
        """One full SAC update (critic, actor, temperature, target)."""
        loss = self.oracle_loss(batch, reward)
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.actor.parameters()))
        self.actor_optimizer.step()
        return loss.item()

    def reset_critic(self) -> None:
        """PEBBLE's critic reset after the first feedback session (new Q, Q̄ and critic optimiser)."""
        fresh = DoubleQ(self.obs_dim, self.act_dim, self.cfg).to(self.device)
        self.critic.load_state_dict(fresh.state_dict())
        self.critic_target.load_state_dict(fresh.state_dict())
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.lr, fused=True)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)  # torch optimisers would otherwise share the state tensors given
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.num_updates = state["num_updates"]
