"""Label efficiency: gold reward against judge labels used, brlhf against TRL's pipelines (issue 5).

    OMP_NUM_THREADS=1 python benchmarks/label_efficiency.py            # 3 seeds, 2 processes at a time
    OMP_NUM_THREADS=1 python benchmarks/label_efficiency.py --quick    # smoke run, under a minute

Task: the tiny local Llama of ``brlhf.tiny`` (built from the recipe's prompts, nothing downloaded) is
steered towards completions with many spaces; the hidden gold score is ``GOLD_RULES["spaces"]`` (the
fraction of spaces in the completion). The gold score is used only (a) as the judge answering
preference queries, ties broken by a seeded coin so every query is a label, and (b) as the final score.

Methods, each with the same judge, label budget, base model (per seed), adapters (LoRA on the linear
layers plus, by default, a trained copy of the LM head: ``--no-train_head`` leaves the head frozen, and
then no method, not even RLOO on the gold score, moves the tiny random model much in this many updates),
β, sampling temperature, completion length, number of policy updates (``budget / labels_per_step``) and
constant learning rate (TrainingArguments' default linear decay would give TRL's trainers half the
average step of brlhf's constant one; with it online DPO reached gold 0.36 instead of 0.998 on seed 0):

* ``brlhf``: ``BilevelRLHFTrainer`` (Algorithm 1) with λ = 10 and ``keep_better_pure`` (when a reward
  step measures ``g(x, y) < g(x, z)``, z lags behind y at its own objective: that step's penalty term is
  skipped and z ← y), labels on pairs of y's own samples, every label replayed in later reward steps
  (``label_replay``; ``RewardTrainer`` too sees each label once per epoch).
* ``brlhf_lam1``: the same with λ = 1. ``brlhf_lam_growing``: λ grows along the run, λ_t = (1 + t)^0.5
  capped at 30 (the increasing schedule of the paper's references). ``brlhf_k4``: K = 4 inner (policy)
  steps per reward step, each reward step on 4x the labels: the same labels, policy updates and
  generated tokens as K = 1, in a quarter of the reward steps. ``brlhf_unguarded_lam1``,
  ``brlhf_unguarded_lam10``, ``brlhf_unguarded_eta_small``: plain Algorithm 1 without the guard (λ = 1,
  λ = 10, and λ = 1 with a reward step size η = 1e-4, 30x below the policies': two time scales).
  Without the guard a lagging z lets the reward step drive the value gap far below zero (r_x learns to
  tell y's samples from z's).
* ``brlhf_no_penalty``: ``penalised_upper_grad=False``. Then y ≡ z exactly (common random numbers), the
  value-gap term vanishes and the reward step is the plain Bradley-Terry fit on online labels of the
  policy's own samples, the policy trained on the current reward model: the issue's "λ = 0".
* ``rm_then_rloo``: the standard pipeline. Pairs of reference samples labelled by the judge, a reward
  model fitted with TRL's ``RewardTrainer``, then TRL's ``RLOOTrainer`` on that frozen reward model;
  one run per label budget in ``--rm_fractions`` of the budget.
* ``online_dpo``: TRL's ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``) with a reward function
  that asks the judge about each generated pair (one label per pair).
* ``<method>_half`` (for ``brlhf``, ``brlhf_no_penalty``, ``online_dpo``): the same method and the same
  number of policy updates with half the labels per update (half the budget in all): a method that
  learns a reward model can spend fewer labels per update; online DPO gets the same chance.
* ``gold_rloo``: not a competitor: ``RLOOTrainer`` on ``--gold_scale`` x the gold score itself (no
  labels), to tell a label-limited setting from a policy-limited one.

Generated tokens are counted per method (brlhf samples two copies, y and z, per step; RLOO gets as many
completions per step; online DPO generates one pair per label; the pipeline counts its reference pairs).

Outputs (``--out``, default ``benchmarks/results``): ``label_efficiency.csv`` (every measured point),
``label_efficiency.md`` (table, setup and verdict), ``label_efficiency.png`` (gold reward, win rate
against the reference and KL to the reference against labels used; mean and standard deviation over
seeds) and ``label_efficiency.txt`` (the console summary); ``--tag T`` names them
``label_efficiency.T.*``. Every (method, seed) runs in its own subprocess, one thread each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROMPTS = os.path.join(REPO, "recipes", "data", "prompts.jsonl")
BRLHF_VARIANTS: dict[str, dict[str, Any]] = {  # overrides of the brlhf options; remedies of issue 5
    "brlhf": {"lam": 10.0, "keep_better_pure": True},
    "brlhf_lam1": {"lam": 1.0, "keep_better_pure": True},
    "brlhf_lam_growing": {"lam": 1.0, "lam_power": 0.5, "lam_max": 30.0, "keep_better_pure": True},
    "brlhf_k4": {"lam": 10.0, "keep_better_pure": True, "inner_steps": 4},
    "brlhf_unguarded_lam1": {"lam": 1.0, "keep_better_pure": False},
    "brlhf_unguarded_lam10": {"lam": 10.0, "keep_better_pure": False},
    "brlhf_unguarded_eta_small": {"lam": 1.0, "keep_better_pure": False, "reward_learning_rate": 1e-4},
    "brlhf_no_penalty": {"penalised_upper_grad": False},
}
HALF = "_half"  # suffix: the same method and number of policy updates with half the labels per update
HALF_RATE = ("brlhf", "brlhf_no_penalty", "online_dpo")
METHODS = (*BRLHF_VARIANTS, "rm_then_rloo", "online_dpo", "gold_rloo", *(m + HALF for m in HALF_RATE))
LABELS = {
    "brlhf": "brlhf (BilevelRLHFTrainer, λ = 10)",
    "brlhf_lam1": "brlhf, λ = 1",
    "brlhf_lam_growing": "brlhf, λ_t = (1 + t)^0.5 (≤ 30)",
    "brlhf_k4": "brlhf, λ = 10, K = 4 inner steps",
    "brlhf_unguarded_lam1": "brlhf, λ = 1, no z ← y guard",
    "brlhf_unguarded_lam10": "brlhf, λ = 10, no z ← y guard",
    "brlhf_unguarded_eta_small": "brlhf, λ = 1, no guard, reward lr 1e-4",
    "brlhf_no_penalty": "brlhf, penalty off (λ = 0)",
    "rm_then_rloo": "RewardTrainer + RLOOTrainer",
    "online_dpo": "OnlineDPOTrainer + judge",
    "gold_rloo": "RLOOTrainer on the gold score itself (no labels)",
}
LABELS.update({m + HALF: LABELS[m] + ", half the labels per update" for m in HALF_RATE})
BASE_COMPETITORS = ("brlhf_no_penalty", "rm_then_rloo", "online_dpo")
COMPETITORS = (*BASE_COMPETITORS, *(m + HALF for m in HALF_RATE if m in BASE_COMPETITORS))


def base_method(method: str) -> str:
    return method.removesuffix(HALF)


# ---------------------------------------------------------------------------------------------- pieces
class CountingJudge:
    """The gold judge: the completion with the higher gold score wins, ties by a seeded coin (so every
    query is a label), and with probability ``error`` the answer is flipped (B-Pref's mistake teacher);
    ``labels`` counts the pairs it has answered."""

    def __init__(self, score: Callable[[Any, str], float], seed: int, error: float = 0.0) -> None:
        import torch

        self.score, self.labels, self.error = score, 0, error
        self.generator = torch.Generator().manual_seed(seed + 999)

    def judge(self, prompts: list[Any], completions: list[tuple[str, str]]) -> list[int]:
        import torch

        out = []
        for p, (a, b) in zip(prompts, completions):
            sa, sb = self.score(p, a), self.score(p, b)
            coin = int(torch.rand((), generator=self.generator).item() < 0.5)
            answer = coin if sa == sb else int(sb > sa)
            if self.error > 0 and torch.rand((), generator=self.generator).item() < self.error:
                answer = 1 - answer
            out.append(answer)
        self.labels += len(out)
        return out


class Evaluator:
    """Gold reward, win rate against the reference (gold comparison, ties ½) and the sequence-level KL
    ``E_π[log π - log π_ref]``, on ``samples`` completions per prompt; the training's random stream is
    restored afterwards."""

    def __init__(
        self, tokenizer: Any, prompts: list[Any], score: Callable, samples: int, length: int, seed: int
    ) -> None:
        self.tokenizer, self.score, self.length, self.seed = tokenizer, score, length, seed
        self.prompts = [p for p in prompts for _ in range(samples)]

    def __call__(
        self,
        policy: Callable[[], AbstractContextManager],
        reference: Callable[[], AbstractContextManager],
    ) -> dict[str, float]:
        import torch

        from brlhf.core import get_rng_state, set_rng_state
        from brlhf.trainer.rollout import encode_prompts, sample, sequence_logprobs

        tok, rng = self.tokenizer, get_rng_state()
        torch.manual_seed(self.seed + 12345)
        with torch.no_grad():
            ids, mask = encode_prompts(self.prompts, tok)
            args = (self.length, 1.0, tok.pad_token_id, tok.eos_token_id)
            with policy() as model:
                out, out_mask = sample(model, ids, mask, *args)
                logp = sequence_logprobs(model, ids, mask, out, out_mask)
            with reference() as ref:
                ref_logp = sequence_logprobs(ref, ids, mask, out, out_mask)
                ref_out, _ = sample(ref, ids, mask, *args)
        set_rng_state(rng)
        ours = tok.batch_decode(out, skip_special_tokens=True)
        theirs = tok.batch_decode(ref_out, skip_special_tokens=True)
        gold = [self.score(p, c) for p, c in zip(self.prompts, ours)]
        gold_ref = [self.score(p, c) for p, c in zip(self.prompts, theirs)]
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, gold_ref)]
        n = len(gold)
        return {
            "gold": sum(gold) / n,
            "win_rate": sum(wins) / n,
            "kl": (logp - ref_logp).mean().item(),
        }


def _lora(opts: argparse.Namespace) -> Any:
    """The adapters every method trains: LoRA on the linear layers (not the head: TRL's RLOO refuses a
    LoRA there), plus with ``--train_head`` a trainable copy of the LM head (peft ``modules_to_save``)."""
    from brlhf.tiny import tiny_lora_config

    config = tiny_lora_config(head=False)
    if opts.train_head:
        config.modules_to_save = ["lm_head"]
    return config


def _peft_contexts(model: Any) -> tuple[Callable, Callable]:
    """(policy, reference) context factories for a peft model: adapters on / adapters disabled."""

    @contextmanager
    def policy() -> Iterator[Any]:
        yield model

    @contextmanager
    def reference() -> Iterator[Any]:
        with model.disable_adapter():
            yield model

    return policy, reference


def _curve_callback(
    evaluate: Callable[[], dict[str, float]],
    labels: Callable[[], int],
    tokens: Callable[[], int],
    every: int,
) -> Any:
    """A ``TrainerCallback`` measuring ``evaluate()`` whenever ``labels()`` passes a multiple of ``every``."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []
            self.next = every

        def on_log(self, args, state, control, **kwargs):  # after the step's token count is logged
            if labels() >= self.next:
                self.points.append({"labels": labels(), "tokens": tokens(), **evaluate()})
                self.next = (labels() // every + 1) * every

    return Curve()


def _token_counter(key_lengths: list[str], completions_per_step: int) -> Any:
    """A ``TrainerCallback`` summing ``logs[key] * completions_per_step`` over the logged steps."""
    from transformers import TrainerCallback

    class Tokens(TrainerCallback):
        def __init__(self) -> None:
            self.count = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in key_lengths:
                if logs and key in logs:
                    self.count += float(logs[key]) * completions_per_step

    return Tokens()


# ---------------------------------------------------------------------------------------------- one run
def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (value read as JSON when it parses, else as a string) for ``--brlhf_set``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--brlhf_set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_one(method: str, seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed): train, measure the curve, return it with the labels and tokens used."""
    import torch
    from datasets import load_dataset

    from brlhf.judges import GOLD_RULES
    from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    t_start = time.time()
    dataset = load_dataset("json", data_files=PROMPTS, split="train")
    prompts = list(dataset["prompt"])
    tokenizer = build_tiny_tokenizer([p[0]["content"] for p in prompts], vocab_size=200)
    vocab_hash = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:10]
    score = GOLD_RULES[opts.gold_rule]
    judge = CountingJudge(score, seed, opts.judge_error)
    evaluate = Evaluator(tokenizer, prompts, score, opts.eval_samples, opts.completion_length, seed)
    folder = tempfile.mkdtemp(prefix="label_efficiency_")
    policy_path = os.path.join(folder, "policy")
    build_tiny_policy(tokenizer, seed=seed).save_pretrained(policy_path)
    tokenizer.save_pretrained(policy_path)
    steps = opts.budget // opts.labels_per_step  # policy updates: the same for every method
    name, method = method, base_method(method)
    per_step = opts.labels_per_step // 2 if name.endswith(HALF) else opts.labels_per_step
    budget = steps * per_step
    common = dict(
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        learning_rate=opts.policy_lr,
        lr_scheduler_type="constant",  # brlhf's default (TrainingArguments' linear decay slowed TRL's ~2x)
        beta=opts.beta,
        temperature=1.0,
    )

    def load_policy() -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)

    def reward_model() -> Any:
        return build_tiny_reward_model(tokenizer, seed=seed + 1)

    result: dict[str, Any] = {"method": name, "seed": seed, "vocab": vocab_hash, "points": []}
    if method in BRLHF_VARIANTS:
        from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer

        knobs = {
            "lam": opts.lam,
            "lam_power": opts.lam_power,
            "lam_max": None,
            "inner_steps": opts.inner_steps,
            "label_replay": opts.label_replay,
            "penalised_upper_grad": True,
            "reward_learning_rate": opts.reward_lr,
            **BRLHF_VARIANTS[method],
            **dict(_parse_override(kv) for kv in opts.brlhf_set),
        }
        knobs["labels_per_step"] = per_step * knobs["inner_steps"]
        args = BilevelRLHFConfig(
            output_dir=os.path.join(folder, "out"),
            max_steps=budget // knobs["labels_per_step"],
            per_device_train_batch_size=opts.prompts_per_step,
            num_generations=opts.generations,
            max_completion_length=opts.completion_length,
            label_budget=budget,
            offline_batch_size=opts.replay_batch_size,
            **knobs,
            **common,
        )
        trainer = BilevelRLHFTrainer(
            load_policy(),
            reward_model(),
            args,
            judge=judge,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora(opts),
        )
        completions = opts.prompts_per_step * opts.generations * knobs["inner_steps"]
        tokens = _token_counter(["completion_length/y", "completion_length/z"], completions)

        def measure() -> dict[str, float]:
            return evaluate(lambda: trainer.policies.active("y"), trainer.policies.reference)

        curve = _curve_callback(measure, lambda: judge.labels, lambda: int(tokens.count), opts.eval_every)
        trainer.add_callback(tokens)
        trainer.add_callback(curve)
        result["points"].append({"labels": 0, "tokens": 0, **measure()})
        trainer.train()
        result["points"] += curve.points
        if not curve.points or curve.points[-1]["labels"] != judge.labels:
            result["points"].append({"labels": judge.labels, "tokens": int(tokens.count), **measure()})
        result["labels_used"], result["tokens"] = judge.labels, int(tokens.count)
        assert trainer.labels_used == judge.labels, (trainer.labels_used, judge.labels)
    elif method == "online_dpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        generated = {"tokens": 0}

        def judge_reward(prompts: list[Any], completions: list[Any], completion_ids: list, **kw) -> list:
            """Rewards 1 / 0 from one judge query per pair (first half vs second half of the batch)."""
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            generated["tokens"] += sum(
                sum(t != tokenizer.pad_token_id for t in ids) for ids in completion_ids
            )
            n = len(texts) // 2
            answers = judge.judge(prompts[:n], list(zip(texts[:n], texts[n:])))
            return [float(a == 0) for a in answers] + [float(a == 1) for a in answers]

        args = OnlineDPOConfig(
            output_dir=os.path.join(folder, "out"),
            max_steps=steps,
            per_device_train_batch_size=per_step,
            max_new_tokens=opts.completion_length,
            gradient_checkpointing=False,
            **{**common, "beta": [opts.beta]},
        )
        trainer = OnlineDPOTrainer(
            model=load_policy(),
            reward_funcs=judge_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora(opts),
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        policy, reference = _peft_contexts(model)

        def measure() -> dict[str, float]:
            return evaluate(policy, reference)

        curve = _curve_callback(measure, lambda: judge.labels, lambda: generated["tokens"], opts.eval_every)
        trainer.add_callback(curve)
        result["points"].append({"labels": 0, "tokens": 0, **measure()})
        trainer.train()
        result["points"] += curve.points
        if not curve.points or curve.points[-1]["labels"] != judge.labels:
            result["points"].append({"labels": judge.labels, "tokens": generated["tokens"], **measure()})
        result["labels_used"], result["tokens"] = judge.labels, generated["tokens"]
    elif method == "gold_rloo":  # no labels: RLOO on the gold score itself, the ceiling of this many updates

        def gold_reward(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [opts.gold_scale * score(p, c) for p, c in zip(prompts, texts)]

        trainer, tokens = _rloo(opts, folder, "gold-rloo", dataset, tokenizer, gold_reward, common)
        policy, reference = _peft_contexts(trainer.accelerator.unwrap_model(trainer.model))
        trainer.train()
        result["points"] = [{"labels": 0, "tokens": int(tokens.count), **evaluate(policy, reference)}]
        result["labels_used"], result["tokens"] = 0, int(tokens.count)
    elif method == "rm_then_rloo":
        result.update(_rm_then_rloo(opts, seed, folder, dataset, tokenizer, judge, evaluate, common))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    result["wall_s"] = round(time.time() - t_start, 1)
    return result


def _rloo(
    opts: argparse.Namespace,
    folder: str,
    name: str,
    dataset: Any,
    tokenizer: Any,
    reward: Any,
    common: dict[str, Any],
) -> tuple[Any, Any]:
    """TRL's ``RLOOTrainer`` on ``reward`` (a frozen reward model or a reward function), with its
    generated-token counter; ``budget / labels_per_step`` steps, like every other method."""
    from trl import RLOOConfig, RLOOTrainer

    completions = opts.rloo_prompts_per_step * opts.generations
    tokens = _token_counter(["completions/mean_length"], completions)
    args = RLOOConfig(
        output_dir=os.path.join(folder, name),
        max_steps=opts.budget // opts.labels_per_step,
        per_device_train_batch_size=completions,
        num_generations=opts.generations,
        max_completion_length=opts.completion_length,
        gradient_checkpointing=False,
        **common,
    )
    trainer = RLOOTrainer(
        model=os.path.join(folder, "policy"),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer if hasattr(reward, "config") else None,
        peft_config=_lora(opts),
        callbacks=[tokens],
    )
    return trainer, tokens


def _rm_then_rloo(
    opts: argparse.Namespace,
    seed: int,
    folder: str,
    dataset: Any,
    tokenizer: Any,
    judge: CountingJudge,
    evaluate: Evaluator,
    common: dict[str, Any],
) -> dict[str, Any]:
    """The standard pipeline at each budget in ``opts.rm_fractions``: label pairs of reference samples,
    fit a reward model with ``RewardTrainer``, run ``RLOOTrainer`` on it (frozen). Pairs are nested (the
    smaller budgets use a prefix), and each budget is a fresh run from the same initial models."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import RewardConfig, RewardTrainer

    from brlhf.tiny import build_tiny_reward_model
    from brlhf.trainer.rollout import encode_prompts, sample

    policy_path = os.path.join(folder, "policy")
    prompts = list(dataset["prompt"])
    budget = opts.budget
    # 2 * budget reference samples: pair i is (prompt i mod n) with two independent completions
    torch.manual_seed(seed + 4242)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    pair_prompts = [prompts[i % len(prompts)] for i in range(budget)]
    texts: list[str] = []
    ref_tokens = 0
    for start in range(0, budget, 64):
        batch = [p for p in pair_prompts[start : start + 64] for _ in range(2)]
        ids, mask = encode_prompts(batch, tokenizer)
        out, out_mask = sample(
            reference, ids, mask, opts.completion_length, 1.0, tokenizer.pad_token_id, tokenizer.eos_token_id
        )
        ref_tokens += int(out_mask.sum())
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    pairs = list(zip(texts[0::2], texts[1::2]))
    answers = judge.judge(pair_prompts, pairs)  # all budget labels; a run at budget n uses the first n
    rows = []
    for p, (a, b), ans in zip(pair_prompts, pairs, answers):
        chosen, rejected = (b, a) if ans == 1 else (a, b)
        rows.append(
            {
                "prompt": p,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    points, tokens_by_budget = [], {}
    first = True
    for fraction in opts.rm_fractions:
        n = int(round(fraction * budget))
        torch.manual_seed(seed)
        rm = build_tiny_reward_model(tokenizer, seed=seed + 1)
        rm_args = RewardConfig(
            output_dir=os.path.join(folder, f"rm-{n}"),
            num_train_epochs=opts.rm_epochs,
            per_device_train_batch_size=16,
            gradient_checkpointing=False,
            **{**{k: v for k, v in common.items() if k not in ("beta", "temperature")}},
        )
        rm_args.learning_rate = opts.reward_lr
        rm_args.logging_steps = 1000
        RewardTrainer(
            model=rm, args=rm_args, train_dataset=Dataset.from_list(rows[:n]), processing_class=tokenizer
        ).train()
        rm.eval().requires_grad_(False)
        trainer, tokens = _rloo(opts, folder, f"rloo-{n}", dataset, tokenizer, rm, common)
        policy, reference_ctx = _peft_contexts(trainer.accelerator.unwrap_model(trainer.model))
        if first:
            points.append({"labels": 0, "tokens": 0, **evaluate(policy, reference_ctx)})
            first = False
        trainer.train()
        n_tokens = int(tokens.count) + ref_tokens * n // budget
        tokens_by_budget[n] = n_tokens
        points.append({"labels": n, "tokens": n_tokens, **evaluate(policy, reference_ctx)})
    return {"points": points, "labels_used": budget, "tokens": tokens_by_budget[max(tokens_by_budget)]}


# ---------------------------------------------------------------------------------------------- aggregate
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """method -> labels -> metric -> (mean, std over seeds), on label counts measured for every seed."""
    out: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for method in METHODS:
        runs = [r for r in results if r["method"] == method and method != "gold_rloo"]
        if not runs:
            continue
        common = set.intersection(*[{p["labels"] for p in r["points"]} for r in runs])
        out[method] = {}
        for labels in sorted(common):
            rows = [next(p for p in r["points"] if p["labels"] == labels) for r in runs]
            out[method][labels] = {
                k: _mean_std([row[k] for row in rows]) for k in ("gold", "win_rate", "kl", "tokens")
            }
    return out


def verdict(agg: dict[str, dict[int, dict[str, tuple[float, float]]]]) -> str:
    """Does brlhf reach the best competitor's final gold reward with at most half its labels, at no
    larger KL? (On the seed means; 'final' = the largest label count of each method.)"""
    if "brlhf" not in agg:
        return "brlhf was not run."
    finals = {m: agg[m][max(agg[m])] | {"labels": max(agg[m])} for m in agg}
    competitors = [m for m in COMPETITORS if m in finals]
    if not competitors:
        return "no competitor was run."
    best = max(competitors, key=lambda m: finals[m]["gold"][0])
    target, labels, kl = finals[best]["gold"][0], finals[best]["labels"], finals[best]["kl"][0]
    lines = [
        f"Best competitor: {LABELS[best]}, final gold reward {target:.4f} with {labels} labels "
        f"(KL {kl:.3f}).",
    ]
    own_kl = finals["brlhf"]["kl"][0]
    calm = [m for m in competitors if finals[m]["kl"][0] <= own_kl]
    if calm:
        m = max(calm, key=lambda m: finals[m]["gold"][0])
        lines.append(
            f"Best competitor with a final KL <= brlhf's ({own_kl:.3f}): {LABELS[m]}, gold "
            f"{finals[m]['gold'][0]:.4f} (brlhf {finals['brlhf']['gold'][0]:.4f}), "
            f"KL {finals[m]['kl'][0]:.3f}."
        )
    for variant in [m for m in agg if m not in COMPETITORS and base_method(m) in BRLHF_VARIANTS]:
        reach = [n for n, row in sorted(agg[variant].items()) if n > 0 and row["gold"][0] >= target]
        if not reach:
            b = finals[variant]
            lines.append(
                f"{LABELS[variant]} does not reach it: final gold reward {b['gold'][0]:.4f} with "
                f"{b['labels']} labels (KL {b['kl'][0]:.3f}). Target NOT met."
            )
            continue
        n, row = reach[0], agg[variant][reach[0]]
        met = n <= labels / 2 and row["kl"][0] <= kl
        lines.append(
            f"{LABELS[variant]} first reaches it at {n} labels ({n / labels:.0%} of the competitor's), gold "
            f"{row['gold'][0]:.4f}, KL {row['kl'][0]:.3f}. Target (<= 50% of the labels at no larger KL) "
            f"{'MET' if met else 'NOT met'}."
        )
    return "\n".join(lines)


def write_outputs(results: list[dict[str, Any]], opts: argparse.Namespace, wall_s: float) -> str:
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, "label_efficiency" + (f".{opts.tag}" if opts.tag else ""))
    with open(stem + ".csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "seed", "labels", "tokens", "gold", "win_rate", "kl"])
        for r in results:
            for p in r["points"]:
                writer.writerow(
                    [r["method"], r["seed"], p["labels"], p["tokens"]]
                    + [f"{p[k]:.5f}" for k in ("gold", "win_rate", "kl")]
                )
    agg = aggregate(results)
    seeds = sorted({r["seed"] for r in results})
    grid = sorted(set.intersection(*[set(rows) for rows in agg.values()])) if agg else []
    header = "| method | " + " | ".join(f"gold @ {n} labels" for n in grid)
    header += " | final gold (labels) | final win rate | final KL "
    header += "| labels used (max) | generated tokens | wall s / run |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, rows in agg.items():
        runs = [r for r in results if r["method"] == method]
        final = rows[max(rows)]
        cells = [f"{rows[n]['gold'][0]:.4f} ± {rows[n]['gold'][1]:.4f}" for n in grid]
        tokens = _mean_std([float(r["tokens"]) for r in runs])[0]
        wall = _mean_std([r["wall_s"] for r in runs])[0]
        lines.append(
            f"| {LABELS[method]} | "
            + " | ".join(cells)
            + f" | {final['gold'][0]:.4f} ± {final['gold'][1]:.4f} ({max(rows)})"
            + f" | {final['win_rate'][0]:.3f} ± {final['win_rate'][1]:.3f}"
            f" | {final['kl'][0]:.3f} ± {final['kl'][1]:.3f}"
            f" | {max(r['labels_used'] for r in runs)} | {tokens:,.0f} | {wall:.0f} |"
        )
    ceiling = [r for r in results if r["method"] == "gold_rloo"]
    if ceiling:
        gold, kl = (_mean_std([r["points"][-1][k] for r in ceiling]) for k in ("gold", "kl"))
        win = _mean_std([r["points"][-1]["win_rate"] for r in ceiling])
        tokens = _mean_std([float(r["tokens"]) for r in ceiling])[0]
        lines.append(
            f"| {LABELS['gold_rloo']} | "
            + " | ".join("" for _ in grid)
            + f" | {gold[0]:.4f} ± {gold[1]:.4f} (0)"
            f" | {win[0]:.3f} ± {win[1]:.3f} | {kl[0]:.3f} ± {kl[1]:.3f} | 0 | {tokens:,.0f} | "
            f"{_mean_std([r['wall_s'] for r in ceiling])[0]:.0f} |"
        )
    table = "\n".join(lines)
    text = verdict(agg)
    setup = (
        f"Gold rule `{opts.gold_rule}`, judge error rate {opts.judge_error}; label budget {opts.budget}; "
        f"seeds {seeds} (mean ± std over seeds); "
        f"{opts.budget // opts.labels_per_step} policy updates per run. brlhf: {opts.labels_per_step} labels "
        f"and {opts.prompts_per_step} prompts x {opts.generations} samples per copy and outer step, "
        f"λ={opts.lam}, K={opts.inner_steps}, label replay {opts.label_replay} ({opts.replay_batch_size} "
        f"replayed pairs per reward step), variants as named; RLOO: {opts.rloo_prompts_per_step} prompts x "
        f"{opts.generations} samples per step, reward model: {opts.rm_epochs} epochs of RewardTrainer; "
        f"online DPO: {opts.labels_per_step} prompts x 2 samples per step. Policy lr {opts.policy_lr}, "
        f"reward lr {opts.reward_lr}, β={opts.beta}, {opts.completion_length} new tokens at temperature 1, "
        f"LoRA `tiny_lora_config(head=False)`{' + a trained copy of the LM head' if opts.train_head else ''} "
        "for all. Evaluation: "
        f"{opts.eval_samples} samples per prompt on the 72 prompts. Total wall time {wall_s / 60:.1f} min."
    )
    with open(stem + ".md", "w") as fh:
        fh.write(
            "# Label efficiency (issue 5)\n\n"
            "`OMP_NUM_THREADS=1 python benchmarks/label_efficiency.py"
            + (" " + " ".join(opts.argv) if opts.argv else "")
            + "`\n\n"
            + setup
            + "\n\n"
            + table
            + "\n\n"
            + text.replace("\n", "\n\n")
            + "\n"
        )
    summary = setup + "\n\n" + table + "\n\n" + text
    with open(stem + ".txt", "w") as fh:
        fh.write(summary + "\n")
    plot(agg, results, stem + ".png", opts)
    return summary


def plot(
    agg: dict[str, dict[int, dict[str, tuple[float, float]]]],
    results: list[dict[str, Any]],
    path: str,
    opts: argparse.Namespace,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    colours = dict(zip(METHODS, plt.get_cmap("tab20").colors))

    def style(method: str) -> dict[str, Any]:
        ls = "--" if method == "rm_then_rloo" else ":" if method.endswith(HALF) else "-"
        return dict(ls=ls, marker="o", ms=3, color=colours[base_method(method)])

    titles = {"gold": "gold reward", "win_rate": "win rate vs reference (gold judge)", "kl": "KL(π || π_ref)"}
    for ax, key in zip(axes, titles):
        for method, rows in agg.items():
            xs = sorted(rows)
            mean = [rows[n][key][0] for n in xs]
            std = [rows[n][key][1] for n in xs]
            ax.plot(xs, mean, label=LABELS[method], **style(method))
            lo, hi = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            ax.fill_between(xs, lo, hi, alpha=0.12, color=colours[base_method(method)])
        ax.set_xlabel("judge labels used")
        ax.set_title(titles[key])
    for method, rows in agg.items():  # the KL-matched view: every curve point, mean over seeds
        xs = sorted(rows)
        axes[3].plot([rows[n]["kl"][0] for n in xs], [rows[n]["gold"][0] for n in xs], **style(method))
    axes[3].set_xlabel("KL(π || π_ref)")
    axes[3].set_title("gold reward against KL (points every --eval_every labels)")
    ceiling = [r for r in results if r["method"] == "gold_rloo"]
    if ceiling:
        gold = _mean_std([r["points"][-1]["gold"] for r in ceiling])[0]
        axes[0].axhline(gold, color="gray", ls=":", label=LABELS["gold_rloo"])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"label efficiency, gold rule '{opts.gold_rule}', mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny budget (< 1 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=int, default=512, help="judge labels per run")
    p.add_argument("--labels_per_step", type=int, default=4, help="labels per update (brlhf, online DPO)")
    p.add_argument("--prompts_per_step", type=int, default=8, help="brlhf prompts per step (each copy)")
    p.add_argument("--rloo_prompts_per_step", type=int, default=16, help="RLOO prompts per step")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion_length", type=int, default=16)
    p.add_argument("--policy_lr", type=float, default=3e-3)
    p.add_argument("--reward_lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=10.0, help="λ of brlhf variants that do not set it")
    p.add_argument("--lam_power", type=float, default=0.0)
    p.add_argument("--inner_steps", type=int, default=1)
    p.add_argument(
        "--label_replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="brlhf: replay every online label in later reward steps (RewardTrainer too sees each label "
        "several times, once per epoch)",
    )
    p.add_argument(
        "--brlhf_set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="BilevelRLHFConfig fields for every brlhf method, after its variant's (e.g. lam=3)",
    )
    p.add_argument("--replay_batch_size", type=int, default=16, help="replayed pairs per reward step")
    p.add_argument("--rm_fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--rm_epochs", type=float, default=4)
    p.add_argument("--gold_rule", default="spaces")
    p.add_argument("--judge_error", type=float, default=0.0, help="probability that the judge flips a label")
    p.add_argument(
        "--train_head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train a copy of the LM head (peft modules_to_save) in every method; without it the tiny "
        "random model barely moves in this many updates, even on the gold score itself",
    )
    p.add_argument(
        "--gold_scale", type=float, default=1.0, help="gold_rloo: reward = gold_scale * gold score"
    )
    p.add_argument("--eval_every", type=int, default=64, help="labels between curve points")
    p.add_argument("--eval_samples", type=int, default=8, help="samples per prompt per evaluation")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument(
        "--tag", default="", help="output files label_efficiency.<tag>.* instead of label_efficiency.*"
    )
    p.add_argument(
        "--cache",
        default=os.path.join(REPO, "outputs", "label_efficiency_runs"),
        help="folder keeping every finished run (keyed by options and code): an interrupted or extended "
        "benchmark reruns only what is missing; '' turns it off",
    )
    p.add_argument("--rerun", action="store_true", help="run again even if the cache has the run")
    p.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return p


QUICK = dict(
    seeds=[0],
    budget=16,
    labels_per_step=2,
    prompts_per_step=4,
    rloo_prompts_per_step=4,
    rm_fractions=[0.5, 1.0],
    rm_epochs=1,
    eval_every=8,
    eval_samples=1,
)


_NOT_IN_KEY = {"seeds", "methods", "jobs", "out", "tag", "cache", "rerun", "argv", "_worker", "_result"}


def run_key(opts: argparse.Namespace) -> str:
    """Names the cache folder of finished runs: a hash of every option a run depends on and of the code
    it runs (this file and ``brlhf/``), so a cached run is reused only for the same run."""
    h = hashlib.sha1()
    h.update(json.dumps({k: v for k, v in sorted(vars(opts).items()) if k not in _NOT_IN_KEY}).encode())
    sources = [os.path.abspath(__file__)]
    for root, _, files in sorted(os.walk(os.path.join(REPO, "brlhf"))):
        sources += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    for path in sources:
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def _shown_argv(argv: list[str]) -> list[str]:
    """The command line as the outputs print it: without the options naming folders of this machine."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--cache"):
            skip = True
        elif not a.startswith(("--out=", "--cache=")):
            shown.append(a)
    return shown


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    opts = parser.parse_args(argv)
    if opts.quick:
        parser.set_defaults(**QUICK)
        opts = parser.parse_args(argv)
    if opts.labels_per_step % 2 and any(m.endswith(HALF) for m in opts.methods):
        parser.error(f"--labels_per_step {opts.labels_per_step} is odd: the {HALF} methods use half of it")
    if opts._worker:
        method, seed = opts._worker
        with open(opts._result, "w") as fh:
            json.dump(run_one(method, int(seed), opts), fh)
        return []
    opts.out = opts.out or (
        os.path.join(REPO, "outputs", "label_efficiency_quick")
        if opts.quick
        else os.path.join(HERE, "results")
    )
    opts.argv = _shown_argv(argv)
    t0 = time.time()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cache = os.path.join(opts.cache, run_key(opts)) if opts.cache else None
    jobs = [(m, s) for s in opts.seeds for m in opts.methods]
    with tempfile.TemporaryDirectory() as tmp:

        def launch(job: tuple[str, int]) -> dict[str, Any]:
            method, seed = job
            cached = os.path.join(cache, f"{method}-{seed}.json") if cache else None
            if cached and os.path.exists(cached) and not opts.rerun:
                with open(cached) as fh:
                    res = json.load(fh)
                print(f"  {method} seed {seed}: cached ({cached})", flush=True)
                return res
            path = os.path.join(tmp, f"{method}-{seed}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", method, str(seed)]
            proc = subprocess.run(cmd + ["--_result", path], capture_output=True, text=True, env=env)
            if proc.returncode != 0 or not os.path.exists(path):
                raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stderr[-4000:]}")
            with open(path) as fh:
                res = json.load(fh)
            if cached:
                os.makedirs(cache, exist_ok=True)
                with open(cached + ".tmp", "w") as fh:
                    json.dump(res, fh)
                os.replace(cached + ".tmp", cached)
            print(f"  {method} seed {seed}: {res['wall_s']} s, final {res['points'][-1]}", flush=True)
            return res

        with concurrent.futures.ThreadPoolExecutor(max_workers=opts.jobs) as pool:
            results = list(pool.map(launch, jobs))
    vocabs = {r["vocab"] for r in results}
    assert len(vocabs) == 1, f"runs built different tokenizers: {vocabs}"
    print(write_outputs(results, opts, time.time() - t0))
    return results


if __name__ == "__main__":
    main()
