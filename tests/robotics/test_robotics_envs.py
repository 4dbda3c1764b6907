"""The two environments: shapes, reward ranges, success flag, B-Pref's door randomisation."""

import numpy as np
import pytest

pytest.importorskip("dm_control")
pytest.importorskip("metaworld")

from robotics.envs import TASKS, episode_seed, make_env, task_spec  # noqa: E402


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_dtypes_and_episode_length(name):
    spec, env = TASKS[name], make_env(name)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (spec.obs_dim,) and obs.dtype == np.float32
    assert env.action_space.shape == (spec.act_dim,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    rng = np.random.default_rng(0)
    rewards, t, done = [], 0, False
    while not done:
        obs, r, term, trunc, info = env.step(rng.uniform(-1, 1, spec.act_dim).astype(np.float32))
        assert obs.shape == (spec.obs_dim,) and obs.dtype == np.float32 and not term
        rewards.append(r)
        t, done = t + 1, term or trunc
    assert t == spec.episode_length
    high = 1.0 if name == "walker_walk" else 10.0
    assert min(rewards) >= 0.0 and max(rewards) <= high


def test_reset_seed_reproducible_and_distinct():
    for name in TASKS:
        env = make_env(name)
        a, b, c = env.reset(seed=5)[0], env.reset(seed=5)[0], env.reset(seed=6)[0]
        assert np.array_equal(a, b) and not np.allclose(a, c)
    assert episode_seed(0, 1) != episode_seed(0, 2) != episode_seed(1, 1)
    assert episode_seed(0, 1, stream=1) != episode_seed(0, 1)


def test_door_new_position_every_reset_and_goal_hidden():
    env = make_env("door_open")
    handles = []
    for ep in range(6):
        obs, _ = env.reset(seed=ep)
        assert np.all(obs[36:] == 0.0), "goal must be hidden"
        handles.append(obs[4:7].copy())
    assert len({tuple(np.round(h, 4)) for h in handles}) == 6


@pytest.mark.filterwarnings("ignore:Constant")
def test_scripted_door_policy_succeeds_through_wrapper():
    from metaworld.policies import SawyerDoorOpenV3Policy

    env, policy = make_env("door_open"), SawyerDoorOpenV3Policy()
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        success, done = 0.0, False
        while not done:
            obs, r, term, trunc, info = env.step(policy.get_action(obs))
            success, done = max(success, info["success"]), term or trunc
        assert success == 1.0
    # a policy that does nothing does not succeed
    obs, _ = env.reset(seed=0)
    assert not any(env.step(np.zeros(4, np.float32))[4]["success"] for _ in range(100))


def test_unknown_task_refused():
    with pytest.raises(ValueError, match="unknown task 'cheetah_run'"):
        task_spec("cheetah_run")
    with pytest.raises(ValueError, match="unknown task"):
        make_env("cheetah_run")
