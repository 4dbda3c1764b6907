"""Cost per outer iteration and peak memory: the first-order penalty solver against implicit hyper-gradients.

Lower level: multi-output ridge regression with one learned regulariser per feature (hyper-parameter
learning), on synthetic data: X ∈ R^{n×p}, Y ∈ R^{n×q}, W ∈ R^{p×q} with d = p q parameters
(p = 100 features, q = d/100 outputs, n = 256 training and 256 validation samples):

    g(x, W) = 1/(2n) ‖X W − Y‖²_F + ½ Σ_j e^{x_j} ‖W_j‖²          (lower, strongly convex)
    f(W)    = 1/(2n) ‖X_v W − Y_v‖²_F                              (upper, validation loss)

∇²_WW g = I_q ⊗ (XᵀX/n + diag e^x) has the same condition number at every d, so a setting that is
accurate at one d is as accurate at every d. Exact hyper-gradient: W* = A⁻¹XᵀY/n with
A = XᵀX/n + diag e^x, V = A⁻¹ ∇_W f(W*), ∇Φ(x)_j = −e^{x_j} ⟨W*_j, V_j⟩.

Methods, per outer iteration (lower variables warm-started, plain gradient steps of size 1/L):
* penalty: ``brlhf.core.PenaltySolver``, K steps on z (g) and y (g + f/λ), then the x step
  (3K + 3 gradient calls, no HVP);
* TorchOpt CG: K steps on W, then ``torchopt.diff.implicit.custom_root`` with
  ``solve_cg(maxiter=M, rtol=1e-10)`` (K + 1 gradient calls, M + 1 HVPs);
* Neumann: K steps on W, then J Neumann terms with α = 1/L (K + 1 gradient calls, J HVPs).

Two comparisons: equal inner steps (K = 10, M = 10, J = 10) and equal accuracy (the cheapest setting of
each method whose hyper-gradient, computed from a cold start W = 0, has relative error ≤ --tol against
the exact one; searched at d = 1e4 with cost = gradient calls + r·HVP calls, r = measured time of an HVP
over a gradient). A gradient or HVP call is one full-batch evaluation on n = 256 samples (256 samples).
Each (method, d) runs in its own subprocess: time = median over outer iterations after one warm-up;
memory = peak RSS (``resource.getrusage``) minus the RSS after the data and variables were built.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torchopt  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from brlhf.core import PenaltyConfig, PenaltySolver  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)
FEATURES, N_TRAIN, N_VAL = 100, 256, 256


@dataclass
class Ridge:
    """Synthetic multi-output ridge data with d = FEATURES · q lower-level parameters."""

    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.q = max(1, self.dim // FEATURES)
        self.shape = (FEATURES, self.q)
        self.X = torch.randn(N_TRAIN, FEATURES, generator=gen)
        self.Xv = torch.randn(N_VAL, FEATURES, generator=gen)
        w_true = torch.randn(FEATURES, self.q, generator=gen) / math.sqrt(FEATURES)
        self.Y = self.X @ w_true + 0.5 * torch.randn(N_TRAIN, self.q, generator=gen)
        self.Yv = self.Xv @ w_true + 0.5 * torch.randn(N_VAL, self.q, generator=gen)
        self.x0 = torch.full((FEATURES,), math.log(0.1))
        gram = self.X.T @ self.X / N_TRAIN
        self.L = float(torch.linalg.eigvalsh(gram).max()) + math.exp(float(self.x0.max()))

    def g(self, x: Tensor, w: Tensor) -> Tensor:
        fit = 0.5 * (self.X @ w - self.Y).square().sum() / N_TRAIN
        return fit + 0.5 * (x.exp() * w.square().sum(1)).sum()

    def f(self, x: Tensor, w: Tensor) -> Tensor:
        return 0.5 * (self.Xv @ w - self.Yv).square().sum() / N_VAL

    def exact_hypergrad(self, x: Tensor) -> Tensor:
        a = self.X.T @ self.X / N_TRAIN + torch.diag(x.exp())
        w = torch.linalg.solve(a, self.X.T @ self.Y / N_TRAIN)
        v = torch.linalg.solve(a, self.Xv.T @ (self.Xv @ w - self.Yv) / N_VAL)
        return -x.exp() * (w * v).sum(1)


@dataclass
class MLP:
    """Non-linear lower level: a one-hidden-layer tanh network, parameters flattened into w ∈ R^d.

        net(X; w) = tanh(X W₁ / √p) W₂ / √h       (W₁ ∈ R^{p×h}, W₂ ∈ R^{h×10}, h = d / (p + 10))
        g(x, w) = 1/(2n) ‖net(X; w) − Y‖²_F + (1/2h) Σ_j e^{x_j} ‖(W₁)_j‖² + (0.1/2h) ‖W₂‖²
        f(w)    = 1/(2n) ‖net(X_v; w) − Y_v‖²_F

    The 1/√p, 1/√h scalings keep the curvature independent of h. No closed form: only the cost is measured.
    """

    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.out = 10
        self.hidden = max(1, self.dim // (FEATURES + self.out))
        self.shape = (FEATURES * self.hidden + self.hidden * self.out,)
        self.X = torch.randn(N_TRAIN, FEATURES, generator=gen)
        self.Xv = torch.randn(N_VAL, FEATURES, generator=gen)
        w_true = torch.randn(FEATURES, self.out, generator=gen) / math.sqrt(FEATURES)
        self.Y = torch.tanh(self.X @ w_true) + 0.1 * torch.randn(N_TRAIN, self.out, generator=gen)
        self.Yv = torch.tanh(self.Xv @ w_true) + 0.1 * torch.randn(N_VAL, self.out, generator=gen)
        self.x0 = torch.full((FEATURES,), math.log(0.1))
        self.L = 2.0

    def _split(self, w: Tensor) -> tuple[Tensor, Tensor]:
        n1 = FEATURES * self.hidden
        return w[:n1].view(FEATURES, self.hidden), w[n1:].view(self.hidden, self.out)

    def g(self, x: Tensor, w: Tensor) -> Tensor:
        w1, w2 = self._split(w)
        fit = 0.5 * (self.net(self.X, w1, w2) - self.Y).square().sum() / N_TRAIN
        return fit + (0.5 * (x.exp() * w1.square().sum(1)).sum() + 0.05 * w2.square().sum()) / self.hidden

    def net(self, inputs: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        return torch.tanh(inputs @ w1 / math.sqrt(FEATURES)) @ w2 / math.sqrt(self.hidden)

    def f(self, x: Tensor, w: Tensor) -> Tensor:
        w1, w2 = self._split(w)
        return 0.5 * (self.net(self.Xv, w1, w2) - self.Yv).square().sum() / N_VAL

    def init(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.shape, generator=gen)

    exact_hypergrad = None


class Counter:
    grads = 0
    hvps = 0


def initial_lower(prob: Ridge | MLP) -> Tensor:
    return prob.init() if isinstance(prob, MLP) else torch.zeros(prob.shape)


class Lower(nn.Module):
    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())


def gd_steps(prob: Ridge, x: Tensor, w: Tensor, steps: int, lr: float, count: Counter) -> Tensor:
    for _ in range(steps):
        ww = w.detach().requires_grad_(True)
        w = w - lr * torch.autograd.grad(prob.g(x, ww), ww)[0]
        count.grads += 1
    return w.detach()


class PenaltyMethod:
    """brlhf's PenaltySolver; ``hypergrad`` is the proxy gradient it used for its last x step."""

    def __init__(self, prob: Ridge, k: int, lam: float, count: Counter, lr_x: float) -> None:
        self.x = prob.x0.clone().requires_grad_(True)

        def upper(low: Lower, _b: object) -> Tensor:
            count.grads += 1
            return prob.f(self.x, low.w)

        def lower(low: Lower, _b: object) -> Tensor:
            count.grads += 1
            return prob.g(self.x, low.w)

        self.solver = PenaltySolver(
            [self.x],
            Lower(initial_lower(prob)),
            upper_loss=upper,
            lower_loss=lower,
            upper_optimizer=functools.partial(torch.optim.SGD, lr=lr_x),
            penalised_optimizer=functools.partial(torch.optim.SGD, lr=1.0 / (prob.L + prob.L / lam)),
            pure_optimizer=functools.partial(torch.optim.SGD, lr=1.0 / prob.L),
            config=PenaltyConfig(lam=lam, inner_steps=k, check_finite=False),
        )

    def step(self) -> Tensor:
        self.solver.step()
        return self.x.grad.detach().clone()


class ImplicitMethod:
    """K warm-started steps on W, then a CG (TorchOpt) or Neumann implicit hyper-gradient, then the x step."""

    def __init__(self, prob: Ridge, kind: str, k: int, iters: int, count: Counter, lr_x: float) -> None:
        self.prob, self.kind, self.k, self.iters, self.count, self.lr_x = prob, kind, k, iters, count, lr_x
        self.x = prob.x0.clone()
        self.w = initial_lower(prob)

    def hypergrad(self) -> Tensor:
        prob, count = self.prob, self.count
        self.w = gd_steps(prob, self.x, self.w, self.k, 1.0 / prob.L, count)
        if self.kind == "cg":
            w_sol = self.w

            def optimality(w: Tensor, x: Tensor) -> Tensor:
                return torch.func.grad(lambda ww: prob.g(x, ww))(w)

            @torchopt.diff.implicit.custom_root(
                optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=self.iters, rtol=1e-10)
            )
            def root(w: Tensor, x: Tensor) -> Tensor:
                return w_sol

            x = self.x.clone().requires_grad_(True)
            out = torch.autograd.grad(prob.f(x, root(w_sol, x)), x)[0]
            count.grads += 1
            count.hvps += self.iters + 1
            return out
        x = self.x.clone().requires_grad_(True)
        w = self.w.clone().requires_grad_(True)
        fw = torch.autograd.grad(prob.f(x, w), w)[0]
        gw = torch.autograd.grad(prob.g(x, w), w, create_graph=True)[0]
        count.grads += 2  # ∇f, and ∇g kept with its graph for the HVPs
        alpha = 1.0 / prob.L
        term, v = fw, alpha * fw
        for _ in range(self.iters - 1):
            term = term - alpha * torch.autograd.grad(gw, w, grad_outputs=term, retain_graph=True)[0]
            v = v + alpha * term
        out = -torch.autograd.grad(gw, x, grad_outputs=v)[0]
        count.hvps += self.iters
        return out

    def step(self) -> Tensor:
        hg = self.hypergrad()
        self.x = self.x - self.lr_x * hg
        return hg


def make_method(name: str, prob: Ridge, k: int, it: int, lam: float, lr_x: float, count: Counter):
    if name == "penalty":
        return PenaltyMethod(prob, k, lam, count, lr_x)
    return ImplicitMethod(prob, name, k, it, count, lr_x)


def rel_error(est: Tensor, exact: Tensor) -> float:
    return float((est - exact).norm() / exact.norm())


def run_one(args: argparse.Namespace) -> None:
    """Child process: time, memory, calls and cold-start accuracy of one (method, d, setting)."""
    prob = MLP(args.dim) if args.lower == "mlp" else Ridge(args.dim)
    count = Counter()
    method = make_method(args.method, prob, args.k, args.iters, args.lam, 1e-3, count)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        method.step()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reps = args.reps + 1
    calls = (count.grads / reps, count.hvps / reps)
    # accuracy of one hyper-gradient from a cold start (x fixed: lr_x = 0), after the memory reading
    err = math.nan
    if isinstance(prob, Ridge):
        method = make_method(args.method, prob, args.k, args.iters, args.lam, 0.0, Counter())
        err = rel_error(method.step(), prob.exact_hypergrad(prob.x0))
    print(
        json.dumps(
            {
                "time": statistics.median(times[1:]),
                "time_spread": [min(times[1:]), max(times[1:])],
                "mem_mb": (peak_kb - base_kb) / 1024,
                "grads": calls[0],
                "hvps": calls[1],
                "rel_err": err,
            }
        )
    )


def child(method: str, dim: int, k: int, it: int, lam: float, reps: int, lower: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.solver_cost",
        "--one",
        method,
        "--dim",
        str(dim),
        "--k",
        str(k),
        "--iters",
        str(it),
        "--lam",
        str(lam),
        "--reps",
        str(reps),
        "--lower",
        lower,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hvp_over_grad(dim: int, reps: int = 20) -> float:
    """Measured time of one HVP (double backward through ∇_W g) over one gradient of g, in-process."""
    prob = Ridge(dim)
    x, w = prob.x0.clone(), torch.randn(FEATURES, prob.q).requires_grad_(True)
    v = torch.randn_like(w)

    def grad() -> None:
        torch.autograd.grad(prob.g(x, w), w)

    def hvp() -> None:
        gw = torch.autograd.grad(prob.g(x, w), w, create_graph=True)[0]
        torch.autograd.grad(gw, w, grad_outputs=v)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return max(timed(hvp) - timed(grad), 0.0) / timed(grad)


def equal_accuracy_settings(
    tol: float, dim: int, ratio: float, lams: list[float], ks: list[int], its: list[int]
) -> dict[str, tuple[int, int, float, float, float]]:
    """Cheapest (K, iters, λ) per method with cold-start relative hyper-gradient error ≤ tol at ``dim``.

    Cost = gradient calls + ratio · HVP calls. Returns name -> (K, iters, λ, error, cost)."""
    prob = Ridge(dim)
    exact = prob.exact_hypergrad(prob.x0)
    best: dict[str, tuple[int, int, float, float, float]] = {}
    grid = {
        "penalty": [(k, 0, lam) for k in ks for lam in lams],
        "cg": [(k, it, 0.0) for k in ks for it in its],
        "neumann": [(k, it, 0.0) for k in ks for it in its],
    }
    for name, settings in grid.items():
        for k, it, lam in settings:
            count = Counter()
            try:
                est = make_method(name, prob, k, it, lam, 0.0, count).step()
            except ZeroDivisionError:  # TorchOpt's CG divides by pᵀAp = 0 once the residual is exactly 0
                continue
            err, cost = rel_error(est, exact), count.grads + ratio * count.hvps
            if err <= tol and (name not in best or cost < best[name][4]):
                best[name] = (k, it, lam, err, cost)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--k", type=int, default=10, help="inner steps K (equal-steps comparison)")
    parser.add_argument("--iters", type=int, default=10, help="CG iterations M and Neumann terms J")
    parser.add_argument("--lam", type=float, default=100.0, help="penalty λ (equal-steps comparison)")
    parser.add_argument(
        "--tol", type=float, default=1e-2, help="relative hyper-gradient error (equal accuracy)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed outer iterations after one warm-up")
    parser.add_argument("--quick", action="store_true", help="d = 1e3, 1e4 only, 2 repetitions")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP lower level (equal inner steps)")
    parser.add_argument("--lower", choices=["ridge", "mlp"], default="ridge", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=["penalty", "cg", "neumann"], help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.method = args.one
        run_one(args)
        return
    if args.quick:
        args.dims, args.reps = [1e3, 1e4], 2
    dims = [int(d) for d in args.dims]
    methods = ["penalty", "cg", "neumann"]
    labels = {"penalty": "penalty (first-order)", "cg": "TorchOpt CG", "neumann": "Neumann"}

    ratio = hvp_over_grad(10_000)
    print(
        f"ridge lower level, p={FEATURES} features, n={N_TRAIN}; one call = one full-batch gradient or HVP "
        f"({N_TRAIN} samples); time of an HVP (gradient with graph + double backward) at d=1e4: "
        f"{1 + ratio:.2f} gradients, so an HVP that reuses a gradient's graph costs {ratio:.2f} more"
    )
    search_dim = min(10_000, max(dims))
    acc = equal_accuracy_settings(
        args.tol,
        search_dim,
        ratio,
        lams=[1e2, 1e3, 1e4],
        ks=[5, 10, 20, 40, 80, 160, 320],
        its=[5, 10, 20, 40, 80],
    )
    equal_steps = {m: (args.k, args.iters, args.lam) for m in methods}
    settings = {
        "ridge, equal inner steps": ("ridge", equal_steps),
        f"ridge, equal accuracy (rel. err ≤ {args.tol:g})": (
            "ridge",
            {m: acc[m][:3] for m in methods if m in acc},
        ),
    }
    if not args.no_mlp:
        settings["MLP (tanh, 1 hidden layer), equal inner steps"] = ("mlp", equal_steps)
    for m in methods:
        if m in acc:
            k, it, lam, err, cost = acc[m]
            print(
                f"  equal accuracy at d={search_dim}: {labels[m]:<22} K={k:<4} M/J={it or '-':<3} "
                f"λ={lam or '-':<6} "
                f"cold-start rel. err {err:.1e}, cost {cost:.0f} gradient-equivalents"
            )
        else:
            print(f"  equal accuracy: {labels[m]} reaches no rel. err ≤ {args.tol:g} on the grid")

    for title, (lower, setting) in settings.items():
        print(f"\n== {title} ==")
        print(
            f"{'d':>9} {'method':<22}{'K':>5}{'M/J':>5}{'λ':>7}{'grads':>7}{'HVPs':>6}{'s/iter':>10}"
            f"{'(min-max)':>18}{'peak MB':>9}{'rel.err':>9}{'time ratio':>11}{'mem ratio':>10}"
        )
        results: dict[str, dict[int, dict]] = {m: {} for m in setting}
        for dim in dims:
            reps = args.reps if dim >= 100_000 else 3 * args.reps
            for m, (k, it, lam) in setting.items():
                results[m][dim] = r = child(m, dim, k, it, lam or 1.0, reps, lower)
            pen = results.get("penalty", {}).get(dim)
            for m, (k, it, lam) in setting.items():
                r = results[m][dim]
                tr = f"{r['time'] / pen['time']:.2f}" if pen else ""
                # below ~1 MB the RSS peak does not resolve the method (it reuses the heap of the set-up)
                resolved = pen is not None and min(r["mem_mb"], pen["mem_mb"]) >= 1
                mr = f"{r['mem_mb'] / pen['mem_mb']:.2f}" if resolved else "-"
                spread = f"({r['time_spread'][0]:.3g}-{r['time_spread'][1]:.3g})"
                print(
                    f"{dim:>9.0e} {labels[m]:<22}{k:>5}{it if m != 'penalty' else '-':>5}"
                    f"{lam if m == 'penalty' else '-':>7}{r['grads']:>7.0f}{r['hvps']:>6.0f}"
                    f"{r['time']:>10.4f}{spread:>18}{r['mem_mb']:>9.1f}{r['rel_err']:>9.1e}{tr:>11}{mr:>10}"
                )
        print("slope of log(s/iter) vs log(d):  all d / last two d")
        for m in setting:
            ts = [results[m][d]["time"] for d in dims]
            lx, ly = [math.log(d) for d in dims], [math.log(t) for t in ts]
            mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
            slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
            last = (ly[-1] - ly[-2]) / (lx[-1] - lx[-2]) if len(dims) > 1 else math.nan
            print(f"  {labels[m]:<22} {slope:.2f} / {last:.2f}")
        top = dims[-1]
        if "penalty" in results:
            pen = results["penalty"][top]
            for m in setting:
                if m != "penalty":
                    r = results[m][top]
                    print(
                        f"  at d={top:.0e}: {labels[m]} / penalty: time {r['time'] / pen['time']:.2f}x, "
                        f"peak memory {r['mem_mb']:.1f} / {pen['mem_mb']:.1f} MB"
                    )
    print(
        "\ntime ratio / mem ratio: method over penalty at the same d (> 1: the penalty step is cheaper; "
        "mem ratio '-': a peak under 1 MB above the baseline, not resolved by RSS); "
        "rel.err: cold-start hyper-gradient error against the closed form "
        "(penalty: of its proxy gradient)."
    )


if __name__ == "__main__":
    main()
