"""recipes/align.py end to end: the embedded default raises the gold reward; a local model folder runs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "align.py")


@pytest.fixture(scope="module")
def align():
    spec = importlib.util.spec_from_file_location("align_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["align_recipe"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run(align, argv):
    return align.main(*align.make_parser().parse_args_and_config(args=argv))


def test_embedded_default_raises_the_gold_reward(align, tmp_path):
    out = tmp_path / "run"
    result = run(
        align, ["--output_dir", str(out), "--max_steps", "60", "--eval_every", "30", "--disable_tqdm", "true"]
    )
    before, after = result["gold_reward_before"], result["gold_reward_after"]
    assert after["y"] > before["y"] + 0.05, result  # the fraction of spaces, ~0.08 for the random model
    assert after["y"] > after["reference"] + 0.05, result
    assert after["win_rate_y_vs_reference"] > 0.75, result
    assert 0 < result["labels_used"] <= 60 * 16
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["labels_used"] == result["labels_used"]
    assert (out / "y" / "adapter_model.safetensors").exists() and (
        out / "reward_model" / "config.json"
    ).exists()


def test_a_local_model_folder_runs_the_same_recipe(align, tmp_path, tokenizer):
    from brlhf.tiny import build_tiny_policy

    folder = tmp_path / "local-model"
    build_tiny_policy(tokenizer, hidden=32, layers=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {folder}\nmax_steps: 2\noffline_pairs: 16\nreward_warmup_steps: 2\n"
        "labels_per_step: 4\nper_device_train_batch_size: 2\neval_every: 1\n"
    )
    result = run(
        align,
        [
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "out"),
            "--disable_tqdm",
            "true",
            "--eval_samples",
            "1",
        ],
    )
    assert result["labels_used"] > 0
    for path in ["y/adapter_config.json", "z/adapter_config.json", "reward_model/config.json", "README.md"]:
        assert (tmp_path / "out" / path).exists(), path
    adapter = json.loads((tmp_path / "out" / "y" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)


def test_recipe_reward_lora_and_schedule_options(align, tmp_path):
    out = tmp_path / "out"
    argv = "--max_steps 2 --offline_pairs 16 --reward_warmup_steps 2 --labels_per_step 4 "
    argv += "--per_device_train_batch_size 2 --eval_every 1 --eval_samples 1 --disable_tqdm true "
    argv += "--reward_lora_r 4 --lr_scheduler_type cosine --warmup_steps 1"
    result = run(align, [*argv.split(), "--output_dir", str(out)])
    assert result["labels_used"] > 0
    adapter = json.loads((out / "reward_model" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert not (out / "reward_model" / "model.safetensors").exists()
