"""Two CPU processes under DDP and under DeepSpeed ZeRO-2 (gloo): replicas stay in sync, labels add up.

Run as a test (it launches itself with ``accelerate launch``) or directly:
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \
        tests/trainer/test_distributed.py <out_dir> ddp
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    import torch
    from datasets import Dataset

    from brlhf.judges import FunctionJudge
    from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, build_tiny_tokenizer, tiny_lora_config
    from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer

    torch.set_num_threads(1)
    with open(os.path.join(REPO, "recipes", "data", "prompts.jsonl")) as fh:
        prompts = [json.loads(line)["prompt"] for line in fh]
    tokenizer = build_tiny_tokenizer([p[0]["content"] for p in prompts], vocab_size=200)
    args = dict(
        output_dir=out_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=6,
        labels_per_step=4,
        learning_rate=1e-2,
        reward_learning_rate=1e-2,
        use_cpu=backend == "ddp",  # DeepSpeed picks its CPU accelerator itself
        ddp_backend="gloo",
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,
        inner_steps=2,
        lr_scheduler_type="cosine",  # rates that change every step: the schedules must resume exactly
        warmup_steps=1,
    )

    def build(**overrides) -> BilevelRLHFTrainer:
        from peft import LoraConfig

        return BilevelRLHFTrainer(
            build_tiny_policy(tokenizer, hidden=32, layers=1),
            build_tiny_reward_model(tokenizer, hidden=32, layers=1),
            BilevelRLHFConfig(**{**args, **overrides}),
            judge=FunctionJudge(lambda p, c: c.count(" ") / max(len(c), 1)),
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
    before = _digest(trainer.policies.z.parameters())
    trainer.train()
    # stop at the step-2 checkpoint and resume in new trainer: the same numbers as the uninterrupted run
    resumed = build(output_dir=os.path.join(out_dir, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
    variables = [
        (v.policies.y.parameters(), v.policies.z.parameters(), v.reward_model.parameters())
        for v in (trainer, resumed)
    ]
    same_after_resume = all(_digest(a) == _digest(b) for a, b in zip(*variables))
    record = {
        "rank": trainer.rank,
        "zero": trainer.zero_config is not None,
        "world_size": trainer.world_size,
        "labels_used": trainer.labels_used,
        "y": _digest(trainer.policies.y.parameters()),
        "z": _digest(trainer.policies.z.parameters()),
        "x": _digest(trainer.reward_model.parameters()),
        "z_before": before,
        "prompts": [str(p) for p in trainer._rollouts["y"].prompts],
        "value_gap": trainer.state.log_history[-1]["value_gap"],
        "same_after_resume": same_after_resume,
        "lr": [[h[f"lr/{v}"] for v in "xyz"] for h in trainer.state.log_history],
        "lr_resumed": [[h[f"lr/{v}"] for v in "xyz"] for h in resumed.state.log_history],
        "lr_reference": _reference_rates([1e-2, 1e-2, 1e-2], "cosine", 1, 3),
    }
    with open(os.path.join(out_dir, f"rank{trainer.rank}.json"), "w") as fh:
        json.dump(record, fh)


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_cpu_processes_stay_in_sync(tmp_path, backend):
    if backend == "zero2":
        pytest.importorskip("deepspeed")
    config = {"ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml"}[backend]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "accelerate_configs", config),
        "--main_process_port",
        str(_free_port()),
        os.path.abspath(__file__),
        str(tmp_path),
        backend,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
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
