"""Saving and resuming the trainer: the trained models (``save_model``, with a model card) and
``checkpoint-<step>/`` folders that resume a run exactly.

A checkpoint holds the saved models, ``bilevel_state.pt`` (the solver's variables and optimisers, the
learning-rate schedules, the label count, the judge's statistics, the replayed labels), the
``TrainerState`` and one random state per process (and, under DeepSpeed and FSDP, one optimiser shard
per process). It is written to a temporary folder and renamed; ``save_total_limit`` keeps the newest ones.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from transformers import TrainerState

from brlhf.core import get_rng_state, set_rng_state
from brlhf.core.solver import OPTIMIZERS
from brlhf.trainer.distributed import barrier
from brlhf.trainer.schedules import load_schedulers
from brlhf.trainer.zero import full_state_dict

STATE_NAME = "bilevel_state.pt"


class CheckpointMixin:
    """``save_model``, the model card and the checkpoints of :class:`BilevelRLHFTrainer`: its models
    (``policies``, ``reward_model``, tokenizers), ``solver``, ``lr_schedulers``, label count and replayed
    labels, judge statistics and random generators."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes ``y/``, ``z/`` (adapters or full models), ``reward_model/``, the tokenizer, a model card.

        ``reward_model/`` holds the full reward model, or with ``reward_peft_config`` its adapter (LoRA and
        score head): load it with ``PeftModel.from_pretrained(base_reward_model, ".../reward_model")``, or
        ``AutoPeftModelForSequenceClassification`` when the base came from a hub id or a folder.
        Under ZeRO-3 and FSDP every process must call it (the models are gathered); process 0 writes them."""
        output_dir = output_dir or self.args.output_dir
        states: dict[str, Any] = {}  # ZeRO-3, FSDP: all processes gather the sharded models, process 0 writes
        if self.zero3 or self.fsdp:
            keep = self.is_world_process_zero()
            states = {name: full_state_dict(m, keep) for name, m in self.policies.models.items()}
            states["reward_model"] = full_state_dict(self.reward_model, keep)
        if not self.is_world_process_zero():
            return
        os.makedirs(output_dir, exist_ok=True)
        self.policies.save(output_dir, states)
        self.reward_model.save_pretrained(
            os.path.join(output_dir, "reward_model"), state_dict=states.get("reward_model")
        )
        self.reward_tokenizer.save_pretrained(os.path.join(output_dir, "reward_model"))
        self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "README.md"), "w") as fh:
            fh.write(self.model_card())

    def model_card(self) -> str:
        a = self.args
        base = getattr(getattr(self.policies.model, "config", None), "_name_or_path", "") or "a local model"
        last = next((h for h in reversed(self.state.log_history) if "value_gap" in h), {})
        lines = [
            "---",
            "library_name: brlhf",
            "tags: [brlhf, bilevel-rlhf, rlhf, trl]",
            "---",
            "",
            "# Bilevel RLHF policy and reward model",
            "",
            f"Trained with `brlhf.trainer.BilevelRLHFTrainer` from {base}: the reward model and the "
            "KL-regularised "
            "policy are solved together as one bilevel problem (penalty method, Algorithm 1).",
            "",
            "* `y/`: the penalised policy (the one to ship), `z/`: the pure lower-level policy, "
            "`reward_model/`: the reward model trained on judge labels of y's samples.",
            f"* λ={a.lam} (power {a.lam_power}), K={a.inner_steps}, β={a.beta}, "
            f"{a.num_generations} completions "
            f"per prompt, {self.state.global_step} outer steps, {self.labels_used} labels.",
        ]
        if last:
            lines.append(
                f"* last logged step: value gap {last.get('value_gap', float('nan')):.4g}, "
                f"reward y {last.get('reward/y', float('nan')):.4g}, "
                f"reward z {last.get('reward/z', float('nan')):.4g}."
            )
        return "\n".join(lines) + "\n"

    def trainer_state_dict(self) -> dict[str, Any]:
        """Everything that is shared by the processes: the solver (x, y, z, their optimisers, λ's step),
        the learning-rate schedules and the label count."""
        state = self.solver.state_dict()
        state.pop("rng")
        return {
            "solver": state,
            "lr_schedulers": {name: s.state_dict() for name, s in self.lr_schedulers.items()},
            "labels_used": self.labels_used,
            "judge_stats": dict(self.judge.stats) if self.judge else None,
            "preferences": self._preferences if self.args.label_replay else None,  # with the replayed labels
        }

    def _judge_generator(self) -> torch.Generator | None:
        """The judge's own random stream, if it has one (a judge with a ``generator``)."""
        generator = getattr(getattr(self.judge, "inner", None), "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _rng_state(self) -> dict[str, Any]:
        judge_gen = self._judge_generator()
        return {
            "global": get_rng_state(),
            "prompts": self.prompt_generator.get_state(),
            "offline": self.offline_generator.get_state(),
            "judge": judge_gen.get_state() if judge_gen is not None else None,
        }

    def _save_checkpoint(self, model: Any = None, trial: Any = None) -> None:
        """``checkpoint-<step>/``, written to a temporary folder and renamed (atomic)."""
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(self.args.output_dir, name)
        tmp = os.path.join(self.args.output_dir, f"tmp-{name}")
        state = self.trainer_state_dict()  # on every process: ZeRO-3 gathers, ZeRO has per-process shards
        if self.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier(self.world_size)
        self.save_model(tmp)  # every process (ZeRO-3 gathers), process 0 writes
        if self.is_world_process_zero():
            torch.save(state, os.path.join(tmp, STATE_NAME))
            self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        torch.save(self._rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        if self._shard_file():  # each process's shard of the three optimiser states
            shards = {k: state["solver"][k] for k in OPTIMIZERS}
            torch.save(shards, os.path.join(tmp, self._shard_file()))
        barrier(self.world_size)
        if self.is_world_process_zero():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        barrier(self.world_size)

    def _shard_file(self) -> str | None:
        """The file of this process's optimiser shards (DeepSpeed, FSDP), or None (replicated optimisers)."""
        if self.zero_config is not None:
            return f"zero_optimizer_states_{self.rank}.pt"
        return f"fsdp_optimizer_states_{self.rank}.pt" if self.fsdp else None

    def _load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, STATE_NAME), weights_only=False)
        if self._shard_file():
            state["solver"].update(torch.load(os.path.join(path, self._shard_file()), weights_only=False))
        self.solver.load_state_dict({**state["solver"], "rng": None}, restore_rng=False)
        load_schedulers(self.lr_schedulers, state.get("lr_schedulers"))
        self.labels_used = state["labels_used"]
        if state.get("preferences") is not None:
            self._preferences = state["preferences"]
        if self.judge is not None and state["judge_stats"]:
            self.judge.stats.update(state["judge_stats"])
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pt"), weights_only=False)
        set_rng_state(rng["global"])
        self.prompt_generator.set_state(rng["prompts"])
        self.offline_generator.set_state(rng["offline"])
        judge_gen = self._judge_generator()
        if rng["judge"] is not None and judge_gen is not None:
            judge_gen.set_state(rng["judge"])
        saved = TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        self.state.log_history = saved.log_history


def _checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-")]
    return sorted(names, key=lambda d: int(d.split("-")[-1]))


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    """Deletes all but the ``limit`` newest checkpoints (``None`` / 0: keeps all)."""
    if not limit:
        return
    for d in _checkpoints(output_dir)[:-limit]:
        shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)


def last_checkpoint(output_dir: str) -> str:
    """The newest checkpoint folder in ``output_dir`` (``resume_from_checkpoint=True``)."""
    ckpts = _checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if not ckpts:
        raise ValueError(f"resume_from_checkpoint=True but there is no checkpoint in {output_dir}")
    return os.path.join(output_dir, ckpts[-1])
