"""Train PEBBLE, bilevel PEBBLE or the SAC oracle on one task; the command-line entry point.

    python -m robotics.train --env walker_walk --method brl --labels 100 --steps 1000000 --seed 0
    python -m robotics.train --env door_open --method pebble --preset reduced --seed 1

The loop is B-Pref's ``train_PEBBLE.py``: ``seed_steps`` random actions, then SAC on the state-entropy
reward until the first feedback session at ``seed_steps + unsup_steps`` (uniform queries, critic reset,
``reset_update`` extra updates), then one SAC update per environment step and a feedback session every
``num_interact`` steps while labels remain. Every ``eval_every`` steps (at the next episode end): 10
deterministic episodes (true return; success rate in %), a CSV row, TensorBoard scalars and an atomic
checkpoint; rerunning the same command resumes from it. ``--method sac`` is B-Pref's ``train_SAC.py``:
the same SAC stores the true reward and updates from the first step after the random ones.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brlhf.core import BilevelLossError, get_rng_state, set_rng_state
from robotics.bilevel import BilevelLearner
from robotics.buffer import ReplayBuffer
from robotics.config import METHODS, PRESETS, RunConfig, make_config
from robotics.entropy import RunningMeanStd, state_entropy_reward
from robotics.envs import TASKS, episode_seed, make_env, task_spec
from robotics.feedback import feedback_session
from robotics.pebble import PebbleLearner
from robotics.queries import EpisodeStore, PreferenceBuffer
from robotics.reward_model import RewardEnsemble

COLUMNS = [
    "step",
    "episode",
    "sessions",
    "labels_used",
    "labels_obtained",
    "train_return",
    "train_success",
    "eval_return",
    "eval_success",
    "z_eval_return",
    "z_eval_success",
    "reward_acc",
    "value_gap",
    "pure_restarts",
    "sps",
    "wall_s",
]


def run_dir(root: str | Path, cfg: RunConfig) -> Path:
    return Path(root) / cfg.preset / cfg.env / cfg.method / f"seed{cfg.seed}"


class Trainer:
    def __init__(
        self, cfg: RunConfig, out: str | Path | None = None, progress: bool = False, device: str = "cpu"
    ) -> None:
        cfg.validate()
        self.cfg, self.spec, self.progress = cfg, task_spec(cfg.env), progress
        self.out = Path(out) if out is not None else None
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        o, a = self.spec.obs_dim, self.spec.act_dim
        self.env, self.eval_env = make_env(cfg.env), make_env(cfg.env)
        self.buffer = ReplayBuffer(o, a, cfg.steps, seed=cfg.seed, device=device)
        self.store = EpisodeStore(o + a, self.spec.episode_length, cfg.max_episodes)
        self.prefs = PreferenceBuffer(cfg.labels, cfg.segment, o + a, device=device)
        self.ensemble = RewardEnsemble(o + a, cfg.reward_members, cfg.reward_hidden, cfg.reward_depth).to(
            device
        )
        self.reward_optimizer = torch.optim.Adam(self.ensemble.parameters(), lr=cfg.reward_lr)
        self.teacher = dataclasses.replace(cfg.teacher)
        common = (o, a, cfg.sac, self.ensemble, self.reward_optimizer, self.buffer, self.prefs)
        self.learner: PebbleLearner | BilevelLearner = (
            PebbleLearner(*common)
            if cfg.method in ("pebble", "sac")
            else BilevelLearner(
                *common,
                lam=cfg.lam,
                f_pairs=cfg.f_pairs,
                seed=cfg.seed,
                score_trust=cfg.score_trust,
                keep_better_pure=cfg.keep_better_pure,
            )
        )
        self.ent_stats = RunningMeanStd()
        self.rng = np.random.default_rng([cfg.seed, 1])  # queries and teacher
        self.step, self.episode, self.total_feedback, self.labelled = 0, 0, 0, 0
        self.interact_count, self.sessions = 0, 0
        self.recent_returns: deque[float] = deque(maxlen=10)
        self.next_eval, self.wall = cfg.eval_every, 0.0
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.last: dict[str, float] = {}
        self.writer = None

    # -------------------------------------------------------------- updates
    def _update(self) -> None:
        cfg, start = self.cfg, self.cfg.first_session_step
        if cfg.method == "sac":  # the oracle: the buffer holds the true reward, no pre-training
            if self.step > cfg.seed_steps:
                self.learner.rl_update()
        elif self.step == start:
            self._session(first=True)
        elif self.step > start:
            if self.total_feedback < cfg.labels and self.interact_count == cfg.num_interact:
                self._session(first=False)
            elif self.total_feedback >= cfg.labels and self.interact_count >= cfg.num_interact:
                self.learner.labels_spent(keep_score_term=cfg.score_after_labels)
            self.learner.rl_update()
        elif self.step > cfg.seed_steps:
            batch = self.buffer.sample(cfg.sac.batch_size)
            reward = state_entropy_reward(batch["obs"], self.buffer.all_obs(), self.ent_stats, cfg.knn_k)
            self.learner.unsup_update(batch, reward)

    def _session(self, first: bool) -> None:
        cfg = self.cfg
        if first:
            self.learner.start_feedback()
        if self.recent_returns:
            self.teacher.set_margin(np.mean(self.recent_returns) * cfg.segment / self.spec.episode_length)
        n = min(cfg.reward_batch, cfg.labels - self.total_feedback)
        stats = feedback_session(
            self.store,
            self.prefs,
            self.ensemble,
            self.teacher,
            n,
            cfg.segment,
            "uniform" if first else cfg.feed_type,
            cfg.large_batch,
            cfg.reward_update,
            cfg.reward_train_batch,
            self.learner.reward_step,
            self.rng,
        )
        self.total_feedback += n
        self.labelled += int(stats["labelled"])
        self.buffer.relabel(self.ensemble)
        if first:
            self.learner.reset_critics()
            for _ in range(cfg.reset_update):
                self.learner.rl_update()
        self.interact_count, self.sessions = 0, self.sessions + 1
        self.last.update(stats)
        self._scalars({f"feedback/{k}": v for k, v in stats.items()})

    # -------------------------------------------------------------- evaluation and outputs
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        row: dict[str, float] = {}
        for prefix, agent in self.learner.eval_agents().items():
            returns, successes = [], []
            for k in range(self.cfg.eval_episodes):
                obs, _ = self.eval_env.reset(seed=episode_seed(self.cfg.seed, k, stream=1))
                total, success, done = 0.0, 0.0, False
                while not done:
                    obs, r, term, trunc, info = self.eval_env.step(agent.act(obs, deterministic=True))
                    total += r
                    success = max(success, float(info.get("success", 0.0)))
                    done = term or trunc
                returns.append(total)
                successes.append(success)
            row[f"{prefix}eval_return"] = float(np.mean(returns))
            row[f"{prefix}eval_success"] = 100.0 * float(np.mean(successes))
        return row

    def _scalars(self, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.step)

    def _log_eval(self, train_return: float, train_success: float, sps: float) -> dict[str, Any]:
        row = {
            "step": self.step,
            "episode": self.episode,
            "sessions": self.sessions,
            "labels_used": self.total_feedback,
            "labels_obtained": self.labelled,
            "train_return": train_return,
            "train_success": 100.0 * train_success,
            "reward_acc": self.last.get("reward_acc", ""),
            "value_gap": self.last.get("value_gap", ""),
            "pure_restarts": self.last.get("pure_restarts", ""),
            "sps": sps,
            "wall_s": self.wall,
            **self.evaluate(),
        }
        if self.out is not None:
            path = self.out / "metrics.csv"
            new = not path.exists()
            with open(path, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
                if new:
                    w.writeheader()
                w.writerow(row)
            self._scalars({f"eval/{k}": v for k, v in row.items() if isinstance(v, float) and k != "wall_s"})
            self.save()
        return row

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg),
            "counters": dict(
                step=self.step,
                episode=self.episode,
                total_feedback=self.total_feedback,
                labelled=self.labelled,
                interact_count=self.interact_count,
                sessions=self.sessions,
                next_eval=self.next_eval,
                wall=self.wall,
            ),
            "recent_returns": list(self.recent_returns),
            "last": dict(self.last),
            "buffer": self.buffer.state_dict(),
            "store": self.store.state_dict(),
            "prefs": self.prefs.state_dict(),
            "ensemble": self.ensemble.state_dict(),
            "reward_optimizer": self.reward_optimizer.state_dict(),
            "teacher": dataclasses.asdict(self.teacher),
            "learner": self.learner.state_dict(),
            "ent_stats": self.ent_stats.state_dict(),
            "rng": self.rng.bit_generator.state,
            "global_rng": get_rng_state(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        defaults = dataclasses.asdict(RunConfig())  # a field added since the checkpoint: its default
        s["config"] = {**{k: defaults[k] for k in defaults if k not in s["config"]}, **s["config"]}
        if s["config"] != dataclasses.asdict(self.cfg):
            diff = {
                k: (v, s["config"].get(k))
                for k, v in dataclasses.asdict(self.cfg).items()
                if s["config"].get(k) != v
            }
            raise ValueError(f"checkpoint was written with another configuration (now, then): {diff}")
        for k, v in s["counters"].items():
            setattr(self, k, v)
        self.recent_returns.extend(s["recent_returns"])
        self.last = s["last"]
        self.buffer.load_state_dict(s["buffer"])
        self.store.load_state_dict(s["store"])
        self.prefs.load_state_dict(s["prefs"])
        self.ensemble.load_state_dict(s["ensemble"])
        self.reward_optimizer.load_state_dict(s["reward_optimizer"])
        self.teacher = type(self.teacher)(**s["teacher"])
        self.learner.load_state_dict(s["learner"])
        self.ent_stats.load_state_dict(s["ent_stats"])
        self.rng.bit_generator.state = s["rng"]
        set_rng_state(s["global_rng"])

    def save(self) -> None:
        """Atomic: write ``checkpoint.pt.tmp``, then ``os.replace`` it over ``checkpoint.pt``."""
        assert self.out is not None
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.out / "checkpoint.pt")
        self.saved_step = self.step

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` if there is one; drop CSV rows written after it (the file is rewritten with
        the current columns, blank where an older version wrote none). True if resumed."""
        if self.out is None or not (self.out / "checkpoint.pt").exists():
            return False
        self.load_state_dict(torch.load(self.out / "checkpoint.pt", map_location="cpu", weights_only=False))
        self.saved_step = self.step
        path = self.out / "metrics.csv"
        if path.exists():
            with open(path) as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.step]
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)
        return True

    # -------------------------------------------------------------- the loop
    def env_step(self, obs: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Act (uniformly at random during the seed steps), update, step the environment, store the step."""
        if self.step < self.cfg.seed_steps:
            action = self.rng.uniform(-1, 1, self.spec.act_dim)
        else:
            action = self.learner.behaviour.act(obs)
        action = action.astype(np.float32)
        self._update()
        next_obs, reward, term, trunc, info = self.env.step(action)
        if self.cfg.method == "sac":
            stored = float(reward)
        else:
            with torch.no_grad():
                sa = torch.from_numpy(np.concatenate([obs, action])).to(self.device)
                stored = self.ensemble(sa).item()
        self.store.add(obs, action, reward)
        self.buffer.add(obs, action, stored, next_obs, term)
        self.step, self.interact_count = self.step + 1, self.interact_count + 1
        return next_obs, reward, term, trunc, info

    def run(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train to ``cfg.steps`` (or ``max_steps`` more, then to the episode's end); returns eval rows."""
        cfg, rows = self.cfg, []
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard not installed: CSV only
                print("tensorboard is not installed: writing the CSV only")
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not self.progress, desc=f"{cfg.env} {cfg.method}"
        )
        t0, s0 = time.perf_counter(), self.step
        obs, ep_return, ep_success = None, 0.0, 0.0
        while self.step < stop or obs is not None:
            if obs is None:
                obs, _ = self.env.reset(seed=episode_seed(cfg.seed, self.episode))
                ep_return, ep_success = 0.0, 0.0
            next_obs, reward, term, trunc, info = self.env_step(obs)
            ep_return, ep_success = ep_return + reward, max(ep_success, float(info.get("success", 0.0)))
            obs = next_obs
            bar.update(1)
            if term or trunc or self.step >= cfg.steps:
                obs, self.episode = None, self.episode + 1
                self.recent_returns.append(ep_return)
                self._scalars({"train/return": ep_return, "train/success": ep_success})
                if self.step >= self.next_eval or self.step >= cfg.steps:
                    while self.next_eval <= self.step:
                        self.next_eval += cfg.eval_every
                    now = time.perf_counter()
                    self.wall += now - t0
                    sps = (self.step - s0) / max(now - t0, 1e-9)
                    rows.append(self._log_eval(ep_return, ep_success, sps))
                    bar.set_postfix(ret=f"{rows[-1]['eval_return']:.1f}", labels=self.total_feedback)
                    t0, s0 = time.perf_counter(), self.step
                if self.step >= stop:
                    if self.out is not None and not (rows and rows[-1]["step"] == self.step):
                        self.save()
                    break
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m robotics.train", description=__doc__.split("\n")[0])
    p.add_argument("--env", required=True, help=f"one of {sorted(TASKS)}")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default="pebble",
        help="pebble, brl (bilevel PEBBLE) or sac (SAC on the true reward, no labels: the oracle)",
    )
    p.add_argument("--preset", default="full", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--labels", type=int, help="label budget (default: the preset's)")
    p.add_argument("--steps", type=int, help="environment steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lam", type=float, help="λ of bilevel PEBBLE")
    p.add_argument(
        "--score-after-labels",
        action="store_true",
        default=None,
        dest="score_after_labels",
        help="bilevel PEBBLE: keep y's f/λ term on stale pairs after every label is spent",
    )
    p.add_argument(
        "--keep-better-pure",
        action=argparse.BooleanOptionalAction,
        default=None,
        dest="keep_better_pure",
        help="bilevel PEBBLE: the z ← y guard, on by default (when r_x rates y's actions above z's, copy y "
        "into z and skip that reward step's penalty term)",
    )
    p.add_argument("--reward-batch", type=int, dest="reward_batch")
    p.add_argument("--num-interact", type=int, dest="num_interact")
    p.add_argument("--segment", type=int)
    p.add_argument("--feed-type", choices=["uniform", "disagreement"], dest="feed_type")
    p.add_argument("--eval-every", type=int, dest="eval_every")
    p.add_argument("--eval-episodes", type=int, dest="eval_episodes")
    for name in ["beta", "gamma", "eps_mistake", "eps_skip", "eps_equal"]:
        p.add_argument(f"--teacher-{name.replace('_', '-')}", type=float, dest=f"teacher_{name}")
    p.add_argument("--out", default="runs", help="root folder of the run folders")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device for the networks (e.g. cuda)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from robotics.teacher import Teacher

    teacher = {
        k[len("teacher_") :]: v for k, v in vars(args).items() if k.startswith("teacher_") and v is not None
    }
    keys = [
        "labels",
        "steps",
        "seed",
        "lam",
        "score_after_labels",
        "keep_better_pure",
        "reward_batch",
        "num_interact",
        "segment",
        "feed_type",
        "eval_every",
        "eval_episodes",
    ]
    return make_config(
        args.env, args.method, args.preset, teacher=Teacher(**teacher), **{k: getattr(args, k) for k in keys}
    )


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    out = run_dir(args.out, cfg)
    trainer = Trainer(cfg, out, progress=not args.no_progress, device=args.device)
    if trainer.resume():
        if trainer.step >= cfg.steps:
            print(f"{out} is complete ({trainer.step} steps)")
            return
        print(f"resumed {out} at step {trainer.step}")
    try:
        rows = trainer.run()
    except (FloatingPointError, BilevelLossError) as e:  # diverged: the last checkpoint is left as it was
        step = trainer.saved_step
        kept = "no checkpoint yet" if step is None else f"the checkpoint of step {step} is kept"
        raise SystemExit(f"error: {out} stopped at step {trainer.step}: {e} ({kept})") from None
    if rows:
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
