"""Judges: the protocol, the three judges and the failure handling of SafeJudge."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from brlhf.judges import FunctionJudge, HumanJudge, RewardModelJudge, SafeJudge, as_judge

PROMPTS = ["p1", "p2", "p3"]
PAIRS = [("aaa", "a"), ("b", "bbbb"), ("cc", "cc")]


def test_function_judge_prefers_higher_score_and_abstains_on_ties():
    judge = FunctionJudge(lambda p, c: len(c))
    assert judge.judge(PROMPTS, PAIRS) == [0, 1, None]


def test_noisy_function_judge_follows_bradley_terry():
    judge = FunctionJudge(lambda p, c: float(len(c)), temperature=1.0, seed=0)
    answers = [judge.judge(["p"], [("a", "ab")])[0] for _ in range(2000)]
    p_b = sum(answers) / len(answers)
    assert abs(p_b - torch.sigmoid(torch.tensor(1.0)).item()) < 0.04  # P(b ≻ a) = σ(1)


def test_reward_model_judge_matches_the_model_scores(tokenizer, reward_model):
    judge = RewardModelJudge(reward_model, tokenizer)
    pairs = [("hello there", "sea"), ("a cat", "the moon is bright")]
    scores = judge.scores(["Tell me", "Write"], pairs)
    expected = [None if a == b else int(b > a) for a, b in scores]
    assert judge.judge(["Tell me", "Write"], pairs) == expected
    with torch.no_grad():
        direct = reward_model(**tokenizer(["Tell mehello there"], return_tensors="pt")).logits[0, 0].item()
    assert scores[0][0] == pytest.approx(direct, abs=1e-5)


def test_human_judge_reads_answers_written_by_a_person(tmp_path):
    judge = HumanJudge(str(tmp_path), timeout=10, poll=0.05)

    def person():
        for _ in range(200):
            if (tmp_path / "pending.jsonl").exists():
                break
            time.sleep(0.02)
        rows = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
        with open(tmp_path / "answers.jsonl", "w") as fh:
            fh.write(json.dumps({"id": rows[0]["id"], "choice": 1}) + "\n")
            fh.write("not json\n")
            fh.write(json.dumps({"id": rows[1]["id"], "choice": 0}) + "\n")
            fh.write(json.dumps({"id": rows[2]["id"], "choice": None}) + "\n")

    thread = threading.Thread(target=person)
    thread.start()
    with pytest.warns(UserWarning, match="malformed"):
        answers = judge.judge(PROMPTS, PAIRS)
    thread.join()
    assert answers == [1, 0, None]


def test_human_judge_times_out_to_abstentions(tmp_path):
    assert HumanJudge(str(tmp_path), timeout=0.1, poll=0.02).judge(["p"], [("a", "b")]) == [None]


def test_safe_judge_retries_then_succeeds():
    calls = {"n": 0}

    def flaky(prompts, completions):
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("server busy")
        return [0] * len(prompts)

    judge = SafeJudge(flaky, timeout=None, max_retries=2)
    with pytest.warns(UserWarning, match="server busy"):
        assert judge.judge(PROMPTS, PAIRS) == [0, 0, 0]
    assert calls["n"] == 3 and judge.stats["failed_calls"] == 0


def test_safe_judge_skips_a_judge_that_always_fails():
    judge = SafeJudge(lambda p, c: 1 / 0, timeout=None, max_retries=1)
    with pytest.warns(UserWarning, match="not counted as labels"):
        assert judge.judge(PROMPTS, PAIRS) == [None, None, None]
    assert judge.stats["failed_calls"] == 1 and judge.stats["abstained"] == 3


def test_safe_judge_times_out():
    judge = SafeJudge(lambda p, c: time.sleep(1.0) or [0] * len(p), timeout=0.05, max_retries=0)
    with pytest.warns(UserWarning, match="timed out"):
        assert judge.judge(["p"], [("a", "b")]) == [None]


def test_safe_judge_turns_garbage_into_abstentions():
    judge = SafeJudge(lambda p, c: [1, "yes", 7], timeout=None)
    with pytest.warns(UserWarning, match="expected 0, 1 or None"):
        assert judge.judge(PROMPTS, PAIRS) == [1, None, None]
    assert judge.stats["invalid_answers"] == 2
    wrong_length = SafeJudge(lambda p, c: [0], timeout=None, max_retries=0)
    with pytest.warns(UserWarning):
        assert wrong_length.judge(PROMPTS, PAIRS) == [None, None, None]
    tf = SafeJudge(lambda p, c: [True, -1, 0.0], timeout=None)
    with pytest.warns(UserWarning):
        assert tf.judge(PROMPTS, PAIRS) == [None, None, 0]


def test_a_judge_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="judge"):
        as_judge("gpt-4")
    with pytest.raises(TypeError, match="callable"):
        FunctionJudge(3)
