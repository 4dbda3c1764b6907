"""The README's bilevel example: learned example weights find the corrupted labels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "hyper_cleaning.py"


def test_hyper_cleaning_finds_corrupted_labels(tmp_path):
    spec = importlib.util.spec_from_file_location("hyper_cleaning", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    result = recipe.run(recipe.parse_args(["--steps", "400", "--output_dir", str(tmp_path)]))
    assert result["validation_loss_end"] < 0.5 * result["validation_loss_start"]
    # 40% of the labels are wrong: uniform weights lose ~15 points of accuracy, learned weights win most back
    assert result["test_accuracy_learned_weights"] > result["test_accuracy_uniform_weights"] + 0.05
    assert result["corrupted_label_precision"] > 0.8 and result["corrupted_label_recall"] > 0.8
    assert result["mean_weight_corrupted"] < result["mean_weight_clean"] - 0.2
    assert (tmp_path / "result.json").exists() and (tmp_path / "hyper_cleaning.png").exists()
