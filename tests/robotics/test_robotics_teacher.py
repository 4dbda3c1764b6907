"""B-Pref's scripted teacher: rational labels follow true segment returns; each noisy option as documented."""

import numpy as np
import pytest

from robotics.teacher import Teacher


def _pairs(n=4000, h=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, h)), rng.uniform(0, 1, (n, h)), rng


def test_rational_labels_match_true_segment_returns():
    r0, r1, rng = _pairs()
    kept, labels = Teacher().label(r0, r1, rng)
    assert np.array_equal(kept, np.arange(len(r0)))
    expected = np.where(r1.sum(1) > r0.sum(1), 1, 0)
    assert np.array_equal(labels, expected)


def test_rationality_beta_follows_bradley_terry():
    r0, r1, rng = _pairs(n=20000, h=5)
    beta = 2.0
    _, labels = Teacher(beta=beta).label(r0, r1, rng)
    p = 1 / (1 + np.exp(-beta * (r1.sum(1) - r0.sum(1))))
    bins = np.digitize(p, [0.2, 0.4, 0.6, 0.8])
    for b in range(5):
        m = bins == b
        assert abs(labels[m].mean() - p[m].mean()) < 0.03
    assert 0.05 < np.mean(labels != (r1.sum(1) > r0.sum(1))) < 0.45  # noisy, but mostly right


def test_myopia_weights_recent_steps_more():
    # σ⁰ is good early, σ¹ is good late; undiscounted they tie-break towards σ⁰
    r0 = np.array([[1.0, 1.0, 0.0, 0.0]])
    r1 = np.array([[0.0, 0.0, 0.9, 0.9]])
    rng = np.random.default_rng(0)
    assert Teacher().label(r0, r1, rng)[1][0] == 0
    assert Teacher(gamma=0.5).label(r0, r1, rng)[1][0] == 1  # weights 1/8, 1/4, 1/2, 1


def test_mistakes_flip_the_documented_fraction():
    r0, r1, rng = _pairs(n=20000)
    _, rational = Teacher().label(r0, r1, rng)
    _, noisy = Teacher(eps_mistake=0.1).label(r0, r1, rng)
    assert abs(np.mean(noisy != rational) - 0.1) < 0.01


def test_skip_drops_pairs_where_neither_segment_is_good_enough():
    r0, r1, rng = _pairs()
    t = Teacher(eps_skip=0.5)
    t.set_margin(10.0)  # thres_skip = 5 on sums of 10 uniforms (mean 5)
    assert t.thres_skip == pytest.approx(5.0)
    kept, labels = t.label(r0, r1, rng)
    best = np.maximum(r0.sum(1), r1.sum(1))
    assert np.array_equal(kept, np.flatnonzero(best > 5.0))
    assert 0 < len(kept) < len(r0)
    assert np.array_equal(labels, np.where(r1[kept].sum(1) > r0[kept].sum(1), 1, 0))


def test_equal_marks_close_pairs_and_overrides_mistakes():
    r0, r1, rng = _pairs()
    t = Teacher(eps_equal=0.1, eps_mistake=1.0)
    t.set_margin(5.0)  # thres_equal = 0.5
    kept, labels = t.label(r0, r1, rng)
    close = np.abs(r0.sum(1) - r1.sum(1)) < 0.5
    assert np.array_equal(labels == -1, close) and close.any()
    # eps_mistake = 1 flips every other label
    assert np.array_equal(labels[~close], np.where(r1.sum(1) > r0.sum(1), 0, 1)[~close])
