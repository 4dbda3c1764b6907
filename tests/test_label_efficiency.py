"""Smoke test of benchmarks/label_efficiency.py: the quick run writes every output, with every method in
the table, no run using more labels than its budget, and finished runs reused from the cache."""

from __future__ import annotations

import csv
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_covers_every_method_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sys.path.insert(0, REPO)
    from benchmarks.label_efficiency import HALF, LABELS, METHODS, QUICK, main

    cache = tmp_path / "runs"
    results = main(["--quick", "--jobs", "1", "--out", str(tmp_path), "--cache", str(cache)])
    budget = QUICK["budget"]
    assert sorted(r["method"] for r in results) == sorted(METHODS)
    for r in results:
        assert r["tokens"] > 0, r["method"]
        if r["method"] == "gold_rloo":  # RLOO on the gold score itself: no labels
            assert r["labels_used"] == 0 and [p["labels"] for p in r["points"]] == [0]
            continue
        own = budget // 2 if r["method"].endswith(HALF) else budget  # same updates, half the labels each
        assert 0 < r["labels_used"] <= own, r["method"]
        assert all(p["labels"] <= own for p in r["points"]), r["method"]
        assert r["points"][0]["labels"] == 0 and r["points"][-1]["labels"] == own, r["method"]
    for ext in ("csv", "md", "png", "txt"):
        assert (tmp_path / f"label_efficiency.{ext}").stat().st_size > 0, ext
    table = (tmp_path / "label_efficiency.md").read_text()
    assert all(LABELS[m] in table for m in METHODS)
    assert str(tmp_path) not in table  # the command shown names no folder of this machine
    with open(tmp_path / "label_efficiency.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {row["method"] for row in rows} == set(METHODS)
    assert max(int(row["labels"]) for row in rows) <= budget

    # a second run with the same options reuses the finished runs instead of training again
    again = main(["--quick", "--methods", "brlhf", "--out", str(tmp_path / "b"), "--cache", str(cache)])
    assert again == [r for r in results if r["method"] == "brlhf"]
