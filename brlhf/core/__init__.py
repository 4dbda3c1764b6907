"""The solver core: the penalty-based first-order bilevel method, for any torch parameters."""

from brlhf.core.rng import get_rng_state, set_rng_state
from brlhf.core.schedule import LambdaSchedule
from brlhf.core.solver import BilevelLossError, PenaltyConfig, PenaltySolver, trainable_parameters

__all__ = [
    "BilevelLossError",
    "LambdaSchedule",
    "PenaltyConfig",
    "PenaltySolver",
    "get_rng_state",
    "set_rng_state",
    "trainable_parameters",
]
