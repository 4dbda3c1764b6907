"""Evaluation of a trained policy against its reference: gold reward and judge win rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from brlhf.judges import SafeJudge


def gold_reward(
    trainer: Any,
    prompts: list[Any],
    score: Callable[[Any, str], float],
    policy: str = "y",
    samples_per_prompt: int = 1,
) -> float:
    """Mean ``score(prompt, completion)`` over samples of ``policy`` (``"y"``, ``"z"`` or ``"reference"``)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    completions = trainer.generate(repeated, policy=policy)
    return sum(score(p, c) for p, c in zip(repeated, completions)) / len(repeated)


def win_rate(
    trainer: Any, prompts: list[Any], judge: Any, policy: str = "y", baseline: str = "reference"
) -> float:
    """Fraction of prompts where ``judge`` prefers ``policy``'s sample to ``baseline``'s (abstentions: ½)."""
    ours = trainer.generate(prompts, policy=policy)
    theirs = trainer.generate(prompts, policy=baseline)
    answers = SafeJudge(judge).judge(prompts, list(zip(ours, theirs)))
    return sum(0.5 if a is None else float(a == 0) for a in answers) / len(prompts)
