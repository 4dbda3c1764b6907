"""Run configurations: the paper's two settings at full scale, a reduced CPU scale, and a CI smoke scale.

``full``    B-Pref / the paper: 1M steps, walker_walk with 100 labels (a session of 10 every 20k steps,
            50 reward epochs, SAC 2x1024, batch 1024, lr 5e-4) and door_open with 1000 labels (10 every
            5k steps, 10 reward epochs, SAC 3x256, batch 512, lr 3e-4).
``reduced`` 100k steps, the same label budgets, the schedule compressed so every label is spent by
            ~85% of training (walker: 10 every 5k steps, last session at 55k; door: 20 every 1.5k steps,
            last at 83.5k). **Walker uses smaller SAC networks (2x256, batch 512)**; door keeps the
            paper's 3x256 / 512. Seed and pre-training steps as the paper (1000 + 9000).
``smoke``   2000 steps and 8-10 labels with tiny networks: checks the whole pipeline.

``method="sac"`` runs a preset's SAC on the true task reward, with no labels and no pre-training (B-Pref's
``train_SAC.py``): the oracle that the preference-based methods are measured against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from robotics.envs import task_spec
from robotics.sac import SACConfig
from robotics.teacher import Teacher

METHODS = {
    "pebble": "PEBBLE",
    "brl": "Bilevel PEBBLE",
    "sac": "SAC on the true reward (oracle)",
}


@dataclass
class RunConfig:
    env: str = "walker_walk"
    method: str = "pebble"  # "pebble", "brl" (bilevel PEBBLE) or "sac" (SAC on the true reward: the oracle)
    seed: int = 0
    steps: int = 1_000_000
    seed_steps: int = 1000  # uniformly random actions
    unsup_steps: int = 9000  # state-entropy pre-training
    labels: int = 100  # max_feedback
    reward_batch: int = 10  # queries per session
    num_interact: int = 20_000  # env steps between sessions
    reward_update: int = 50  # max reward epochs per session (stop early at 97% accuracy)
    feed_type: str = "disagreement"  # or "uniform" (the first session is always uniform)
    large_batch: int = 10  # candidates per query for disagreement
    segment: int = 50
    max_episodes: int = 100  # queries come from the last 100 episodes
    reward_hidden: int = 256
    reward_depth: int = 3
    reward_members: int = 3
    reward_lr: float = 3e-4
    reward_train_batch: int = 128
    reset_update: int = 100  # extra SAC updates after the critic reset
    knn_k: int = 5
    sac: SACConfig = field(default_factory=SACConfig)
    teacher: Teacher = field(default_factory=Teacher)
    # bilevel PEBBLE
    lam: float = 10.0
    f_pairs: int = 8  # labelled pairs per y step for the score-function term ∇_y f
    score_trust: float | None = 3.0  # ∇_y f: no gradient from actions > this many σ off y's mean
    # ∇_y f keeps acting after the last session's interval. Off: once every label is spent the pairs only
    # grow staler and x no longer moves, so y (like z) solves min_y g(x, y); with it on, reduced walker's y
    # fell from 148 to 36 between 50k and 100k steps while z rose to 247.
    score_after_labels: bool = False
    # the solver's z ← y guard (PenaltyConfig.keep_better_pure): a reward step that measures
    # g_x(y) < g_x(z) (r_x rates y's actions above the pure agent z's) skips its penalty term and copies
    # agent y (actor, critic, optimisers) into z. Without it a lagging z lets r_x learn to tell y's
    # actions from z's: the value gap ran to -0.84 on reduced walker seed 2 (final return 54; 142 with it).
    keep_better_pure: bool = True
    # evaluation and outputs
    eval_every: int = 10_000
    eval_episodes: int = 10
    preset: str = "full"

    @property
    def sessions(self) -> int:
        return math.ceil(self.labels / self.reward_batch)

    @property
    def first_session_step(self) -> int:
        """The first feedback session (and the end of pre-training)."""
        return self.seed_steps + self.unsup_steps

    @property
    def last_session_step(self) -> int:
        return self.first_session_step + (self.sessions - 1) * self.num_interact

    @property
    def labels_done_step(self) -> int:
        """One interval after the last session: every label is spent and y's ``f/λ`` term goes off."""
        return self.last_session_step + self.num_interact

    def validate(self) -> None:
        """Refuse a configuration that cannot run as asked, before anything is built."""
        spec = task_spec(self.env)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.eval_every < 1 or self.eval_episodes < 1:
            raise ValueError("eval_every and eval_episodes must be positive")
        if self.method == "sac":
            if self.labels:
                raise ValueError(
                    f"method 'sac' learns from the true reward and takes no labels (got {self.labels})"
                )
            return
        if self.feed_type not in ("uniform", "disagreement"):
            raise ValueError(f"unknown feed_type {self.feed_type!r}; choose 'uniform' or 'disagreement'")
        if self.segment < 1 or self.segment > spec.episode_length:
            raise ValueError(
                f"segment of {self.segment} steps does not fit in a {self.env} episode of "
                f"{spec.episode_length} steps"
            )
        if self.labels < 1 or self.reward_batch < 1 or self.num_interact < 1:
            raise ValueError("labels, reward_batch and num_interact must be positive")
        if self.first_session_step < spec.episode_length:
            raise ValueError(
                f"the first feedback session (step {self.first_session_step}) comes before the "
                f"first complete episode ({spec.episode_length} steps): no segment to query"
            )
        if self.last_session_step >= self.steps:
            raise ValueError(
                f"label budget {self.labels} cannot be spent: {self.sessions} sessions of "
                f"{self.reward_batch} labels every {self.num_interact} steps after step "
                f"{self.first_session_step} end at "
                f"step {self.last_session_step}, but the run has only {self.steps} steps; raise --steps or "
                f"reward_batch, or lower num_interact or --labels"
            )
        if self.lam <= 0:
            raise ValueError(f"lam must be positive, got {self.lam}")


_WALKER_SAC = SACConfig(hidden_dim=1024, hidden_depth=2, batch_size=1024, lr=5e-4)
_DOOR_SAC = SACConfig(hidden_dim=256, hidden_depth=3, batch_size=512, lr=3e-4)
_SMOKE = dict(  # what both tasks' smoke presets share: 2k steps, 2 sessions, small networks
    steps=2000,
    num_interact=500,
    reward_update=5,
    reward_hidden=64,
    reset_update=10,
    eval_every=1000,
    eval_episodes=1,
    f_pairs=4,
)

PRESETS: dict[str, dict[str, dict]] = {
    "full": {
        "walker_walk": dict(
            steps=1_000_000,
            labels=100,
            reward_batch=10,
            num_interact=20_000,
            reward_update=50,
            sac=_WALKER_SAC,
            eval_every=10_000,
        ),
        "door_open": dict(
            steps=1_000_000,
            labels=1000,
            reward_batch=10,
            num_interact=5000,
            reward_update=10,
            sac=_DOOR_SAC,
            eval_every=10_000,
        ),
    },
    "reduced": {
        "walker_walk": dict(
            steps=100_000,
            labels=100,
            reward_batch=10,
            num_interact=5000,
            reward_update=50,
            sac=SACConfig(hidden_dim=256, hidden_depth=2, batch_size=512, lr=5e-4),
            eval_every=5000,
        ),
        "door_open": dict(
            steps=100_000,
            labels=1000,
            reward_batch=20,
            num_interact=1500,
            reward_update=10,
            sac=_DOOR_SAC,
            eval_every=5000,
        ),
    },
    "smoke": {
        "walker_walk": dict(
            **_SMOKE,
            seed_steps=500,
            unsup_steps=500,
            labels=8,
            reward_batch=4,
            sac=SACConfig(hidden_dim=64, hidden_depth=2, batch_size=64, lr=5e-4),
        ),
        "door_open": dict(
            **_SMOKE,
            seed_steps=250,
            unsup_steps=250,
            labels=10,
            reward_batch=5,
            sac=SACConfig(hidden_dim=64, hidden_depth=2, batch_size=64, lr=3e-4),
        ),
    },
}


def make_config(env: str, method: str, preset: str = "full", **overrides) -> RunConfig:
    """The preset for ``env`` with ``overrides`` (``None`` values ignored), validated."""
    task_spec(env)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset][env])
    values["sac"] = dataclasses.replace(values["sac"])
    if method == "sac":  # the oracle: SAC from the true reward (B-Pref's train_SAC.py), no labels
        values["labels"] = 0
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(env=env, method=method, preset=preset, **values)
    cfg.validate()
    return cfg
