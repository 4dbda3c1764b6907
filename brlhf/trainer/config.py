"""Configuration of the bilevel RLHF trainer (ALGORITHM.md §5.2), TRL style."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import SchedulerType, TrainingArguments


@dataclass
class BilevelRLHFConfig(TrainingArguments):
    r"""Configuration of [`BilevelRLHFTrainer`]: the reward model ``x`` (upper level) and the KL-regularised
    policy (lower level, two copies ``y`` penalised / ``z`` pure) trained together by Algorithm 1:

        K times:  z ← z - α_z ∇_z g(x, z)                       α_z = learning_rate
                  y ← y - α_y [∇_y g(x, y) + ∇_y f(x, y) / λ]    α_y = penalised_learning_rate
        then:     x ← x - η [∇_x f(x, y) + λ (∇_x g(x, y) - ∇_x g(x, z))]   η = reward_learning_rate

    with ``g(x, π) = -E_π[r_x - β log(π/π_ref)]`` and ``f`` the Bradley-Terry loss of ``r_x`` on
    judge-labelled pairs sampled from ``y`` (plus the optional offline preference data).

    One training step (``global_step``) is one outer iteration; ``per_device_train_batch_size`` is the
    number of prompts per device per inner step. Only the fields below are specific to this trainer;
    differences from ``TrainingArguments`` defaults: ``learning_rate=1e-4``, ``lr_scheduler_type="constant"``,
    ``logging_steps=1``, ``bf16=False``, ``save_strategy="no"``, ``remove_unused_columns=False``.

    Learning-rate schedules: ``lr_scheduler_type``, ``lr_scheduler_kwargs`` and ``warmup_steps`` (a count,
    or a fraction of the steps when < 1) of ``TrainingArguments`` apply to all three optimisers alike, as in
    ``transformers.Trainer``: one schedule per optimiser (``x``, ``y``, ``z``, each from its own base rate)
    over the ``max_steps`` outer steps, advanced once per outer step (the K inner steps of ``y`` and ``z``
    share their outer step's rate). The default here is ``"constant"`` (TrainingArguments: ``"linear"``, a
    decay to 0). ``reward_warmup_steps`` run before the schedule, at the base ``reward_learning_rate``.
    """

    # penalty method
    lam: float = field(
        default=10.0, metadata={"help": "Penalty weight λ (> 0); the proxy's gradient error is O(1/λ)."}
    )
    lam_power: float = field(default=0.0, metadata={"help": "λ_t = lam (1 + t)^lam_power; 0 keeps λ fixed."})
    lam_max: float | None = field(default=None, metadata={"help": "Cap of the increasing λ schedule."})
    inner_steps: int = field(
        default=1, metadata={"help": "K: policy steps of each copy per reward-model step."}
    )
    penalised_upper_grad: bool = field(
        default=True,
        metadata={"help": "Add ∇_y f / λ to y's step; False makes y follow z exactly (collapse)."},
    )
    keep_better_pure: bool = field(
        default=True,
        metadata={
            "help": "When a reward step measures g(x, y) < g(x, z) (z lags behind y at its own objective), "
            "skip that step's penalty term and copy y into z (min_π g <= min(g(y), g(z))). False: plain "
            "Algorithm 1, where a lagging z lets the reward model learn to tell y's samples from z's."
        },
    )
    common_random_numbers: bool = field(
        default=True, metadata={"help": "Same prompts and random stream for the y and z terms of each step."}
    )
    fresh_rollouts_for_upper: bool = field(
        default=False,
        metadata={
            "help": "Generate new samples of y and z for the reward step (eq. 11) instead of reusing the "
            "last inner step's samples (one generation per copy and step, at one step of staleness)."
        },
    )
    # learning rates (learning_rate, from TrainingArguments, is α_z)
    learning_rate: float = field(default=1e-4, metadata={"help": "α_z: learning rate of the pure policy z."})
    penalised_learning_rate: float | None = field(
        default=None, metadata={"help": "α_y: learning rate of the penalised policy y (None: learning_rate)."}
    )
    reward_learning_rate: float = field(
        default=1e-4, metadata={"help": "η: learning rate of the reward model x."}
    )
    # RL oracle
    beta: float = field(default=0.05, metadata={"help": "KL coefficient β of g = -E[r - β log(π/π_ref)]."})
    num_generations: int = field(
        default=4,
        metadata={"help": "Completions per prompt (>= 2: leave-one-out baseline, and the labelled pair)."},
    )
    max_completion_length: int = field(default=32, metadata={"help": "Maximum new tokens per completion."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompts longer than this (in tokens) are an error; None: the context "
            "length minus max_completion_length."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (log-probs use the same)."}
    )
    # labels
    labels_per_step: int = field(
        default=8, metadata={"help": "Judge-labelled pairs per outer step (all devices together)."}
    )
    label_budget: int | None = field(default=None, metadata={"help": "Total labels; None: unlimited."})
    on_budget_exhausted: str = field(
        default="stop",
        metadata={
            "help": "'stop' ends training when the budget is spent; "
            "'continue_without_labels' goes on with the offline data only."
        },
    )
    label_replay: bool = field(
        default=False,
        metadata={
            "help": "Keep every online label and add its pair to the offline pool, so later reward steps "
            "replay it (offline_batch_size pairs per step, weight offline_weight); False: each label "
            "enters one reward step only."
        },
    )
    judge_timeout: float | None = field(
        default=60.0, metadata={"help": "Seconds per judge call (None: no limit)."}
    )
    judge_max_retries: int = field(default=2, metadata={"help": "Retries of a failing judge call."})
    # offline preferences
    offline_weight: float = field(
        default=1.0, metadata={"help": "Weight of the offline Bradley-Terry term in f."}
    )
    offline_batch_size: int = field(default=8, metadata={"help": "Offline preference pairs per reward step."})
    reward_warmup_steps: int = field(
        default=0, metadata={"help": "Reward-model steps on the offline data alone before the bilevel loop."}
    )
    # policies
    full_finetuning: bool = field(
        default=False, metadata={"help": "Train two full copies of the policy instead of two LoRA adapters."}
    )
    # TrainingArguments defaults that differ
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={
            "help": "Schedule of the three learning rates (x, y, z) over max_steps outer steps, stepped once "
            "per outer step: 'constant' (default: fixed rates), 'linear', 'cosine', 'constant_with_warmup', "
            "... (transformers' names; with warmup_steps and lr_scheduler_kwargs)."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N outer steps."})
    bf16: bool | None = field(
        default=False, metadata={"help": "bf16 mixed precision (off: tiny CPU models)."}
    )
    save_strategy: str = field(
        default="no", metadata={"help": "'steps' to save checkpoints every save_steps."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns."})

    def __post_init__(self) -> None:
        scheduler = SchedulerType(self.lr_scheduler_type)  # an unknown name fails here, listing the known
        if scheduler in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY):
            raise ValueError(
                f"lr_scheduler_type={scheduler.value!r} adapts to evaluation metrics, which the bilevel "
                "trainer does not compute; use a fixed schedule ('constant', 'linear', 'cosine', ...)"
            )
        super().__post_init__()
        if self.penalised_learning_rate is None:
            self.penalised_learning_rate = self.learning_rate
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (leave-one-out baseline), got {self.num_generations}"
            )
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.on_budget_exhausted not in ("stop", "continue_without_labels"):
            raise ValueError(
                "on_budget_exhausted must be 'stop' or 'continue_without_labels', "
                f"got {self.on_budget_exhausted!r}"
            )
        if self.labels_per_step < 0:
            raise ValueError(f"labels_per_step must be >= 0, got {self.labels_per_step}")
        if self.label_budget is not None and self.label_budget < self.labels_per_step:
            raise ValueError(
                f"label_budget={self.label_budget} is smaller than one step's labels "
                f"(labels_per_step={self.labels_per_step})"
            )
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
