"""Benchmarks of the penalty solver against implicit and first-order bilevel baselines (issue 2, item 6)."""
