"""Full fine-tuning under DeepSpeed ZeRO-3 on two CPU processes (gloo): the partitioned replicas agree, a
checkpoint resumes exactly, the run computes what the same run under DDP computes, and ``save_model`` writes
full models. LoRA under ZeRO-3 is refused with a reason.

Process 1's judge abstains in the first step while process 0's labels pairs: under ZeRO-3 process 1 must
still make the forward passes of a pair (with weight 0), or the processes' collective gathers go out of step.
The run and the checks it shares with test_fsdp.py are in two_processes.py.

Run as a test (it launches itself with ``accelerate launch``) or directly:
    accelerate launch --config_file accelerate_configs/cpu_zero3.yaml \
        tests/trainer/test_zero3.py <out_dir> zero3
"""

from __future__ import annotations

import sys

import pytest
from two_processes import check_full_finetuning, check_same_as_ddp, full_finetuning_worker, launch


def _partitioned(trainer) -> bool:
    """Outside a gather, the partitioned parameters of the engines are empty."""
    return all(p.numel() == 0 for p in trainer.policies.models["y"].lm_head.parameters())


def worker(out_dir: str, backend: str) -> None:
    # DeepSpeed picks its CPU accelerator itself
    full_finetuning_worker(out_dir, "zero3", _partitioned, use_cpu=backend == "ddp")


def test_zero3_full_finetuning_on_two_cpu_processes(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = launch(__file__, tmp_path / "zero3", "cpu_zero3.yaml", "zero3")
    check_full_finetuning(ranks, tmp_path / "zero3", "zero3")
    assert (tmp_path / "zero3" / "checkpoint-2" / "zero_optimizer_states_1.pt").exists()
    check_same_as_ddp(__file__, ranks, tmp_path / "zero3", tmp_path / "ddp")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        pytest.exit("usage: accelerate launch ... test_zero3.py <out_dir> zero3|ddp")
    worker(sys.argv[1], sys.argv[2])
