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
(one engine per variable over its tensors), ZeRO-3 with ``full_finetuning`` only (one engine per
variable over its own model, the reference in an inference engine; see :mod:`brlhf.trainer.zero`) and
FSDP2 with ``full_finetuning`` only (``y``, ``z``, the reward model and the reference each sharded as a
module of its own; see :mod:`brlhf.trainer.fsdp`). Every process takes the same decisions and makes the same
forward passes (ZeRO-3 and FSDP gather weights collectively): the value gap the solver acts on is the
mean over processes, replayed labels are pooled over processes, and a process without labels in a step
scores a weight-0 placeholder pair.

This module holds the trainer's core: its construction, the solver's closures and batches, the rollouts
and the training loop. The rest lives beside it: the inputs' checks and the reward model's loading in
:mod:`~brlhf.trainer.inputs`, the judge's labels in :mod:`~brlhf.trainer.labels`, saving and resuming in
:mod:`~brlhf.trainer.checkpoint`, the learning-rate schedules in :mod:`~brlhf.trainer.schedules` and the
collectives over processes in :mod:`~brlhf.trainer.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainerState
from transformers.trainer_utils import TrainOutput
from trl.models.utils import unwrap_model_for_generation

from brlhf.core import PenaltyConfig, PenaltySolver
from brlhf.core.solver import OPTIMIZERS
from brlhf.judges import SafeJudge
from brlhf.rl import kl_policy_gradient_surrogate, leave_one_out_baseline, return_surrogate
from brlhf.trainer import schedules
from brlhf.trainer.checkpoint import CheckpointMixin, last_checkpoint
from brlhf.trainer.config import BilevelRLHFConfig
from brlhf.trainer.distributed import average_gradients, mean_over_processes, process_mean, world
from brlhf.trainer.fsdp import check_fsdp, fsdp_version, shard, sharded_optimizer, unsharded
from brlhf.trainer.inputs import (
    check_preferences,
    check_prompts,
    copy_config,
    load_reward_model,
    set_pad_token,
    wrap_reward_model,
)
from brlhf.trainer.labels import LabelledPairs, LabelsMixin
from brlhf.trainer.policy import PolicyPair, PolicyView
from brlhf.trainer.rollout import Rollout, encode_prompts, reward_scores, sample, sequence_logprobs
from brlhf.trainer.zero import inference_engine, is_partitioned, is_zero3, zero_config, zero_optimizer


def _draw(pool: list[Any], n: int, generator: torch.Generator) -> list[Any]:
    """``n`` rows of ``pool``, uniformly with replacement."""
    idx = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in idx.tolist()]


class BilevelRLHFTrainer(CheckpointMixin, LabelsMixin, Trainer):
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
        set_pad_token(processing_class)
        processing_class.padding_side = "left"
        self.reward_tokenizer = reward_processing_class or processing_class
        set_pad_token(self.reward_tokenizer)

        self.reward_model = load_reward_model(
            reward_model, model, model_id, self.reward_tokenizer.pad_token_id
        )
        self.reward_is_lora = reward_peft_config is not None
        if self.reward_is_lora:
            self.reward_model = wrap_reward_model(self.reward_model, reward_peft_config)
        self._prompts = check_prompts(train_dataset, processing_class, model, args)
        self._preferences = check_preferences(preference_dataset)

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
        self.fsdp = fsdp_version(self.accelerator) is not None
        if self.fsdp:
            check_fsdp(fsdp_version(self.accelerator), args.full_finetuning)
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
        if self.fsdp:  # one FSDP module per variable (and the reference); y and z see the sharded tensors
            for m in (self.reward_model, *self.policies.models.values(), self.policies.ref_model):
                shard(m)
            self.policies.y = PolicyView("y", dict(self.policies.models["y"].named_parameters()))
            self.policies.z = PolicyView("z", dict(self.policies.models["z"].named_parameters()))
        self.rank, self.world_size = world()
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
        self.lr_schedulers = schedules.build_schedulers(args, self._optimizers(), self._max_steps())
        self._rollouts: dict[str, Rollout] = {}
        self._pairs: LabelledPairs | None = None
        self._pairs_step = -1
        self._stats: dict[str, float] = {}
        self.skip_shared_samples = True  # exact; switch off to score every sample in the reward step

    # ------------------------------------------------------------------ construction
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
            adam = functools.partial(zero_optimizer, adam, self.zero_config, self._zero3_modules())
        elif self.fsdp:  # each process saves and loads its shard of the optimiser states
            adam = functools.partial(sharded_optimizer, adam)
        # x: the reward model's trainable tensors; with a LoRA reward model only the adapter and the head
        # (a view, so that checkpoints hold these tensors and not the frozen base weights)
        upper = (
            PolicyView("x", {n: p for n, p in self.reward_model.named_parameters() if p.requires_grad})
            if self.reward_is_lora or self.zero3 or self.fsdp  # a view gathers sharded tensors
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

    # ------------------------------------------------------------------ distributed backward
    def _backward(self, loss: Tensor, params: list[Tensor]) -> None:
        """``d loss / d params`` into ``.grad``, averaged over the data-parallel processes."""
        for p in params:
            p.requires_grad_(True)
        if self.zero_config is not None:
            engine = next(o for o in self._optimizers() if o.owns(list(params)))
            engine.backward(loss)
            return
        if self.fsdp:  # the sharded tensors are not in the graph; FSDP reduce-scatters (averages) gradients
            loss.backward()
            return
        loss.backward(inputs=list(params))
        average_gradients(params, self.world_size)

    def _optimizers(self) -> list[Any]:
        return [getattr(self.solver, name) for name in OPTIMIZERS]

    # ------------------------------------------------------------------ batches
    def _prompt_batch(self) -> list[Any] | None:
        """``per_device_train_batch_size`` prompts, uniformly with replacement (per-process stream)."""
        if self.solver.stage == "upper" and not self.args.fresh_rollouts_for_upper:
            return None
        return _draw(self._prompts, self.args.per_device_train_batch_size, self.prompt_generator)

    def _upper_batch(self) -> tuple[LabelledPairs | None, list[dict[str, Any]] | None]:
        """This outer step's labelled pairs (labelled on first use) and a fresh offline batch."""
        if self._pairs_step != self.solver.outer_step:
            self._pairs, self._pairs_step = self._label_pairs(), self.solver.outer_step
        offline = self._offline_batch() if self.args.offline_weight > 0 else None
        return self._pairs, offline

    def _offline_batch(self) -> list[dict[str, Any]] | None:
        if not self._preferences:
            return None
        return _draw(self._preferences, self.args.offline_batch_size, self.offline_generator)

    # ------------------------------------------------------------------ rollouts
    def _rollout(self, view: PolicyView, prompts: list[Any], with_grad: bool) -> Rollout:
        """``num_generations`` samples per prompt of policy ``view``, their log-probs (with graph if
        ``with_grad``), the reference's log-probs and the current reward model's scores."""
        a, tok = self.args, self.processing_class
        repeated = [p for p in prompts for _ in range(a.num_generations)]
        prompt_ids, prompt_mask = encode_prompts(repeated, tok, self.args.device)
        t0 = time.perf_counter()
        completion_ids, completion_mask = self._sample(
            view.name, prompt_ids, prompt_mask, a.max_completion_length, a.temperature
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

    def _reward_rows(self, rollout: Rollout, rows: Tensor) -> Tensor:
        """``r_x`` on rows ``rows`` of ``rollout``."""
        idx = rows.tolist()
        return self.reward(
            [rollout.prompts[i] for i in idx],
            [rollout.completions[i] for i in idx],
            rollout.completion_ids[rows.to(rollout.completion_ids.device)],
        )

    def _offline_margins(self, offline: list[dict[str, Any]]) -> Tensor:
        """``r_x(prompt, chosen) - r_x(prompt, rejected)`` for each offline preference row."""
        scores = self.reward(
            [row["prompt"] for row in offline] * 2,
            [row["chosen"] for row in offline] + [row["rejected"] for row in offline],
        )
        return scores[: len(offline)] - scores[len(offline) :]

    def _sample(
        self, policy: str, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """Completions of ``policy`` (``"y"``, ``"z"`` or ``"reference"``): :func:`sample` on the model
        :meth:`_for_generation` gives."""
        tok = self.processing_class
        ctx = self.policies.reference() if policy == "reference" else self.policies.active(policy)
        with ctx as engine, self._for_generation(engine) as model:
            return sample(
                model,
                prompt_ids,
                prompt_mask,
                max_new_tokens,
                temperature,
                tok.pad_token_id,
                tok.eos_token_id,
            )

    def _for_generation(self, policy: nn.Module) -> Any:
        """Context giving the model to sample from: under ZeRO-3 the engine's module with all its parameters
        gathered and the partitioning hooks removed (TRL's helper), so that generation makes no collective
        call and each process may stop at its own EOS; under FSDP the module with every unit unsharded
        (:func:`~brlhf.trainer.fsdp.unsharded`); otherwise ``policy`` itself."""
        if self.fsdp:
            return unsharded(policy)
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
            fresh = self._reward_rows(rollout, rows)
            if shared.all():  # nothing differs: a zero-gradient graph keeps the step well defined
                fresh = rollout.rewards[rows.to(fresh.device)] + 0.0 * fresh
            rewards = rollout.rewards.index_put((rows.to(fresh.device),), fresh)
        return process_mean(-return_surrogate(rewards) + self.args.beta * rollout.kl.mean(), self.world_size)

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
        rows = pairs.rows
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
                scores = self._reward_rows(r, pairs.rows)
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
                margin = self._offline_margins(offline)
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
        with schedules.base_learning_rates(self.lr_schedulers["x"]):
            for _ in range(steps):
                loss = -F.logsigmoid(self._offline_margins(self._offline_batch())).mean()
                self.solver.upper_optimizer.zero_grad(set_to_none=True)
                self._backward(loss, self.solver.upper_params)
                self.solver.upper_optimizer.step()

    def learning_rates(self) -> dict[str, float]:
        """The current learning rates of ``x``, ``y`` and ``z`` (``lr/x``, ``lr/y``, ``lr/z``)."""
        return schedules.learning_rates(self.lr_schedulers)

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
        logs = mean_over_processes(logs, self.world_size)
        logs["lam"], logs["labels/used"] = stats["lam"], float(self.labels_used)
        logs["pure_restarts"] = stats["pure_restarts"]
        logs.update(learning_rates)
        return logs

    def _steps_per_epoch(self) -> float:
        a = self.args
        return len(self._prompts) / (a.per_device_train_batch_size * self.world_size * a.inner_steps)

    def _max_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * math.ceil(self._steps_per_epoch())))

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
            resume_from_checkpoint = last_checkpoint(args.output_dir)
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
        else:
            if self.world_size > 1:  # each process samples its completions from its own random stream
                torch.manual_seed(args.seed + 7919 * self.rank)
            self.warmup_reward_model(args.reward_warmup_steps)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        steps_per_epoch = self._steps_per_epoch()
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
        ZeRO-3 and FSDP it gathers the policy's weights: every process must call it."""
        tok = self.processing_class
        ids, mask = encode_prompts(prompts, tok, self.args.device)
        out, _ = self._sample(
            policy,
            ids,
            mask,
            max_new_tokens or self.args.max_completion_length,
            temperature or self.args.temperature,
        )
        return tok.batch_decode(out, skip_special_tokens=True)


__all__ = ["BilevelRLHFTrainer", "LabelledPairs", "copy_config"]
