"""Two CPU processes under DDP and under DeepSpeed ZeRO-2 (gloo): replicas stay in sync, labels add up.

Run as a test (it launches itself with ``accelerate launch``) or directly:
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \
        tests/trainer/test_distributed.py <out_dir> ddp
"""

from __future__ import annotations

import os
import sys

import pytest
from two_processes import digest, launch, spaces_judge, tiny_setup, trainer_args, write_record


def _reference_rates(bases: list[float], schedule: str, warmup: int, steps: int) -> list[list[float]]:
    """The rates transformers' own schedule gives a plain torch optimiser at each of ``steps`` steps."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in bases])
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def worker(out_dir: str, backend: str) -> None:
    from datasets import Dataset

    from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, tiny_lora_config
    from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer

    prompts, tokenizer = tiny_setup()
    args = trainer_args(
        out_dir,
        use_cpu=backend == "ddp",  # DeepSpeed picks its CPU accelerator itself
        learning_rate=1e-2,
        lr_scheduler_type="cosine",  # rates that change every step: the schedules must resume exactly
        warmup_steps=1,
    )

    def build(**overrides) -> BilevelRLHFTrainer:
        from peft import LoraConfig

        return BilevelRLHFTrainer(
            build_tiny_policy(tokenizer, hidden=32, layers=1),
            build_tiny_reward_model(tokenizer, hidden=32, layers=1),
            BilevelRLHFConfig(**{**args, **overrides}),
            judge=spaces_judge(),
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
            peft_config=tiny_lora_config(4),
            reward_peft_config=(  # ZeRO-2: the reward model as a LoRA adapter (its own engine, sharded)
                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
                if backend == "zero2"
                else None
            ),
        )

    trainer = build()
    before = digest(trainer.policies.z.parameters())
    trainer.train()
    # stop at the step-2 checkpoint and resume in new trainer: the same numbers as the uninterrupted run
    resumed = build(output_dir=os.path.join(out_dir, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
    variables = [
        (v.policies.y.parameters(), v.policies.z.parameters(), v.reward_model.parameters())
        for v in (trainer, resumed)
    ]
    same_after_resume = all(digest(a) == digest(b) for a, b in zip(*variables))
    record = {
        "rank": trainer.rank,
        "zero": trainer.zero_config is not None,
        "world_size": trainer.world_size,
        "labels_used": trainer.labels_used,
        "y": digest(trainer.policies.y.parameters()),
        "z": digest(trainer.policies.z.parameters()),
        "x": digest(trainer.reward_model.parameters()),
        "z_before": before,
        "prompts": [str(p) for p in trainer._rollouts["y"].prompts],
        "value_gap": trainer.state.log_history[-1]["value_gap"],
        "same_after_resume": same_after_resume,
        "lr": [[h[f"lr/{v}"] for v in "xyz"] for h in trainer.state.log_history],
        "lr_resumed": [[h[f"lr/{v}"] for v in "xyz"] for h in resumed.state.log_history],
        "lr_reference": _reference_rates([1e-2, 1e-2, 1e-2], "cosine", 1, 3),
    }
    write_record(out_dir, trainer.rank, record)


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_cpu_processes_stay_in_sync(tmp_path, backend):
    if backend == "zero2":
        pytest.importorskip("deepspeed")
    config = {"ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml"}[backend]
    ranks = launch(__file__, tmp_path, config, backend, timeout=300)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["zero"] for r in ranks] == [backend == "zero2"] * 2
    for key in ("x", "y", "z", "labels_used", "value_gap"):
        assert ranks[0][key] == ranks[1][key], key  # replicas identical after 3 outer steps
    assert ranks[0]["z"] != ranks[0]["z_before"]  # and they did train
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # on different prompts per process
    assert 0 < ranks[0]["labels_used"] <= 3 * 4  # labels_per_step counts all processes (ties abstain)
    assert (tmp_path / "checkpoint-2" / "rng_state_1.pt").exists()
    if backend == "zero2":  # each process saves its shard of the optimiser states
        assert (tmp_path / "checkpoint-2" / "zero_optimizer_states_1.pt").exists()
    assert ranks[0]["same_after_resume"] and ranks[1]["same_after_resume"]
    for r in ranks:  # the learning-rate schedule (under ZeRO: on the engines' optimisers), and its resume
        assert r["lr"] == r["lr_reference"] and r["lr_resumed"] == r["lr"]
        assert len({tuple(lr) for lr in r["lr"]}) == 3


if __name__ == "__main__":
    if len(sys.argv) != 3:
        pytest.exit("usage: accelerate launch ... test_distributed.py <out_dir> ddp|zero2")
    worker(sys.argv[1], sys.argv[2])
