"""Learning-rate schedules of the three optimisers, and the reward model as a LoRA adapter."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import get_scheduler

from brlhf.judges import FunctionJudge
from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, tiny_lora_config
from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer
from brlhf.trainer.rollout import reward_scores


def spaces(prompt, completion: str) -> float:
    return completion.count(" ") / max(len(completion), 1)


def reward_lora(r: int = 4, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", **kw)


def build(args, tokenizer, prompts, reward_model=None, **kw):
    return BilevelRLHFTrainer(
        build_tiny_policy(tokenizer, hidden=32, layers=1, seed=0),
        reward_model or build_tiny_reward_model(tokenizer, hidden=32, layers=1, seed=1),
        args,
        judge=FunctionJudge(spaces),
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=tiny_lora_config(4),
        **kw,
    )


def reference_rates(base: float, schedule: str, steps: int, warmup: int, kwargs: dict) -> list[float]:
    """transformers' own schedule on a plain torch optimiser: the rate of each of ``steps`` steps, and the
    rate after them."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=steps,
        scheduler_specific_kwargs=kwargs,
    )
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates + [optimizer.param_groups[0]["lr"]]


# ---------------------------------------------------------------------------------- learning-rate schedules
def test_default_schedule_is_constant_and_metric_schedules_are_refused(tmp_path):
    assert BilevelRLHFConfig(output_dir=str(tmp_path)).lr_scheduler_type == "constant"
    with pytest.raises(ValueError, match="adapts to evaluation metrics"):
        BilevelRLHFConfig(output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau")


def test_constant_default_keeps_the_rates(args_factory, tokenizer, prompts):
    trainer = build(
        args_factory(max_steps=2, learning_rate=1e-2, reward_learning_rate=3e-3), tokenizer, prompts
    )
    trainer.train()
    for h in trainer.state.log_history:
        assert (h["lr/x"], h["lr/y"], h["lr/z"]) == (3e-3, 1e-2, 1e-2)


@pytest.mark.parametrize(
    "schedule, warmup, kwargs",
    [
        ("cosine", 2, {}),
        ("linear", 0.4, {}),  # warmup as a fraction of max_steps: ceil(0.4 * 5) = 2
        ("cosine_with_min_lr", 1, {"min_lr_rate": 0.1}),  # lr_scheduler_kwargs reach the schedule
    ],
)
def test_rates_follow_transformers_schedule(args_factory, tokenizer, prompts, schedule, warmup, kwargs):
    steps, bases = 5, {"x": 5e-3, "y": 3e-3, "z": 1e-2}
    args = args_factory(
        max_steps=steps,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        lr_scheduler_kwargs=kwargs,
        reward_learning_rate=bases["x"],
        penalised_learning_rate=bases["y"],
        learning_rate=bases["z"],
    )
    trainer = build(args, tokenizer, prompts)
    trainer.train()
    n_warmup = args.get_warmup_steps(steps)
    for name, base in bases.items():
        expected = reference_rates(base, schedule, steps, n_warmup, kwargs)
        logged = [h[f"lr/{name}"] for h in trainer.state.log_history]
        assert logged == pytest.approx(expected[:-1], rel=1e-12, abs=0), name  # the rate each step used
        assert trainer.learning_rates()[f"lr/{name}"] == pytest.approx(expected[-1], rel=1e-12, abs=0)
        optimizer = {"x": "upper", "y": "penalised", "z": "pure"}[name] + "_optimizer"
        assert getattr(trainer.solver, optimizer).param_groups[0]["lr"] == pytest.approx(expected[-1])
    assert len(set(logged)) > 2  # the schedule did change the rates


def test_a_step_at_zero_rate_leaves_the_policies_unchanged(args_factory, tokenizer, prompts):
    """Linear warmup starts at rate 0 (as in transformers): the first outer step moves nothing."""
    args = args_factory(max_steps=1, lr_scheduler_type="constant_with_warmup", warmup_steps=3)
    trainer = build(args, tokenizer, prompts)
    before = [p.detach().clone() for p in trainer.solver.upper_params + trainer.solver.pure_params]
    trainer.train()
    after = trainer.solver.upper_params + trainer.solver.pure_params
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.learning_rates()["lr/z"] == pytest.approx(args.learning_rate / 3)


def test_reward_warmup_runs_at_the_base_rate(args_factory, tokenizer, prompts):
    rows = [{"prompt": f"Say something {i}", "chosen": " a b c", "rejected": "abc!"} for i in range(8)]
    args = args_factory(lr_scheduler_type="constant_with_warmup", warmup_steps=2, reward_learning_rate=3e-3)
    trainer = build(args, tokenizer, prompts, preference_dataset=Dataset.from_list(rows))
    assert trainer.learning_rates()["lr/x"] == 0.0
    before = [p.detach().clone() for p in trainer.solver.upper_params]
    trainer.warmup_reward_model(2)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.solver.upper_params))
    assert trainer.learning_rates()["lr/x"] == 0.0  # the schedule's rate is back


# ---------------------------------------------------------------------------------- LoRA reward model
def test_reward_lora_step_moves_only_the_adapter_and_the_head(args_factory, tokenizer, prompts):
    trainer = build(
        args_factory(max_steps=2), tokenizer, prompts, reward_peft_config=reward_lora(task_type="SEQ_CLS")
    )
    model = trainer.reward_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("score.modules_to_save" in n for n in trainable)  # peft trains the head (SEQ_CLS)
    assert {id(p) for p in trainer.solver.upper_params} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable  # base weights (and the original head) bit-identical
    assert any("score.modules_to_save" in n for n in changed) and any("lora_B" in n for n in changed)
    # the checkpointed x is the adapter and the head only
    assert set(trainer.solver.state_dict()["upper"]) == trainable


def test_saved_reward_adapter_reloads_with_the_same_scores(args_factory, tokenizer, prompts, tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftModel

    base_dir = tmp_path / "base-reward"
    build_tiny_reward_model(tokenizer, hidden=32, layers=1, seed=1).save_pretrained(base_dir)
    trainer = build(
        args_factory(max_steps=2),
        tokenizer,
        prompts,
        reward_model=str(base_dir),
        reward_peft_config=reward_lora(task_type="SEQ_CLS"),
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "reward_model" / "adapter_config.json").exists()
    assert not (out / "reward_model" / "model.safetensors").exists()  # the base is not copied
    texts = (["Say hi", "Tell me"], [" a b c", "xyz!"])
    with torch.no_grad():
        expected = trainer.reward(*texts)
        auto = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "reward_model")).eval()
        over_base = PeftModel.from_pretrained(
            build_tiny_reward_model(tokenizer, hidden=32, layers=1, seed=1), str(out / "reward_model")
        ).eval()
        for reloaded in (auto, over_base):
            assert torch.allclose(reward_scores(reloaded, tokenizer, *texts), expected, atol=1e-6)
    untrained = build_tiny_reward_model(tokenizer, hidden=32, layers=1, seed=1).eval()
    with torch.no_grad():
        assert not torch.allclose(reward_scores(untrained, tokenizer, *texts), expected, atol=1e-6)


def test_bad_reward_peft_configs_are_refused(args_factory, tokenizer, prompts):
    with pytest.raises(ValueError, match="task_type must be 'SEQ_CLS'.*CAUSAL_LM"):
        build(args_factory(), tokenizer, prompts, reward_peft_config=reward_lora(task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="reward_peft_config must be a peft config"):
        build(args_factory(), tokenizer, prompts, reward_peft_config={"r": 4})
