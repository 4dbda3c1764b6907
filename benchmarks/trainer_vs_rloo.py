"""Cost of one bilevel iteration against one TRL RLOO step, on the same tiny model and batch.

    OMP_NUM_THREADS=1 python benchmarks/trainer_vs_rloo.py [--steps 20] [--warmup 3] [--device cpu|cuda]

One BilevelRLHFTrainer iteration (K=1) samples and updates two policies (LoRA adapters y and z) and
updates the reward model; one RLOOTrainer step samples and updates one LoRA policy against a frozen
reward model. Both: the same tiny Llama (built locally), ``prompts x num_generations`` completions,
the same LoRA config, β, temperature and completion length. Each trainer runs in its own subprocess;
memory is the peak of torch's CUDA allocator on a GPU, and on a CPU the growth of the peak resident
set size during training (process peak RSS minus the RSS once the trainer is built). Targets
(issue 3): time ratio <= 2.5, memory ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build_assets(folder: str, hidden: int, layers: int) -> None:
    """The tiny tokenizer, policy and reward model, saved once (RLOO reloads its reference by path)."""
    from brlhf.tiny import build_tiny_policy, build_tiny_reward_model, build_tiny_tokenizer

    with open(os.path.join(REPO, "recipes", "data", "prompts.jsonl")) as fh:
        prompts = [json.loads(line)["prompt"] for line in fh]
    tokenizer = build_tiny_tokenizer([p[0]["content"] for p in prompts], vocab_size=200)
    for name, model in [
        ("policy", build_tiny_policy(tokenizer, hidden, layers)),
        ("reward", build_tiny_reward_model(tokenizer, hidden, layers, seed=1)),
    ]:
        model.save_pretrained(os.path.join(folder, name))
        tokenizer.save_pretrained(os.path.join(folder, name))


def run_one(kind: str, folder: str, opts: argparse.Namespace) -> dict:
    """Runs inside a fresh subprocess: build the trainer, train warmup + steps, time the last ``steps``."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.set_num_threads(1)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    cuda = opts.device == "cuda"
    dataset = load_dataset(
        "json", data_files=os.path.join(REPO, "recipes", "data", "prompts.jsonl"), split="train"
    )
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "policy"))
    common = dict(
        output_dir=os.path.join(folder, f"out-{kind}"),
        max_steps=opts.warmup + opts.steps,
        max_completion_length=opts.completion_length,
        num_generations=opts.generations,
        beta=opts.beta,
        temperature=1.0,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
        save_strategy="no",
        bf16=False,
        use_cpu=not cuda,
        seed=0,
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    reward_model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(folder, "reward"), num_labels=1
    )
    if kind == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(
            per_device_train_batch_size=opts.prompts * opts.generations,
            gradient_checkpointing=False,
            **common,
        )
        trainer = RLOOTrainer(
            model=os.path.join(folder, "policy"),
            reward_funcs=reward_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
            peft_config=lora,
            callbacks=[Clock()],
        )
    else:
        from brlhf.judges import FunctionJudge
        from brlhf.trainer import BilevelRLHFConfig, BilevelRLHFTrainer

        args = BilevelRLHFConfig(
            per_device_train_batch_size=opts.prompts,
            labels_per_step=opts.labels,
            reward_learning_rate=1e-3,
            **common,
        )
        policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"), dtype=torch.float32)
        trainer = BilevelRLHFTrainer(
            policy,
            reward_model,
            args,
            judge=FunctionJudge(lambda p, c: c.count(" ") / max(len(c), 1)),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Clock()],
        )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    timed = times[opts.warmup :]
    return {
        "kind": kind,
        "time_per_iteration_s": sum(timed) / len(timed),
        "peak_memory_mb": peak,
        "training_memory_mb": peak - base,
        "steps": len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--completion_length", type=int, default=32)
    parser.add_argument("--labels", type=int, default=8, help="judge labels per bilevel step")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._worker:
        print("RESULT " + json.dumps(run_one(opts._worker, opts._folder, opts)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        build_assets(folder, opts.hidden, opts.layers)
        for kind in ("rloo", "bilevel"):
            argv = [a for a in sys.argv[1:]] + ["--_worker", kind, "--_folder", folder]
            env = {
                **os.environ,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True, env=env
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
            results[kind] = json.loads(line[len("RESULT ") :])
    r, b = results["rloo"], results["bilevel"]
    print(
        f"setup: {opts.prompts} prompts x {opts.generations} completions of {opts.completion_length} tokens, "
        f"tiny Llama (hidden {opts.hidden}, {opts.layers} layers), LoRA r=16 all-linear, {opts.device}, "
        f"{opts.steps} timed steps after {opts.warmup} warm-up"
    )
    unit = "CUDA allocator" if opts.device == "cuda" else "RSS"
    print(f"{'trainer':<22}{'s / iteration':>15}{'peak ' + unit + ' MB':>20}{'training growth MB':>22}")
    for name, res in [("TRL RLOOTrainer", r), ("BilevelRLHFTrainer", b)]:
        print(
            f"{name:<22}{res['time_per_iteration_s']:>15.4f}{res['peak_memory_mb']:>20.1f}"
            f"{res['training_memory_mb']:>22.1f}"
        )
    print(
        f"time ratio bilevel / RLOO: {b['time_per_iteration_s'] / r['time_per_iteration_s']:.2f}x "
        "(target <= 2.5x)"
    )
    print(
        f"peak memory ratio: {b['peak_memory_mb'] / r['peak_memory_mb']:.2f}x (target <= 1.3x); "
        f"training-growth ratio: {b['training_memory_mb'] / max(r['training_memory_mb'], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    main()
