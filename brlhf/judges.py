"""Pairwise judges: given prompts and two completions each, say which completion is preferred.

TRL 1.x removed its judges; this module gives the small protocol the bilevel trainer needs.

* A judge is any object with ``judge(prompts, completions) -> list[int | None]`` where
  ``completions[i] = (a, b)`` and the answer is ``0`` (``a`` preferred), ``1`` (``b``) or ``None``
  (abstain), or any plain callable with that signature.
* :class:`FunctionJudge` turns a score function ``score(prompt, completion) -> float`` into a judge
  (the higher score wins); :class:`RewardModelJudge` does the same with a gold reward model;
  :class:`HumanJudge` writes pending pairs to a JSONL file and reads a person's answers back.
* :class:`SafeJudge` wraps any of them: retries on exceptions, a timeout, and per-answer validation,
  so a failing, slow or garbage-returning judge only produces abstentions (with a warning) and never
  an invalid label.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Prompt = Any  # a string, or a list of chat messages
Pair = Sequence[str]


GOLD_RULES: dict[str, Callable[[Any, str], float]] = {
    "spaces": lambda prompt, completion: completion.count(" ") / max(len(completion), 1),
    "vowels": lambda prompt, completion: sum(ch in "aeiou" for ch in completion) / max(len(completion), 1),
    "lowercase": lambda prompt, completion: sum(ch.islower() for ch in completion) / max(len(completion), 1),
}
"""Rule-based gold scores ``score(prompt, completion) -> float`` (fraction of spaces, vowels, lowercase
letters) for the embedded recipe and the benchmarks: wrap one in :class:`FunctionJudge`."""


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, prompts: list[Prompt], completions: list[Pair]) -> list[int | None]:
        """Per prompt: 0 if ``completions[i][0]`` is preferred, 1 if ``completions[i][1]``, None: abstain."""
        ...


def _text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class FunctionJudge:
    """Prefers the completion with the higher ``score(prompt, completion)``; ties abstain.

    With ``temperature > 0`` the label is drawn from the Bradley-Terry model
    ``P(a ≻ b) = σ((s_a - s_b) / temperature)`` (a noisy annotator), with its own seeded generator.
    """

    def __init__(
        self, score: Callable[[Prompt, str], float], temperature: float = 0.0, seed: int = 0
    ) -> None:
        if not callable(score):
            raise TypeError(
                f"FunctionJudge needs a callable score(prompt, completion), got {type(score).__name__}"
            )
        self.score, self.temperature = score, temperature
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, prompts: list[Prompt], completions: list[Pair]) -> list[tuple[float, float]]:
        return [(float(self.score(p, a)), float(self.score(p, b))) for p, (a, b) in zip(prompts, completions)]

    def judge(self, prompts: list[Prompt], completions: list[Pair]) -> list[int | None]:
        out: list[int | None] = []
        for sa, sb in self.scores(prompts, completions):
            if self.temperature > 0:
                p_b = 1.0 / (1.0 + math.exp(-(sb - sa) / self.temperature))
                out.append(int(torch.rand((), generator=self.generator).item() < p_b))
            else:
                out.append(None if sa == sb else int(sb > sa))
        return out


class RewardModelJudge(FunctionJudge):
    """A gold reward model (a sequence classifier with one output) as a judge."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        temperature: float = 0.0,
        seed: int = 0,
        max_length: int = 1024,
    ) -> None:
        super().__init__(lambda p, c: 0.0, temperature, seed)
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @torch.no_grad()
    def score_texts(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        from brlhf.trainer.rollout import join_prompt_completion

        texts = [join_prompt_completion(p, c, self.tokenizer) for p, c in zip(prompts, completions)]
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        device = next(self.model.parameters()).device
        return self.model(**enc.to(device)).logits[:, 0].float().tolist()

    def scores(self, prompts: list[Prompt], completions: list[Pair]) -> list[tuple[float, float]]:
        a = self.score_texts(prompts, [c[0] for c in completions])
        b = self.score_texts(prompts, [c[1] for c in completions])
        return list(zip(a, b))


class HumanJudge:
    """A person labels between steps: pending pairs go to ``<folder>/pending.jsonl``, answers are read
    from ``<folder>/answers.jsonl`` (one ``{"id": ..., "choice": 0 | 1 | null}`` per line).

    ``judge`` waits up to ``timeout`` seconds (polling every ``poll`` seconds) for the answers of the
    pairs it just wrote; unanswered pairs abstain.
    """

    def __init__(self, folder: str, timeout: float = 3600.0, poll: float = 1.0) -> None:
        self.folder, self.timeout, self.poll = folder, timeout, poll
        os.makedirs(folder, exist_ok=True)
        self.pending_path = os.path.join(folder, "pending.jsonl")
        self.answers_path = os.path.join(folder, "answers.jsonl")

    def _answers(self) -> dict[str, Any]:
        if not os.path.exists(self.answers_path):
            return {}
        answers = {}
        with open(self.answers_path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                    answers[str(row["id"])] = row.get("choice")
                except (json.JSONDecodeError, KeyError, TypeError):
                    warnings.warn(
                        f"HumanJudge: ignoring a malformed line in {self.answers_path}: {line[:80]!r}",
                        stacklevel=2,
                    )
        return answers

    def judge(self, prompts: list[Prompt], completions: list[Pair]) -> list[int | None]:
        ids = [uuid.uuid4().hex for _ in prompts]
        with open(self.pending_path, "a") as fh:
            for i, p, (a, b) in zip(ids, prompts, completions):
                fh.write(
                    json.dumps({"id": i, "prompt": _text(p), "completion_0": a, "completion_1": b}) + "\n"
                )
        deadline = time.monotonic() + self.timeout
        while True:
            answers = self._answers()
            if all(i in answers for i in ids) or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        return [answers.get(i) for i in ids]


def as_judge(judge: Any) -> PairwiseJudge:
    """A judge object, or a plain callable ``(prompts, completions) -> labels`` wrapped as one."""
    if hasattr(judge, "judge") and callable(judge.judge):
        return judge
    if callable(judge):

        class _Callable:
            def judge(self, prompts, completions):
                return judge(prompts, completions)

        return _Callable()
    raise TypeError(
        "the judge must have a `judge(prompts, completions)` method or be callable, "
        f"got {type(judge).__name__}"
    )


class SafeJudge:
    """Retries, a timeout and validation around any judge.

    Each call is retried up to ``max_retries`` times on an exception, a timeout or an answer of the
    wrong length; after that every pair abstains (``None``) with a warning. Single answers that are not
    0, 1 or None (or -1, TRL's "unknown") become abstentions with a warning. ``stats`` counts them.
    """

    def __init__(self, judge: Any, timeout: float | None = 60.0, max_retries: int = 2) -> None:
        self.inner = as_judge(judge)
        self.timeout, self.max_retries = timeout, max_retries
        if isinstance(self.inner, HumanJudge):  # a person gets the HumanJudge's own (long) deadline
            self.timeout = None
        self.stats = {"calls": 0, "failed_calls": 0, "invalid_answers": 0, "abstained": 0}

    def _call(self, prompts: list[Prompt], completions: list[Pair]) -> Any:
        if self.timeout is None:
            return self.inner.judge(prompts, completions)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(self.inner.judge, prompts, completions).result(timeout=self.timeout)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def judge(self, prompts: list[Prompt], completions: list[Pair]) -> list[int | None]:
        self.stats["calls"] += 1
        if not prompts:
            return []
        answers = None
        for attempt in range(self.max_retries + 1):
            try:
                result = list(self._call(prompts, completions))
                if len(result) != len(prompts):
                    raise ValueError(f"returned {len(result)} answers for {len(prompts)} pairs")
                answers = result
                break
            except concurrent.futures.TimeoutError:
                warnings.warn(f"judge timed out after {self.timeout}s (attempt {attempt + 1})", stacklevel=2)
            except Exception as err:  # noqa: BLE001 - any judge failure is retried, then skipped
                warnings.warn(
                    f"judge failed (attempt {attempt + 1}): {type(err).__name__}: {err}", stacklevel=2
                )
        if answers is None:
            self.stats["failed_calls"] += 1
            self.stats["abstained"] += len(prompts)
            warnings.warn(
                f"judge gave no answer after {self.max_retries + 1} attempts: "
                f"{len(prompts)} pairs skipped (not counted as labels)",
                stacklevel=2,
            )
            return [None] * len(prompts)
        clean: list[int | None] = []
        for a in answers:
            if a is None or (isinstance(a, (int, float)) and not isinstance(a, bool) and a == -1):
                clean.append(None)
            elif isinstance(a, (int, float)) and not isinstance(a, bool) and a in (0, 1):
                clean.append(int(a))
            else:
                self.stats["invalid_answers"] += 1
                warnings.warn(f"judge returned {a!r}, expected 0, 1 or None: pair skipped", stacklevel=2)
                clean.append(None)
        self.stats["abstained"] += sum(c is None for c in clean)
        return clean
