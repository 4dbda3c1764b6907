"""Correctness of the benchmark baselines (Neumann, TorchOpt CG, F2SA, SOBA) on the closed-form quadratic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not an installed package

from benchmarks.baselines import (  # noqa: E402
    F2SAConfig,
    Oracles,
    SOBAConfig,
    cg_hypergrad,
    neumann_hypergrad,
    run_f2sa,
    run_soba,
)
from benchmarks.problems import NonconvexPL, Quadratic  # noqa: E402

torch.set_num_threads(1)


def test_implicit_hypergradients_match_closed_form() -> None:
    pytest.importorskip("torchopt")
    prob = Quadratic(sigma=0.0)
    x = torch.randn(prob.dx, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = prob.y_star(x)
    exact = prob.grad_phi(x)
    cg = cg_hypergrad(prob.f, prob.g, x, y, maxiter=100)
    neumann, hvps = neumann_hypergrad(prob.f, prob.g, x, y, terms=300, alpha=1.0 / prob.L_g)
    assert torch.allclose(cg, exact, atol=1e-4 * float(exact.norm()))  # TorchOpt's default rtol = 1e-5
    assert torch.allclose(neumann, exact, atol=1e-8)
    assert hvps == 300


def test_x_star_is_stationary() -> None:
    prob = Quadratic()
    assert prob.grad_phi(prob.x_star()).norm() < 1e-10
    assert NonconvexPL().grad_phi(NonconvexPL().x_star()).norm() == 0


@pytest.mark.parametrize("method", ["f2sa", "soba"])
def test_first_and_second_order_baselines_converge_without_noise(method: str) -> None:
    prob = Quadratic(sigma=0.0)
    orc = Oracles(prob, torch.Generator().manual_seed(0))
    last: list[torch.Tensor] = []
    if method == "f2sa":
        cfg = F2SAConfig(gamma0=1.0 / prob.L_g, lam0=100.0, eta0=0.3, k0=1e9, inner_steps=3)  # constant steps
        run_f2sa(orc, prob.x0(), prob.y0(), cfg, 30_000, lambda n, x: last.append(x))
        tol = 1e-4  # the fixed λ = 100 leaves an O(1/λ) bias in ∇Φ
    else:
        cfg = SOBAConfig(rho0=1.0 / prob.L_g, gamma0=0.3, t0=1e9)
        run_soba(orc, prob.x0(), prob.y0(), cfg, 30_000, lambda n, x: last.append(x))
        tol = 1e-8
    assert prob.grad_phi(last[-1]).square().sum() < tol


def test_soba_counts_two_gradients_and_one_hvp_per_step() -> None:
    prob = Quadratic()
    orc = Oracles(prob, torch.Generator().manual_seed(0))
    run_soba(orc, prob.x0(), prob.y0(), SOBAConfig(batch=4), 1, lambda n, x: None)
    assert (orc.grad_calls, orc.hvp_calls, orc.samples) == (2, 1, 12)


def test_closed_forms_agree_with_brlhf_problems() -> None:
    from benchmarks.problems import PLLine
    from brlhf import problems

    for lam in (1.0, 10.0, 1000.0):
        assert PLLine.x_lam(lam) == pytest.approx(problems.PLLineProblem.x_lam(lam))
    assert PLLine.x_star() == pytest.approx(problems.PLLineProblem.x_star)
    x = torch.tensor([0.3], dtype=torch.float64)
    assert torch.allclose(NonconvexPL(dim=1).grad_phi(x), problems.NonconvexPLProblem.hyper_gradient(x))
