"""Bilevel PEBBLE: PEBBLE's reward learning as the upper level of Algorithm 1 (``brlhf.core``).

Variables (ALGORITHM.md §5.3): ``x`` = the reward ensemble ``r_x`` (members r_m); ``z`` = a SAC agent
on ``r_x`` (plain PEBBLE); ``y`` = a SAC agent whose actor loss adds ``f/λ``. ``y`` collects the
environment data and the query segments; both learn off-policy from the same relabelled buffer.

* ``g(x, w)`` (eq. 12): SAC's actor loss of agent ``w``, after that agent's own critic, temperature and
  target steps on the batch (they are the estimator of the policy gradient).
* ``g_x(x, w) = -Σ_m mean_s r_m(s, a)``, ``a ~ π_w(·|s)``, ``s`` from the replay batch (eq. 11: its
  gradient in ``x`` is ``-E_{π_w} ∇_x r_x``; same states and noise for ``y`` and ``z``: common random
  numbers). The logged value gap is ``(g_x(y) - g_x(z)) / M``, in units of ``r̂``.
* ``f(x, y)`` (eq. 13): PEBBLE's Bradley-Terry loss ``Σ_m mean_n CE_m`` on labelled pairs. Its gradient in
  ``y`` is the score-function term ``mean_n (ℓ_n - b) ∇_y [log π_y(σ⁰_n) + log π_y(σ¹_n)]`` with
  ``ℓ_n = Σ_m CE_m(n)``, ``b = mean_n ℓ_n`` and ``log π_y(σ) = Σ_t log π_y(a_t|s_t)``, on ``f_pairs``
  random labelled pairs per ``y`` step (the pairs were collected by earlier ``y`` iterates: no
  importance weights; instead actions more than ``score_trust`` σ away from y's current mean give no
  gradient, and tanh-saturated action dimensions count as censored, see ``Actor.log_prob``). The ``ℓ_n``
  of all labelled pairs are cached between x steps. Once every label is spent (one interval after the
  last session) the term is off (``labels_spent``): x no longer moves, the pairs only grow staler, and
  y solves ``min_y g(x, y)``.

One outer step of Algorithm 1 is one feedback session: between sessions ``solver.inner_step()`` runs
once per environment step (K = ``num_interact``); at the session the ensemble takes one
``solver.upper_step()`` per minibatch of PEBBLE's reward training (up to ``reward_update`` epochs),
i.e. ``x ← x - η ∇_x[f + λ (g_x(y) - g_x(z))]``: PEBBLE's preference loss plus
``λ (Σ_m mean r_m on z's actions - Σ_m mean r_m on y's actions)``. With ``keep_better_pure`` (the
solver's z ← y guard, on by default) a reward step that measures ``g_x(y) < g_x(z)`` drops that penalty
term and copies the whole agent y into z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from brlhf.core import PenaltyConfig, PenaltySolver
from robotics.buffer import ReplayBuffer
from robotics.queries import PreferenceBuffer
from robotics.reward_model import RewardEnsemble
from robotics.sac import SAC, SACConfig


@dataclass
class PairBatch:
    """Indices of labelled pairs: ``[M, b]`` per-member minibatches (x step) or ``[b]`` shared (y step)."""

    idx: np.ndarray
    for_x: bool


class BilevelLearner:
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        sac: SACConfig,
        ensemble: RewardEnsemble,
        reward_optimizer: torch.optim.Optimizer,
        buffer: ReplayBuffer,
        prefs: PreferenceBuffer,
        lam: float,
        f_pairs: int,
        seed: int = 0,
        penalised_upper_grad: bool = True,
        score_trust: float | None = 3.0,
        keep_better_pure: bool = True,
    ) -> None:
        self.y, self.z = SAC(obs_dim, act_dim, sac, buffer.device), SAC(obs_dim, act_dim, sac, buffer.device)
        self.z.load_state_dict(self.y.state_dict())  # y0 = z0
        self.ensemble, self.buffer, self.prefs, self.f_pairs = ensemble, buffer, prefs, f_pairs
        self.trust = score_trust
        self.score_term = True  # ∇_y f on; off once every label is spent (``labels_spent``)
        self.rng = np.random.default_rng([seed, 7])
        self._pending: np.ndarray | None = None
        self._correct: Tensor | None = None
        self._ell: Tensor | None = None  # cached per-pair losses under the current x
        self.last_upper: dict[str, float] = {}
        self.solver = PenaltySolver(
            upper=ensemble,
            penalised=self.y,
            pure=self.z,
            upper_loss=self.f,
            lower_loss=self.g,
            lower_loss_x=self.g_x,
            upper_optimizer=reward_optimizer,
            penalised_optimizer=self.y.actor_optimizer,
            pure_optimizer=self.z.actor_optimizer,
            config=PenaltyConfig(
                lam=lam,
                penalised_upper_grad=penalised_upper_grad,
                common_random_numbers=True,
                keep_better_pure=keep_better_pure,
            ),
            upper_batches=self._pair_batch,
            lower_batches=lambda: buffer.sample(sac.batch_size),
        )

    # -------------------------------------------------------------- the three closures
    def g(self, agent: SAC, batch: dict[str, Tensor]) -> Tensor:
        return agent.oracle_loss(batch)

    def g_x(self, agent: SAC, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            action, _ = agent.actor.sample(batch["obs"])
        return -self.ensemble.member_rewards(torch.cat([batch["obs"], action], -1)).mean(-1).sum()

    def f(self, agent: SAC, batch: PairBatch | None) -> Tensor:
        if batch is None:  # no labelled pair yet
            return torch.zeros((), device=self.prefs.device)
        seg0, seg1, target = self.prefs.batch(batch.idx)
        if batch.for_x:  # the x step: PEBBLE's loss on per-member minibatches
            loss, self._correct = self.ensemble.preference_loss(seg0, seg1, target)
            return loss
        # the y step: only ∇_y f is used, its value is the mean loss of the pairs
        ell = self._pair_losses()[torch.from_numpy(batch.idx).to(self.prefs.device)]
        d = self.y.obs_dim
        logp = sum(agent.actor.log_prob(s[..., :d], s[..., d:], self.trust).sum(-1) for s in (seg0, seg1))
        return ell.mean() + ((ell - ell.mean()) * (logp - logp.detach())).mean()

    @torch.no_grad()
    def _pair_losses(self) -> Tensor:
        """``ℓ_n = Σ_m CE_m(n)`` of every labelled pair; cached, since x only moves at the sessions."""
        if self._ell is None or len(self._ell) != self.prefs.size:
            idx = np.arange(self.prefs.size)
            self._ell = torch.cat(
                [
                    self.ensemble.pair_losses(*self.prefs.batch(idx[i : i + 256]))[0].sum(0)
                    for i in range(0, len(idx), 256)
                ]
            )
        return self._ell

    def _pair_batch(self) -> PairBatch | None:
        if self._pending is not None:
            return PairBatch(self._pending, for_x=True)
        if self.prefs.size == 0 or not self.score_term:
            return None
        return PairBatch(self.rng.integers(0, self.prefs.size, self.f_pairs), for_x=False)

    # -------------------------------------------------------------- the learner interface
    @property
    def behaviour(self) -> SAC:
        return self.y

    def eval_agents(self) -> dict[str, SAC]:
        return {"": self.y, "z_": self.z}

    def unsup_update(self, batch: dict[str, Tensor], reward: Tensor) -> None:
        """Pre-training trains ``y`` only; ``z`` starts from it at the first session (y0 = z0)."""
        self.y.update(batch, reward)

    def start_feedback(self) -> None:
        self.z.load_state_dict(self.y.state_dict())

    def labels_spent(self, keep_score_term: bool) -> None:
        """Called every step once the last session's interval is over. x no longer moves, so without
        the ``f/λ`` term (stale pairs) y solves the same ``min_y g(x, y)`` as z."""
        self.score_term = keep_score_term

    def reset_critics(self) -> None:
        """One fresh critic for both (at the first session y = z, so that y0 = z0 still holds after it)."""
        self.y.reset_critic()
        self.z.load_state_dict(self.y.state_dict())

    def rl_update(self) -> dict[str, float]:
        return self.solver.inner_step()

    def reward_step(self, idx: np.ndarray) -> tuple[dict[str, float], Tensor]:
        self._pending, self._ell = idx, None
        try:
            self.last_upper = self.solver.upper_step()
        finally:
            self._pending = None
        diag = {
            "reward_loss": self.last_upper["upper_loss"],
            "value_gap": self.last_upper["value_gap"] / self.ensemble.members,
            "proxy_grad_norm": self.last_upper["proxy_grad_norm"],
            "pure_restarts": self.last_upper["pure_restarts"],
        }
        return diag, self._correct

    def state_dict(self) -> dict[str, Any]:
        return {
            "y": self.y.state_dict(),
            "z": self.z.state_dict(),
            "rng": self.rng.bit_generator.state,
            "outer_step": self.solver.outer_step,
            "inner_step": self.solver.inner_step_count,
            "pure_restarts": self.solver.pure_restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.y.load_state_dict(state["y"])
        self.z.load_state_dict(state["z"])
        self.rng.bit_generator.state = state["rng"]
        self._ell = None
        self.solver.outer_step, self.solver.inner_step_count = state["outer_step"], state["inner_step"]
        self.solver.pure_restarts = state.get("pure_restarts", 0)
