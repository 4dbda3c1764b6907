"""End to end: smoke runs of every method on both tasks, exact checkpoint resume, bad configs, the plot."""

import csv

import pytest

pytest.importorskip("dm_control")
pytest.importorskip("metaworld")

import torch  # noqa: E402

from robotics import plot, train  # noqa: E402
from robotics.config import make_config  # noqa: E402

torch.set_num_threads(1)


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


SMOKE = [(env, method) for env in ("walker_walk", "door_open") for method in ("pebble", "brl", "sac")]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each method on each task with the smoke preset, once for the module."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for env, method in SMOKE:
        cfg = make_config(env, method, "smoke")
        out = train.run_dir(root, cfg)
        runs[env, method] = (cfg, out, train.Trainer(cfg, out).run())
    return root, runs


@pytest.mark.parametrize("env, method", SMOKE)
def test_smoke_run(smoke_runs, env, method):
    cfg, out, rows = smoke_runs[1][env, method]
    assert rows[-1]["step"] == cfg.steps
    assert rows[-1]["labels_used"] == cfg.labels and rows[-1]["sessions"] == cfg.sessions
    saved = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in saved] == [r["step"] for r in rows]
    assert (out / "checkpoint.pt").exists() and any((out / "tb").iterdir())
    assert 0.0 <= float(saved[-1]["eval_success"]) <= 100.0
    if method == "brl":
        assert saved[-1]["z_eval_return"] != "" and saved[-1]["value_gap"] != ""
        assert saved[-1]["pure_restarts"] != ""


def test_resume_reproduces_the_uninterrupted_run(smoke_runs, tmp_path):
    cfg, full_out, _ = smoke_runs[1]["door_open", "brl"]
    first = train.Trainer(cfg, tmp_path / "b")
    first.run(max_steps=1000)  # stops after the evaluation (and checkpoint) at step 1000
    second = train.Trainer(cfg, tmp_path / "b")
    assert second.resume() and second.step == 1000
    second.run()
    a, b = _rows(full_out / "metrics.csv"), _rows(tmp_path / "b" / "metrics.csv")
    drop = {"sps", "wall_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]
    # a checkpoint from another configuration is refused
    other = train.Trainer(make_config("door_open", "brl", "smoke", lam=3.0), tmp_path / "b")
    with pytest.raises(ValueError, match="another configuration"):
        other.resume()


def test_a_diverged_run_stops_with_the_last_checkpoint_intact(smoke_runs, tmp_path, monkeypatch):
    """NaN weights after the second session: the CLI stops with a message, the checkpoint written before
    is left as it was, and resuming from it gives the uninterrupted run's rows."""
    argv = ["--env", "door_open", "--method", "pebble", "--preset", "smoke", "--out", str(tmp_path)]
    session = train.Trainer._session

    def poisoned(self, first):
        session(self, first)
        if self.sessions == 2:
            with torch.no_grad():
                next(self.learner.agent.actor.parameters()).fill_(float("nan"))

    monkeypatch.setattr(train.Trainer, "_session", poisoned)
    diverged = r"stopped at step 1\d\d\d: SAC critic loss is nan .*checkpoint of step 1000 is kept"
    with pytest.raises(SystemExit, match=diverged):
        train.main([*argv, "--no-progress"])
    out = tmp_path / "smoke" / "door_open" / "pebble" / "seed0"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["counters"]["step"] == 1000
    assert all(v.isfinite().all() for v in saved["learner"]["agent"]["actor"].values())
    monkeypatch.setattr(train.Trainer, "_session", session)
    train.main([*argv, "--no-progress"])
    drop = {"sps", "wall_s"}
    a, b = _rows(smoke_runs[1]["door_open", "pebble"][1] / "metrics.csv"), _rows(out / "metrics.csv")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_plot_draws_both_tasks_from_the_csvs(smoke_runs, tmp_path):
    root = smoke_runs[0]
    extra = plot.parse_extra(f"variant={root}:brl")
    table = plot.plot(root, "smoke", tmp_path / "fig.png", [extra])
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert table.count("| walker_walk | return |") == 4  # PEBBLE, bilevel, the SAC oracle, the variant
    assert table.count("| door_open | success |") == 4 and table.count("| door_open | return |") == 4
    assert (tmp_path / "table.md").read_text().strip() == table
    assert (tmp_path / "agents.png").stat().st_size > 1000
    # the agents figure: y and z of bilevel PEBBLE (z from its first session on) and PEBBLE's agent
    series = [(name, root, method) for method, name in plot.METHODS.items() if method != "sac"]
    drawn = plot.plot_agents(series, "smoke", tmp_path / "agents.png")
    cfg, out, _ = smoke_runs[1]["door_open", "brl"]
    rows, first_session = _rows(out / "metrics.csv"), cfg.first_session_step
    steps, z = drawn["door_open", "Bilevel PEBBLE (z) (n=1)"]
    assert list(steps) == [int(r["step"]) for r in rows if int(r["step"]) > first_session] == [1000, 2000]
    assert list(z) == [float(r["z_eval_return"]) for r in rows if int(r["step"]) > first_session]
    assert ("walker_walk", "PEBBLE (n=1)") in drawn and not any("oracle" in label for _, label in drawn)
    # the final value in the table is the CSV's last evaluation (one seed: std 0)
    last = float(_rows(smoke_runs[1]["walker_walk", "brl"][1] / "metrics.csv")[-1]["eval_return"])
    assert f"| walker_walk | return | variant | 1 | 2000 | {last:.1f} ± 0.0 |" in table
    seeds = (tmp_path / "seeds.md").read_text()
    assert seeds.count("| walker_walk | return |") == 4
    assert seeds.count("| door_open | success |") == 4 and seeds.count("| door_open | return |") == 4
    assert f"| walker_walk | return | variant | 0 | 2000 | {last:.0f} |" in seeds
    with pytest.raises(SystemExit, match="LABEL=ROOT:METHOD"):
        plot.parse_extra("no-root")
    assert plot.parse_extra("λ = 100=runs/x:brl") == ("λ = 100", plot.Path("runs/x"), "brl")
    with pytest.raises(SystemExit, match="no brl runs under"):
        plot.main(["--runs", str(root), "--preset", "smoke", "--extra", f"v={tmp_path}/none:brl"])
    # --until: every row ends at the first evaluation (step 1000) with its value there
    early = plot.plot(root, "smoke", tmp_path / "early" / "fig.png", until=1000)
    first = float(_rows(smoke_runs[1]["walker_walk", "brl"][1] / "metrics.csv")[0]["eval_return"])
    assert f"| walker_walk | return | Bilevel PEBBLE | 1 | 1000 | {first:.1f} ± 0.0 |" in early
    assert all("| 1000 |" in row for row in early.splitlines()[2:])
    assert (tmp_path / "early" / "seeds.md").read_text().count("| 1000 |") == 9  # 3 methods x 3 panels


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(env="cheetah_run", method="pebble"), "unknown task 'cheetah_run'"),
        (dict(env="walker_walk", method="ppo"), "unknown method 'ppo'"),
        (dict(env="walker_walk", method="pebble", preset="huge"), "unknown preset 'huge'"),
        (dict(env="walker_walk", method="brl", labels=1000), "label budget 1000 cannot be spent"),
        (dict(env="door_open", method="pebble", segment=600), "does not fit in a door_open episode of 500"),
        (dict(env="door_open", method="pebble", preset="smoke", unsup_steps=100), "no segment to query"),
        (dict(env="walker_walk", method="brl", lam=0.0), "lam must be positive"),
        (dict(env="walker_walk", method="sac", labels=100), "takes no labels"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(**kwargs)


def test_cli_refuses_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit, match="label budget 5000 cannot be spent"):
        train.main(["--env", "walker_walk", "--method", "brl", "--labels", "5000", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown task"):
        train.main(["--env", "hopper", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cli_flags_reach_the_config():
    base = ["--env", "walker_walk", "--method", "brl", "--preset", "reduced"]
    assert train.config_from_args(train.parse_args(base)).keep_better_pure  # the default
    cfg = train.config_from_args(train.parse_args([*base, "--no-keep-better-pure", "--lam", "3"]))
    assert not cfg.keep_better_pure and cfg.lam == 3.0 and cfg.labels == 100
    assert train.config_from_args(train.parse_args([*base, "--keep-better-pure"])).keep_better_pure


def test_sac_oracle_learns_from_the_true_reward_without_labels():
    cfg = make_config("door_open", "sac", "smoke", steps=1000, eval_every=1000)
    trainer = train.Trainer(cfg)
    ensemble = [p.clone() for p in trainer.ensemble.parameters()]
    actor = [p.clone() for p in trainer.learner.agent.actor.parameters()]
    trainer.run()
    # the replay buffer holds the environment's reward, step for step (two 500-step episodes)
    stored, true = trainer.buffer.reward[:1000].reshape(2, 500), trainer.store.reward[:2]
    assert trainer.store.count == 2 and (stored == true).all() and true.std() > 0
    assert trainer.total_feedback == 0 and trainer.sessions == 0 and trainer.prefs.size == 0
    assert all(torch.equal(a, b) for a, b in zip(ensemble, trainer.ensemble.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(actor, trainer.learner.agent.actor.parameters()))


def test_score_term_switches_off_one_interval_after_the_last_session():
    cfg = make_config("walker_walk", "brl", "smoke", steps=2600, eval_every=2600)
    trainer = train.Trainer(cfg)
    trainer.run(max_steps=cfg.labels_done_step)
    assert trainer.total_feedback == cfg.labels and trainer.learner.score_term
    trainer.run()
    assert not trainer.learner.score_term
