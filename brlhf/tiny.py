"""Tiny language models built locally, for tests, CI and the laptop recipe (nothing is downloaded).

A byte-level BPE tokenizer trained in memory on a small corpus (with a chat template), a ~0.5M
parameter Llama policy and a one-output Llama sequence classifier for the reward model.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterable

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (alphabet: the corpus's characters only),
    left padding, ``<|end|>`` as EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=[], show_progress=False
    )
    tok.train_from_iterator(
        [*corpus, string.ascii_letters + string.digits + string.punctuation + " \n"], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token=None,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def _config(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **kw,
    )


def build_tiny_policy(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM sized to the tokenizer (~0.1-0.7M parameters)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tokenizer, hidden, layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, seed: int = 0
) -> LlamaForSequenceClassification:
    """A randomly initialised Llama sequence classifier with one output (a reward model). An ordinary model
    even under a DeepSpeed ZeRO-3 config, where transformers would build its inner model under zero.Init
    (partitioned) and then fail to initialise it."""
    try:
        from transformers.modeling_utils import set_zero3_state  # marks zero.Init as entered: skipped
    except ImportError:
        set_zero3_state = contextlib.nullcontext
    torch.manual_seed(seed)
    with set_zero3_state():
        return LlamaForSequenceClassification(_config(tokenizer, hidden, layers, num_labels=1))


def tiny_lora_config(r: int = 16, head: bool = True):
    """LoRA on every linear layer *and* the LM head: a random tiny model can only move its output
    distribution quickly through the head (peft's ``"all-linear"`` leaves the head out). ``head=False``
    leaves the head out (TRL's GRPO / RLOO refuse a LoRA on ``lm_head``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            *(["lm_head"] if head else []),
        ],
    )
