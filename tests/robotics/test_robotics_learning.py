"""Slow: SAC learns walker_walk from the true reward (run with ``pytest -m slow``; ~8 min on one thread)."""

import numpy as np
import pytest

pytest.importorskip("dm_control")

import torch  # noqa: E402

from robotics.buffer import ReplayBuffer  # noqa: E402
from robotics.envs import episode_seed, make_env  # noqa: E402
from robotics.sac import SAC, SACConfig  # noqa: E402


def _evaluate(agent, env, episodes=3):
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=episode_seed(0, k, stream=1))
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(agent.act(obs, deterministic=True))
            total, done = total + r, term or trunc
        returns.append(total)
    return float(np.mean(returns))


@pytest.mark.slow
def test_sac_learns_walker_walk_from_the_true_reward():
    """Measured: eval return 29 at 5k steps, 208 at 30k (a random policy gets ~30)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    env, eval_env = make_env("walker_walk"), make_env("walker_walk")
    agent = SAC(24, 6, SACConfig(hidden_dim=256, hidden_depth=2, batch_size=512, lr=5e-4))
    buf, rng = ReplayBuffer(24, 6, 30_000), np.random.default_rng(0)
    step, episode = 0, 0
    while step < 30_000:
        obs, _ = env.reset(seed=episode_seed(0, episode))
        episode, done = episode + 1, False
        while not done:
            action = rng.uniform(-1, 1, 6).astype(np.float32) if step < 1000 else agent.act(obs)
            if step >= 1000:
                agent.update(buf.sample(512))
            next_obs, r, term, trunc, _ = env.step(action)
            buf.add(obs, action, r, next_obs, term)
            obs, step, done = next_obs, step + 1, term or trunc
    assert _evaluate(agent, eval_env) > 120.0
