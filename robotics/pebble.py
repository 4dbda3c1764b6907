"""PEBBLE's learner (Lee, Smith, Abbeel 2021): one SAC agent trained on the learned reward ``r̂``.

The environment loop, the schedule and the feedback sessions live in ``robotics.train`` and
``robotics.feedback``; a learner only says how the policy and the reward model are updated, so that
PEBBLE and bilevel PEBBLE (``robotics.bilevel``) share everything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from robotics.buffer import ReplayBuffer
from robotics.queries import PreferenceBuffer
from robotics.reward_model import RewardEnsemble
from robotics.sac import SAC, SACConfig


class PebbleLearner:
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        sac: SACConfig,
        ensemble: RewardEnsemble,
        reward_optimizer: torch.optim.Optimizer,
        buffer: ReplayBuffer,
        prefs: PreferenceBuffer,
    ) -> None:
        self.agent = SAC(obs_dim, act_dim, sac, buffer.device)
        self.ensemble, self.reward_optimizer, self.buffer, self.prefs = (
            ensemble,
            reward_optimizer,
            buffer,
            prefs,
        )

    @property
    def behaviour(self) -> SAC:
        """The agent that acts in the environment (and is evaluated)."""
        return self.agent

    def eval_agents(self) -> dict[str, SAC]:
        return {"": self.agent}

    def unsup_update(self, batch: dict[str, torch.Tensor], reward: torch.Tensor) -> None:
        """A SAC step on the state-entropy reward (pre-training)."""
        self.agent.update(batch, reward)

    def start_feedback(self) -> None:
        """Called once, at the first feedback session, before the reward is learned."""

    def labels_spent(self, keep_score_term: bool) -> None:
        """Every label is spent and the last session's interval is over: nothing changes for PEBBLE."""

    def reset_critics(self) -> None:
        self.agent.reset_critic()

    def rl_update(self) -> dict[str, float]:
        self.agent.update(self.buffer.sample(self.agent.cfg.batch_size))
        return {}

    def reward_step(self, idx: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
        """One Adam step of the ensemble on labelled pairs ``idx [M, b]`` (PEBBLE's preference loss)."""
        loss, correct = self.ensemble.preference_loss(*self.prefs.batch(idx))
        self.reward_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.reward_optimizer.step()
        return {"reward_loss": loss.item()}, correct

    def state_dict(self) -> dict[str, Any]:
        return {"agent": self.agent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
