"""Replay buffer relabelling and the state-entropy reward."""

import numpy as np
import torch

from robotics.buffer import ReplayBuffer
from robotics.entropy import RunningMeanStd, knn_distance, state_entropy_reward


def test_relabel_rewrites_every_stored_reward():
    buf = ReplayBuffer(3, 2, capacity=10_000, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(9_001):  # not a multiple of the chunk size
        buf.add(rng.normal(size=3), rng.uniform(-1, 1, 2), -123.0, rng.normal(size=3), False)
    buf.relabel(lambda sa: sa[:, 0] * 2 + sa[:, 4], chunk=1000)
    expected = buf.obs[:9001, 0] * 2 + buf.action[:9001, 1]
    np.testing.assert_allclose(buf.reward[:9001], expected, rtol=1e-6)
    assert not np.any(buf.reward[:9001] == -123.0)
    assert np.all(buf.reward[9001:] == 0.0)  # nothing written past the stored transitions


def test_buffer_wraps_and_samples_stored_transitions():
    buf = ReplayBuffer(1, 1, capacity=5, seed=0)
    for i in range(8):
        buf.add(np.array([i]), np.array([0.0]), float(i), np.array([i + 1]), i == 7)
    assert buf.size == 5 and sorted(buf.reward.tolist()) == [3, 4, 5, 6, 7]
    b = buf.sample(100)
    assert set(b["reward"].tolist()) <= {3.0, 4.0, 5.0, 6.0, 7.0}
    np.testing.assert_array_equal(b["next_obs"][:, 0], b["obs"][:, 0] + 1)
    np.testing.assert_array_equal(b["not_done"], (b["reward"] != 7).float())


def test_knn_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(700, 5)).astype(np.float32)
    obs = pool[rng.choice(700, 64, replace=False)]
    d = knn_distance(torch.from_numpy(obs), torch.from_numpy(pool), k=5, chunk=128).numpy()
    brute = np.sort(np.linalg.norm(obs[:, None] - pool[None], axis=-1), axis=1)[:, 5]  # index 0 is itself
    np.testing.assert_allclose(d, brute, rtol=1e-5)


def test_running_std_and_normalised_entropy_reward():
    rng = np.random.default_rng(1)
    stats, xs = RunningMeanStd(), []
    for _ in range(50):
        x = rng.normal(3.0, 2.0, 256)
        xs.append(x)
        stats.update(torch.from_numpy(x))
    allx = np.concatenate(xs)
    assert abs(stats.mean - allx.mean()) < 1e-3 and abs(stats.std - allx.std()) < 1e-2
    pool = torch.from_numpy(rng.normal(size=(300, 4)).astype(np.float32))
    s = RunningMeanStd()
    r = state_entropy_reward(pool[:32], pool, s, k=5)
    np.testing.assert_allclose(r.numpy(), knn_distance(pool[:32], pool, 5).numpy() / s.std, rtol=1e-6)
