"""SAC: the squashed-Gaussian log-density, the batched double Q, target updates, and that it learns."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from robotics.sac import SAC, SACConfig

torch.set_num_threads(1)
SMALL = SACConfig(hidden_dim=32, hidden_depth=2, batch_size=128, lr=3e-3, alpha_lr=1e-3)


def test_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    agent = SAC(5, 3, SMALL)
    agent.actor.double()  # float64: atanh of actions near ±1 is exact enough for the reference
    obs = torch.randn(64, 5, dtype=torch.float64)
    action, logp = agent.actor.sample(obs)
    mu, log_std = agent.actor(obs)
    ref = TransformedDistribution(Normal(mu, log_std.exp()), [TanhTransform()]).log_prob(action).sum(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(agent.actor.log_prob(obs, action), ref, rtol=1e-4, atol=1e-4)
    seg = torch.randn(4, 7, 5, dtype=torch.float64)  # any leading shape
    assert agent.actor.log_prob(seg, torch.rand(4, 7, 3, dtype=torch.float64) * 2 - 1).shape == (4, 7)


def test_log_prob_of_saturated_actions_is_the_censored_tail():
    """A stored ±1 (tanh saturated) counts as P(±u ≥ atanh(1 - 1e-6)) under N(μ, σ): scipy's norm.logsf."""
    from scipy.stats import norm

    torch.manual_seed(0)
    agent = SAC(5, 1, SMALL)
    agent.actor.double()
    obs = torch.randn(6, 5, dtype=torch.float64)
    action = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    mu, log_std = (t.detach().numpy()[:, 0] for t in agent.actor(obs))
    u_c = np.arctanh(1 - 1e-6)
    expected = norm.logsf(u_c, loc=action.numpy()[:, 0] * mu, scale=np.exp(log_std))
    got = agent.actor.log_prob(obs, action).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.isfinite(got)) and np.all(got > -1e3)  # not the -1e15 of a density at the clamp


def test_trust_region_drops_the_gradient_of_implausible_actions():
    torch.manual_seed(0)
    agent = SAC(5, 2, SMALL)
    obs = torch.randn(2, 5)
    mu, log_std = agent.actor(obs)
    near = torch.tanh(mu.detach())  # the policy's own mean action: 0 σ away
    far = torch.tanh(mu.detach() + 6 * log_std.detach().exp()).clamp(-0.999, 0.999)  # 6 σ away
    far = torch.where((far - near).abs() < 1e-3, -near, far)
    params = list(agent.actor.parameters())
    for action, moves in ((near, True), (far, False)):
        logp = agent.actor.log_prob(obs, action, trust=3.0).sum()
        grads = torch.autograd.grad(logp, params, allow_unused=True)
        norm = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert (norm > 0) is moves
    # without trust both carry a gradient
    logp = agent.actor.log_prob(obs, far).sum()
    assert sum(float(g.abs().sum()) for g in torch.autograd.grad(logp, params)) > 0


def test_log_std_is_squashed_into_bounds():
    agent = SAC(5, 3, SMALL)
    with torch.no_grad():
        for p in agent.actor.parameters():
            p.mul_(100)
    _, log_std = agent.actor(torch.randn(256, 5) * 10)
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0


def test_batched_double_q_equals_two_separate_networks():
    agent = SAC(4, 2, SMALL)
    obs, act = torch.randn(10, 4), torch.rand(10, 2)
    q = agent.critic(obs, act)
    for i in range(2):
        x = torch.cat([obs, act], -1)
        layers = [m for m in agent.critic.net if hasattr(m, "weight")]
        for j, layer in enumerate(layers):
            x = x @ layer.weight[i] + layer.bias[i, 0]
            if j < len(layers) - 1:
                x = torch.relu(x)
        torch.testing.assert_close(q[i], x.squeeze(-1))
    assert not torch.allclose(q[0], q[1])  # independently initialised


def test_target_network_moves_every_second_update_by_tau():
    torch.manual_seed(0)
    agent = SAC(3, 1, SMALL)
    batch = dict(
        obs=torch.randn(8, 3),
        action=torch.rand(8, 1),
        reward=torch.rand(8),
        next_obs=torch.randn(8, 3),
        not_done=torch.ones(8),
    )
    t0 = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(t0, agent.critic_target.parameters()))
    agent.update(batch)
    for old, new, online in zip(t0, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, (1 - SMALL.tau) * old + SMALL.tau * online)


def test_sac_solves_a_one_step_bandit():
    """r(a) = -‖a - 0.5‖², episodes of one step: the greedy action must approach 0.5."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    agent = SAC(2, 2, SMALL)
    for _ in range(600):
        obs = torch.from_numpy(rng.normal(size=(128, 2)).astype(np.float32))
        with torch.no_grad():
            act = agent.actor.sample(obs)[0]
        reward = -((act - 0.5) ** 2).sum(-1)
        agent.update(dict(obs=obs, action=act, reward=reward, next_obs=obs, not_done=torch.zeros(128)))
    greedy = agent.actor.mode(torch.randn(100, 2))
    assert (greedy - 0.5).abs().mean() < 0.1 and (greedy - 0.5).abs().max() < 0.25
    assert agent.alpha.item() < 0.1  # temperature learned downwards (target entropy -|A|)


def test_reset_critic_and_state_dict_round_trip():
    a, b = SAC(3, 2, SMALL), SAC(3, 2, SMALL)
    b.load_state_dict(a.state_dict())
    for p, q in zip(a.critic.parameters(), b.critic.parameters()):
        assert torch.equal(p, q)
    a.reset_critic()
    assert not torch.equal(next(a.critic.parameters()), next(b.critic.parameters()))
    for p, q in zip(a.critic.parameters(), a.critic_target.parameters()):
        assert torch.equal(p, q)


def test_a_non_finite_critic_loss_stops_the_update_before_any_weight_moves():
    agent = SAC(3, 2, SMALL)
    batch = dict(obs=torch.randn(8, 3), action=torch.rand(8, 2), next_obs=torch.randn(8, 3))
    batch.update(reward=torch.ones(8), not_done=torch.ones(8))
    batch["reward"][3] = float("nan")
    before = [p.clone() for p in (*agent.critic.parameters(), *agent.actor.parameters())]
    with pytest.raises(FloatingPointError, match="critic loss is nan"):
        agent.update(batch)
    after = [*agent.critic.parameters(), *agent.actor.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
