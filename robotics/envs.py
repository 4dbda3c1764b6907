"""The two tasks of the paper as gymnasium environments with flat float32 state observations.

* ``walker_walk``: DeepMind Control's walker/walk, as ``dmc2gym`` (used by B-Pref) exposes it: the
  observation dict (orientations 14, height 1, velocity 9) flattened to 24 numbers, 6 actions in
  [-1, 1], 1000 steps per episode, reward r_t ∈ [0, 1]. The episode ends by time limit only
  (``truncated``), never ``terminated``: SAC bootstraps through it.
* ``door_open``: Meta-World's ``SawyerDoorEnvV3`` built the way B-Pref's ``make_metaworld_env`` did
  (``_freeze_rand_vec = False``, ``_set_task_called = True``): a new door position drawn at every
  reset, goal hidden (``_partially_observable``: the last 3 of the 39 numbers are zeros), 4 actions,
  500 steps, reward r_t ∈ [0, 10], ``info["success"]``. ``gym.make("Meta-World/MT1", ...)`` instead
  cycles through 50 fixed positions and shows the goal.

Every ``reset(seed=s)`` reseeds the task's random draws, so that an episode is a function of its seed
(the trainer seeds each episode; this is what makes checkpoints resume exactly).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # state observations only; avoids GLFW's X11 warning

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class TaskSpec:
    name: str
    obs_dim: int
    act_dim: int
    episode_length: int
    metric: str  # "return" (true episode return) or "success" (% of episodes with a success)


TASKS: dict[str, TaskSpec] = {
    "walker_walk": TaskSpec("walker_walk", 24, 6, 1000, "return"),
    "door_open": TaskSpec("door_open", 39, 4, 500, "success"),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


class DMCWalkerWalk(gym.Env):
    """dm_control walker/walk with a flat 24-dim observation (``dmc2gym`` order: orientations, height,
    velocity)."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        from dm_control import suite

        self._suite = suite
        self._env = suite.load("walker", "walk", task_kwargs={"random": 0})
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (24,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
        self.max_episode_steps = 1000
        self._t = 0

    @staticmethod
    def _flat(obs: dict[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in obs.values()])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.task._random = np.random.RandomState(seed)
        self._t = 0
        return self._flat(self._env.reset().observation), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ts = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float64))
        self._t += 1
        return self._flat(ts.observation), float(ts.reward), False, bool(ts.last()), {}


class MetaWorldDoorOpen(gym.Env):
    """Meta-World door-open with a new random door position at every reset and the goal hidden."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        from metaworld.envs import SawyerDoorEnvV3

        env = SawyerDoorEnvV3()
        env._freeze_rand_vec = False  # draw a new door position at every reset (B-Pref)
        env.seeded_rand_vec = True  # ... from env.np_random, so that seeding makes it reproducible
        env._set_task_called = True  # no Task object: positions come from the random reset space
        env._partially_observable = True  # goal position zeroed in the observation
        self._env = env
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.max_episode_steps = env.max_path_length  # 500
        env.seed(0)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        obs, info = self._env.reset()
        return obs.astype(np.float32), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, _, truncated, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        return obs.astype(np.float32), float(reward), False, bool(truncated), info


def make_env(name: str) -> gym.Env:
    """A fresh environment for task ``name`` (see ``TASKS``)."""
    task_spec(name)
    return DMCWalkerWalk() if name == "walker_walk" else MetaWorldDoorOpen()


def episode_seed(seed: int, episode: int, stream: int = 0) -> int:
    """A distinct, reproducible reset seed for episode ``episode`` of run ``seed`` (stream 1: evaluation)."""
    return int(np.random.SeedSequence([seed, stream, episode]).generate_state(1)[0])
