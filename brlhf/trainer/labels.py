"""The judge's labels: pairs of ``y``'s samples sent to the judge each outer step, within the per-step
quota and the total budget, counted over all processes, and (``label_replay``) added to the offline pool.

Each process labels its own pairs (``labels_per_step / world_size`` of them). A process without labels
in a step while others have some makes the same forward passes on a weight-0 placeholder pair under
ZeRO-3, whose weight gathers are collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from brlhf.trainer.distributed import gather, sum_over_processes
from brlhf.trainer.rollout import Rollout


@dataclass
class LabelledPairs:
    """Judge-labelled pairs of one outer step: rows ``chosen[i]`` / ``rejected[i]`` of ``rollout``."""

    rollout: Rollout
    chosen: Tensor
    rejected: Tensor
    weight: float = 1.0  # 0: a placeholder pair, for the forward passes only (ZeRO-3, see _label_pairs)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def rows(self) -> Tensor:
        """The rows of ``rollout`` in the pairs: the chosen ones, then the rejected ones."""
        return torch.cat([self.chosen, self.rejected])


class LabelsMixin:
    """Labelling ``y``'s latest samples (``_rollouts["y"]``) for :class:`BilevelRLHFTrainer` with its
    ``judge``; the label count ``labels_used`` and the budget; replayed labels join ``_preferences``."""

    def budget_exhausted(self) -> bool:
        return self.args.label_budget is not None and self.labels_used >= self.args.label_budget

    def _labels_this_step(self) -> int:
        per_step = self.args.labels_per_step
        if self.args.label_budget is not None:
            per_step = min(per_step, max(self.args.label_budget - self.labels_used, 0))
        return per_step // self.world_size

    def _label_pairs(self) -> LabelledPairs | None:
        """Send pairs of ``y``'s latest samples to the judge; count the valid labels (all processes)."""
        wanted = self._labels_this_step() if self.judge is not None else 0
        rollout = self._rollouts.get("y")
        chosen, rejected = [], []
        if wanted > 0 and rollout is not None:
            k = self.args.num_generations
            groups = len(rollout.prompts) // k
            candidates = [(g * k + 2 * j, g * k + 2 * j + 1) for j in range(k // 2) for g in range(groups)][
                :wanted
            ]
            answers = self.judge.judge(
                [rollout.prompts[a] for a, _ in candidates],
                [(rollout.completions[a], rollout.completions[b]) for a, b in candidates],
            )
            for (a, b), ans in zip(candidates, answers):
                if ans is not None:
                    chosen.append(b if ans == 1 else a)
                    rejected.append(a if ans == 1 else b)
        count = torch.tensor(
            [len(chosen), 0 if rollout is None else 1], dtype=torch.float64, device=self.args.device
        )
        sum_over_processes(count, self.world_size)
        self.labels_used += int(count[0])
        self._stats["labels/step"] = float(count[0])
        if self.args.label_replay:
            self._replay(rollout, chosen, rejected)
        device = rollout.logprobs.device if rollout is not None else None
        if not chosen and (self.zero3 or self.fsdp) and count[0] > 0:
            # ZeRO-3 / FSDP: other processes make forward passes on their pairs (gathering the reward model's
            # and y's weights, a collective), so this one makes the same passes on a placeholder pair with
            # weight 0: one row twice, whose gradient is exactly zero
            row = torch.zeros(1, dtype=torch.long, device=device)
            return LabelledPairs(rollout, row, row, weight=0.0)
        if not chosen:
            return None
        return LabelledPairs(
            rollout, torch.tensor(chosen, device=device), torch.tensor(rejected, device=device)
        )

    def _replay(self, rollout: Rollout | None, chosen: list[int], rejected: list[int]) -> None:
        """Adds this step's labelled pairs to the offline preferences (``label_replay``)."""
        new: list[dict[str, Any]] = [
            {
                "prompt": rollout.prompts[c],
                "chosen": rollout.completions[c],
                "rejected": rollout.completions[r],
            }
            for c, r in zip(chosen, rejected)
        ]
        # every process replays every label: the same pool everywhere
        new = [row for rows in gather(new, self.world_size) for row in rows]
        if new:
            self._preferences = (self._preferences or []) + new
