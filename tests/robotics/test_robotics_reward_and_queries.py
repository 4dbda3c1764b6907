"""Reward ensemble, query selection and the preference buffer."""

import numpy as np
import torch

from robotics.feedback import train_reward
from robotics.queries import EpisodeStore, PreferenceBuffer, sample_segments, select_queries
from robotics.reward_model import RewardEnsemble, epoch_indices
from robotics.teacher import Teacher

torch.set_num_threads(1)
D, T, H = 6, 40, 10
W = np.array([1.0, -2.0, 0.5, 0.0, 1.5, -1.0], np.float32)


def _store(episodes=30, seed=0):
    rng = np.random.default_rng(seed)
    store = EpisodeStore(D, T, max_episodes=20)
    for _ in range(episodes * T):
        sa = rng.normal(size=D).astype(np.float32)
        store.add(sa[:4], sa[4:], float(np.tanh(sa @ W / 3)))  # known reward
    return store, rng


def test_store_keeps_last_episodes_and_segments_are_contiguous_slices():
    store, rng = _store()
    assert store.count == 20
    sa0, sa1, r0, r1 = sample_segments(store, 50, H, rng)
    assert sa0.shape == (50, H, D) and r1.shape == (50, H)
    np.testing.assert_allclose(r0, np.tanh(sa0 @ W / 3), atol=1e-5)  # rewards belong to their (s, a)
    ep = [np.flatnonzero((store.sa == sa0[i, 0]).all(-1).reshape(-1)) for i in range(5)]
    for i, hits in enumerate(ep):  # the segment is H consecutive steps of one stored episode
        e, t = divmod(int(hits[0]), T)
        np.testing.assert_array_equal(store.sa[e, t : t + H], sa0[i])


def test_epoch_indices_give_each_member_its_own_permutation():
    batches = list(epoch_indices(300, 3, 128, np.random.default_rng(0)))
    assert [b.shape for b in batches] == [(3, 128), (3, 128), (3, 44)]
    full = np.concatenate(batches, axis=1)
    for m in range(3):
        assert sorted(full[m]) == list(range(300))
    assert not np.array_equal(full[0], full[1])


def test_ensemble_learns_a_known_reward_from_teacher_labels():
    torch.manual_seed(0)
    store, rng = _store()
    ens = RewardEnsemble(D, members=3, hidden_dim=64, depth=2)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    prefs = PreferenceBuffer(400, H, D)
    sa0, sa1, r0, r1 = sample_segments(store, 400, H, rng)
    kept, labels = Teacher().label(r0, r1, rng)
    prefs.add(sa0[kept], sa1[kept], labels)

    def step(idx):
        loss, correct = ens.preference_loss(*prefs.batch(idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"reward_loss": loss.item()}, correct

    stats = train_reward(prefs, 3, 128, 60, step, rng)
    assert stats["reward_acc"] > 0.9
    # held-out pairs: the learned reward ranks segments like the true one
    t0, t1, q0, q1 = sample_segments(store, 500, H, np.random.default_rng(1))
    with torch.no_grad():
        pred = ens(torch.from_numpy(t1)).sum(-1) > ens(torch.from_numpy(t0)).sum(-1)
    assert np.mean(pred.numpy() == (q1.sum(1) > q0.sum(1))) > 0.85
    sa = torch.from_numpy(store.sa.reshape(-1, D))
    with torch.no_grad():
        corr = np.corrcoef(ens(sa).numpy(), store.reward.reshape(-1))[0, 1]
    assert corr > 0.8


def test_equal_labels_train_towards_one_half():
    ens = RewardEnsemble(D, hidden_dim=16, depth=1)
    seg = torch.randn(1, H, D)
    ce, _ = ens.pair_losses(seg, seg, torch.tensor([0.5]))
    np.testing.assert_allclose(ce.detach().numpy(), np.log(2), rtol=1e-6)  # identical segments: P = 1/2


def test_disagreement_picks_the_highest_variance_pairs():
    torch.manual_seed(0)
    store, _ = _store()
    ens = RewardEnsemble(D, members=3, hidden_dim=32, depth=2)
    n, large = 7, 10
    chosen = select_queries(store, ens, n, H, np.random.default_rng(3), "disagreement", large)
    cand = sample_segments(store, n * large, H, np.random.default_rng(3))  # the same candidates
    std = []
    with torch.no_grad():  # brute force, member by member, in float64
        for i in range(n * large):
            p = []
            for m in range(3):
                x0 = torch.from_numpy(cand[0][i]).double()
                x1 = torch.from_numpy(cand[1][i]).double()
                net = ens.net.double()
                r0 = torch.tanh(net(x0.unsqueeze(0).expand(3, -1, -1))[m]).sum()
                r1 = torch.tanh(net(x1.unsqueeze(0).expand(3, -1, -1))[m]).sum()
                p.append(torch.sigmoid(r0 - r1).item())
            std.append(np.std(p))
        ens.net.float()
    top = np.argsort(-np.array(std))[:n]
    np.testing.assert_array_equal(chosen[0], cand[0][top])
    np.testing.assert_array_equal(chosen[3], cand[3][top])
    uniform = select_queries(store, ens, n, H, np.random.default_rng(3), "uniform")
    np.testing.assert_array_equal(uniform[0], sample_segments(store, n, H, np.random.default_rng(3))[0])


def test_preference_buffer_targets():
    prefs = PreferenceBuffer(3, H, D)
    segs = np.zeros((4, H, D), np.float32)
    prefs.add(segs, segs, np.array([1, 0, -1, 1]))
    assert prefs.size == 3  # capacity = label budget
    _, _, target = prefs.batch(np.arange(3))
    np.testing.assert_array_equal(target.numpy(), [1.0, 0.0, 0.5])
