"""What the trainer is given, loaded and checked: the tokenizers' padding, the reward model (loaded, or
initialised from the policy's base; optionally wrapped as a LoRA adapter), the prompt dataset and the
offline preference dataset (TRL formats)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from trl.data_utils import is_conversational, maybe_extract_prompt

from brlhf.trainer.config import BilevelRLHFConfig
from brlhf.trainer.policy import has_adapters
from brlhf.trainer.rollout import encode_prompts


def set_pad_token(tokenizer: Any) -> None:
    """The EOS token pads where the tokenizer has no padding token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_reward_model(
    reward_model: Any, policy: nn.Module, model_id: str | None, pad_token_id: int | None
) -> nn.Module:
    """The reward model ``x``: loaded from an id / folder, a given module, or (``None``) initialised from the
    policy's base with a fresh one-output head; checked to have one output, in eval mode."""
    load = AutoModelForSequenceClassification.from_pretrained
    if isinstance(reward_model, str):
        reward_model = load(reward_model, num_labels=1, dtype=torch.float32)
    elif reward_model is None:  # initialise from the policy's base, with a fresh one-output head
        if model_id is not None:
            reward_model = load(model_id, num_labels=1, dtype=torch.float32)
        else:
            config = copy_config(policy.config, num_labels=1)
            reward_model = AutoModelForSequenceClassification.from_config(config)
            reward_model.load_state_dict(policy.state_dict(), strict=False)
    if not isinstance(reward_model, nn.Module):
        raise TypeError(
            f"reward_model must be a model id, a folder, a module or None, got {type(reward_model).__name__}"
        )
    config = getattr(reward_model, "config", None)
    num_labels = getattr(config, "num_labels", 1)
    if num_labels != 1:
        raise ValueError(
            f"the reward model must have exactly one output (a scalar reward), it has num_labels={num_labels}"
        )
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id
    return reward_model.eval()


def wrap_reward_model(reward_model: nn.Module, peft_config: Any) -> nn.Module:
    """The reward model as a peft model (LoRA adapter + trainable score head): ``reward_peft_config``."""
    from peft import PeftConfig, TaskType, get_peft_model

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
    if has_adapters(reward_model):
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


def copy_config(config: Any, **overrides: Any) -> Any:
    """A copy of a model config with some fields changed."""
    new = config.__class__.from_dict(config.to_dict())
    for k, v in overrides.items():
        setattr(new, k, v)
    return new


def prompt_is_empty(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):
        return not prompt or all(not str(m.get("content", "")).strip() for m in prompt)
    return True


def check_prompts(dataset: Any, tokenizer: Any, model: nn.Module, args: BilevelRLHFConfig) -> list[Any]:
    """The prompts of ``dataset``'s ``prompt`` column: none empty, none longer than ``max_prompt_length``
    tokens (default: the policy's context length minus ``max_completion_length``)."""
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
    empty = [i for i, p in enumerate(prompts) if prompt_is_empty(p)]
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


def check_preferences(dataset: Any) -> list[dict[str, Any]] | None:
    """The offline pairs as ``{"prompt", "chosen", "rejected"}`` rows with text completions (``None``: no
    dataset)."""
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
        if "prompt" not in r or prompt_is_empty(r["prompt"]):
            raise ValueError(f"preference row {i} has no prompt")
        chosen, rejected = r["chosen"], r["rejected"]
        if is_conversational({"chosen": chosen}):  # completions as assistant messages -> their text
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
        out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    if not out:
        raise ValueError("the preference dataset is empty")
    return out
