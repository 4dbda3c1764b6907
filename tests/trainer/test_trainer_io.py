"""Bad input fails before training with a clear message; save_model; stop-and-resume equals one run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset

from brlhf.judges import FunctionJudge
from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, tiny_lora_config
from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer


def spaces(prompt, completion: str) -> float:
    return completion.count(" ") / max(len(completion), 1)


GOLD_JUDGE = FunctionJudge(spaces)


def build(args, tokenizer, prompts, judge=GOLD_JUDGE, **kw):
    policy = build_tiny_policy(tokenizer, hidden=32, layers=1, seed=0)
    reward_model = kw.pop("reward_model", None) or build_tiny_reward_model(
        tokenizer, hidden=32, layers=1, seed=1
    )
    return BilevelRLHFTrainer(
        policy,
        reward_model,
        args,
        judge=judge,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=tiny_lora_config(4),
        **kw,
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"query": "hi"}], r"columns \['query'\]; expected a 'prompt' column"),
        ([{"prompt": "hi"}, {"prompt": "   "}], r"1 empty prompt\(s\) .* row 1"),
        ([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": []}], r"empty prompt\(s\) .* row 1"),
        ([{"prompt": "a b c d " * 200}], r"prompt at row 0 has \d+ tokens, more than the \d+ allowed"),
    ],
)
def test_bad_prompt_datasets(args_factory, tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        build(args_factory(), tokenizer, Dataset.from_list(rows))


def test_bad_preference_dataset(args_factory, tokenizer, prompts):
    bad = Dataset.from_list([{"prompt": "hi", "good": "a", "bad": "b"}])
    with pytest.raises(ValueError, match="expected 'prompt', 'chosen' and 'rejected'"):
        build(args_factory(), tokenizer, prompts, preference_dataset=bad)


def test_reward_model_with_two_outputs(args_factory, tokenizer, prompts):
    two = build_tiny_reward_model(tokenizer, hidden=32, layers=1)
    two.config.num_labels = 2
    with pytest.raises(ValueError, match="exactly one output"):
        build(args_factory(), tokenizer, prompts, reward_model=two)


def test_judge_not_callable_and_missing(args_factory, tokenizer, prompts):
    with pytest.raises(TypeError, match="judge"):
        build(args_factory(), tokenizer, prompts, judge="a person")
    with pytest.raises(ValueError, match="no judge given"):
        build(args_factory(), tokenizer, prompts, judge=None)


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="smaller than one step's labels"):
        BilevelRLHFConfig(output_dir=str(tmp_path), labels_per_step=8, label_budget=4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        BilevelRLHFConfig(output_dir=str(tmp_path), num_generations=1)
    with pytest.raises(ValueError, match="on_budget_exhausted"):
        BilevelRLHFConfig(output_dir=str(tmp_path), on_budget_exhausted="pause")


def test_save_model_writes_adapters_reward_model_and_card(args_factory, tokenizer, prompts, tmp_path):
    trainer = build(args_factory(max_steps=1), tokenizer, prompts)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    for path in [
        "y/adapter_model.safetensors",
        "z/adapter_model.safetensors",
        "reward_model/config.json",
        "tokenizer.json",
        "README.md",
    ]:
        assert (out / path).exists(), path
    assert "bilevel" in (out / "README.md").read_text().lower()
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(
        build_tiny_policy(tokenizer, hidden=32, layers=1, seed=0), str(out / "y")
    )
    ids = torch.tensor([[5, 6, 7]])
    with trainer.policies.active("y") as model, torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def _numbers(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


@pytest.mark.parametrize(
    "options",
    [
        {},
        # a schedule that changes every step (warmup, then cosine decay) and a LoRA reward model
        {"lr_scheduler_type": "cosine", "warmup_steps": 1, "reward_lora": True},
    ],
    ids=["constant", "cosine-lora-reward"],
)
def test_stopped_and_resumed_run_equals_an_uninterrupted_run(
    args_factory, tokenizer, prompts, tmp_path, options
):
    options = dict(options)
    kw = {}
    if options.pop("reward_lora", False):
        from peft import LoraConfig

        kw["reward_peft_config"] = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"
        )
    common = dict(
        max_steps=4, save_strategy="steps", save_steps=2, inner_steps=2, labels_per_step=2, **options
    )
    straight = build(args_factory(output_dir=str(tmp_path / "a"), **common), tokenizer, prompts, **kw)
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert ckpt.is_dir() and not any(d.startswith("tmp-") for d in os.listdir(tmp_path / "a"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2

    resumed = build(args_factory(output_dir=str(tmp_path / "b"), **common), tokenizer, prompts, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4 and resumed.labels_used == straight.labels_used
    assert _numbers(resumed.state.log_history) == _numbers(straight.state.log_history)
    for a, b in [
        (straight.policies.y, resumed.policies.y),
        (straight.policies.z, resumed.policies.z),
        (straight.reward_model, resumed.reward_model),
    ]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    opt_a, opt_b = straight.solver.pure_optimizer.state_dict(), resumed.solver.pure_optimizer.state_dict()
    assert all(
        torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"]
    )
    assert resumed.learning_rates() == straight.learning_rates()
    for name, scheduler in straight.lr_schedulers.items():
        assert resumed.lr_schedulers[name].state_dict() == scheduler.state_dict()
    if options:  # the rates did change from step to step, and the resumed run logged the same ones
        assert len({h["lr/z"] for h in straight.state.log_history}) == 4


def test_metrics_reach_tensorboard(args_factory, tokenizer, prompts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = args_factory(max_steps=2, report_to=["tensorboard"], output_dir=str(tmp_path / "tb"))
    trainer = build(args, tokenizer, prompts)
    trainer.train()
    runs = [p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert runs
    events = EventAccumulator(str(runs[0])).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "reward/y",
        "reward/z",
        "kl/y",
        "value_gap",
        "upper_loss",
        "reward_model/accuracy",
        "labels/used",
        "lam",
        "time/generation",
        "time/step",
    }
    assert expected <= {t.removeprefix("train/") for t in tags}, tags
    labels = [e.value for e in events.Scalars("train/labels/used")]
    assert labels == [float(trainer.state.log_history[0]["labels/used"]), float(trainer.labels_used)]


def test_offline_preferences_warm_start_the_reward_model(args_factory, tokenizer, prompts):
    rows = [{"prompt": f"Say something {i}", "chosen": " a b c d e", "rejected": "abcde!"} for i in range(32)]
    trainer = build(
        args_factory(max_steps=1, reward_warmup_steps=30, offline_batch_size=8, reward_learning_rate=3e-3),
        tokenizer,
        prompts,
        preference_dataset=Dataset.from_list(rows),
    )
    with torch.no_grad():
        margin0 = (trainer.reward(["q"], [" a b c d e"]) - trainer.reward(["q"], ["abcde!"])).item()
    trainer.train()
    with torch.no_grad():
        margin = (trainer.reward(["q"], [" a b c d e"]) - trainer.reward(["q"], ["abcde!"])).item()
    assert margin > margin0 + 1.0
    first = trainer.state.log_history[0]
    assert first["labels/step"] > 0 and first["reward_model/offline_accuracy"] == 1.0


def test_reward_model_initialised_from_the_policy_base(args_factory, tokenizer, prompts):
    policy = build_tiny_policy(tokenizer, hidden=32, layers=1, seed=3)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = BilevelRLHFTrainer(
        policy, None, args_factory(), judge=GOLD_JUDGE, train_dataset=prompts, processing_class=tokenizer
    )
    reward_state = trainer.reward_model.state_dict()
    shared = [k for k in base if k.startswith("model.")]
    assert shared and all(torch.equal(reward_state[k], base[k]) for k in shared)
    assert trainer.reward_model.score.out_features == 1


def test_unsupported_deepspeed_settings_are_refused_clearly():
    from brlhf.trainer.zero import zero_config

    assert zero_config({"zero_optimization": {"stage": 2, "overlap_comm": "auto"}}, 1.0)[
        "zero_optimization"
    ] == {"stage": 2}
    assert zero_config({"zero_optimization": {"stage": 3}}, 1.0)["zero_optimization"] == {"stage": 3}
    with pytest.raises(NotImplementedError, match="stages 1 to 3"):
        zero_config({"zero_optimization": {"stage": 0}}, 1.0)
    with pytest.raises(NotImplementedError, match="offload_optimizer"):
        zero_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 1.0)
