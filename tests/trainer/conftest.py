"""Tiny models and prompt sets built locally (nothing from the hub) for the trainer tests."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset

from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS_FILE = os.path.join(REPO, "recipes", "data", "prompts.jsonl")

torch.set_num_threads(1)


def shipped_prompts() -> list:
    with open(PROMPTS_FILE) as fh:
        return [json.loads(line)["prompt"] for line in fh]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer([p[0]["content"] for p in shipped_prompts()], vocab_size=200)


@pytest.fixture
def policy(tokenizer):
    return build_tiny_policy(tokenizer, hidden=32, layers=1, seed=0)


@pytest.fixture
def reward_model(tokenizer):
    return build_tiny_reward_model(tokenizer, hidden=32, layers=1, seed=1)


@pytest.fixture
def prompts() -> Dataset:
    return Dataset.from_list([{"prompt": p} for p in shipped_prompts()[:16]])


def spaces(prompt, completion: str) -> float:
    """The rule-based gold reward of the tests: the fraction of spaces in the completion."""
    return completion.count(" ") / max(len(completion), 1)


def tiny_args(tmp_path, **overrides):
    from brlhf.trainer import BilevelRLHFConfig

    kw = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=6,
        labels_per_step=2,
        learning_rate=1e-2,
        reward_learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kw.update(overrides)
    return BilevelRLHFConfig(**kw)


@pytest.fixture
def args_factory(tmp_path):
    """``args_factory(**overrides)``: a tiny BilevelRLHFConfig writing under this test's tmp_path."""
    return lambda **overrides: tiny_args(tmp_path, **overrides)


@pytest.fixture
def gold():
    return spaces
