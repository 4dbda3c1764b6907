"""Time one SAC update (sample a batch, critic, actor, temperature, target) of robotics.sac against
stable-baselines3's SAC with the same networks, batch and replay data, on one CPU thread, in one run.

    OMP_NUM_THREADS=1 python benchmarks/robotics_sac_speed.py [--updates 20] [--configs walker door small]

Prints the median milliseconds per update of each and the ratio SB3 / ours (> 1: ours is faster). The
implementations are timed alternately, update by update, so that load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from robotics.buffer import ReplayBuffer
from robotics.sac import SAC, SACConfig

CONFIGS = {  # name: (obs_dim, act_dim, hidden_dim, hidden_depth, batch)
    "walker": (24, 6, 1024, 2, 1024),  # B-Pref's DMC setting
    "door": (39, 4, 256, 3, 512),  # B-Pref's Meta-World setting
    "small": (24, 6, 256, 2, 512),  # the reduced walker preset
}


class _Dummy(gym.Env):
    def __init__(self, obs_dim: int, act_dim: int) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        return np.zeros(self.observation_space.shape, np.float32), 0.0, False, False, {}


def _data(n: int, obs_dim: int, act_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "next_obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "action": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "reward": rng.uniform(0, 1, n).astype(np.float32),
    }


class FullBackwardSAC(SAC):
    """Ablation: the actor loss back-propagates into the critic's weights too (as SB3's ``backward()``)."""

    def update(self, batch, reward=None):
        loss = self.oracle_loss(batch, reward)
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optimizer.step()
        return loss.item()


def ours(obs_dim: int, act_dim: int, hidden: int, depth: int, batch: int, data: dict, variant: str = ""):
    cfg = SACConfig(hidden_dim=hidden, hidden_depth=depth, batch_size=batch, lr=3e-4)
    agent = (FullBackwardSAC if variant == "full_backward" else SAC)(obs_dim, act_dim, cfg)
    if variant == "unfused_adam":
        agent.actor_optimizer = torch.optim.Adam(agent.actor.parameters(), lr=3e-4)
        agent.critic_optimizer = torch.optim.Adam(agent.critic.parameters(), lr=3e-4)
    buf = ReplayBuffer(obs_dim, act_dim, len(data["obs"]))
    n = len(data["obs"])
    buf.obs[:], buf.next_obs[:], buf.action[:], buf.reward[:] = (
        data["obs"],
        data["next_obs"],
        data["action"],
        data["reward"],
    )
    buf.size = n
    return lambda: agent.update(buf.sample(batch))


def sb3(obs_dim: int, act_dim: int, hidden: int, depth: int, batch: int, data: dict):
    from stable_baselines3 import SAC as SB3SAC

    n = len(data["obs"])
    model = SB3SAC(
        "MlpPolicy",
        _Dummy(obs_dim, act_dim),
        learning_rate=3e-4,
        buffer_size=n,
        batch_size=batch,
        learning_starts=0,
        tau=0.005,
        gamma=0.99,
        ent_coef="auto_0.1",
        target_update_interval=2,
        policy_kwargs=dict(net_arch=[hidden] * depth),
        device="cpu",
        seed=0,
    )
    rb = model.replay_buffer
    rb.observations[:, 0], rb.next_observations[:, 0] = data["obs"], data["next_obs"]
    rb.actions[:, 0], rb.rewards[:, 0] = data["action"], data["reward"]
    rb.pos, rb.full = 0, True
    model._logger = __import__("stable_baselines3.common.logger", fromlist=["x"]).configure(None, ["csv"])
    return lambda: model.train(gradient_steps=1, batch_size=batch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=20, help="timed updates per implementation and config")
    p.add_argument("--blocks", type=int, default=0, help="alternation blocks (0: alternate every update)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--ablations", action="store_true", help="also time ours without each speed-up")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    for name in args.configs:
        o, a, h, d, b = CONFIGS[name]
        data = _data(20_000, o, a)
        fns = {"ours": ours(o, a, h, d, b, data), "sb3": sb3(o, a, h, d, b, data)}
        if args.ablations:
            for v in ("full_backward", "unfused_adam"):
                fns[v] = ours(o, a, h, d, b, data, v)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            for _ in range(3):
                fn()
        blocks = args.blocks or args.updates
        per_block = max(1, args.updates // blocks)
        for _ in range(blocks):
            for k, fn in fns.items():
                for _ in range(per_block):
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"{name:7s} {d}x{h} batch {b}: ours {ms['ours']:8.2f} ms  sb3 {ms['sb3']:8.2f} ms  "
            f"sb3/ours = {ms['sb3'] / ms['ours']:.2f}"
        )
        for v in ("full_backward", "unfused_adam"):
            if v in ms:
                print(f"        ours without one speed-up ({v}): {ms[v]:8.2f} ms")


if __name__ == "__main__":
    main()
