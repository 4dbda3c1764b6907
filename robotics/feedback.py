"""One PEBBLE feedback session: query, label, train the reward ensemble, relabel the replay buffer.

    1. pick ``reward_batch`` segment pairs (uniformly at the first session, then by disagreement);
    2. the scripted teacher labels them (some may be skipped: they still count against the budget);
    3. train the ensemble for up to ``reward_update`` epochs over *all* labelled pairs, stopping once
       the mean training accuracy of the members exceeds 97%;
    4. rewrite every reward in the replay buffer with the new ``r̂`` (done by the caller).

Step 3's minibatch update is the learner's ``reward_step`` (a plain Adam step for PEBBLE, the solver's
upper step for bilevel PEBBLE), so this module is shared by both methods.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from robotics.queries import EpisodeStore, PreferenceBuffer, select_queries
from robotics.reward_model import RewardEnsemble, epoch_indices
from robotics.teacher import Teacher

RewardStep = Callable[[np.ndarray], tuple[dict[str, float], torch.Tensor]]
"""``reward_step(idx [M, b]) -> (diagnostics, correct [M, b])``: one update of the ensemble on those pairs."""


def train_reward(
    prefs: PreferenceBuffer,
    members: int,
    batch_size: int,
    epochs: int,
    reward_step: RewardStep,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Up to ``epochs`` epochs of ``reward_step`` (B-Pref's ``train_reward``, early stop at 97% accuracy)."""
    stats: dict[str, float] = {"reward_epochs": 0, "reward_acc": 0.0}
    for epoch in range(epochs):
        correct = np.zeros(members)
        for idx in epoch_indices(prefs.size, members, batch_size, rng):
            diag, c = reward_step(idx)
            correct += c.float().sum(1).cpu().numpy()
            stats.update(diag)
        stats["reward_acc"], stats["reward_epochs"] = float(np.mean(correct / prefs.size)), epoch + 1
        if stats["reward_acc"] > 0.97:
            break
    return stats


def feedback_session(
    store: EpisodeStore,
    prefs: PreferenceBuffer,
    ensemble: RewardEnsemble,
    teacher: Teacher,
    n_queries: int,
    segment: int,
    mode: str,
    large_batch: int,
    epochs: int,
    batch_size: int,
    reward_step: RewardStep,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Steps 1-3 above; returns the number of labels obtained and the training diagnostics."""
    sa0, sa1, r0, r1 = select_queries(store, ensemble, n_queries, segment, rng, mode, large_batch)
    kept, labels = teacher.label(r0, r1, rng)
    prefs.add(sa0[kept], sa1[kept], labels)
    stats: dict[str, float] = {"queries": n_queries, "labelled": len(kept)}
    if prefs.size > 0:
        stats.update(train_reward(prefs, ensemble.members, batch_size, epochs, reward_step, rng))
    return stats
