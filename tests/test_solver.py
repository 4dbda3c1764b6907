"""The solver's contract: what each step touches, collapse, exact resume, schedules, and clear errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from brlhf.core import BilevelLossError, LambdaSchedule, PenaltyConfig, PenaltySolver
from brlhf.problems import QuadraticProblem, Vector

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def problem_solver(problem: QuadraticProblem, x: torch.Tensor, lower, **kwargs) -> PenaltySolver:
    """A solver on ``problem``'s closures at ``x`` and its batches (optimisers and config in ``kwargs``)."""
    upper_loss, lower_loss = problem.closures(x)
    return PenaltySolver(
        [x],
        lower,
        upper_loss=upper_loss,
        lower_loss=lower_loss,
        upper_batches=problem.upper_batch,
        lower_batches=problem.lower_batch,
        **kwargs,
    )


def make_solver(
    noise: float = 0.3, seed: int = 0, own_generator: bool = True, **config
) -> tuple[PenaltySolver, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed) if own_generator else None  # None: torch's global RNG
    problem = QuadraticProblem.random(dim_x=3, dim_y=4, seed=seed, noise=noise, batch_size=2, generator=gen)
    x, lower = problem.init()
    solver = problem_solver(
        problem,
        x,
        lower,
        upper_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        lower_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        config=PenaltyConfig(**{"lam": 10.0, "inner_steps": 3, **config}),
    )
    return solver, x


def snapshot(solver: PenaltySolver) -> dict[str, list[torch.Tensor]]:
    return {
        name: [p.detach().clone() for p in params]
        for name, params in [
            ("x", solver.upper_params),
            ("y", solver.penalised_params),
            ("z", solver.pure_params),
        ]
    }


def changed(before, after) -> set[str]:
    return {k for k in before if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))}


def test_each_step_moves_only_its_own_variables():
    solver, _ = make_solver()
    before = snapshot(solver)
    solver.inner_step()
    middle = snapshot(solver)
    assert changed(before, middle) == {"y", "z"}
    assert all(p.grad is None for p in solver.upper_params)  # the inner step wrote no gradient into x
    lower_grads = [p.grad.clone() for p in solver.penalised_params + solver.pure_params]
    solver.upper_step()
    assert changed(middle, snapshot(solver)) == {"x"}
    # ... and the upper step none into y or z
    assert all(
        torch.equal(p.grad, g) for p, g in zip(solver.penalised_params + solver.pure_params, lower_grads)
    )


def test_the_lower_module_is_copied_not_trained():
    lower = Vector(torch.zeros(4))
    solver, _ = make_solver()
    solver2 = sgd_solver(solver.upper_params, solver.upper_loss, solver.lower_loss, lower=lower)
    solver2.step()
    assert torch.equal(lower.w, torch.zeros(4))
    assert solver2.penalised is not lower and solver2.pure is not lower


def test_collapse_without_upper_gradient_in_the_penalised_step():
    """∇_y f switched off: y follows z exactly (same batches and random numbers), and the value gap is 0."""
    solver, _ = make_solver(penalised_upper_grad=False)
    for _ in range(20):
        stats = solver.step()
    for y, z in zip(solver.penalised_params, solver.pure_params):
        assert torch.equal(y, z)
    assert stats["value_gap"] == 0.0
    # and with the term on, they differ
    solver, _ = make_solver()
    solver.step()
    assert not torch.equal(solver.penalised_params[0], solver.pure_params[0])


def test_common_random_numbers_make_the_value_gap_exact_at_y_equal_z():
    """A closure that samples by itself (an RL rollout, say): at y = z the two ∇_x g terms cancel exactly
    with common random numbers (the gap's variance is 0), and not without them."""
    problem = QuadraticProblem.random(dim_x=3, dim_y=4, seed=0)
    x, _ = problem.init()
    upper_loss, lower_loss = problem.closures(x)
    for crn in (True, False):
        solver = PenaltySolver(
            [x],
            Vector(torch.randn(4)),
            upper_loss=upper_loss,
            lower_loss=lambda w, _: lower_loss(w, torch.randn(4)),  # its own noise
            upper_optimizer=SGD,
            lower_optimizer=SGD,
            config=PenaltyConfig(common_random_numbers=crn),
        )
        gaps = [solver.upper_step()["value_gap"] for _ in range(3)]
        assert all(gap == 0.0 for gap in gaps) == crn, gaps


def test_state_dict_resumes_exactly():
    """Save after 5 steps, run 5 more; a fresh solver loaded from the save gives the same 5 steps.
    The batches come from torch's global RNG, which the state restores."""
    torch.manual_seed(0)
    solver, _ = make_solver(seed=3, own_generator=False)
    for _ in range(5):
        solver.step()
    state = copy.deepcopy(solver.state_dict())
    reference = [solver.step() for _ in range(5)]
    live = solver.state_dict()
    final = snapshot(solver)

    torch.manual_seed(123)  # a new process: other random state, fresh variables
    resumed, _ = make_solver(seed=3, own_generator=False)
    resumed.load_state_dict(state)
    assert [resumed.step() for _ in range(5)] == reference
    assert changed(final, snapshot(resumed)) == set()
    assert resumed.outer_step == 10
    # loading a live solver's state shares no optimiser tensor with it
    resumed.load_state_dict(live)
    moments = lambda opt: {id(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    assert not moments(resumed.pure_optimizer) & moments(solver.pure_optimizer)


def test_lambda_schedule():
    assert LambdaSchedule(10.0)(0) == LambdaSchedule(10.0)(1000) == 10.0
    schedule = LambdaSchedule(1.0, power=0.5, lam_max=3.0)
    assert [schedule(t) for t in (0, 3, 8, 100)] == [1.0, 2.0, 3.0, 3.0]
    solver, _ = make_solver(lam=2.0, lam_power=1.0, lam_max=5.0)
    assert [solver.step()["lam"] for _ in range(4)] == [2.0, 4.0, 5.0, 5.0]


def test_projection_and_clipping():
    solver, x = make_solver(max_grad_norm=1e-3)
    solver.project_upper = lambda params: params[0].clamp_(-0.01, 0.01)
    for _ in range(10):
        solver.step()
    assert x.abs().max().item() <= 0.01


def test_optimizer_instances_are_accepted():
    x = torch.zeros(1, requires_grad=True)
    y, z = Vector(torch.zeros(1)), Vector(torch.zeros(1))
    solver = PenaltySolver(
        [x],
        penalised=y,
        pure=z,
        upper_loss=lambda w, _: (w() - 1).square().sum() + x.square().sum(),
        lower_loss=lambda w, _: (w() - x).square().sum(),
        upper_optimizer=torch.optim.SGD([x], lr=0.1),
        penalised_optimizer=torch.optim.SGD(y.parameters(), lr=0.1),
        pure_optimizer=torch.optim.SGD(z.parameters(), lr=0.1),
    )
    solver.step()
    assert solver.penalised is y and x.item() != 0


# ---------------------------------------------------------------------------- bad input
def quadratic_closures():
    x = torch.zeros(2, requires_grad=True)
    return x, (lambda w, _: w().square().sum() + x.sum()), (lambda w, _: (w() - x).square().sum())


def sgd_solver(upper, upper_loss, lower_loss, lower="default", **kwargs) -> PenaltySolver:
    """A plain-SGD solver on a 2-vector lower variable (``lower=None`` with explicit copies in kwargs)."""
    lower = Vector(torch.zeros(2)) if lower == "default" else lower
    return PenaltySolver(
        upper,
        lower,
        upper_loss=upper_loss,
        lower_loss=lower_loss,
        upper_optimizer=SGD,
        lower_optimizer=SGD,
        **kwargs,
    )


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_non_positive_lambda_is_refused(lam):
    with pytest.raises(ValueError, match="λ must be positive"):
        PenaltyConfig(lam=lam)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="inner_steps"):
        PenaltyConfig(inner_steps=0)
    with pytest.raises(ValueError, match="lam_max"):
        PenaltyConfig(lam=10, lam_max=1)


@pytest.mark.parametrize(
    ("which", "bad", "message"),
    [
        ("upper", lambda w, _: w(), r"upper loss f returned a tensor of shape \(2,\) at outer step 0"),
        (
            "lower",
            lambda w, _: torch.tensor(float("nan")) + w().sum(),
            r"lower loss g returned nan at outer step 0",
        ),
        ("lower", lambda w, _: 3.0, "lower loss g returned a float"),
    ],
)
def test_bad_closure_output_names_the_closure_and_step(which, bad, message):
    x, f, g = quadratic_closures()
    solver = sgd_solver([x], bad if which == "upper" else f, bad if which == "lower" else g)
    with pytest.raises(BilevelLossError, match=message):
        solver.step()


def test_nan_appearing_later_is_reported_with_its_step():
    x, f, g = quadratic_closures()
    calls = {"n": 0}

    def flaky_upper(w, batch):
        calls["n"] += 1
        return f(w, batch) * (float("inf") if calls["n"] > 4 else 1.0)

    solver = sgd_solver([x], flaky_upper, g)
    message = r"upper loss f returned -?inf at outer step 2 \(inner step 2\), penalised copy y"
    with pytest.raises(BilevelLossError, match=message):
        for _ in range(5):
            solver.step()


def test_parameters_without_gradients_are_refused():
    x, f, g = quadratic_closures()
    with pytest.raises(
        ValueError, match=r"upper variable x\[0\] \(shape \(2,\)\) does not require gradients"
    ):
        sgd_solver([torch.zeros(2)], f, g)
    with pytest.raises(ValueError, match="penalised lower copy y has no parameter that requires gradients"):
        sgd_solver([x], f, g, lower=nn.Linear(2, 1).requires_grad_(False))


def test_mismatched_copies_are_refused():
    x, f, g = quadratic_closures()
    with pytest.raises(ValueError, match=r"mismatched shapes at tensor 0: \(2,\) vs \(3,\)"):
        sgd_solver([x], f, g, lower=None, penalised=Vector(torch.zeros(2)), pure=Vector(torch.zeros(3)))
    shared = Vector(torch.zeros(2))
    with pytest.raises(ValueError, match="share tensor 0"):
        sgd_solver([x], f, g, lower=None, penalised=shared, pure=shared)
    with pytest.raises(ValueError, match="either `lower`"):
        sgd_solver([x], f, g, lower=None)
    with pytest.raises(TypeError, match="upper_loss must be callable"):
        sgd_solver([x], None, g)


def test_lower_loss_without_graph_is_refused():
    x, f, _ = quadratic_closures()
    solver = sgd_solver([x], f, lambda w, _: x.sum().detach())
    with pytest.raises(BilevelLossError, match="pure copy z does not depend on its parameters"):
        solver.step()


def test_a_lagging_pure_copy_is_reported():
    """z frozen (learning rate 0) while y and x move: g(x, y) < g(x, z) persistently, and the solver
    says so once; a healthy run says nothing."""
    import warnings

    for pure_lr, expect_warning in [(0.0, True), (0.05, False)]:
        solver, _ = make_solver(noise=0.0, gap_patience=20)
        for group in solver.pure_optimizer.param_groups:
            group["lr"] = pure_lr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(60):
                solver.step()
        lagging = [w for w in caught if "not tracking the lower-level optimum" in str(w.message)]
        assert len(lagging) == (1 if expect_warning else 0)


def _scalar_quadratic_solver(pure_lr: float, keep_better_pure: bool, x0: float = 0.0) -> PenaltySolver:
    """x* = 1/2, x_λ = λ/(1 + 2λ) (ALGORITHM.md §7); z's learning rate set apart to make it lag."""
    problem = QuadraticProblem.scalar()
    x, lower = problem.init()
    with torch.no_grad():
        x.fill_(x0)
    return problem_solver(
        problem,
        x,
        lower,
        upper_optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        penalised_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        pure_optimizer=functools.partial(torch.optim.SGD, lr=pure_lr),
        config=PenaltyConfig(lam=10.0, inner_steps=5, keep_better_pure=keep_better_pure, gap_patience=None),
    )


def test_keep_better_pure_restarts_z_from_y_and_steps_x_on_f_alone():
    """At x = 1 with z frozen at 0, y moves towards argmin g = 1 and beats z at g: the upper step then
    uses ∇_x f only (x ← x - η ρ x with f = ½(y - 1)² + ½x²) and copies y into z."""
    solver = _scalar_quadratic_solver(pure_lr=0.0, keep_better_pure=True, x0=1.0)
    for _ in range(solver.config.inner_steps):
        solver.inner_step()
    y, z = solver.penalised.w.item(), solver.pure.w.item()
    assert z == 0.0 and 0.5 * y * y - y < 0.5 * z * z - z  # g(1, y) = ½y² - y: y beats z at g
    stats = solver.upper_step()
    assert stats["value_gap"] < 0
    assert solver.upper_params[0].item() == pytest.approx(1.0 - 0.05 * 1.0, abs=1e-7)
    assert solver.pure.w.item() == solver.penalised.w.item() and stats["pure_restarts"] == 1


def test_keep_better_pure_keeps_a_lagging_z_from_blowing_up_x():
    """Plain Algorithm 1 with a z that cannot follow (frozen) drives the value gap, then x, to infinity;
    with keep_better_pure x stays bounded; with a z that does follow the guard changes nothing: x_λ."""
    unguarded = _scalar_quadratic_solver(pure_lr=0.0, keep_better_pure=False)
    with pytest.raises(BilevelLossError, match="inf|nan"):
        for _ in range(1000):
            unguarded.step()
    guarded = _scalar_quadratic_solver(pure_lr=0.0, keep_better_pure=True)
    for _ in range(1000):
        guarded.step()
    assert abs(guarded.upper_params[0].item()) < 1.0 and guarded.pure_restarts > 0
    healthy = _scalar_quadratic_solver(pure_lr=0.1, keep_better_pure=True)
    for _ in range(3000):
        healthy.step()
    assert healthy.upper_params[0].item() == pytest.approx(10 / 21, abs=1e-5)
    assert healthy.pure_restarts <= 1


def test_keep_better_pure_copies_whole_module_state_and_survives_resume():
    solver, _ = make_solver(keep_better_pure=True)
    solver.copy_penalised_to_pure()
    assert all(torch.equal(a, b) for a, b in zip(solver.penalised_params, solver.pure_params))
    assert solver.pure_params[0] is not solver.penalised_params[0]
    solver.pure_restarts = 3
    other, _ = make_solver(keep_better_pure=True)
    other.load_state_dict(solver.state_dict())
    assert other.pure_restarts == 3
