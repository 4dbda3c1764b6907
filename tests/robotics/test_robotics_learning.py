"""Slow: the SAC oracle (``--method sac``) learns walker_walk from the true reward (``pytest -m slow``;
~8 min on one thread)."""

import pytest

pytest.importorskip("dm_control")

import torch  # noqa: E402

from robotics.config import make_config  # noqa: E402
from robotics.train import Trainer  # noqa: E402


@pytest.mark.slow
def test_sac_learns_walker_walk_from_the_true_reward():
    """Reduced walker networks (2x256, batch 512), 30k steps; a random policy gets ~30."""
    torch.set_num_threads(1)
    cfg = make_config("walker_walk", "sac", "reduced", steps=30_000, eval_every=30_000, eval_episodes=3)
    rows = Trainer(cfg).run()
    assert rows[-1]["step"] == 30_000 and rows[-1]["eval_return"] > 120.0
