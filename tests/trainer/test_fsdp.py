"""Full fine-tuning under FSDP2 (torch's ``fully_shard``) on two CPU processes (gloo): the sharded replicas
agree, a checkpoint resumes exactly, the run computes what the same run under DDP computes, and ``save_model``
writes full models. LoRA under FSDP is refused with a reason.

Process 1's judge abstains in the first step while process 0's labels pairs: under FSDP process 1 must still
make the forward passes of a pair (with weight 0), or the processes' collective all-gathers go out of step.
The run and the checks it shares with test_zero3.py are in two_processes.py.

Run as a test (it launches itself with ``accelerate launch``) or directly:
    accelerate launch --config_file accelerate_configs/cpu_fsdp.yaml \
        tests/trainer/test_fsdp.py <out_dir> fsdp
"""

from __future__ import annotations

import sys

import pytest
from two_processes import check_full_finetuning, check_same_as_ddp, full_finetuning_worker, launch


def _sharded(trainer) -> bool:
    """Each process holds half of every weight of every model (dimension 0 split, rounded up)."""
    from brlhf.trainer.fsdp import is_sharded

    models = (*trainer.policies.models.values(), trainer.policies.ref_model, trainer.reward_model)
    return all(
        is_sharded(p) and 2 * p.to_local().numel() <= p.numel() + p.shape[1:].numel()
        for m in models
        for p in m.parameters()
    )


def worker(out_dir: str, backend: str) -> None:  # fsdp or ddp: both on the CPU
    full_finetuning_worker(out_dir, "fsdp", _sharded, use_cpu=True)


def test_fsdp_full_finetuning_on_two_cpu_processes(tmp_path):
    ranks = launch(__file__, tmp_path / "fsdp", "cpu_fsdp.yaml", "fsdp")
    models = check_full_finetuning(ranks, tmp_path / "fsdp", "fsdp")
    assert (tmp_path / "fsdp" / "checkpoint-2" / "fsdp_optimizer_states_1.pt").exists()
    for model in models.values():  # not FSDP...
        assert model.config.architectures[0].startswith("Llama"), model.config.architectures
    check_same_as_ddp(__file__, ranks, tmp_path / "fsdp", tmp_path / "ddp")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        pytest.exit("usage: accelerate launch ... test_fsdp.py <out_dir> fsdp|ddp")
    worker(sys.argv[1], sys.argv[2])
