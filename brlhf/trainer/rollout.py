"""Rollouts of a language-model policy: prompt encoding (chat templates), batched sampling with left
padding, sequence log-probabilities and reward-model scores.

For a language model one episode is ``(prompt, completion)`` and the sequence log-probability is

    log π(c | p) = Σ_t log softmax(logits_t / T)[c_t]        (t over the completion, up to its EOS)

at the sampling temperature ``T``; the KL sample against the reference is ``log π - log π_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig
from trl.data_utils import is_conversational, maybe_apply_chat_template


def prompt_text(prompt: Any, tokenizer: Any) -> str:
    """A prompt (string, or list of chat messages) as the text the policy continues."""
    return maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]


def join_prompt_completion(prompt: Any, completion: str, tokenizer: Any) -> str:
    """The full text a reward model scores: the chat-formatted conversation, or ``prompt + completion``."""
    if is_conversational({"prompt": prompt}):
        out = maybe_apply_chat_template(
            {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}, tokenizer
        )
        return out["prompt"] + out["completion"]
    return prompt + completion


def encode_prompts(
    prompts: list[Any], tokenizer: Any, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)``; chat-templated prompts get no extra special tokens."""
    texts = [prompt_text(p, tokenizer) for p in prompts]
    conversational = bool(prompts) and is_conversational({"prompt": prompts[0]})
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not conversational
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_mask(completion_ids: Tensor, eos_token_id: int | list[int] | None) -> Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids)
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (seen_before == 0).long()


@torch.no_grad()
def sample(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
) -> tuple[Tensor, Tensor]:
    """Ancestral sampling at ``temperature`` (no top-k / top-p: the samples follow π exactly).
    Returns right-padded ``(completion_ids, completion_mask)``."""
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    # the weights are local when sampling (replicas, or gathered under ZeRO-3): no process waits for another
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=False
    )
    ids = out[:, input_ids.shape[1] :]
    mask = completion_mask(ids, eos_token_id)
    return ids.masked_fill(mask == 0, pad_token_id), mask


def sequence_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """``log π(completion | prompt)`` per row, at the sampling temperature, with the positions the
    sampler used (left padding shifts them)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature
    token_logprobs = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logprobs * completion_mask).sum(dim=1)


def reward_scores(
    reward_model: Any,
    tokenizer: Any,
    prompts: list[Any],
    completions: list[str],
    max_length: int | None = None,
) -> Tensor:
    """``r_x(prompt, completion)`` for each pair (differentiable when grad is enabled)."""
    texts = [join_prompt_completion(p, c, tokenizer) for p, c in zip(prompts, completions)]
    enc = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=False,
    )
    device = next(reward_model.parameters()).device
    return (
        reward_model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        .logits[:, 0]
        .float()
    )


@dataclass
class Rollout:
    """``N = prompts × num_generations`` samples of one policy, grouped by prompt (consecutive rows)."""

    prompts: list[Any]  # raw prompt of each row (repeated num_generations times)
    prompt_ids: Tensor  # (N, P), left padded
    prompt_mask: Tensor
    completion_ids: Tensor  # (N, C), right padded
    completion_mask: Tensor
    completions: list[str]  # decoded completions
    logprobs: Tensor  # (N,) log π(c|p), with the graph to the policy when built for a step
    ref_logprobs: Tensor  # (N,) log π_ref(c|p)
    rewards: Tensor  # (N,) r_x(p, c), detached
    tag: int = -1  # which step built it (its logprobs' graph is alive during that step only)

    @property
    def kl(self) -> Tensor:
        """Per-sample KL estimate ``log π - log π_ref`` (detached)."""
        return self.logprobs.detach() - self.ref_logprobs
