"""RL gradient oracles of the paper (eqs. 11-12), as autograd surrogates."""

from brlhf.rl.oracles import (
    discount_weights,
    kl_policy_gradient_surrogate,
    leave_one_out_baseline,
    reinforce,
    return_surrogate,
    rewards_to_go,
)

__all__ = [
    "discount_weights",
    "kl_policy_gradient_surrogate",
    "leave_one_out_baseline",
    "reinforce",
    "return_surrogate",
    "rewards_to_go",
]
