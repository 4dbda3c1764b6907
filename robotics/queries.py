"""Where PEBBLE's queries come from and where the labelled ones go.

* ``EpisodeStore``: ``(s, a)`` and true rewards of the last 100 complete episodes (B-Pref's
  ``max_size``), fixed-length, so that segments are slices of one ``[E, T, D]`` array.
* ``sample_segments``: N pairs ``(σ⁰, σ¹)`` of H-step segments: episodes drawn uniformly with
  replacement, each segment's start uniform in ``[0, T - H)`` (B-Pref's ``get_queries``).
* ``select_queries``: *uniform* keeps N such pairs; *disagreement* draws ``large_batch · N`` candidates
  and keeps the N with the largest std over ensemble members of ``P_m(σ⁰ ≻ σ¹)``.
* ``PreferenceBuffer``: the labelled pairs (capacity = the label budget).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from robotics.reward_model import RewardEnsemble


class EpisodeStore:
    def __init__(self, sa_dim: int, episode_length: int, max_episodes: int = 100) -> None:
        self.sa_dim, self.T, self.max_episodes = sa_dim, episode_length, max_episodes
        self.sa = np.zeros((max_episodes, episode_length, sa_dim), np.float32)
        self.reward = np.zeros((max_episodes, episode_length), np.float32)
        self.count = 0  # complete episodes stored (≤ max_episodes), ring order does not matter
        self.next, self.t = 0, 0
        self._sa = np.zeros((episode_length, sa_dim), np.float32)
        self._r = np.zeros(episode_length, np.float32)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float) -> None:
        """One step of the running episode; the episode is stored when it reaches ``T`` steps."""
        self._sa[self.t, : len(obs)], self._sa[self.t, len(obs) :], self._r[self.t] = obs, action, reward
        self.t += 1
        if self.t == self.T:
            self.sa[self.next], self.reward[self.next] = self._sa, self._r
            self.next = (self.next + 1) % self.max_episodes
            self.count = min(self.count + 1, self.max_episodes)
            self.t = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "sa": self.sa[: self.count].copy(),
            "reward": self.reward[: self.count].copy(),
            "count": self.count,
            "next": self.next,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.count, self.next, self.t = s["count"], s["next"], 0
        self.sa[: self.count], self.reward[: self.count] = s["sa"], s["reward"]


def sample_segments(
    store: EpisodeStore, n: int, segment: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(sa0, sa1, r0, r1)``: ``n`` random segment pairs, ``sa [n, H, D]``, ``r [n, H]``."""
    if store.count == 0:
        raise RuntimeError("no complete episode to draw query segments from")
    out = []
    for _ in range(2):
        ep = rng.integers(0, store.count, n)
        start = rng.integers(0, store.T - segment, n) if segment < store.T else np.zeros(n, np.int64)
        t = start[:, None] + np.arange(segment)[None, :]
        out.append((store.sa[ep[:, None], t], store.reward[ep[:, None], t]))
    (sa0, r0), (sa1, r1) = out
    return sa0, sa1, r0, r1


def select_queries(
    store: EpisodeStore,
    ensemble: RewardEnsemble,
    n: int,
    segment: int,
    rng: np.random.Generator,
    mode: str = "disagreement",
    large_batch: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` pairs to ask the teacher about, chosen ``uniform``-ly or by ensemble ``disagreement``."""
    if mode == "uniform":
        return sample_segments(store, n, segment, rng)
    if mode != "disagreement":
        raise ValueError(f"unknown query selection {mode!r}")
    sa0, sa1, r0, r1 = sample_segments(store, n * large_batch, segment, rng)
    dev = next(ensemble.parameters()).device
    std = ensemble.preference_std(torch.from_numpy(sa0).to(dev), torch.from_numpy(sa1).to(dev)).cpu().numpy()
    top = np.argsort(-std, kind="stable")[:n]
    return sa0[top], sa1[top], r0[top], r1[top]


class PreferenceBuffer:
    def __init__(self, capacity: int, segment: int, sa_dim: int, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.seg0 = np.zeros((capacity, segment, sa_dim), np.float32)
        self.seg1 = np.zeros((capacity, segment, sa_dim), np.float32)
        self.label = np.zeros(capacity, np.int64)
        self.size = 0

    def add(self, seg0: np.ndarray, seg1: np.ndarray, label: np.ndarray) -> None:
        n = min(len(label), len(self.label) - self.size)
        self.seg0[self.size : self.size + n], self.seg1[self.size : self.size + n] = seg0[:n], seg1[:n]
        self.label[self.size : self.size + n] = label[:n]
        self.size += n

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(σ⁰, σ¹, target)`` for index array ``idx`` (any shape); target P(σ¹ ≻ σ⁰): 1, 0 or ½ (equal)."""
        label = self.label[idx]
        target = np.where(label < 0, 0.5, label).astype(np.float32)
        seg0, seg1 = torch.from_numpy(self.seg0[idx]), torch.from_numpy(self.seg1[idx])
        return seg0.to(self.device), seg1.to(self.device), torch.from_numpy(target).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"seg0": self.seg0[:n].copy(), "seg1": self.seg1[:n].copy(), "label": self.label[:n].copy()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.size = len(s["label"])
        self.seg0[: self.size], self.seg1[: self.size], self.label[: self.size] = (
            s["seg0"],
            s["seg1"],
            s["label"],
        )
