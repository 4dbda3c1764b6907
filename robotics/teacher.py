"""B-Pref's scripted teacher (Lee et al. 2021, "B-Pref"), labelling a segment pair from true rewards.

For segments σ⁰, σ¹ with true rewards r⁰_t, r¹_t (t = 0..H-1), in this order:

1. **skip** (``eps_skip``): drop the pair if ``max(Σ r⁰, Σ r¹) < thres_skip`` — neither is good enough;
2. **equal** (``eps_equal``): label ½ ("equally preferable", stored as -1) if ``|Σ r⁰ - Σ r¹| < thres_equal``;
3. **myopia** (``gamma``): compare the discounted sums ``R^i = Σ_t γ^(H-1-t) r^i_t`` (recent steps
   count more);
4. **rationality** (``beta``): β > 0 samples the label from ``P(σ¹ ≻ σ⁰) = σ(β (R¹ - R⁰))``; β ≤ 0 (default)
   is perfectly rational: label 1 iff ``R⁰ < R¹``;
5. **mistakes** (``eps_mistake``): flip each label with probability ``eps_mistake``;

and the equal labels of step 2 override steps 3-5. The thresholds scale with the task:
``thres_{skip,equal} = eps_{skip,equal} · mean(last 10 true episode returns) · H / episode_length``
(``set_margin``). Label convention as B-Pref: 1 means σ¹ is preferred, 0 σ⁰, -1 equal.
(B-Pref's ``train_PEBBLE.py`` multiplies by eps twice after the first session, setter and caller both;
that quirk is not copied. With the paper's settings, all eps = 0, the two agree.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Teacher:
    beta: float = -1.0
    gamma: float = 1.0
    eps_mistake: float = 0.0
    eps_skip: float = 0.0
    eps_equal: float = 0.0
    thres_skip: float = 0.0
    thres_equal: float = 0.0

    def set_margin(self, margin: float) -> None:
        """``margin`` = mean true return per segment length (B-Pref's ``new_margin``)."""
        self.thres_skip = margin * self.eps_skip
        self.thres_equal = margin * self.eps_equal

    def label(
        self, r0: np.ndarray, r1: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(kept, labels)``: indices of the pairs kept and their labels in {1, 0, -1}; ``r0, r1 [N, H]``."""
        sum0, sum1 = r0.sum(1), r1.sum(1)
        kept = np.arange(len(r0))
        if self.thres_skip > 0:
            kept = kept[np.maximum(sum0, sum1)[kept] > self.thres_skip]
        r0, r1, sum0, sum1 = r0[kept], r1[kept], sum0[kept], sum1[kept]
        equal = np.abs(sum0 - sum1) < self.thres_equal
        weights = self.gamma ** np.arange(r0.shape[1] - 1, -1, -1, dtype=np.float64)
        ret0, ret1 = r0 @ weights, r1 @ weights
        if self.beta > 0:
            p1 = 1.0 / (1.0 + np.exp(-self.beta * (ret1 - ret0)))
            labels = (rng.random(len(kept)) < p1).astype(np.int64)
        else:
            labels = (ret0 < ret1).astype(np.int64)
        flip = rng.random(len(kept)) <= self.eps_mistake
        labels[flip] = 1 - labels[flip]
        labels[equal] = -1
        return kept, labels
