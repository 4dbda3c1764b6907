"""brlhf: bilevel reinforcement learning from human feedback.

* ``brlhf.core``: the penalty-based, fully first-order bilevel solver (Algorithm 1), for any torch problem.
* ``brlhf.rl``: the RL gradient oracles of the paper (eq. 11: reward-parameter gradient of the return;
  eq. 12: the KL-regularised policy gradient).
"""

from brlhf.core import BilevelLossError, LambdaSchedule, PenaltyConfig, PenaltySolver

__version__ = "0.1.0"
__all__ = ["BilevelLossError", "LambdaSchedule", "PenaltyConfig", "PenaltySolver", "__version__"]
