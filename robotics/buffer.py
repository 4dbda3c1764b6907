"""The replay buffer of SAC transitions, whose rewards PEBBLE rewrites with r_x after each reward update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ReplayBuffer:
    """Transitions ``(s, a, r̂, s', 1 - terminated)`` in preallocated float32 arrays.

    ``r̂`` is the learned reward at insertion time; ``relabel`` recomputes it for every stored
    transition (PEBBLE: ``relabel_with_predictor``). ``terminated`` is never set by the two tasks
    (their episodes end by time limit), so SAC bootstraps through episode ends as B-Pref does.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, seed: int = 0, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.capacity, self.size, self.idx = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.not_done = np.ones(capacity, np.float32)
        self.rng = np.random.default_rng(seed)

    def add(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool
    ) -> None:
        i = self.idx
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i] = obs, action, reward, next_obs
        self.not_done[i] = 0.0 if terminated else 1.0
        self.idx = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        i = self.rng.integers(0, self.size, batch_size)
        return {
            "obs": torch.from_numpy(self.obs[i]).to(self.device),
            "action": torch.from_numpy(self.action[i]).to(self.device),
            "reward": torch.from_numpy(self.reward[i]).to(self.device),
            "next_obs": torch.from_numpy(self.next_obs[i]).to(self.device),
            "not_done": torch.from_numpy(self.not_done[i]).to(self.device),
        }

    def all_obs(self) -> Tensor:
        """Every stored state (the kNN pool of the state-entropy reward)."""
        return torch.from_numpy(self.obs[: self.size]).to(self.device)

    @torch.no_grad()
    def relabel(self, reward_fn: Callable[[Tensor], Tensor], chunk: int = 4096) -> None:
        """``r̂_i ← reward_fn([s_i, a_i])`` for every stored transition."""
        for start in range(0, self.size, chunk):
            end = min(start + chunk, self.size)
            sa = torch.from_numpy(np.concatenate([self.obs[start:end], self.action[start:end]], axis=1))
            self.reward[start:end] = reward_fn(sa.to(self.device)).cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {
            "size": n,
            "idx": self.idx,
            "rng": self.rng.bit_generator.state,
            "obs": self.obs[:n].copy(),
            "next_obs": self.next_obs[:n].copy(),
            "action": self.action[:n].copy(),
            "reward": self.reward[:n].copy(),
            "not_done": self.not_done[:n].copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.size = state["size"]
        self.idx = state["idx"]
        self.rng.bit_generator.state = state["rng"]
        for k in ["obs", "next_obs", "action", "reward", "not_done"]:
            getattr(self, k)[:n] = state[k]
