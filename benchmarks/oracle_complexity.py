"""Oracle calls to reach a target E‖∇Φ(x)‖² (squared norm of the exact hyper-gradient, last iterate).

Problems (``benchmarks/problems.py``): the quadratic with a strongly convex lower level (x ∈ R¹⁰, y ∈ R²⁰,
cond(H) = 10, random-design Gaussian noise σ = 1) and the separable non-convex PL problem (x, y ∈ R¹⁰,
σ = 1). A minibatch of B samples has noise σ/√B. ∇Φ is exact (closed forms).

Methods:
* penalty, fixed λ (Theorem 2 of the paper): for each target ε one run with λ = ε^-1/2, T = ⌈c_T/ε⌉ outer
  steps, K = ⌈ln 1/ε⌉ + 1 inner steps, minibatch B = ⌈c_B ε^-2⌉ (``brlhf.core.PenaltySolver``, SGD);
  predicted samples Õ(ε^-3), i.e. a slope of −1/3 of error against samples;
* penalty, increasing λ: one run with λ_t = λ₀ √(1+t), B_t = ⌈c_B (1+t)²⌉, K_t = ⌈ln(1+t)⌉ + 1 (the
  same choices made along the run instead of per ε; also slope −1/3);
* F2SA (Kwon et al. 2023): λ_k ∝ k^(1/7), steps k^(-4/7), k^(-5/7), B = --batch (slope −2/7);
* SOBA (Dagréou et al. 2022): steps t^(-2/5), t^(-3/5), one HVP a step, B = --batch (slope −2/5).

Counting (wrappers around the closures, ``benchmarks.baselines.Oracles``): every evaluation of f or g
whose gradient is taken is one gradient call on B samples; every Hessian-vector product (SOBA's joint
∇²_yy g v and ∇²_xy g v) is one HVP call on B samples; samples = B (gradient + HVP calls). Wall time is
reported next to it. Step sizes (and c_B) are chosen on seed 1000 from small grids, then every method
runs on seeds 0..S-1; E is the mean over seeds; medians and min-max spreads are printed too.
Writes results/oracle_complexity.{csv,md,png} (not with --quick).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.baselines import F2SAConfig, Oracles, SOBAConfig, log_slope, run_f2sa, run_soba  # noqa: E402
from benchmarks.problems import NonconvexPL, Quadratic  # noqa: E402
from brlhf.core import PenaltyConfig, PenaltySolver  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parent / "results"


class Recorder:
    """Records ‖∇Φ(x)‖² and wall time when the sample count first passes each checkpoint."""

    def __init__(self, problem: Any, checkpoints: list[float]) -> None:
        self.problem, self.checkpoints = problem, checkpoints
        self.err: list[float] = []
        self.time: list[float] = []
        self.t0 = time.perf_counter()

    def __call__(self, samples: int, x: Tensor) -> None:
        while len(self.err) < len(self.checkpoints) and samples >= self.checkpoints[len(self.err)]:
            e = float(self.problem.grad_phi(x.detach()).square().sum())
            self.err.append(e if math.isfinite(e) else math.inf)
            self.time.append(time.perf_counter() - self.t0)

    def final(self, samples: int, x: Tensor) -> tuple[int, float, float]:
        e = float(self.problem.grad_phi(x.detach()).square().sum())
        return samples, (e if math.isfinite(e) else math.inf), time.perf_counter() - self.t0


class Lower(nn.Module):
    def __init__(self, y0: Tensor) -> None:
        super().__init__()
        self.y = nn.Parameter(y0.clone())


def penalty_solver(
    orc: Oracles,
    x: Tensor,
    y0: Tensor,
    lam: float,
    lam_power: float,
    lr_x: float,
    lr_y: float,
    batch: Callable[[], int],
) -> PenaltySolver:
    """brlhf's PenaltySolver on counted stochastic closures; ``batch()`` gives the current minibatch size."""

    def upper(low: Lower, b: dict) -> Tensor:
        return orc.f(x, low.y, b["xi"], b["B"])

    def lower(low: Lower, b: dict) -> Tensor:
        return orc.g(x, low.y, b["xi"], b["B"])

    def f_batch() -> dict:
        n = batch()
        return {"xi": orc.noise_f(n), "B": n}

    def g_batch() -> dict:
        n = batch()
        return {"xi": orc.noise_g(n), "B": n}

    return PenaltySolver(
        [x],
        Lower(y0),
        upper_loss=upper,
        lower_loss=lower,
        upper_optimizer=functools.partial(torch.optim.SGD, lr=lr_x),
        lower_optimizer=functools.partial(torch.optim.SGD, lr=lr_y),
        config=PenaltyConfig(lam=lam, lam_power=lam_power, inner_steps=1, check_finite=False),
        upper_batches=f_batch,
        lower_batches=g_batch,
    )


def run_penalty_eps(
    problem: Any, eps: float, seed: int, lr_x: float, c_b: float, c_t: float
) -> tuple[int, float, float]:
    """Theorem 2's choices for target ε: λ = ε^-1/2, T = ⌈c_T/ε⌉, K = ⌈ln 1/ε⌉ + 1, B = ⌈c_B ε^-2⌉."""
    orc = Oracles(problem, torch.Generator().manual_seed(seed))
    x = problem.x0().requires_grad_(True)
    lam, steps, k = eps**-0.5, math.ceil(c_t / eps), math.ceil(math.log(1 / eps)) + 1
    b = math.ceil(c_b * eps**-2)
    solver = penalty_solver(orc, x, problem.y0(), lam, 0.0, lr_x, 1.0 / problem.L_g, lambda: b)
    rec = Recorder(problem, [])
    for _ in range(steps):
        for _ in range(k):
            solver.inner_step()
        solver.upper_step()
        if not torch.isfinite(x).all():
            break
    return rec.final(orc.samples, x)


def run_penalty_increasing(
    problem: Any, seed: int, lr_x: float, c_b: float, lam0: float, max_samples: float, record: Recorder
) -> None:
    """λ_t = λ₀ √(1+t), B_t = ⌈c_B (1+t)²⌉, K_t = ⌈ln(1+t)⌉ + 1."""
    orc = Oracles(problem, torch.Generator().manual_seed(seed))
    x = problem.x0().requires_grad_(True)
    solver = penalty_solver(
        orc,
        x,
        problem.y0(),
        lam0,
        0.5,
        lr_x,
        1.0 / problem.L_g,
        lambda: math.ceil(c_b * (1 + solver.outer_step) ** 2),
    )
    while orc.samples < max_samples and torch.isfinite(x).all():
        for _ in range(math.ceil(math.log(1 + solver.outer_step)) + 1):
            solver.inner_step()
        solver.upper_step()
        record(orc.samples, x)


@dataclass
class Anytime:
    """A method run once to a sample budget, recorded at checkpoints; ``grid`` lists the tuned settings."""

    name: str
    run: Callable[[Any, int, dict, float, Recorder], None]  # (problem, seed, setting, budget, recorder)
    grid: list[dict]
    theory: str  # the slope of log E‖∇Φ‖² against log samples that the method's paper predicts


def anytime_methods(batch: int) -> list[Anytime]:
    def pen(problem: Any, seed: int, p: dict, budget: float, rec: Recorder) -> None:
        run_penalty_increasing(
            problem, seed, lr_x=p["eta"], c_b=0.1, lam0=1.0, max_samples=budget, record=rec
        )

    def f2sa(problem: Any, seed: int, p: dict, budget: float, rec: Recorder) -> None:
        cfg = F2SAConfig(gamma0=1.0 / problem.L_g, lam0=p["lam0"], eta0=p["eta"], batch=batch)
        run_f2sa(
            Oracles(problem, torch.Generator().manual_seed(seed)),
            problem.x0(),
            problem.y0(),
            cfg,
            int(budget),
            rec,
        )

    def soba(problem: Any, seed: int, p: dict, budget: float, rec: Recorder) -> None:
        cfg = SOBAConfig(rho0=0.5 / problem.L_g, gamma0=p["eta"], batch=batch)
        run_soba(
            Oracles(problem, torch.Generator().manual_seed(seed)),
            problem.x0(),
            problem.y0(),
            cfg,
            int(budget),
            rec,
        )

    etas = [{"eta": e} for e in (0.03, 0.1, 0.3, 1.0)]
    return [
        Anytime("penalty, increasing λ", pen, etas, "-1/3"),
        Anytime("F2SA", f2sa, [{"eta": e, "lam0": lam} for e in (0.1, 0.3) for lam in (1.0, 10.0)], "-2/7"),
        Anytime("SOBA", soba, etas, "-2/5"),
    ]


def tune_score(err: list[float]) -> float:
    """Mean log error over the second half of the checkpoints (lower is better; divergence is +inf)."""
    tail = err[len(err) // 2 :]
    if not tail or not all(math.isfinite(e) and e > 0 for e in tail):
        return math.inf
    return sum(math.log(e) for e in tail) / len(tail)


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"{len(values) - len(finite)}/{len(values)} not reached"
    return f"{statistics.median(finite):.3g} [{min(finite):.3g}, {max(finite):.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--budget", type=float, default=1e6, help="samples per anytime run")
    parser.add_argument("--batch", type=int, default=16, help="minibatch of F2SA and SOBA")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, budget 5e4, ε down to 0.03; prints only, writes no files",
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budget, args.eps = 2, 5e4, [0.3, 0.1, 0.03]
    checkpoints = [float(c) for c in torch.logspace(2, math.log10(args.budget), 25).tolist()]
    problems = {"quadratic": Quadratic(), "nonconvex PL": NonconvexPL()}
    seeds = list(range(args.seeds))
    rows: list[dict] = []
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    print(
        f"criterion E‖∇Φ(x_T)‖² (squared norm, mean over {args.seeds} seeds); "
        "step sizes tuned on seed 1000; "
        f"F2SA/SOBA minibatch B={args.batch}, budget {args.budget:.0e} samples"
    )
    for pname, problem in problems.items():
        curves[pname] = {}
        print(f"\n=== {pname} ===   ‖∇Φ(x0)‖² = {float(problem.grad_phi(problem.x0()).square().sum()):.3g}")
        # --- anytime methods
        for meth in anytime_methods(args.batch):
            scores = []
            for setting in meth.grid:
                rec = Recorder(problem, checkpoints)
                meth.run(problem, 1000, setting, args.budget, rec)
                scores.append(tune_score(rec.err))
            setting = meth.grid[min(range(len(scores)), key=scores.__getitem__)]
            recs = []
            for s in seeds:
                rec = Recorder(problem, checkpoints)
                meth.run(problem, s, setting, args.budget, rec)
                recs.append(rec)
            n = min(len(r.err) for r in recs)
            mean_err = [statistics.fmean(r.err[i] for r in recs) for i in range(n)]
            lo = [min(r.err[i] for r in recs) for i in range(n)]
            hi = [max(r.err[i] for r in recs) for i in range(n)]
            xs = checkpoints[:n]
            fit = [(a, b) for a, b in zip(xs, mean_err) if a >= xs[-1] / 100 and math.isfinite(b) and b > 0]
            slope = log_slope([a for a, _ in fit], [b for _, b in fit]) if len(fit) > 2 else math.nan
            curves[pname][meth.name] = (xs, mean_err, lo, hi, slope, meth.theory)
            print(
                f"{meth.name:<24} {setting}; slope of log E‖∇Φ‖² vs log samples (last 2 decades): "
                f"{slope:.3f} (theory {meth.theory}); final E‖∇Φ‖² {mean_err[-1]:.3g}; "
                f"wall {statistics.fmean(r.time[-1] for r in recs):.1f} s"
            )
            for target in args.targets:
                hit = next((i for i, e in enumerate(mean_err) if e <= target), None)
                per_seed = []
                for r in recs:
                    j = next((i for i, e in enumerate(r.err) if e <= target), None)
                    per_seed.append(checkpoints[j] if j is not None else math.inf)
                rows.append(
                    {
                        "problem": pname,
                        "method": meth.name,
                        "target": target,
                        "samples": f"{xs[hit]:.3g}" if hit is not None else f">{args.budget:.0e}",
                        "seconds": (
                            f"{statistics.fmean(r.time[hit] for r in recs):.2f}" if hit is not None else ""
                        ),
                        "per-seed samples median [min, max]": spread(per_seed),
                        "slope": f"{slope:.3f}",
                        "theory slope": meth.theory,
                    }
                )
        # --- penalty, fixed λ, Theorem 2 choices per ε (lr_x, c_B, c_T: the cheapest run on seed 1000 that
        # meets ε = 0.03)
        best = None
        for lr_x in (0.3, 1.0):
            for c_b in (0.1, 1.0):
                for c_t in (3.0, 30.0):
                    samples, err, _ = run_penalty_eps(problem, 0.03, 1000, lr_x, c_b, c_t)
                    key = (err > 0.03, samples, err)
                    if best is None or key < best[0]:
                        best = (key, lr_x, c_b, c_t)
        _, lr_x, c_b, c_t = best
        pts = []
        for eps in args.eps:
            outs = [run_penalty_eps(problem, eps, s, lr_x, c_b, c_t) for s in seeds]
            samples = statistics.fmean(o[0] for o in outs)
            err = statistics.fmean(o[1] for o in outs)
            pts.append((samples, err, [o[1] for o in outs], statistics.fmean(o[2] for o in outs), eps))
        good = [(s, e) for s, e, *_ in pts if math.isfinite(e) and e > 0]
        slope = log_slope([s for s, _ in good], [e for _, e in good]) if len(good) > 2 else math.nan
        name = "penalty, fixed λ=ε^-1/2"
        curves[pname][name] = (
            [p[0] for p in pts],
            [p[1] for p in pts],
            [min(p[2]) for p in pts],
            [max(p[2]) for p in pts],
            slope,
            "-1/3",
        )
        print(
            f"{name:<24} lr_x {lr_x:g}, c_B {c_b:g}, c_T {c_t:g}; slope over the ε runs: {slope:.3f} "
            "(theory -1/3)"
        )
        for samples, err, errs, secs, eps in pts:
            print(
                f"    ε={eps:<6g} samples {samples:.3g}  E‖∇Φ‖² {err:.3g}  per seed {spread(errs)}  "
                f"({'meets' if err <= eps else 'misses'} ε)  {secs:.2f} s"
            )
        for target in args.targets:
            hit = next(((s, secs) for s, e, _, secs, _ in pts if e <= target), None)
            rows.append(
                {
                    "problem": pname,
                    "method": name,
                    "target": target,
                    "samples": f"{hit[0]:.3g}" if hit else "not reached (ε grid)",
                    "seconds": f"{hit[1]:.2f}" if hit else "",
                    "per-seed samples median [min, max]": "",
                    "slope": f"{slope:.3f}",
                    "theory slope": "-1/3",
                }
            )

    table = (
        "Samples (sample-gradient + HVP calls × minibatch) to reach E‖∇Φ(x)‖² ≤ target "
        f"(squared norm, mean over {args.seeds} seeds). Anytime methods: first of 25 log-spaced "
        "checkpoints where the seed mean is below the target; per-seed median [min, max] "
        "of the same; slope fitted on the last two decades of the budget. Fixed λ: the cheapest "
        "ε-run whose mean meets the target; slope fitted over the ε-runs. Theory slopes: "
        "penalty -1/3 (Õ(ε^-3)), F2SA -2/7 (ε^-3.5), SOBA -2/5 (ε^-2.5), all in the squared-norm "
        "convention.\n\n"
        "| "
        + " | ".join(rows[0])
        + " |\n|"
        + "---|" * len(rows[0])
        + "\n"
        + "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    )
    print("\n" + table)
    if args.quick:  # the quick run leaves the default run's files alone
        return
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "oracle_complexity.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / "oracle_complexity.md").write_text(table)
    plot(curves)


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (pname, methods) in zip(axes, curves.items()):
        for name, (xs, mean, lo, hi, slope, theory) in methods.items():
            marker = "o-" if name.startswith("penalty, fixed") else "-"
            line = ax.loglog(xs, mean, marker, label=f"{name} (slope {slope:.2f}; theory {theory})")[0]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(pname)
        ax.set_xlabel("samples (sample-gradient + HVP calls × batch)")
        ax.set_ylabel("E‖∇Φ(x)‖²  (squared norm)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "oracle_complexity.png", dpi=120)


if __name__ == "__main__":
    main()
