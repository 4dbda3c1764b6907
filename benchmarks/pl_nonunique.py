"""PL lower level with a line of solutions: implicit hyper-gradients against the penalty solver.

Problem (ALGORITHM.md §7): y ∈ R², g = ½(y₁ + y₂ − x)², f = ½‖y‖² + ½(x − 2)²; x* = 4/3 and the penalty
proxy's minimiser is x_λ = 2(1 + 2λ)/(1 + 3λ). ∇²_yy g = [[1, 1], [1, 1]] is singular, so the implicit
formula ∇Φ = ∇_x f − ∇²_xy g (∇²_yy g)⁻¹ ∇_y f has no inverse to take. Every method runs T outer steps
x ← x − η d(x, y) from x₀ = 0 with K warm-started gradient steps of size α_y on the lower variable in
between, for several initialisations y₀ of the lower variable:

* TorchOpt CG: ``torchopt.diff.implicit.custom_root`` + ``solve_cg(maxiter=M)``;
* Neumann: v = α Σ_{j<J} (I − α∇²_yy g)^j ∇_y f, for α = 1/L (= 0.5) and α = 1 (Betty's default
  ``neumann_alpha``);
* Betty 0.2.1 (``ImplicitProblem`` with type ``cg`` and ``neumann``, its default ``cg_alpha`` and
  ``neumann_alpha`` of 1), if it imports;
* BOAT (boat-torch 1.1.1, needs ``higher``): gradient mapping ``NGD`` with ``na_op`` ``CG`` or ``NS``
  (Neumann series with the lower step α_y), ``CG.k`` = M, tolerance 1e-10, if it imports;
* the penalty solver (``brlhf.core.PenaltySolver``) for λ = 10, 100, 1000.

The outer step η is chosen on a separate initialisation (seed 1000) from a small grid, by the smallest
final update |x_T − x_{T−1}|/η (stationarity of each method's own iteration; x* is not used).
Prints the final x and |x − x*| for each method and initialisation.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.baselines import cg_hypergrad, neumann_hypergrad  # noqa: E402
from benchmarks.problems import PLLine  # noqa: E402
from brlhf.core import PenaltyConfig, PenaltySolver  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
logging.disable(logging.INFO)
torch.set_num_threads(1)
PROBLEM = PLLine()
DT = torch.float64


def lower_steps(x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """K gradient steps y ← y − α_y ∇_y g(x, y)."""
    for _ in range(steps):
        yy = y.detach().requires_grad_(True)
        y = y - lr * torch.autograd.grad(PROBLEM.g(x, yy), yy)[0]
    return y.detach()


FAILURES: dict[str, str] = {}


def run_implicit(
    hypergrad: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    eta: float,
    outer: int,
    inner: int,
    lr_y: float,
    name: str = "",
) -> tuple[float, float]:
    """x ← x − η d(x, y), y warm-started; returns (final x, last update / η). NaN or an exception: NaN."""
    x, y = torch.zeros(1, dtype=DT), y0.clone()
    prev = x.clone()
    try:
        for _ in range(outer):
            y = lower_steps(x, y, inner, lr_y)
            prev, x = x, x - eta * hypergrad(x, y)
            if not torch.isfinite(x).all():
                FAILURES[name] = "x became non-finite"
                return math.nan, math.nan
    except (ZeroDivisionError, RuntimeError, ValueError) as err:
        FAILURES[name] = f"{type(err).__name__}: {err}"
        return math.nan, math.nan
    return float(x), float((x - prev).abs()) / eta


class Lower(nn.Module):
    def __init__(self, y0: Tensor) -> None:
        super().__init__()
        self.y = nn.Parameter(y0.clone())


def run_penalty(
    lam: float, y0: Tensor, eta: float, outer: int, inner: int, lr_y: float
) -> tuple[float, float]:
    """brlhf's PenaltySolver with SGD on every variable and a fixed λ."""
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    solver = PenaltySolver(
        [x],
        Lower(y0),
        upper_loss=lambda low, _b: PROBLEM.f(x, low.y),
        lower_loss=lambda low, _b: PROBLEM.g(x, low.y),
        upper_optimizer=functools.partial(torch.optim.SGD, lr=eta),
        lower_optimizer=functools.partial(torch.optim.SGD, lr=lr_y),
        config=PenaltyConfig(lam=lam, inner_steps=inner, check_finite=False),
    )
    prev = float(x)
    for _ in range(outer):
        prev = float(x)
        solver.step()
        if not math.isfinite(float(x)):
            return math.nan, math.nan
    return float(x), abs(float(x) - prev) / eta


def run_betty(
    kind: str, y0: Tensor, eta: float, outer: int, inner: int, lr_y: float, iters: int
) -> tuple[float, float]:
    """Betty 0.2.1: upper ImplicitProblem on f, lower ImplicitProblem on g with config.type = kind."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    class Upper(ImplicitProblem):
        def training_step(self, batch: object) -> Tensor:
            return PROBLEM.f(self.module.x, self.inner.module.y)

    class Inner(ImplicitProblem):
        def training_step(self, batch: object) -> Tensor:
            return PROBLEM.g(self.outer.module.x, self.module.y)

    up_mod, low_mod = nn.Module(), Lower(y0)
    up_mod.x = nn.Parameter(torch.zeros(1, dtype=DT))
    loader = [torch.zeros(1)] * 10
    upper = Upper(
        name="outer",
        module=up_mod,
        optimizer=torch.optim.SGD(up_mod.parameters(), lr=eta),
        train_data_loader=loader,
        config=Config(retain_graph=True),
    )
    lower = Inner(
        name="inner",
        module=low_mod,
        optimizer=torch.optim.SGD(low_mod.parameters(), lr=lr_y),
        train_data_loader=loader,
        config=Config(type=kind, unroll_steps=inner, cg_iterations=iters, neumann_iterations=iters),
    )
    engine = Engine(
        config=EngineConfig(train_iters=outer * inner, logger_type="none"),
        problems=[upper, lower],
        dependencies={"l2u": {lower: [upper]}, "u2l": {upper: [lower]}},
    )
    prev = float(up_mod.x.detach())
    try:
        engine.run()
    except Exception as err:  # noqa: BLE001  (any crash of the library is the measured outcome)
        FAILURES[f"Betty {kind}"] = f"{type(err).__name__}: {str(err)[:80]}"
        return math.nan, math.nan
    x = float(up_mod.x.detach())
    return x, abs(x - prev) / eta


def boat_lower_loss(
    feed: object, ul_model: nn.Module, ll_model: nn.Module, params: list | None = None
) -> Tensor:
    return PROBLEM.g(ul_model.x, params[0] if params is not None else ll_model.y)


def boat_upper_loss(
    feed: object, ul_model: nn.Module, ll_model: nn.Module, params: list | None = None
) -> Tensor:
    return PROBLEM.f(ul_model.x, params[0] if params is not None else ll_model.y)


def run_boat(
    kind: str, y0: Tensor, eta: float, outer: int, inner: int, lr_y: float, iters: int
) -> tuple[float, float]:
    """BOAT: ``Problem`` with gm_op NGD (K lower steps per outer step) and na_op ``kind`` (CG or NS)."""
    import tempfile

    import boat_torch

    up_mod, low_mod = nn.Module(), Lower(y0)
    up_mod.x = nn.Parameter(torch.zeros(1, dtype=DT))
    config = {
        "fo_op": None,
        "gm_op": ["NGD"],
        "na_op": [kind],
        "lower_level_model": low_mod,
        "upper_level_model": up_mod,
        "lower_level_var": list(low_mod.parameters()),
        "upper_level_var": list(up_mod.parameters()),
        "lower_level_opt": torch.optim.SGD(low_mod.parameters(), lr=lr_y),
        "upper_level_opt": torch.optim.SGD(up_mod.parameters(), lr=eta),
        "lower_iters": inner,
        "device": "cpu",
        "loss_log_path": os.path.join(tempfile.gettempdir(), "boat_losses.json"),
        "accumulate_grad": False,
        "copy_last_param": True,
        "return_grad": False,
        "fo_ol_batch_input": False,
        "CG": {"tolerance": 1e-10, "k": iters},
        "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0},
        "RGT": {"truncate_iter": 0},
    }
    losses = {
        "lower_level_loss": {"function": f"{__name__}.boat_lower_loss"},
        "upper_level_loss": {"function": f"{__name__}.boat_upper_loss"},
    }
    prev = 0.0
    try:
        problem = boat_torch.Problem(config, losses)
        problem.build_ll_solver()
        problem.build_ul_solver()
        for t in range(outer):
            prev = float(up_mod.x.detach())
            problem.run_iter({}, {}, current_iter=t)
            if not math.isfinite(float(up_mod.x.detach())):
                break
    except Exception as err:  # noqa: BLE001  (any crash of the library is the measured outcome)
        FAILURES[f"BOAT {kind}"] = f"{type(err).__name__}: {str(err)[:80]}"
        return math.nan, math.nan
    x = float(up_mod.x.detach())
    if not math.isfinite(x):
        FAILURES[f"BOAT {kind}"] = "x became non-finite"
    return x, abs(x - prev) / eta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer", type=int, default=1000, help="T outer steps")
    parser.add_argument("--inner", type=int, default=10, help="K lower steps per outer step")
    parser.add_argument("--lr-y", type=float, default=0.25, help="lower step α_y (L_g = 2)")
    parser.add_argument("--cg-iters", type=int, default=10)
    parser.add_argument("--neumann-terms", type=int, default=10)
    parser.add_argument("--inits", type=int, default=5, help="initialisations y0 (seeds 0..n-1)")
    parser.add_argument("--quick", action="store_true", help="T=300, 3 initialisations")
    args = parser.parse_args()
    if args.quick:
        args.outer, args.inits = 300, 3

    f, g = PROBLEM.f, PROBLEM.g
    implicit: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        f"TorchOpt CG (M={args.cg_iters})": lambda x, y: cg_hypergrad(f, g, x, y, args.cg_iters),
        f"Neumann (J={args.neumann_terms}, α=1/L)": lambda x, y: neumann_hypergrad(
            f, g, x, y, args.neumann_terms, 1.0 / PROBLEM.L_g
        )[0],
        f"Neumann (J={args.neumann_terms}, α=1)": lambda x, y: neumann_hypergrad(
            f, g, x, y, args.neumann_terms, 1.0
        )[0],
    }
    runners: dict[str, Callable[[Tensor, float], tuple[float, float]]] = {
        name: functools.partial(
            lambda y0, eta, hg, nm: run_implicit(hg, y0, eta, args.outer, args.inner, args.lr_y, nm),
            hg=hg,
            nm=name,
        )
        for name, hg in implicit.items()
    }
    try:
        import betty  # noqa: F401

        for kind in ("cg", "neumann"):
            runners[f"Betty {kind} ({args.cg_iters} it.)"] = functools.partial(
                lambda y0, eta, k: run_betty(k, y0, eta, args.outer, args.inner, args.lr_y, args.cg_iters),
                k=kind,
            )
    except ImportError as err:
        print(f"Betty not importable ({err}); skipped")
    try:
        import boat_torch  # noqa: F401

        for kind in ("CG", "NS"):
            runners[f"BOAT {kind} ({args.cg_iters} it.)"] = functools.partial(
                lambda y0, eta, k: run_boat(k, y0, eta, args.outer, args.inner, args.lr_y, args.cg_iters),
                k=kind,
            )
    except ImportError as err:
        print(f"BOAT not importable ({err}); skipped")
    for lam in (10.0, 100.0, 1000.0):
        runners[f"penalty λ={lam:g}"] = functools.partial(
            lambda y0, eta, lam: run_penalty(lam, y0, eta, args.outer, args.inner, args.lr_y), lam=lam
        )

    def init(seed: int) -> Tensor:
        return 3.0 * torch.randn(2, generator=torch.Generator().manual_seed(seed), dtype=DT)

    # step size η on the tuning initialisation (seed 1000): smallest final |x_T - x_{T-1}| / η
    grid = (0.03, 0.1, 0.3)
    etas: dict[str, float] = {}
    for name, run in runners.items():
        scores = []
        for eta in grid:
            _, res = run(init(1000), eta)
            scores.append(res if math.isfinite(res) else math.inf)
        etas[name] = grid[min(range(len(grid)), key=scores.__getitem__)]

    inits = [init(s) for s in range(args.inits)]
    x_star = PROBLEM.x_star()
    print(
        f"PL line problem: x* = {x_star:.6f}; T={args.outer} outer steps, K={args.inner} lower steps "
        f"(α_y={args.lr_y}), x0=0; η tuned on init seed 1000 over {grid}"
    )
    print("inits y0: " + ", ".join(f"({float(y[0]):+.2f},{float(y[1]):+.2f})" for y in inits))
    header = f"{'method':<28}{'η':>6}  " + "".join(
        f"{'x (init ' + str(i) + ')':>16}" for i in range(args.inits)
    )
    print(header + f"{'median |x-x*|':>15}{'max |x-x*|':>12}{'expected':>12}{'s/run':>8}")
    for name, run in runners.items():
        t0 = time.perf_counter()
        xs = [run(y0, etas[name])[0] for y0 in inits]
        dt = (time.perf_counter() - t0) / len(inits)
        errs = [abs(x - x_star) if math.isfinite(x) else math.nan for x in xs]
        finite = [e for e in errs if math.isfinite(e)]
        med = statistics.median(finite) if len(finite) == len(errs) else math.nan
        worst = max(finite) if len(finite) == len(errs) else math.nan
        expected = ""
        if name.startswith("penalty"):
            expected = f"{abs(PROBLEM.x_lam(float(name.split('=')[1])) - x_star):.2e}"
        cells = "".join(f"{x:>16.6f}" if math.isfinite(x) else f"{'NaN/crash':>16}" for x in xs)
        print(f"{name:<28}{etas[name]:>6g}  {cells}{med:>15.2e}{worst:>12.2e}{expected:>12}{dt:>8.2f}")
    print(
        "expected = |x_λ − x*| with x_λ = 2(1+2λ)/(1+3λ); "
        "NaN/crash = non-finite x or an exception in the method"
    )
    for name, why in FAILURES.items():
        print(f"  {name} failed: {why}")


if __name__ == "__main__":
    main()
