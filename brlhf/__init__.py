"""brlhf: bilevel reinforcement learning from human feedback.

* ``brlhf.core``: the penalty-based, fully first-order bilevel solver (Algorithm 1), for any torch problem.
* ``brlhf.rl``: the RL gradient oracles of the paper (eq. 11: reward-parameter gradient of the return;
  eq. 12: the KL-regularised policy gradient).
* ``brlhf.trainer``: ``BilevelRLHFConfig`` and ``BilevelRLHFTrainer`` for language models (imported on
  first use: they pull in transformers, trl and peft).
"""

from typing import Any

from brlhf.core import BilevelLossError, LambdaSchedule, PenaltyConfig, PenaltySolver

__version__ = "0.1.0"
__all__ = [
    "BilevelLossError",
    "BilevelRLHFConfig",
    "BilevelRLHFTrainer",
    "LambdaSchedule",
    "PenaltyConfig",
    "PenaltySolver",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("BilevelRLHFConfig", "BilevelRLHFTrainer"):
        from brlhf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'brlhf' has no attribute {name!r}")
