"""BilevelRLHFTrainer: the reward model and the KL-regularised policy trained as one bilevel problem.

Upper variable ``x`` = the reward model ``r_x``; lower level = the policy, as two copies ``y``
(penalised) and ``z`` (pure) — two LoRA adapters on one base model by default, the reference being the
base with adapters disabled (ALGORITHM.md §5.2). Algorithm 1 itself is :class:`brlhf.core.PenaltySolver`;
this module supplies its closures:

* ``g(x, π)``, gradient in the policy (eq. 12): RLOO with the KL term over ``num_generations`` samples
  per prompt, ``-(1/N) Σ_i (R̃_i - b_i) ∇ log π(c_i|p_i)`` with ``R̃ = r_x - β (log π - log π_ref)``.
* ``g(x, π)``, gradient in ``x`` (eq. 11): ``-(1/N) Σ_i r_x(p_i, c_i)`` over that policy's samples.
* ``f(x, y)`` (eq. 13, PARL reading): Bradley-Terry loss ``ℓ = -log σ(r_x(chosen) - r_x(rejected))`` on
  judge-labelled pairs sampled from ``y`` (+ ``offline_weight`` × the same loss on offline pairs); its
  ``y``-gradient is the score-function term ``E[(ℓ - b) ∇_y log π_y(pair)]`` (leave-one-out ``b``).

So the reward step is ``x ← x - η ∇_x [f + λ (mean r_x on z's samples - mean r_x on y's samples)]``.

Sample reuse: one generation per copy and inner step. The ``y`` samples of an outer step's first inner
step are the ones sent to the judge (each labelled pair is counted once) and serve every ``f`` call of
that outer step; the reward step reuses the last inner step's samples of each copy unless
``fresh_rollouts_for_upper``.

Distribution: one device, DDP (the trainer all-reduces each variable's gradients), DeepSpeed ZeRO-1/2
(one engine per variable over its tensors) and ZeRO-3 with ``full_finetuning`` only (one engine per
variable over its own model, the reference in an inference engine; see :mod:`brlhf.trainer.zero`). FSDP
is refused. Every process takes the same decisions and makes the same forward passes (ZeRO-3 gathers
weights collectively): the value gap the solver acts on is the mean over processes, replayed labels are
pooled over processes, and a process without labels in a step scores a weight-0 placeholder pair.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerState,
    get_scheduler,
)
from transformers.trainer_utils import TrainOutput
from trl.data_utils import is_conversational, maybe_extract_prompt
from trl.models.utils import unwrap_model_for_generation

from brlhf.core import PenaltyConfig, PenaltySolver, get_rng_state, set_rng_state
from brlhf.judges import SafeJudge
from brlhf.rl import kl_policy_gradient_surrogate, leave_one_out_baseline, return_surrogate
from brlhf.trainer.config import BilevelRLHFConfig
from brlhf.trainer.policy import PolicyPair, PolicyView
from brlhf.trainer.rollout import Rollout, encode_prompts, reward_scores, sample, sequence_logprobs
from brlhf.trainer.zero import (
    ZeroVariable,
    full_state_dict,
    inference_engine,
    is_partitioned,
    is_zero3,
    zero_config,
)

STATE_NAME = "bilevel_state.pt"
OPTIMIZERS = ("upper_optimizer", "penalised_optimizer", "pure_optimizer")


@dataclass
class LabelledPairs:
    """Judge-labelled pairs of one outer step: rows ``chosen[i]`` / ``rejected[i]`` of ``rollout``."""

    rollout: Rollout
    chosen: Tensor
    rejected: Tensor
    weight: float = 1.0  # 0: a placeholder pair, for the forward passes only (ZeRO-3, see _label_pairs)

    def __len__(self) -> int:
        return len(self.chosen)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _prompt_is_empty(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):
        return not prompt or all(not str(m.get("content", "")).strip() for m in prompt)
    return True


class BilevelRLHFTrainer(Trainer):
    """Bilevel RLHF (Algorithm 1 on language models), TRL style.

    Args:
        model: the policy: a model id / local folder, or a loaded causal LM (its base, without adapters).
        reward_model: the reward model ``x``: an id / folder, a loaded sequence classifier with one output,
            or ``None`` to initialise it from the policy's base (a new one-output score head).
        args: a :class:`BilevelRLHFConfig`.
        judge: labels pairs of ``y``'s samples (see :mod:`brlhf.judges`); may be ``None`` only with
            ``labels_per_step=0`` (offline preferences only).
        train_dataset: prompts, a ``prompt`` column in TRL's standard (string) or conversational format.
        preference_dataset: optional offline ``prompt``/``chosen``/``rejected`` pairs (TRL preference
            format, explicit or implicit prompt); they warm-start (``reward_warmup_steps``) and regularise
            the reward model (``offline_weight``).
        processing_class: the policy's tokenizer (default: loaded from ``model``); it is also the reward
            model's unless ``reward_processing_class`` is given.
        peft_config: LoRA config of the two adapters (default: r=16, all linear layers); ignored with
            ``args.full_finetuning``.
        reward_peft_config: a peft ``LoraConfig`` with ``task_type="SEQ_CLS"`` to train the reward model as a
            LoRA adapter (peft also trains its score head, through ``modules_to_save``); the upper variable
            ``x`` is then the adapter and the head only, the base weights stay fixed. ``None`` (default):
            the full reward model is trained. The reward model is wrapped in place.

    Learning rates follow ``args.lr_scheduler_type`` (default ``"constant"``): one schedule per optimiser
    (``x``, ``y``, ``z``), advanced once per outer step, kept in ``self.lr_schedulers`` (``"x"``, ``"y"``,
    ``"z"``), saved in checkpoints and logged as ``lr/x``, ``lr/y``, ``lr/z`` (the rates each step used).
    """

    _tag_names = ["brlhf", "bilevel-rlhf"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_model: str | nn.Module | None = None,
        args: BilevelRLHFConfig | None = None,
        judge: Any = None,
        train_dataset: Any = None,
        preference_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        reward_peft_config: Any = None,
    ) -> None:
        args = args if args is not None else BilevelRLHFConfig(output_dir="bilevel-rlhf")
        if not isinstance(args, BilevelRLHFConfig):
            raise TypeError(f"args must be a BilevelRLHFConfig, got {type(args).__name__}")
        if judge is None and args.labels_per_step > 0:
            raise ValueError(
                "no judge given: pass a judge, or set labels_per_step=0 (offline preferences only)"
            )
        self.judge = (
            SafeJudge(judge, args.judge_timeout, args.judge_max_retries) if judge is not None else None
        )

        model_id = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id or model.config._name_or_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        processing_class.padding_side = "left"
        self.reward_tokenizer = reward_processing_class or processing_class
        if self.reward_tokenizer.pad_token is None:
            self.reward_tokenizer.pad_token = self.reward_tokenizer.eos_token

        self.reward_model = self._load_reward_model(reward_model, model, model_id)
        self.reward_is_lora = reward_peft_config is not None
        if self.reward_is_lora:
            self.reward_model = self._wrap_reward_model(self.reward_model, reward_peft_config)
        self._prompts = self._check_prompts(train_dataset, processing_class, model, args)
        self._preferences = self._check_preferences(preference_dataset)

        copy_model = None  # full fine-tuning: z and the reference are deep copies of the policy, unless ...
        if args.full_finetuning and any(is_partitioned(p) for p in model.parameters()):
            if model_id is None:  # ... it was loaded partitioned (ZeRO-3's zero.Init): load them again
                raise ValueError(
                    "the policy's parameters are ZeRO-3-partitioned (loaded under zero.Init) and cannot be "
                    "copied into z and the reference: pass its model id or folder instead"
                )
            load = AutoModelForCausalLM.from_pretrained
            copy_model = functools.partial(load, model_id, dtype=torch.float32)
        self.policies = PolicyPair(model, peft_config, args.full_finetuning, copy_model)
        super().__init__(
            model=self.policies.model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=lambda rows: rows,
            callbacks=callbacks,
        )
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "BilevelRLHFTrainer runs on one device, data-parallel (DDP), DeepSpeed ZeRO-1/2, or ZeRO-3 "
                "with full_finetuning=True; FSDP is not supported yet"
            )
        self.zero_config = None
        if self.is_deepspeed_enabled:
            self.zero_config = zero_config(
                self.accelerator.state.deepspeed_plugin.deepspeed_config, args.max_grad_norm
            )
        self.zero3 = is_zero3(self.zero_config)
        if self.zero3 and not args.full_finetuning:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 needs full_finetuning=True: ZeRO-3 partitions the weights of the module an "
                "engine wraps and gathers them through that module, with one optimiser per engine, while the "
                "LoRA adapters y and z and the reference share one base module, so y and z cannot be stepped "
                "by separate engines. Use full_finetuning=True (y, z, the reference and the reward model are "
                "then separate, sharded models), or LoRA with ZeRO-2 (sharded gradients and optimiser "
                "states, replicated weights)"
            )
        device = self.args.device
        self.reward_model.to(device)
        if args.full_finetuning:
            for m in (*self.policies.models.values(), self.policies.ref_model):
                m.to(device)
        self.rank, self.world_size = _world()
        if args.labels_per_step % self.world_size:
            raise ValueError(
                f"labels_per_step={args.labels_per_step} does not split over {self.world_size} processes"
            )

        self.prompt_generator = torch.Generator().manual_seed(args.seed + self.rank)
        self.offline_generator = torch.Generator().manual_seed(args.seed + 1000 + self.rank)
        self.labels_used = 0
        self.solver = self._build_solver()
        self.reward_engine = None  # ZeRO-3: the engines through which the forward passes go
        if self.zero3:
            solver = self.solver
            self.reward_engine = solver.upper_optimizer.engine
            self.policies.engines = {
                "y": solver.penalised_optimizer.engine,
                "z": solver.pure_optimizer.engine,
                "reference": inference_engine(self.policies.ref_model, self.zero_config),
            }
        self.lr_schedulers = self._build_schedulers(self._max_steps())
        self._rollouts: dict[str, Rollout] = {}
        self._pairs: LabelledPairs | None = None
        self._pairs_step = -1
        self._stats: dict[str, float] = {}
        self.skip_shared_samples = True  # exact; switch off to score every sample in the reward step

    # ------------------------------------------------------------------ construction and checks
    def _load_reward_model(self, reward_model: Any, policy: nn.Module, model_id: str | None) -> nn.Module:
        if isinstance(reward_model, str):
            reward_model = AutoModelForSequenceClassification.from_pretrained(
                reward_model, num_labels=1, dtype=torch.float32
            )
        elif reward_model is None:  # initialise from the policy's base, with a fresh one-output head
            if model_id is not None:
                reward_model = AutoModelForSequenceClassification.from_pretrained(
                    model_id, num_labels=1, dtype=torch.float32
                )
            else:
                config = copy_config(policy.config, num_labels=1)
                reward_model = AutoModelForSequenceClassification.from_config(config)
                reward_model.load_state_dict(policy.state_dict(), strict=False)
        if not isinstance(reward_model, nn.Module):
            raise TypeError(
                f"reward_model must be a model id, a folder, a module or None, "
                f"got {type(reward_model).__name__}"
            )
        num_labels = getattr(getattr(reward_model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"the reward model must have exactly one output (a scalar reward), it has "
                f"num_labels={num_labels}"
            )
        config = getattr(reward_model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.reward_tokenizer.pad_token_id
        return reward_model.eval()

    @staticmethod
    def _wrap_reward_model(reward_model: nn.Module, peft_config: Any) -> nn.Module:
        """The reward model as a peft model (LoRA adapter + trainable score head): ``reward_peft_config``."""
        from peft import PeftConfig, PeftModel, TaskType, get_peft_model

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"reward_peft_config must be a peft config (e.g. LoraConfig(task_type='SEQ_CLS', ...)), "
                f"got {type(peft_config).__name__}"
            )
        if peft_config.task_type != TaskType.SEQ_CLS:
            raise ValueError(
                f"reward_peft_config.task_type must be 'SEQ_CLS' (the reward model is a sequence classifier "
                f"whose score head peft trains through modules_to_save), got {peft_config.task_type!r}"
            )
        if isinstance(reward_model, PeftModel) or any("lora_" in n for n, _ in reward_model.named_modules()):
            raise ValueError(
                "reward_peft_config was given but the reward model already has adapters: pass its base model"
            )
        model = get_peft_model(reward_model, peft_config).eval()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not any("modules_to_save" in n for n in trainable):
            warnings.warn(
                "with reward_peft_config, no score head of the reward model is trainable (peft found no "
                "'score' / 'classifier' module): name the head in reward_peft_config.modules_to_save",
                stacklevel=3,
            )
        return model

    @staticmethod
    def _check_prompts(dataset: Any, tokenizer: Any, model: nn.Module, args: BilevelRLHFConfig) -> list[Any]:
        if dataset is None:
            raise ValueError("train_dataset is required: prompts in a 'prompt' column")
        columns = list(getattr(dataset, "column_names", None) or [])
        if "prompt" not in columns:
            raise ValueError(
                f"the prompt dataset has columns {columns}; expected a 'prompt' column "
                "(TRL standard: a string; conversational: a list of messages)"
            )
        prompts = list(dataset["prompt"])
        if not prompts:
            raise ValueError("the prompt dataset is empty")
        empty = [i for i, p in enumerate(prompts) if _prompt_is_empty(p)]
        if empty:
            raise ValueError(f"{len(empty)} empty prompt(s) in the prompt dataset, first at row {empty[0]}")
        context = getattr(model.config, "max_position_embeddings", None)
        limit = args.max_prompt_length
        if limit is None and context is not None:
            limit = context - args.max_completion_length
        if limit is not None:
            if limit < 1:
                raise ValueError(
                    f"max_completion_length={args.max_completion_length} leaves no room for a prompt "
                    f"in the model's context of {context} tokens"
                )
            for i in range(0, len(prompts), 256):
                ids, mask = encode_prompts(prompts[i : i + 256], tokenizer)
                lengths = mask.sum(dim=1)
                if (lengths > limit).any():
                    j = int(torch.nonzero(lengths > limit)[0])
                    raise ValueError(
                        f"prompt at row {i + j} has {int(lengths[j])} tokens, more than the {limit} allowed "
                        f"(context {context} - max_completion_length {args.max_completion_length}, "
                        f"or max_prompt_length)"
                    )
        return prompts

    @staticmethod
    def _check_preferences(dataset: Any) -> list[dict[str, Any]] | None:
        if dataset is None:
            return None
        columns = list(getattr(dataset, "column_names", None) or [])
        if not {"chosen", "rejected"} <= set(columns):
            raise ValueError(
                f"the preference dataset has columns {columns}; expected 'prompt', 'chosen' and "
                "'rejected' (TRL preference format)"
            )
        rows = [dict(r) if "prompt" in r else maybe_extract_prompt(dict(r)) for r in dataset]
        out = []
        for i, r in enumerate(rows):
            if "prompt" not in r or _prompt_is_empty(r["prompt"]):
                raise ValueError(f"preference row {i} has no prompt")
            chosen, rejected = r["chosen"], r["rejected"]
            if is_conversational({"chosen": chosen}):  # completions as assistant messages -> their text
                chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
            out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
        if not out:
            raise ValueError("the preference dataset is empty")
        return out

    def _build_solver(self) -> PenaltySolver:
        a = self.args
        adam = functools.partial(
            torch.optim.AdamW,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            weight_decay=a.weight_decay,
        )
        config = PenaltyConfig(
            lam=a.lam,
            lam_power=a.lam_power,
            lam_max=a.lam_max,
            inner_steps=a.inner_steps,
            penalised_upper_grad=a.penalised_upper_grad,
            common_random_numbers=a.common_random_numbers,
            keep_better_pure=a.keep_better_pure,
            max_grad_norm=a.max_grad_norm
            if a.max_grad_norm and a.max_grad_norm > 0 and not self.zero_config
            else None,
        )
        if self.zero_config is not None:  # one DeepSpeed engine per variable
            adam = functools.partial(_zero_optimizer, adam, self.zero_config, self._zero3_modules())
        # x: the reward model's trainable tensors; with a LoRA reward model only the adapter and the head
        # (a view, so that checkpoints hold these tensors and not the frozen base weights)
        upper = (
            PolicyView("x", {n: p for n, p in self.reward_model.named_parameters() if p.requires_grad})
            if self.reward_is_lora or self.zero3  # ZeRO-3: a view gathers the partitioned tensors
            else self.reward_model
        )
        return PenaltySolver(
            upper=upper,
            penalised=self.policies.y,
            pure=self.policies.z,
            upper_loss=self._upper_loss,
            lower_loss=self._lower_loss,
            lower_loss_x=self._lower_loss_x,
            upper_optimizer=functools.partial(adam, lr=a.reward_learning_rate),
            penalised_optimizer=functools.partial(adam, lr=a.penalised_learning_rate),
            pure_optimizer=functools.partial(adam, lr=a.learning_rate),
            config=config,
            upper_batches=self._upper_batch,
            lower_batches=self._prompt_batch,
            backward=self._backward,
        )

    def _zero3_modules(self) -> dict[int, nn.Module]:
        """ZeRO-3: the module each variable's engine wraps, keyed by the id of the variable's first tensor."""
        if not self.zero3:
            return {}
        models = (self.reward_model, self.policies.models["y"], self.policies.models["z"])
        return {id(next(p for p in m.parameters() if p.requires_grad)): m for m in models}

    # ------------------------------------------------------------------ learning-rate schedules
    def _build_schedulers(self, num_steps: int) -> dict[str, Any]:
        """One ``transformers.get_scheduler`` schedule per optimiser (``"x"``, ``"y"``, ``"z"``) over
        ``num_steps`` outer steps, from ``lr_scheduler_type`` / ``warmup_steps`` / ``lr_scheduler_kwargs``.

        A schedule drives the torch optimiser that holds the learning rates: the optimiser itself, or, under
        DeepSpeed, the torch optimiser inside the engine's ZeRO optimiser (its ``param_groups`` are the ones
        the engine's step reads). Stepped once per outer step, after ``solver.step()``."""
        a = self.args
        return {
            name: get_scheduler(
                a.lr_scheduler_type,
                _torch_optimizer(optimizer),
                num_warmup_steps=a.get_warmup_steps(num_steps),
                num_training_steps=num_steps,
                scheduler_specific_kwargs=a.lr_scheduler_kwargs or {},
            )
            for name, optimizer in zip(("x", "y", "z"), self._optimizers())
        }

    def learning_rates(self) -> dict[str, float]:
        """The current learning rates of ``x``, ``y`` and ``z`` (``lr/x``, ``lr/y``, ``lr/z``)."""
        return {
            f"lr/{name}": float(_torch_optimizer(optimizer).param_groups[0]["lr"])
            for name, optimizer in zip(("x", "y", "z"), self._optimizers())
        }

    # ------------------------------------------------------------------ distributed backward
    def _backward(self, loss: Tensor, params: list[Tensor]) -> None:
        """``d loss / d params`` into ``.grad``, averaged over the data-parallel processes."""
        for p in params:
            p.requires_grad_(True)
        if self.zero_config is not None:
            engine = next(o for o in self._optimizers() if o.owns(list(params)))
            engine.backward(loss)
            return
        loss.backward(inputs=list(params))
        if self.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
                offset += g.numel()

    def _optimizers(self) -> list[Any]:
        s = self.solver
        return [s.upper_optimizer, s.penalised_optimizer, s.pure_optimizer]

    # ------------------------------------------------------------------ batches
    def _prompt_batch(self) -> list[Any] | None:
        """``per_device_train_batch_size`` prompts, uniformly with replacement (per-process stream)."""
        if self.solver.stage == "upper" and not self.args.fresh_rollouts_for_upper:
            return None
        idx = torch.randint(
            len(self._prompts), (self.args.per_device_train_batch_size,), generator=self.prompt_generator
        )
        return [self._prompts[i] for i in idx.tolist()]

    def _upper_batch(self) -> tuple[LabelledPairs | None, list[dict[str, Any]] | None]:
        """This outer step's labelled pairs (labelled on first use) and a fresh offline batch."""
        if self._pairs_step != self.solver.outer_step:
            self._pairs, self._pairs_step = self._label_pairs(), self.solver.outer_step
        offline = self._offline_batch() if self.args.offline_weight > 0 else None
        return self._pairs, offline

    def _offline_batch(self) -> list[dict[str, Any]] | None:
        if not self._preferences:
            return None
        idx = torch.randint(
            len(self._preferences), (self.args.offline_batch_size,), generator=self.offline_generator
        )
        return [self._preferences[i] for i in idx.tolist()]

    def _labels_this_step(self) -> int:
        per_step = self.args.labels_per_step
        if self.args.label_budget is not None:
            per_step = min(per_step, max(self.args.label_budget - self.labels_used, 0))
        return per_step // self.world_size

    def _label_pairs(self) -> LabelledPairs | None:
        """Send pairs of ``y``'s latest samples to the judge; count the valid labels (all processes)."""
        wanted = self._labels_this_step() if self.judge is not None else 0
        rollout = self._rollouts.get("y")
        chosen, rejected = [], []
        if wanted > 0 and rollout is not None:
            k = self.args.num_generations
            groups = len(rollout.prompts) // k
            candidates = [(g * k + 2 * j, g * k + 2 * j + 1) for j in range(k // 2) for g in range(groups)][
                :wanted
            ]
            answers = self.judge.judge(
                [rollout.prompts[a] for a, _ in candidates],
                [(rollout.completions[a], rollout.completions[b]) for a, b in candidates],
            )
            for (a, b), ans in zip(candidates, answers):
                if ans is not None:
                    chosen.append(b if ans == 1 else a)
                    rejected.append(a if ans == 1 else b)
        count = torch.tensor(
            [len(chosen), 0 if rollout is None else 1], dtype=torch.float64, device=self.args.device
        )
        if self.world_size > 1:
            dist.all_reduce(count)
        self.labels_used += int(count[0])
        self._stats["labels/step"] = float(count[0])
        if self.args.label_replay:
            new = [
                {
                    "prompt": rollout.prompts[c],
                    "chosen": rollout.completions[c],
                    "rejected": rollout.completions[r],
                }
                for c, r in zip(chosen, rejected)
            ]
            if self.world_size > 1:  # every process replays every label: the same pool everywhere
                everyone: list[Any] = [None] * self.world_size
                dist.all_gather_object(everyone, new)
                new = [row for rows in everyone for row in rows]
            if new:
                self._preferences = (self._preferences or []) + new
        device = rollout.logprobs.device if rollout is not None else None
        if not chosen and self.zero3 and count[0] > 0:
            # ZeRO-3: other processes make forward passes on their pairs (gathering the reward model's and
            # y's weights, a collective), so this one makes the same passes on a placeholder pair with
            # weight 0: one row twice, whose gradient is exactly zero
            row = torch.zeros(1, dtype=torch.long, device=device)
            return LabelledPairs(rollout, row, row, weight=0.0)
        if not chosen:
            return None
        return LabelledPairs(
            rollout, torch.tensor(chosen, device=device), torch.tensor(rejected, device=device)
        )

    # ------------------------------------------------------------------ rollouts
    def _rollout(self, view: PolicyView, prompts: list[Any], with_grad: bool) -> Rollout:
        """``num_generations`` samples per prompt of policy ``view``, their log-probs (with graph if
        ``with_grad``), the reference's log-probs and the current reward model's scores."""
        a, tok = self.args, self.processing_class
        repeated = [p for p in prompts for _ in range(a.num_generations)]
        prompt_ids, prompt_mask = encode_prompts(repeated, tok, self.args.device)
        t0 = time.perf_counter()
        with self.policies.active(view.name) as policy, self._for_generation(policy) as model:
            completion_ids, completion_mask = sample(
                model,
                prompt_ids,
                prompt_mask,
                a.max_completion_length,
                a.temperature,
                tok.pad_token_id,
                tok.eos_token_id,
            )
        self._add_time("time/generation", t0)
        t0 = time.perf_counter()
        with torch.no_grad(), self.policies.reference() as ref:
            ref_logprobs = sequence_logprobs(
                ref, prompt_ids, prompt_mask, completion_ids, completion_mask, a.temperature
            )
        with torch.set_grad_enabled(with_grad), self.policies.active(view.name) as model:
            logprobs = sequence_logprobs(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask, a.temperature
            )
        completions = tok.batch_decode(completion_ids, skip_special_tokens=True)
        with torch.no_grad():
            rewards = self.reward(repeated, completions, completion_ids)
        self._add_time("time/forward", t0)
        return Rollout(
            repeated,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            completions,
            logprobs,
            ref_logprobs,
            rewards,
            tag=self.solver.inner_step_count,
        )

    def reward(
        self, prompts: list[Any], completions: list[str], completion_ids: Tensor | None = None
    ) -> Tensor:
        """``r_x(prompt, completion)`` for each row (differentiable in ``x`` when grad is enabled); the
        reward model reads the text (so it may have its own tokenizer). Override for other reward forms."""
        model = self.reward_engine if self.reward_engine is not None else self.reward_model
        return reward_scores(model, self.reward_tokenizer, prompts, completions)

    def _for_generation(self, policy: nn.Module) -> Any:
        """Context giving the model to sample from: under ZeRO-3 the engine's module with all its parameters
        gathered and the partitioning hooks removed (TRL's helper), so that generation makes no collective
        call and each process may stop at its own EOS; otherwise ``policy`` itself."""
        if not self.zero3:
            return contextlib.nullcontext(policy)
        return unwrap_model_for_generation(policy, self.accelerator)

    def _add_time(self, key: str, t0: float) -> None:
        self._stats[key] = self._stats.get(key, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ the three closures
    def _lower_loss(self, view: PolicyView, prompts: list[Any]) -> Tensor:
        """g(x, π) whose policy gradient is eq. 12 (RLOO + KL); value: the estimate of -J(x, π)."""
        rollout = self._rollout(view, prompts, with_grad=True)
        self._rollouts[view.name] = rollout
        self._stats[f"reward/{view.name}"] = rollout.rewards.mean().item()
        self._stats[f"kl/{view.name}"] = rollout.kl.mean().item()
        self._stats[f"completion_length/{view.name}"] = rollout.completion_mask.sum(1).float().mean().item()
        return kl_policy_gradient_surrogate(
            rollout.logprobs,
            rollout.rewards,
            rollout.ref_logprobs,
            beta=self.args.beta,
            group_size=self.args.num_generations,
        )

    def _lower_loss_x(self, view: PolicyView, prompts: list[Any] | None) -> Tensor:
        """g(x, π) whose x-gradient is eq. 11: ``-mean r_x`` on π's samples (+ the constant β KL)."""
        rollout = (
            self._rollouts[view.name] if prompts is None else self._rollout(view, prompts, with_grad=False)
        )
        shared = self._shared_rows() if prompts is None else None
        if shared is None:
            rewards = self.reward(rollout.prompts, rollout.completions, rollout.completion_ids)
        else:  # score only the rows where y's and z's samples differ (see _shared_rows)
            rows = (~shared).nonzero().squeeze(1) if not shared.all() else torch.zeros(1, dtype=torch.long)
            fresh = self.reward(
                [rollout.prompts[i] for i in rows.tolist()],
                [rollout.completions[i] for i in rows.tolist()],
                rollout.completion_ids[rows.to(rollout.completion_ids.device)],
            )
            if shared.all():  # nothing differs: a zero-gradient graph keeps the step well defined
                fresh = rollout.rewards[rows.to(fresh.device)] + 0.0 * fresh
            rewards = rollout.rewards.index_put((rows.to(fresh.device),), fresh)
        return self._process_mean(-return_surrogate(rewards) + self.args.beta * rollout.kl.mean())

    def _process_mean(self, value: Tensor) -> Tensor:
        """``value`` with the mean over the processes as its value and its own gradient. The solver decides on
        the value gap ``g(x, y) - g(x, z)`` (``keep_better_pure`` copies y into z): every process must take
        the same decision, or the replicas diverge (and under ZeRO-3 the collective gathers get out of step).
        """
        if self.world_size == 1:
            return value
        mean = value.detach().clone()
        dist.all_reduce(mean)
        return value + (mean / self.world_size - value.detach())

    def _shared_rows(self) -> Tensor | None:
        """Rows where the cached samples of ``y`` and ``z`` coincide (same prompt, same completion).

        With common random numbers the two copies sample the same prompts from the same random stream, so
        while ``y`` and ``z`` are close most samples coincide. An identical row adds ``r_x`` to
        ``mean r_x(y's samples)`` and to ``mean r_x(z's samples)`` alike: its gradient cancels exactly in
        ``λ (∇_x g(x, y) - ∇_x g(x, z))``, and its value is already known (``rollout.rewards``, scored with
        the same ``x`` in the inner step). Such rows are not scored again with gradient. ``None``: no reuse.
        """
        y, z = self._rollouts.get("y"), self._rollouts.get("z")
        if not (
            self.skip_shared_samples and self.args.common_random_numbers and y is not None and z is not None
        ):
            return None
        if (
            y.tag != z.tag
            or y.prompt_ids.shape != z.prompt_ids.shape
            or not torch.equal(y.prompt_ids, z.prompt_ids)
        ):
            return None
        width = max(y.completion_ids.shape[1], z.completion_ids.shape[1])
        pad = self.processing_class.pad_token_id
        a = F.pad(y.completion_ids, (0, width - y.completion_ids.shape[1]), value=pad)
        b = F.pad(z.completion_ids, (0, width - z.completion_ids.shape[1]), value=pad)
        shared = (a == b).all(dim=1)
        self._stats["shared_samples"] = shared.float().mean().item()
        return shared

    def _pair_logprobs(self, pairs: LabelledPairs) -> tuple[Tensor, Tensor]:
        """``log π_y(chosen)`` and ``log π_y(rejected)`` under the current ``y`` (reusing the rollout's
        graph)."""
        r = pairs.rollout
        rows = torch.cat([pairs.chosen, pairs.rejected])
        if r.tag == self.solver.inner_step_count and r.logprobs.requires_grad:
            logprobs = r.logprobs[rows]
        else:
            with self.policies.active("y") as model:
                logprobs = sequence_logprobs(
                    model,
                    r.prompt_ids[rows],
                    r.prompt_mask[rows],
                    r.completion_ids[rows],
                    r.completion_mask[rows],
                    self.args.temperature,
                )
        n = len(pairs)
        return logprobs[:n], logprobs[n:]

    def _upper_loss(self, view: PolicyView, batch: tuple[LabelledPairs | None, Any]) -> Tensor:
        """f(x, y): Bradley-Terry loss on the labelled pairs of y's samples (+ offline pairs).

        x-gradient (reward step):  ∇_x mean_i ℓ_i,   ℓ_i = -log σ(r_x(chosen_i) - r_x(rejected_i))
        y-gradient (inner step):   mean_i (ℓ_i - b_i) ∇_y log π_y(chosen_i, rejected_i)
        """
        pairs, offline = batch
        upper = self.solver.stage == "upper"
        loss = torch.zeros((), device=self.args.device)
        if pairs is not None:
            r = pairs.rollout
            with torch.set_grad_enabled(upper):
                rows = torch.cat([pairs.chosen, pairs.rejected])
                scores = self.reward(
                    [r.prompts[i] for i in rows.tolist()],
                    [r.completions[i] for i in rows.tolist()],
                    r.completion_ids[rows],
                )
            n = len(pairs)
            margin = scores[:n] - scores[n:]
            bt = -F.logsigmoid(margin)
            loss = loss + bt.mean()
            if upper:
                if pairs.weight:
                    self._stats["reward_model/accuracy"] = (margin > 0).float().mean().item()
            else:
                ell = bt.detach()
                baseline = leave_one_out_baseline(ell, n) if n >= 2 else torch.zeros_like(ell)
                logp_chosen, logp_rejected = self._pair_logprobs(pairs)
                score = ((ell - baseline) * (logp_chosen + logp_rejected)).mean()
                loss = loss + (score - score.detach())
            loss = pairs.weight * loss
        if offline:
            with torch.set_grad_enabled(upper):
                prompts = [row["prompt"] for row in offline]
                scores = self.reward(
                    prompts * 2, [row["chosen"] for row in offline] + [row["rejected"] for row in offline]
                )
            margin = scores[: len(offline)] - scores[len(offline) :]
            loss = loss + self.args.offline_weight * (-F.logsigmoid(margin)).mean()
            if upper:
                self._stats["reward_model/offline_accuracy"] = (margin > 0).float().mean().item()
        return loss

    # ------------------------------------------------------------------ training loop
    def warmup_reward_model(self, steps: int) -> None:
        """``steps`` Bradley-Terry steps of the reward model on the offline preferences alone, at the base
        ``reward_learning_rate`` (the learning-rate schedule starts with the bilevel loop)."""
        if steps <= 0:
            return
        if not self._preferences:
            raise ValueError("reward_warmup_steps > 0 needs a preference_dataset")
        groups = _torch_optimizer(self.solver.upper_optimizer).param_groups
        scheduled = [group["lr"] for group in groups]
        for group, base in zip(groups, self.lr_schedulers["x"].base_lrs):
            group["lr"] = base
        try:
            for _ in range(steps):
                offline = self._offline_batch()
                scores = self.reward(
                    [row["prompt"] for row in offline] * 2,
                    [row["chosen"] for row in offline] + [row["rejected"] for row in offline],
                )
                loss = -F.logsigmoid(scores[: len(offline)] - scores[len(offline) :]).mean()
                self.solver.upper_optimizer.zero_grad(set_to_none=True)
                self._backward(loss, self.solver.upper_params)
                self.solver.upper_optimizer.step()
        finally:
            for group, lr in zip(groups, scheduled):
                group["lr"] = lr

    def outer_step(self) -> dict[str, float]:
        """One iteration of Algorithm 1 (K inner steps of y and z, then the reward-model step), then one
        step of the three learning-rate schedules."""
        self._stats = {}
        learning_rates = self.learning_rates()  # the rates this step uses
        t0 = time.perf_counter()
        stats = self.solver.step()
        for scheduler in self.lr_schedulers.values():
            scheduler.step()
        self._stats["time/step"] = time.perf_counter() - t0
        rollout_time = self._stats.get("time/generation", 0.0) + self._stats.get("time/forward", 0.0)
        self._stats["time/update"] = self._stats["time/step"] - rollout_time  # backward + optimiser steps
        logs = {
            "lower_loss/z": stats["pure_lower_loss"],
            "lower_loss/y": stats["penalised_lower_loss"],
            "upper_loss": stats["upper_loss"],
            "value_gap": stats["value_gap"],
            "proxy_grad_norm": (
                self.solver.upper_optimizer.grad_norm() if self.zero_config else stats["proxy_grad_norm"]
            ),
            **self._stats,
        }
        logs = self._mean_over_processes(logs)
        logs["lam"], logs["labels/used"] = stats["lam"], float(self.labels_used)
        logs["pure_restarts"] = stats["pure_restarts"]
        logs.update(learning_rates)
        return logs

    def _mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the processes that report it (a process without labels this step
        has no reward-model accuracy, for instance)."""
        if self.world_size == 1:
            return logs
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, logs)
        keys = sorted({k for d in everyone for k in d})
        return {k: sum(d[k] for d in everyone if k in d) / sum(k in d for d in everyone) for k in keys}

    def _max_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        a = self.args
        per_epoch = math.ceil(
            len(self._prompts) / (a.per_device_train_batch_size * self.world_size * a.inner_steps)
        )
        return max(1, math.ceil(a.num_train_epochs * per_epoch))

    def budget_exhausted(self) -> bool:
        return self.args.label_budget is not None and self.labels_used >= self.args.label_budget

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run Algorithm 1 for ``max_steps`` outer steps (or ``num_train_epochs`` passes over the prompts)."""
        args = self.args
        max_steps = self._max_steps()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.state.compute_steps(args, max_steps)
        self.state.max_steps = max_steps
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_checkpoint()
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
        else:
            if self.world_size > 1:  # each process samples its completions from its own random stream
                torch.manual_seed(args.seed + 7919 * self.rank)
            self.warmup_reward_model(args.reward_warmup_steps)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        steps_per_epoch = len(self._prompts) / (
            args.per_device_train_batch_size * self.world_size * args.inner_steps
        )
        start = time.time()
        while self.state.global_step < max_steps:
            if args.on_budget_exhausted == "stop" and self.budget_exhausted():
                break
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            logs = self.outer_step()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / steps_per_epoch
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log:
                self.log(logs)
                self.control.should_log = False
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        metrics = {"train_runtime": time.time() - start, "labels_used": float(self.labels_used)}
        return TrainOutput(self.state.global_step, float("nan"), metrics)

    # ------------------------------------------------------------------ saving and resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes ``y/``, ``z/`` (adapters or full models), ``reward_model/``, the tokenizer, a model card.

        ``reward_model/`` holds the full reward model, or with ``reward_peft_config`` its adapter (LoRA and
        score head): load it with ``PeftModel.from_pretrained(base_reward_model, ".../reward_model")``, or
        ``AutoPeftModelForSequenceClassification`` when the base came from a hub id or a folder.
        Under ZeRO-3 every process must call it (the models are gathered); process 0 writes them."""
        output_dir = output_dir or self.args.output_dir
        states: dict[str, Any] = {}  # ZeRO-3: every process gathers the partitioned models, process 0 writes
        if self.zero3:
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

    def _rng_state(self) -> dict[str, Any]:
        judge_gen = getattr(getattr(self.judge, "inner", None), "generator", None)
        return {
            "global": get_rng_state(),
            "prompts": self.prompt_generator.get_state(),
            "offline": self.offline_generator.get_state(),
            "judge": judge_gen.get_state() if isinstance(judge_gen, torch.Generator) else None,
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
        self._barrier()
        self.save_model(tmp)  # every process (ZeRO-3 gathers), process 0 writes
        if self.is_world_process_zero():
            torch.save(state, os.path.join(tmp, STATE_NAME))
            self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        torch.save(self._rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        if self.zero_config is not None:  # each process's shard of the three optimiser states
            shards = {k: state["solver"][k] for k in OPTIMIZERS}
            torch.save(shards, os.path.join(tmp, f"zero_optimizer_states_{self.rank}.pt"))
        self._barrier()
        if self.is_world_process_zero():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate_checkpoints_simple()
        self._barrier()

    def _rotate_checkpoints_simple(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        ckpts = sorted(
            (d for d in os.listdir(self.args.output_dir) if d.startswith("checkpoint-")),
            key=lambda d: int(d.split("-")[-1]),
        )
        for d in ckpts[:-limit]:
            shutil.rmtree(os.path.join(self.args.output_dir, d), ignore_errors=True)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _last_checkpoint(self) -> str:
        out = self.args.output_dir
        ckpts = [d for d in os.listdir(out) if d.startswith("checkpoint-")] if os.path.isdir(out) else []
        if not ckpts:
            raise ValueError(f"resume_from_checkpoint=True but there is no checkpoint in {out}")
        return os.path.join(out, max(ckpts, key=lambda d: int(d.split("-")[-1])))

    def _load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, STATE_NAME), weights_only=False)
        if self.zero_config is not None:
            shards = torch.load(
                os.path.join(path, f"zero_optimizer_states_{self.rank}.pt"), weights_only=False
            )
            state["solver"].update(shards)
        self.solver.load_state_dict({**state["solver"], "rng": None}, restore_rng=False)
        for name, scheduler in self.lr_schedulers.items():
            if "lr_schedulers" in state:  # (checkpoints written before the schedules: constant rates)
                scheduler.load_state_dict(state["lr_schedulers"][name])
            # the rates in force: a ZeRO optimiser's shard need not carry its param_groups' "lr"
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.labels_used = state["labels_used"]
        if state.get("preferences") is not None:
            self._preferences = state["preferences"]
        if self.judge is not None and state["judge_stats"]:
            self.judge.stats.update(state["judge_stats"])
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pt"), weights_only=False)
        set_rng_state(rng["global"])
        self.prompt_generator.set_state(rng["prompts"])
        self.offline_generator.set_state(rng["offline"])
        judge_gen = getattr(getattr(self.judge, "inner", None), "generator", None)
        if rng["judge"] is not None and isinstance(judge_gen, torch.Generator):
            judge_gen.set_state(rng["judge"])
        saved = TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        self.state.log_history = saved.log_history

    # ------------------------------------------------------------------ evaluation helpers
    @torch.no_grad()
    def generate(
        self,
        prompts: list[Any],
        policy: str = "y",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[str]:
        """Sampled completions of ``policy`` (``"y"``, ``"z"`` or ``"reference"``) for ``prompts``. Under
        ZeRO-3 it gathers the policy's weights: every process must call it."""
        tok = self.processing_class
        ids, mask = encode_prompts(prompts, tok, self.args.device)
        ctx = self.policies.reference() if policy == "reference" else self.policies.active(policy)
        with ctx as engine, self._for_generation(engine) as model:
            out, _ = sample(
                model,
                ids,
                mask,
                max_new_tokens or self.args.max_completion_length,
                temperature or self.args.temperature,
                tok.pad_token_id,
                tok.eos_token_id,
            )
        return tok.batch_decode(out, skip_special_tokens=True)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser whose ``param_groups`` hold the learning rates: ``optimizer`` itself, or the one
    wrapped by a :class:`ZeroVariable` and DeepSpeed's ZeRO optimiser (``.optimizer`` attributes)."""
    inner = optimizer
    for _ in range(4):
        if isinstance(inner, torch.optim.Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(f"no torch optimiser found in {type(optimizer).__name__} to schedule its learning rate")


def _zero_optimizer(
    adam: Any, config: dict[str, Any], modules: dict[int, nn.Module], params: list[Tensor], lr: float
) -> ZeroVariable:
    return ZeroVariable(params, adam(params, lr=lr), config, modules.get(id(params[0])))


def copy_config(config: Any, **overrides: Any) -> Any:
    """A copy of a model config with some fields changed."""
    new = config.__class__.from_dict(config.to_dict())
    for k, v in overrides.items():
        setattr(new, k, v)
    return new


__all__ = ["BilevelRLHFTrainer", "LabelledPairs", "copy_config"]
