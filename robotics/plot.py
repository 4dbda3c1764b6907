"""Figure 1 of the paper from the runs' CSVs: mean ± std over seeds of the evaluation metric, both methods.

    python -m robotics.plot --runs runs --preset reduced --out runs/reduced/figure1.png

Left: walker_walk, true episode return of ``y`` (bilevel) / the agent (PEBBLE); right: door_open, success
rate in %. Also prints (and writes next to the figure as ``table.md``) the final value and the area under
the curve (the mean of the evaluation points) per method and task, mean ± std over seeds, on the
evaluation steps every seed has reached (``steps``: the last of them, so unfinished runs show as such).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robotics.envs import TASKS  # noqa: E402

METHODS = {"pebble": "PEBBLE", "brl": "Bilevel PEBBLE"}
TITLES = {"walker_walk": "Walker-walk", "door_open": "Door Open"}


def load_curves(root: Path, preset: str, env: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [T], values [seeds, T])`` on the evaluation steps that every seed reached."""
    column = "eval_return" if TASKS[env].metric == "return" else "eval_success"
    curves = []
    for path in sorted((root / preset / env / method).glob("seed*/metrics.csv")):
        with open(path) as fh:
            curves.append({int(r["step"]): float(r[column]) for r in csv.DictReader(fh)})
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return np.array(steps), np.array([[c[s] for s in steps] for c in curves])


def summary(values: np.ndarray) -> tuple[str, str]:
    """Final value and area under the curve (mean over evaluation points), ``mean ± std`` over seeds."""
    final, auc = values[:, -1], values.mean(1)
    return f"{final.mean():.1f} ± {final.std():.1f}", f"{auc.mean():.1f} ± {auc.std():.1f}"


def plot(root: Path, preset: str, out: Path) -> str:
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    lines = ["| task | method | seeds | steps | final | AUC |", "|---|---|---|---|---|---|"]
    for ax, env in zip(axes, TASKS):
        cfg_labels = {"walker_walk": 100, "door_open": 1000}[env]
        for method, name in METHODS.items():
            steps, values = load_curves(root, preset, env, method)
            if values.size == 0:
                continue
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=f"{name} (n={len(values)})")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
            final, auc = summary(values)
            lines.append(f"| {env} | {name} | {len(values)} | {steps[-1]} | {final} | {auc} |")
        ax.set_title(f"{TITLES[env]} (feedback = {cfg_labels})")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return" if TASKS[env].metric == "return" else "success rate (%)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    table = "\n".join(lines)
    out.with_name("table.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m robotics.plot", description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--preset", default="reduced")
    p.add_argument("--out", help="PNG path (default: <runs>/<preset>/figure1.png)")
    args = p.parse_args(argv)
    root = Path(args.runs)
    out = Path(args.out) if args.out else root / args.preset / "figure1.png"
    print(plot(root, args.preset, out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
