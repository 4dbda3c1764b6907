"""Each variable moves only through its own step; y = z when ∇_y f is off; the reference stays fixed."""

from __future__ import annotations

import pytest
import torch

from brlhf.judges import FunctionJudge
from brlhf.tiny import build_tiny_policy, tiny_lora_config
from brlhf.trainer import BilevelRLHFTrainer


def spaces(prompt, completion: str) -> float:
    return completion.count(" ") / max(len(completion), 1)


@pytest.fixture
def make_trainer(args_factory, policy, reward_model, tokenizer, prompts):
    """``make_trainer(**overrides)``: a LoRA trainer on this test's tiny models and prompts (spaces judge)."""
    return lambda **overrides: BilevelRLHFTrainer(
        policy,
        reward_model,
        args_factory(**overrides),
        judge=FunctionJudge(spaces),
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=tiny_lora_config(4),
    )


def snapshot(trainer) -> dict[str, list[torch.Tensor]]:
    return {
        "y": [p.detach().clone() for p in trainer.policies.y.parameters()],
        "z": [p.detach().clone() for p in trainer.policies.z.parameters()],
        "x": [p.detach().clone() for p in trainer.reward_model.parameters()],
        "base": [
            p.detach().clone() for n, p in trainer.policies.model.named_parameters() if "lora_" not in n
        ],
    }


def moved(before, after) -> set[str]:
    return {k for k in before if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))}


def test_each_update_moves_only_its_own_variable(make_trainer, tmp_path):
    trainer = make_trainer(inner_steps=2)
    solver = trainer.solver
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.policies.y.parameters(), trainer.policies.z.parameters())
    )
    changes = []
    names = {
        "pure_optimizer": "the pure copy z",
        "penalised_optimizer": "the penalised copy y",
        "upper_optimizer": "the upper variable x",
    }
    for attr, name in names.items():
        optimizer = getattr(solver, attr)

        def recording_step(step=optimizer.step, name=name, params=optimizer.param_groups[0]["params"]):
            before = snapshot(trainer)
            grad_norm = sum(p.grad.norm().item() for p in params if p.grad is not None)
            step()
            changes.append((name, moved(before, snapshot(trainer)), grad_norm))

        optimizer.step = recording_step
    for _ in range(2):
        trainer.outer_step()
    expected = ["the pure copy z", "the penalised copy y"] * 2 + ["the upper variable x"]
    assert [c[0] for c in changes] == expected * 2
    owner = {"the pure copy z": {"z"}, "the penalised copy y": {"y"}, "the upper variable x": {"x"}}
    for name, what, norm in changes:
        assert what == owner[name], f"{name} moved {what}"
        assert norm > 0, f"{name} got no gradient (frozen adapter?)"


def test_updates_stay_in_adapters_and_reference_is_fixed(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=3)
    before = snapshot(trainer)
    with torch.no_grad(), trainer.policies.reference() as ref:
        ids = torch.tensor([[5, 6, 7, 8]])
        ref_logits = ref(input_ids=ids).logits.clone()
    trainer.train()
    after = snapshot(trainer)
    assert moved(before, after) == {"x", "y", "z"}
    with torch.no_grad(), trainer.policies.reference() as ref:
        assert torch.equal(ref(input_ids=ids).logits, ref_logits)
    # the two adapters are both trainable again after leaving disable_adapter (the peft pitfall)
    assert all(p.requires_grad for p in trainer.policies.y.parameters())
    assert all(p.requires_grad for p in trainer.policies.z.parameters())


@pytest.mark.parametrize("penalised_upper_grad", [False, True])
def test_y_equals_z_without_the_upper_gradient(make_trainer, tmp_path, penalised_upper_grad):
    trainer = make_trainer(
        max_steps=4,
        penalised_upper_grad=penalised_upper_grad,
        lam=1.0,
        keep_better_pure=False,  # plain Algorithm 1: a z ← y copy would also make y = z
    )
    trainer.train()
    same = all(
        torch.equal(a, b) for a, b in zip(trainer.policies.y.parameters(), trainer.policies.z.parameters())
    )
    assert same is (not penalised_upper_grad)  # collapse exactly when ∇_y f is switched off
    z_init = torch.zeros(1)  # and the policy did move (B of LoRA starts at 0)
    b_weights = [p for n, p in trainer.policies.z.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(p.reshape(-1)[:1], z_init) for p in b_weights)


def test_full_finetuning_uses_two_copies(args_factory, tmp_path, policy, reward_model, tokenizer, prompts):
    trainer = BilevelRLHFTrainer(
        policy,
        reward_model,
        args_factory(full_finetuning=True, max_steps=2),
        judge=FunctionJudge(spaces),
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    ref_before = [p.clone() for p in trainer.policies.ref_model.parameters()]
    before = snapshot(trainer)
    trainer.train()
    assert {"x", "y", "z"} <= moved(before, snapshot(trainer))
    assert all(torch.equal(a, b) for a, b in zip(ref_before, trainer.policies.ref_model.parameters()))
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "y" / "config.json").exists() and (
        tmp_path / "final" / "z" / "config.json"
    ).exists()


def test_label_budget_is_counted_once_per_pair_and_stops(
    args_factory, tmp_path, policy, reward_model, tokenizer, prompts
):
    calls = []

    def judge(prompts_, completions):
        calls.append(len(prompts_))
        return [0, None] * (len(prompts_) // 2) + [1] * (len(prompts_) % 2)  # every other pair abstains

    args = args_factory(max_steps=10, labels_per_step=4, label_budget=8, inner_steps=2)
    trainer = BilevelRLHFTrainer(
        policy,
        reward_model,
        args,
        judge=judge,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=tiny_lora_config(4),
    )
    trainer.train()
    # one judge call per outer step; abstentions are not labels (2 of 4 valid), the judge is never asked for
    # more than the budget left (2, then 1), and training stops when the budget is spent
    assert calls == [4, 4, 4, 2, 1] and trainer.labels_used == 8 and trainer.state.global_step == 5
    args = args_factory(
        max_steps=6, labels_per_step=4, label_budget=8, on_budget_exhausted="continue_without_labels"
    )
    trainer = BilevelRLHFTrainer(
        build_tiny_policy(tokenizer, hidden=32, layers=1),
        reward_model,
        args,
        judge=FunctionJudge(spaces),
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=tiny_lora_config(4),
    )
    trainer.train()
    assert trainer.state.global_step == 6 and trainer.labels_used <= 8
    assert trainer.state.log_history[-1]["labels/step"] == 0


def test_skipping_shared_samples_gives_the_same_reward_gradient(make_trainer):
    trainer = make_trainer(lam=0.2, per_device_train_batch_size=8)
    for _ in range(6):  # let y drift from z so that some samples differ, some coincide
        trainer.outer_step()
    trainer.solver.inner_step()
    trainer.solver.stage = "upper"  # evaluate the reward step's terms by hand below
    shared = trainer._shared_rows()
    assert 0 < shared.float().mean().item() < 1

    def gap_and_grads(skip: bool) -> tuple[float, list[torch.Tensor]]:
        trainer.skip_shared_samples = skip
        trainer.reward_model.zero_grad()
        gap = trainer._lower_loss_x(trainer.policies.y, None) - trainer._lower_loss_x(
            trainer.policies.z, None
        )
        gap.backward()
        return gap.item(), [p.grad.clone() for p in trainer.reward_model.parameters()]

    gap_skip, grads_skip = gap_and_grads(True)
    gap_full, grads_full = gap_and_grads(False)
    assert gap_skip == pytest.approx(gap_full, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_skip, grads_full))
    assert any(g.abs().sum() > 0 for g in grads_full)


def test_a_lagging_z_is_restarted_from_y(make_trainer):
    """With z frozen (learning rate 0, β = 0) y soon beats z at g; keep_better_pure (the default) then copies
    y's adapter into z's (different tensor names: copied in order) and skips that step's penalty term."""
    trainer = make_trainer(learning_rate=0.0, penalised_learning_rate=5e-2, beta=0.0)
    assert trainer.args.keep_better_pure
    solver = trainer.solver
    for _ in range(12):
        before = solver.pure_restarts
        stats = solver.step()
        y, z = list(trainer.policies.y.parameters()), list(trainer.policies.z.parameters())
        if solver.pure_restarts > before:
            assert stats["value_gap"] < 0
            assert all(torch.equal(a, b) and a is not b for a, b in zip(y, z))
        else:
            assert stats["value_gap"] >= 0
    assert solver.pure_restarts >= 1
