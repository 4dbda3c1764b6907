"""PEBBLE's reward model ``r_x``: an ensemble of MLPs trained with the Bradley-Terry model on segment sums.

Each member m maps ``(s, a)`` to ``r_m(s, a) ∈ [-1, 1]`` (3 hidden layers of 256, LeakyReLU, tanh out);
the reward the agent sees is the mean ``r̂ = (1/M) Σ_m r_m``. For a pair of segments σ⁰, σ¹ of H steps

    P_m(σ¹ ≻ σ⁰) = exp Σ_t r_m(σ¹_t) / (exp Σ_t r_m(σ⁰_t) + exp Σ_t r_m(σ¹_t))

and the loss of a labelled pair with target ``y`` (1: σ¹ preferred, 0: σ⁰, ½: equally good) is the
cross-entropy ``-y log P_m(σ¹ ≻ σ⁰) - (1 - y) log P_m(σ⁰ ≻ σ¹)``, summed over the members (B-Pref's
``train_soft_reward``; identical to ``train_reward`` when no label is ½). Each member draws its own
minibatches (its own permutation of the labelled pairs) every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robotics.sac import mlp


class RewardEnsemble(nn.Module):
    def __init__(self, in_dim: int, members: int = 3, hidden_dim: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.members = members
        self.net = mlp(in_dim, hidden_dim, 1, depth, n=members, act=nn.LeakyReLU)

    def member_rewards(self, sa: Tensor, per_member: bool = False) -> Tensor:
        """``r_m(s, a)``, ``[M, ...]``, of ``sa [..., D]`` (or, ``per_member``, of ``sa [M, ..., D]``)."""
        x = sa if per_member else sa.unsqueeze(0).expand(self.members, *sa.shape)
        lead = x.shape[1:-1]
        out = torch.tanh(self.net(x.reshape(self.members, -1, x.shape[-1])))
        return out.reshape(self.members, *lead)

    def forward(self, sa: Tensor) -> Tensor:
        """``r̂(s, a)``, the ensemble mean: ``[..., D] -> [...]``."""
        return self.member_rewards(sa).mean(0)

    def segment_logits(self, seg0: Tensor, seg1: Tensor, per_member: bool = False) -> Tensor:
        """``[M, N, 2]`` segment returns ``(Σ_t r_m(σ⁰_t), Σ_t r_m(σ¹_t))``; ``seg [(M,) N, H, D]``."""
        r0 = self.member_rewards(seg0, per_member).sum(-1)
        r1 = self.member_rewards(seg1, per_member).sum(-1)
        return torch.stack([r0, r1], dim=-1)

    def pair_losses(
        self, seg0: Tensor, seg1: Tensor, target: Tensor, per_member: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(CE, correct)`` per member and pair, ``[M, N]``; ``target`` = P(σ¹ ≻ σ⁰), ``[(M,) N]``."""
        logits = self.segment_logits(seg0, seg1, per_member)
        logp = F.log_softmax(logits, dim=-1)
        target = target.expand(logits.shape[:-1])
        ce = -(target * logp[..., 1] + (1 - target) * logp[..., 0])
        correct = (logits[..., 1] > logits[..., 0]) == (target > 0.5)
        return ce, correct

    def preference_loss(self, seg0: Tensor, seg1: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """PEBBLE's loss on per-member minibatches ``seg [M, N, H, D]``: ``(Σ_m mean_n CE, correct)``."""
        ce, correct = self.pair_losses(seg0, seg1, target, per_member=True)
        return ce.mean(-1).sum(), correct

    @torch.no_grad()
    def preference_std(self, seg0: Tensor, seg1: Tensor) -> Tensor:
        """Disagreement of a candidate pair: the std over members of ``P_m(σ⁰ ≻ σ¹)``, ``[N]``."""
        p = F.softmax(self.segment_logits(seg0, seg1), dim=-1)[..., 0]
        return p.std(0, unbiased=False)


def epoch_indices(n: int, members: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch of minibatch indices ``[M, b]``: member m walks its own permutation of ``range(n)``."""
    perms = np.stack([rng.permutation(n) for _ in range(members)])
    for start in range(0, n, batch_size):
        yield perms[:, start : start + batch_size]
