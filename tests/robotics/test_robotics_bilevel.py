"""Bilevel PEBBLE on the solver core: the collapse check, the x step, and the y step's extra term."""

import numpy as np
import pytest
import torch

from robotics.bilevel import BilevelLearner
from robotics.buffer import ReplayBuffer
from robotics.queries import PreferenceBuffer
from robotics.reward_model import RewardEnsemble
from robotics.sac import SACConfig

torch.set_num_threads(1)
OBS, A, H = 4, 2, 5
SAC_CFG = SACConfig(hidden_dim=32, hidden_depth=2, batch_size=64, lr=1e-3)


def _learner(
    penalised_upper_grad=True, lam=10.0, optimizer=None, seed=0, score_trust=3.0, keep_better_pure=False
):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(OBS, A, 2000, seed=seed)
    for _ in range(500):
        buf.add(rng.normal(size=OBS), rng.uniform(-1, 1, A), rng.normal(), rng.normal(size=OBS), False)
    prefs = PreferenceBuffer(40, H, OBS + A)
    prefs.add(
        rng.normal(size=(40, H, OBS + A)).astype(np.float32),
        rng.normal(size=(40, H, OBS + A)).astype(np.float32),
        rng.integers(0, 2, 40),
    )
    ens = RewardEnsemble(OBS + A, members=3, hidden_dim=16, depth=2)
    opt = (optimizer or (lambda p: torch.optim.Adam(p, lr=1e-3)))(ens.parameters())
    learner = BilevelLearner(
        OBS,
        A,
        SAC_CFG,
        ens,
        opt,
        buf,
        prefs,
        lam=lam,
        f_pairs=8,
        seed=seed,
        penalised_upper_grad=penalised_upper_grad,
        score_trust=score_trust,
        keep_better_pure=keep_better_pure,
    )
    # y has been pre-trained alone; the first session starts z from it (y0 = z0)
    for _ in range(5):
        learner.unsup_update(buf.sample(64), torch.rand(64))
    learner.start_feedback()
    return learner, ens, buf, prefs


def _state(agent):
    sd = agent.state_dict()
    return [sd["actor"], sd["critic"], sd["critic_target"], {"a": sd["log_alpha"]}]


def test_collapse_without_the_f_over_lambda_term_y_equals_z_exactly():
    learner, *_ = _learner(penalised_upper_grad=False)
    learner.reset_critics()
    for _ in range(3):
        for _ in range(10):
            learner.rl_update()
        diag, _ = learner.reward_step(np.stack([np.arange(16)] * 3))
        assert diag["value_gap"] == 0.0
    for dy, dz in zip(_state(learner.y), _state(learner.z)):
        for k in dy:
            assert torch.equal(dy[k], dz[k]), k


def test_with_the_term_y_leaves_z():
    learner, *_ = _learner(penalised_upper_grad=True, lam=0.1)
    for _ in range(20):
        learner.rl_update()
    y, z = learner.y.actor.state_dict(), learner.z.actor.state_dict()
    assert any(not torch.equal(y[k], z[k]) for k in y)


def test_x_step_is_preference_loss_plus_lambda_reward_gap():
    lam = 3.0
    learner, ens, buf, prefs = _learner(lam=lam, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    for _ in range(10):
        learner.rl_update()  # y and z now differ
    idx = np.stack([np.arange(0, 12), np.arange(12, 24), np.arange(24, 36)])
    buf_state, torch_state = buf.rng.bit_generator.state, torch.get_rng_state()
    # independent computation of ∇_x [f + λ (Σ_m mean r_m(s, a_z) - Σ_m mean r_m(s, a_y))]
    batch = buf.sample(SAC_CFG.batch_size)
    noise_state = torch.get_rng_state()
    with torch.no_grad():
        a_z = learner.z.actor.sample(batch["obs"])[0]
        torch.set_rng_state(noise_state)
        a_y = learner.y.actor.sample(batch["obs"])[0]
    seg0, seg1, target = prefs.batch(idx)
    r = [torch.tanh(ens.net(s.reshape(3, -1, OBS + A))).reshape(3, 12, H).sum(-1) for s in (seg0, seg1)]
    pref = sum(
        torch.nn.functional.cross_entropy(torch.stack([r[0][m], r[1][m]], -1), target[m].long())
        for m in range(3)
    )
    gap = sum(
        torch.tanh(ens.net(torch.cat([batch["obs"], a], -1).expand(3, -1, -1))).squeeze(-1).mean(-1) * sign
        for a, sign in ((a_z, 1.0), (a_y, -1.0))
    ).sum()
    grads = torch.autograd.grad(pref + lam * gap, list(ens.parameters()))
    before = [p.detach().clone() for p in ens.parameters()]
    buf.rng.bit_generator.state = buf_state
    torch.set_rng_state(torch_state)
    diag, _ = learner.reward_step(idx)
    for b, p, g in zip(before, ens.parameters(), grads):
        torch.testing.assert_close(p.detach(), b - g, rtol=1e-4, atol=1e-5)
    assert diag["reward_loss"] == pytest.approx(pref.item(), rel=1e-5)
    assert diag["value_gap"] == pytest.approx(gap.item() / 3, rel=1e-4)  # (g_x(y) - g_x(z)) / M


def test_y_step_adds_the_score_function_term_over_lambda():
    lam = 2.0
    learner, ens, buf, prefs = _learner(lam=lam, score_trust=None)  # every stored action counts
    idx = np.arange(8)
    from robotics.bilevel import PairBatch

    seg0, seg1, target = prefs.batch(idx)
    f = learner.f(learner.y, PairBatch(idx, for_x=False))
    gf = torch.autograd.grad(f, list(learner.y.actor.parameters()))
    # independent: per-pair BT losses, baseline = their mean, score = ∇ Σ_t log π over both segments
    with torch.no_grad():
        logits = torch.stack([ens.member_rewards(seg0).sum(-1), ens.member_rewards(seg1).sum(-1)], -1)
        ell = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, 2), target.repeat(3).long(), reduction="none"
            )
            .reshape(3, 8)
            .sum(0)
        )
    expected = [torch.zeros_like(p) for p in learner.y.actor.parameters()]
    for n in range(8):
        lp = sum(learner.y.actor.log_prob(s[n, :, :OBS], s[n, :, OBS:]).sum() for s in (seg0, seg1))
        for e, g in zip(expected, torch.autograd.grad(lp, list(learner.y.actor.parameters()))):
            e += (ell[n] - ell.mean()) * g / 8
    for a, b in zip(gf, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert f.item() == pytest.approx(ell.mean().item(), rel=1e-5)


def test_once_labels_are_spent_y_takes_the_same_step_as_z():
    """``labels_spent(False)`` drops ∇_y f: from y = z both take bit-identical steps (x is frozen)."""
    for keep, same in ((False, True), (True, False)):
        learner, *_ = _learner(penalised_upper_grad=True, lam=0.1)
        for _ in range(5):
            learner.rl_update()
        learner.z.load_state_dict(learner.y.state_dict())
        learner.labels_spent(keep_score_term=keep)
        for _ in range(10):
            learner.rl_update()
        y, z = learner.y.actor.state_dict(), learner.z.actor.state_dict()
        assert all(torch.equal(y[k], z[k]) for k in y) == same


def test_guard_copies_the_whole_agent_y_into_z_when_r_x_rates_y_above_z():
    """``keep_better_pure``: a reward step with g_x(y) < g_x(z) ends with z = y (actor, critic, target,
    temperature); a step with g_x(y) >= g_x(z) leaves z as it was. Both branches are exercised."""
    learner, *_ = _learner(penalised_upper_grad=True, lam=0.1, keep_better_pure=True)
    seen = {True: 0, False: 0}
    for step in range(12):
        for _ in range(5):
            learner.rl_update()
        z_before = [{k: v.clone() for k, v in d.items()} for d in _state(learner.z)]
        diag, _ = learner.reward_step(np.stack([np.arange(16)] * 3))
        copied = diag["value_gap"] < 0
        seen[copied] += 1
        target = _state(learner.y) if copied else z_before
        for dz, dt in zip(_state(learner.z), target):
            for k in dz:
                assert torch.equal(dz[k], dt[k]), (step, copied, k)
        assert diag["pure_restarts"] == seen[True]
    assert seen[True] and seen[False], seen
