"""What the two-process tests (test_distributed.py, test_fsdp.py, test_zero3.py) share: launching a test file
on two CPU processes with ``accelerate launch`` and reading back each rank's JSON record; the workers' tiny
tokenizer, prompts, judge and trainer arguments; and the full fine-tuning run that FSDP and ZeRO-3 both make,
with its checks and its comparison with the same run under DDP.

Not named ``multiprocess.py``: that would shadow the ``multiprocess`` package that ``datasets`` imports (this
folder is on ``sys.path`` both under pytest and when a test file is launched as a script).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: str, out_dir, config: str, backend: str, timeout: int = 600) -> list[dict]:
    """Run ``script <out_dir> <backend>`` on the two processes of ``accelerate_configs/<config>``; it must
    succeed, and each rank must have written ``rank<r>.json`` into ``out_dir`` (a ``Path``): those records."""
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
        str(free_port()),
        os.path.abspath(script),
        str(out_dir),
        backend,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


# ---------------------------------------------------------------------------- in the workers
def digest(tensors: Iterable) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def variable_digest(variable) -> str:
    """Of the full tensors of a solver variable (its ``state_dict`` gathers them under FSDP and ZeRO-3)."""
    return digest(variable.state_dict().values())


def tiny_setup() -> tuple[list, object]:
    """One thread per process; the shipped prompts and the tiny tokenizer built on them."""
    import torch

    from brlhf.tiny import build_tiny_tokenizer

    torch.set_num_threads(1)
    with open(os.path.join(REPO, "recipes", "data", "prompts.jsonl")) as fh:
        prompts = [json.loads(line)["prompt"] for line in fh]
    return prompts, build_tiny_tokenizer([p[0]["content"] for p in prompts], vocab_size=200)


def spaces_judge():
    from brlhf.judges import FunctionJudge

    return FunctionJudge(lambda p, c: c.count(" ") / max(len(c), 1))


def trainer_args(out_dir: str, use_cpu: bool, **overrides) -> dict:
    """Three outer steps of two inner steps, a checkpoint at step 2, on gloo (``use_cpu=False`` under
    DeepSpeed, which picks its CPU accelerator itself)."""
    return dict(
        output_dir=out_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=6,
        labels_per_step=4,
        reward_learning_rate=1e-2,
        use_cpu=use_cpu,
        ddp_backend="gloo",
        report_to="none",
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,
        inner_steps=2,
        **overrides,
    )


def write_record(out_dir: str, rank: int, record: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)


# ---------------------------------------------------------------------------- full fine-tuning, sharded
def full_finetuning_worker(out_dir: str, sharding: str, sharded: Callable, use_cpu: bool) -> None:
    """The run of test_fsdp.py and test_zero3.py. ``sharding`` is the trainer's flag (``"fsdp"``,
    ``"zero3"``); where it is set, ``sharded(trainer)`` says whether the weights really are sharded.

    Process 1's judge abstains in the first step while process 0's labels pairs: process 1 must still make
    the forward passes of a pair (with weight 0), or the processes' collective gathers go out of step."""
    import torch
    from datasets import Dataset

    from brlhf.tiny import build_tiny_policy, build_tiny_reward_model
    from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer

    prompts, tokenizer = tiny_setup()
    args = trainer_args(
        out_dir,
        use_cpu,
        full_finetuning=True,
        learning_rate=1e-4,  # z lags behind y (β = 0: no KL cost): keep_better_pure copies y into z
        beta=0.0,
        penalised_learning_rate=1e-2,
        label_replay=True,  # replayed labels: the same offline pool (and forward passes) on every process
        offline_batch_size=2,
    )

    # built before any config: once a ZeRO-3 config exists, transformers builds the inner model of a
    # LlamaForSequenceClassification under zero.Init, and its own weight init then fails
    policy = build_tiny_policy(tokenizer, hidden=32, layers=1)
    reward_model = build_tiny_reward_model(tokenizer, hidden=32, layers=1)

    gold, calls, rank = spaces_judge(), [], int(os.environ["RANK"])

    def judge(prompts, pairs):  # process 1 abstains in the first step, process 0 labels (rank-dependent work)
        calls.append(1)
        return [None] * len(pairs) if rank == 1 and len(calls) == 1 else gold.judge(prompts, pairs)

    def build(**overrides) -> BilevelRLHFTrainer:
        return BilevelRLHFTrainer(
            copy.deepcopy(policy),
            copy.deepcopy(reward_model),
            BilevelRLHFConfig(**{**args, **overrides}),
            judge=judge,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )

    trainer = build()
    record = {"rank": trainer.rank, "world_size": trainer.world_size, sharding: getattr(trainer, sharding)}
    if record[sharding]:  # the weights really are sharded, and LoRA is refused with a reason
        record["sharded"] = sharded(trainer)
        try:
            build(full_finetuning=False, output_dir=os.path.join(out_dir, "lora"))
        except NotImplementedError as err:
            record["lora_error"] = str(err)
    placeholders, label_pairs = [], trainer._label_pairs

    def recording_label_pairs():
        pairs = label_pairs()
        placeholders.append(pairs is not None and pairs.weight == 0)
        return pairs

    trainer._label_pairs = recording_label_pairs
    before = variable_digest(trainer.solver.pure)
    trainer.train()
    # stop at the step-2 checkpoint and resume in a new trainer: the same numbers as the uninterrupted run
    resumed = build(output_dir=os.path.join(out_dir, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
    names = ("penalised", "pure", "upper")
    same_after_resume = all(
        variable_digest(getattr(trainer.solver, k)) == variable_digest(getattr(resumed.solver, k))
        for k in names
    )
    variables = {k: getattr(trainer.solver, k).state_dict() for k in names}
    trainer.save_model(os.path.join(out_dir, "final"))
    reference = trainer.generate(["hello"] * 2, policy="reference")  # generation from the sharded reference
    if trainer.rank == 0:
        torch.save(variables, os.path.join(out_dir, "variables.pt"))
    record.update(
        labels_used=trainer.labels_used,
        y=variable_digest(trainer.solver.penalised),
        z=variable_digest(trainer.solver.pure),
        x=variable_digest(trainer.solver.upper),
        z_before=before,
        samples=trainer._rollouts["y"].completions,
        logs=[h for h in trainer.state.log_history if "value_gap" in h],
        same_after_resume=same_after_resume,
        placeholders=placeholders,
        reference_samples=len(reference),
    )
    write_record(out_dir, trainer.rank, record)
    # everything is written: skip the interpreter's teardown, where a process now and then aborted
    # ("terminate called without an active exception", about 1 run in 10 on a loaded machine)
    torch.distributed.destroy_process_group()
    os._exit(0)


def check_full_finetuning(ranks: list[dict], out_dir, sharding: str) -> dict:
    """The checks of a sharded run of ``full_finetuning_worker`` in ``out_dir`` (a ``Path``) that FSDP and
    ZeRO-3 share; the full models ``save_model`` wrote, by name, for the backend's own checks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert [r["world_size"] for r in ranks] == [2, 2] and [r[sharding] for r in ranks] == [True, True]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]
    assert "full_finetuning=True" in ranks[0]["lora_error"] and "ZeRO-2" in ranks[0]["lora_error"]
    for key in ("x", "y", "z", "labels_used", "logs"):
        assert ranks[0][key] == ranks[1][key], key  # replicas identical after 3 outer steps
    assert ranks[0]["z"] != ranks[0]["z_before"]  # and they did train
    assert ranks[0]["samples"] != ranks[1]["samples"]  # on different prompts / samples per process
    assert 0 < ranks[0]["labels_used"] <= 3 * 4
    assert ranks[0]["logs"][-1]["pure_restarts"] > 0  # keep_better_pure copied y into z (sharded writes)
    assert ranks[0]["same_after_resume"] and ranks[1]["same_after_resume"]
    assert ranks[0]["reference_samples"] == 2
    # step 1: process 1 had no label and made the passes of a placeholder pair; the others had labels
    assert ranks[1]["placeholders"] == [True, False, False] and ranks[0]["placeholders"] == [False] * 3

    # save_model wrote full models, equal to the gathered variables
    final, variables = out_dir / "final", torch.load(out_dir / "variables.pt")
    models = {}
    for name, key, cls in [
        ("y", "penalised", AutoModelForCausalLM),
        ("z", "pure", AutoModelForCausalLM),
        ("reward_model", "upper", AutoModelForSequenceClassification),
    ]:
        models[name] = cls.from_pretrained(final / name)
        saved = dict(models[name].named_parameters())
        assert saved.keys() == variables[key].keys(), name
        for n, t in variables[key].items():
            assert torch.equal(saved[n].detach(), t), (name, n)
    return models


def check_same_as_ddp(script: str, ranks: list[dict], out_dir, ddp_dir) -> None:
    """The same run under DDP (replicated weights), launched from ``script`` into ``ddp_dir``, computes what
    the sharded run in ``out_dir`` (its records ``ranks``) computed, up to the order of float reductions."""
    import torch

    ddp = launch(script, ddp_dir, "cpu_ddp.yaml", "ddp")
    assert ddp[0]["samples"] == ranks[0]["samples"] and ddp[1]["samples"] == ranks[1]["samples"]
    assert ddp[0]["labels_used"] == ranks[0]["labels_used"]
    for a, b in zip(ddp[0]["logs"], ranks[0]["logs"], strict=True):  # proxy_grad_norm: x's averaged gradient
        for k in ("value_gap", "upper_loss", "lower_loss/y", "lower_loss/z", "proxy_grad_norm", "reward/y"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), k
    # Adam turns float noise in near-zero gradients into differences of a fraction of a step (lr = 1e-2)
    variables, reference = torch.load(out_dir / "variables.pt"), torch.load(ddp_dir / "variables.pt")
    for key in variables:
        for n, t in variables[key].items():
            torch.testing.assert_close(t, reference[key][n].cpu(), rtol=0, atol=1e-3, msg=f"{key} {n}")
