"""Figure 1 of the paper from the runs' CSVs: mean ± std over seeds of the evaluation metric, both methods
(and the SAC oracle on the true reward, dashed, where its runs exist).

    python -m robotics.plot --runs runs --preset reduced --out runs/reduced/figure1.png

Panels: walker_walk's true episode return of ``y`` (bilevel) / the agent (PEBBLE); door_open's success
rate in % (the paper's metric) and its true episode return (which moves long before the first success).
Also prints (and writes next to the figure as ``table.md``) the final value and the area under the curve
(the mean of the evaluation points) per method, task and metric, mean ± std over seeds, on the evaluation
steps every seed has reached (``steps``: the last of them, so unfinished runs show as such), and one row
per run in ``seeds.md``, and ``agents.png``: the true return of both bilevel agents (``y`` and ``z``) against
PEBBLE's, with the span in which labels arrive (and ``y``'s ``f/λ`` term is on) shaded.
``--extra "LABEL=ROOT:METHOD"`` adds the runs of ``METHOD`` under another root as one more curve (a
variant, e.g. ``--extra "Bilevel PEBBLE, no guard=robotics/results/no_guard:brl"``); ``--until STEP`` uses the
evaluations up to ``STEP`` only, to compare runs that have not all finished at the same step.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robotics.config import METHODS, PRESETS, make_config  # noqa: E402
from robotics.envs import TASKS  # noqa: E402

TITLES = {"walker_walk": "Walker-walk", "door_open": "Door Open"}
PANELS = [("walker_walk", "eval_return"), ("door_open", "eval_success"), ("door_open", "eval_return")]
YLABELS = {"eval_return": "true episode return", "eval_success": "success rate (%)"}
Series = tuple[str, Path, str]  # (label, runs root, method)


def metric_column(env: str) -> str:
    """The CSV column of the task's metric: true return (walker) or success rate (door)."""
    return "eval_return" if TASKS[env].metric == "return" else "eval_success"


def read_runs(
    root: Path, preset: str, env: str, method: str, until: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """``{seed: CSV rows}`` of every run of ``method`` on ``env``, the rows up to step ``until`` if given."""
    runs = {}
    for path in sorted((root / preset / env / method).glob("seed*/metrics.csv")):
        with open(path) as fh:
            rows = [r for r in csv.DictReader(fh) if until is None or int(r["step"]) <= until]
        if rows:
            runs[path.parent.name.removeprefix("seed")] = rows
    return runs


def load_curves(
    root: Path, preset: str, env: str, method: str, column: str | None = None, until: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [T], values [seeds, T])`` of ``column`` (default: the task's metric) on the evaluation steps
    that every seed reached (up to ``until``)."""
    column = column or metric_column(env)
    curves = [
        {int(r["step"]): float(r[column]) for r in rows}
        for rows in read_runs(root, preset, env, method, until).values()
    ]
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return np.array(steps), np.array([[c[s] for s in steps] for c in curves])


def summary(values: np.ndarray) -> tuple[str, str]:
    """Final value and area under the curve (mean over evaluation points), ``mean ± std`` over seeds."""
    final, auc = values[:, -1], values.mean(1)
    return f"{final.mean():.1f} ± {final.std():.1f}", f"{auc.mean():.1f} ± {auc.std():.1f}"


def seed_table(series: list[Series], preset: str, until: int | None = None) -> str:
    """One row per run and panel metric: its last evaluation (``y``'s for bilevel PEBBLE), the mean over
    evaluations, ``z``'s last value and the number of z ← y copies (bilevel), and the step reached."""
    lines = [
        "| task | metric | method | seed | steps | final | AUC | z final | z ← y copies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env, metric in PANELS:
        for name, root, method in series:
            for seed, rows in read_runs(root, preset, env, method, until).items():
                last, auc = rows[-1], np.mean([float(r[metric]) for r in rows])
                bilevel = [
                    f"{float(v):.0f}" if (v := last.get(k)) else "" for k in (f"z_{metric}", "pure_restarts")
                ]
                lines.append(
                    f"| {env} | {metric.removeprefix('eval_')} | {name} | "
                    f"{seed} | {last['step']} | "
                    f"{float(last[metric]):.0f} | {auc:.0f} | {' | '.join(bilevel)} |"
                )
    return "\n".join(lines)


def plot(root: Path, preset: str, out: Path, extra: list[Series] = (), until: int | None = None) -> str:
    series = [(name, root, method) for method, name in METHODS.items()] + list(extra)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    lines = ["| task | metric | method | seeds | steps | final | AUC |", "|---|---|---|---|---|---|---|"]
    for ax, (env, column) in zip(axes, PANELS):
        for name, series_root, method in series:
            steps, values = load_curves(series_root, preset, env, method, column, until)
            if values.size == 0:
                continue
            mean, std = values.mean(0), values.std(0)
            style = dict(color="0.4", linestyle="--") if method == "sac" else {}  # the oracle
            line = ax.plot(steps, mean, marker=".", markersize=3, label=f"{name} (n={len(values)})", **style)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line[0].get_color())
            final, auc = summary(values)
            metric = column.removeprefix("eval_")
            lines.append(f"| {env} | {metric} | {name} | {len(values)} | {steps[-1]} | {final} | {auc} |")
        ax.set_title(f"{TITLES[env]} (feedback = {PRESETS[preset][env]['labels']})")
        ax.set_xlabel("environment steps")
        ax.set_ylabel(YLABELS[column])
        if column == "eval_success":
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    table = "\n".join(lines)
    out.with_name("table.md").write_text(table + "\n")
    out.with_name("seeds.md").write_text(seed_table(series, preset, until) + "\n")
    plot_agents([x for x in series if x[2] != "sac"], preset, out.with_name("agents.png"), until)
    return table


def plot_agents(
    series: list[Series], preset: str, out: Path, until: int | None = None
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Both agents of bilevel PEBBLE against PEBBLE's: true return of ``y`` (solid) and ``z`` (dotted) per
    task, with the span in which labels arrive and ``y``'s ``f/λ`` term is on shaded. Returns the curves
    drawn, ``{(env, label): (steps, mean over seeds)}``."""
    envs, drawn = list(TASKS), {}
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6))
    for ax, env in zip(axes, envs):
        cfg = make_config(env, "brl", preset)
        span = (cfg.first_session_step, cfg.labels_done_step)
        ax.axvspan(*span, color="0.9", label="labels arrive (f/λ on)")
        for name, root, method in series:
            agents = [("", "-")] + ([("z_", ":")] if method == "brl" else [])
            colour = None
            for prefix, style in agents:
                steps, values = load_curves(root, preset, env, method, f"{prefix}eval_return", until)
                if values.size == 0:
                    break
                if prefix:  # z is a copy of y from the first session on, untrained before
                    values, steps = values[:, steps > span[0]], steps[steps > span[0]]
                who = {"": " (y)", "z_": " (z)"}[prefix] if method == "brl" else ""
                label = f"{name}{who} (n={len(values)})"
                drawn[env, label] = steps, values.mean(0)
                line = ax.plot(*drawn[env, label], style, color=colour, marker=".", ms=3, label=label)
                colour = line[0].get_color()
        ax.set_title(f"{TITLES[env]}: agents y, z and PEBBLE's")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("true episode return (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def parse_extra(spec: str) -> Series:
    """``"LABEL=ROOT:METHOD"`` -> ``(LABEL, Path(ROOT), METHOD)``; the label may hold "=" (``λ = 100``)."""
    label, sep, rest = spec.rpartition("=")
    root, colon, method = rest.rpartition(":")
    if not (sep and colon and label and root) or method not in METHODS:
        raise SystemExit(
            f"error: --extra {spec!r}: expected LABEL=ROOT:METHOD with METHOD in {sorted(METHODS)}"
        )
    return label, Path(root), method


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m robotics.plot", description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--preset", default="reduced")
    p.add_argument("--out", help="PNG path (default: <runs>/<preset>/figure1.png)")
    p.add_argument("--extra", action="append", default=[], help="LABEL=ROOT:METHOD, one more curve")
    p.add_argument("--until", type=int, help="use evaluations up to this step only (compare unfinished runs)")
    args = p.parse_args(argv)
    root = Path(args.runs)
    out = Path(args.out) if args.out else root / args.preset / "figure1.png"
    extra = [parse_extra(e) for e in args.extra]
    for label, extra_root, method in extra:
        if not any(read_runs(extra_root, args.preset, env, method) for env in TASKS):
            raise SystemExit(f"error: --extra {label!r}: no {method} runs under {extra_root / args.preset}")
    print(plot(root, args.preset, out, extra, args.until))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
