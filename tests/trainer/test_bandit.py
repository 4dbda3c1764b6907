"""ALGORITHM.md §7, the KL-regularised bandit, through the real language-model code path.

One prompt, one-token completions (a vocabulary of 8 tokens), ``r_x(a) = x_a``, upper loss
``f = -Σ_a p_t(a) log π_y(a)``. Then ``π*_x ∝ π_ref exp(x/β)`` and the penalty fixed point is exact for
every λ: ``π_y = π_z = p_t`` (and ``x = β log(p_t/π_ref) + c``). Sampling, sequence log-probs,
the reference under disabled adapters, the RLOO+KL oracle and the solver are the trainer's own.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer
from brlhf.trainer.rollout import encode_prompts

VOCAB = ["<|pad|>", "<|end|>", "a", "b", "c", "d", "e", "f"]


class TableReward(nn.Module):
    """``r_x(a) = x_a`` (the reward of the one-token completion ``a``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(n))


class BanditTrainer(BilevelRLHFTrainer):
    target: torch.Tensor

    def reward(self, prompts, completions, completion_ids=None):
        return self.reward_model.x[completion_ids[:, 0]]

    def policy_probs(self, name: str) -> torch.Tensor:
        ids, mask = encode_prompts(self._prompts[:1], self.processing_class)
        ctx = self.policies.reference() if name == "reference" else self.policies.active(name)
        with ctx as model:
            return torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)

    def _upper_loss(self, view, batch):
        with torch.set_grad_enabled(self.solver.stage == "inner"):
            log_pi = torch.log(self.policy_probs("y"))
        return -(self.target * log_pi).sum()


def test_bandit_reaches_the_target_distribution(tmp_path):
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", padding_side="left"
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
    )
    args = BilevelRLHFConfig(
        output_dir=str(tmp_path),
        max_steps=300,
        per_device_train_batch_size=1,
        num_generations=32,
        max_completion_length=1,
        labels_per_step=0,
        beta=1.0,
        lam=2.0,
        learning_rate=0.05,
        reward_learning_rate=0.05,
        max_grad_norm=0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=50,
        seed=0,
    )
    trainer = BanditTrainer(
        policy,
        TableReward(8),
        args,
        judge=None,
        train_dataset=Dataset.from_list([{"prompt": "a b"}]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["lm_head"]),
    )
    trainer.target = torch.softmax(torch.tensor([-2.0, -1.0, 1.5, 0.5, 0.0, -0.5, 1.0, -1.0]), -1)
    ref = trainer.policy_probs("reference").detach()
    start = 0.5 * (ref - trainer.target).abs().sum().item()
    trainer.train()
    with torch.no_grad():
        pi_y, pi_z = trainer.policy_probs("y"), trainer.policy_probs("z")
    tv_y = 0.5 * (pi_y - trainer.target).abs().sum().item()
    tv_z = 0.5 * (pi_z - trainer.target).abs().sum().item()
    assert start > 0.3
    assert tv_y < 0.05 and tv_z < 0.05, (start, tv_y, tv_z)
    # the reward it learned is the one whose KL-regularised optimum is p_t: x = β log(p_t / π_ref) + c
    implied = args.beta * torch.log(trainer.target / ref)
    x = trainer.reward_model.x.detach()
    assert torch.corrcoef(torch.stack([x, implied]))[0, 1] > 0.95
