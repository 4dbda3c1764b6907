"""Throughput of each robotics preset on this machine (one torch thread), and the projected run time.

    OMP_NUM_THREADS=1 python benchmarks/robotics_preset_speed.py [--presets reduced full] [--rl-steps 300]

For each preset x task x method: fill one episode of random steps, hold the first feedback session
(timed: uniform queries, reward training, relabelling, critic reset + extra updates), time ``--rl-steps``
environment steps of the RL phase (one SAC update per step for PEBBLE, one solver inner step, i.e. two
SAC updates plus the f/λ term, for bilevel PEBBLE), one later feedback session (disagreement) and one
evaluation (the preset's episodes; y and z for bilevel). Projected hours = RL steps / steps-per-second
+ sessions x session time + evaluations x evaluation time (pre-training is counted at the RL rate).
"""

from __future__ import annotations

import argparse
import time

import torch

from robotics.config import make_config
from robotics.envs import episode_seed
from robotics.train import Trainer


def measure(preset: str, env: str, method: str, rl_steps: int) -> dict[str, float]:
    base = make_config(env, method, preset)
    T = {"walker_walk": 1000, "door_open": 500}[env]
    cfg = make_config(env, method, preset, seed_steps=T, unsup_steps=0)
    tr = Trainer(cfg)
    obs, _ = tr.env.reset(seed=episode_seed(0, 0))
    for _ in range(T):  # random seed steps: one complete episode
        obs, *_ = tr.env_step(obs)
    tr.recent_returns.append(0.0)
    obs, _ = tr.env.reset(seed=episode_seed(0, 1))
    t = time.perf_counter()
    obs, *_ = tr.env_step(obs)  # this step holds the first session
    first_session = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(rl_steps):
        obs, _, term, trunc, _ = tr.env_step(obs)
        if term or trunc:
            obs, _ = tr.env.reset(seed=episode_seed(0, 2))
    sps = rl_steps / (time.perf_counter() - t)
    t = time.perf_counter()
    tr._session(first=False)
    session = time.perf_counter() - t
    t = time.perf_counter()
    tr.evaluate()
    evaluation = time.perf_counter() - t
    hours = (
        (base.steps - base.seed_steps) / sps
        + base.sessions * session
        + first_session
        + base.steps / base.eval_every * evaluation
    ) / 3600
    return dict(sps=sps, first_session_s=first_session, session_s=session, eval_s=evaluation, hours=hours)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["smoke", "reduced", "full"])
    p.add_argument("--envs", nargs="+", default=["walker_walk", "door_open"])
    p.add_argument("--methods", nargs="+", default=["pebble", "brl"])
    p.add_argument("--rl-steps", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| preset | task | method | RL steps/s | 1st session s | session s | eval s | projected h / seed |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for env in args.envs:
            for method in args.methods:
                n = (
                    args.rl_steps
                    if preset != "full" or env != "walker_walk"
                    else max(10, args.rl_steps // 15)
                )
                m = measure(preset, env, method, n)
                print(
                    f"| {preset} | {env} | {method} | {m['sps']:.1f} | {m['first_session_s']:.1f} | "
                    f"{m['session_s']:.1f} | {m['eval_s']:.1f} | {m['hours']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
