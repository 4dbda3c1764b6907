"""The language-model trainer: reward model and policy trained together as one bilevel problem."""

from brlhf.trainer.config import BilevelRLHFConfig
from brlhf.trainer.trainer import BilevelRLHFTrainer

__all__ = ["BilevelRLHFConfig", "BilevelRLHFTrainer"]
