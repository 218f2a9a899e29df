"""Precision and the fast paths of the optimizer step (issue 8).

* bf16 parameters: AdamS, LRACS, LoRA-RITE and ScaledGD trained 500 steps on a tiny noisy
  low-rank regression end within 1.5x of the fp32 run's loss (no precision collapse), with
  every optimizer state tensor in float32 (``r x r`` statistics: float64), never bf16;
* the fast paths equal the reference formulas in float64: the ``r x r`` metric norm of a lift
  (every metric, with and without damping, balanced and unbalanced gauges) and at the balanced
  representative, the ``r x r`` transport, ``mm_t`` / ``addmm_t``, the blocked dense Adam;
* Lifted(Adam) in float32 stays close to float64 (the descent is an exact difference);
* batched == per pair (``foreach``) to 1e-12 in float64 for every optimizer of the zoo while the
  persistent stacked state buffers are invalidated: a pair without gradient for a step (the
  bucket changes) and a ``state_dict`` round trip into a fresh optimizer mid-run; the
  per-file ``foreach`` tests cover the plain runs;
* the buffers: per-pair states are views of one stacked buffer per bucket, and a step whose
  update is not finite leaves every state tensor unchanged (also for the optimizers that hand
  their buffers to the hook without a copy).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from devices import DEVICES
from optim_zoo import ZOO, ZooEntry, zoo_ids

from geolora.linalg import addmm_t, mm_t, transpose
from geolora.manifolds import metrics as metrics_mod
from geolora.manifolds.frame import (
    make_frame,
    project_dense,
    project_factor_grads,
    tangent_to_dense,
)
from geolora.manifolds.metrics import (
    ACCELERATOR_SOLVER,
    FrameCore,
    core_solver,
    get_metric,
    use_core_solver,
)
from geolora.manifolds.quotient import assemble_lift
from geolora.manifolds.types import FactorPoint, FixedRankTangent
from geolora.optim.geometry import QuotientGeometry, QuotientPoint, to_tangent
from geolora.optim.lifted import AdamS, LiftedOptimizer
from geolora.optim.lora_rite import LoRARite
from geolora.optim.lracs import LRACS, balanced_representative_norm
from geolora.optim.preconditioners import AdamPreconditioner, StepContext, transport_factored
from geolora.optim.preconditioners import adam as pre_mod
from geolora.optim.scaled import ScaledGD
from geolora.optim.wrap import Lifted

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- bf16 parameters ----------------------------------------------------------------------------
SHAPES = ((16, 12), (16, 12), (10, 14))
RANK = 4


def noisy_lowrank_problem() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per pair: target ``X* = U diag(3, 2) Vᵀ + 0.05 noise`` (so the best rank-4 loss is the
    noise floor ≈ 0.26 in total, not 0) and a random full-rank start ``(B, A)``, float32."""
    g = _gen(0)
    out = []
    for m, n in SHAPES:
        u = torch.linalg.qr(torch.randn(m, 2, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, 2, generator=g))[0]
        Xs = u @ torch.diag(torch.tensor([3.0, 2.0])) @ v.T + 0.05 * torch.randn(m, n, generator=g)
        out.append((Xs, 0.3 * torch.randn(m, RANK, generator=g), 0.3 * torch.randn(RANK, n, generator=g)))
    return out


def train_regression(factory, dtype: torch.dtype, steps: int, device: str = "cpu"):
    """Train the pairs (parameters of ``dtype``, loss in float32); return (first, last) loss and
    the optimizer."""
    prob = [tuple(t.to(device) for t in p) for p in noisy_lowrank_problem()]
    groups = [
        {
            "params": [torch.nn.Parameter(B.to(dtype)), torch.nn.Parameter(A.to(dtype))],
            "lora_pair": True,
            "name": f"l{i}",
        }
        for i, (_, B, A) in enumerate(prob)
    ]
    opt = factory(groups)

    def loss_fn() -> torch.Tensor:
        return sum(
            0.5 * ((g["params"][0].float() @ g["params"][1].float() - Xs) ** 2).sum()
            for g, (Xs, _, _) in zip(groups, prob)
        )

    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn().item()
    for g in groups:
        assert all(p.dtype == dtype for p in g["params"])
    return first, last, opt


BF16_CASES = {
    "adams": lambda g: AdamS(g, lr=1e-2, robust_steps=0),
    "lracs": lambda g: LRACS(g, lr=1e-2, robust_steps=0),
    "lora_rite": lambda g: LoRARite(g, lr=3e-2),
    "scaledgd": lambda g: ScaledGD(g, lr=0.1, momentum=0.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_parameters_train_like_fp32(name: str, device: str) -> None:
    first32, last32, _ = train_regression(BF16_CASES[name], torch.float32, 500, device)
    first16, last16, opt = train_regression(BF16_CASES[name], torch.bfloat16, 500, device)
    assert last32 < 0.05 * first32, f"fp32 run did not converge: {first32} -> {last32}"
    assert math.isfinite(last16) and last16 < 1.5 * last32, (
        f"bf16 loss {last16:.4g} vs fp32 {last32:.4g} (start {first16:.4g})"
    )
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("step",):
                big = v.dim() >= 1 and v.shape[-1] > RANK or v.dim() >= 2 and v.shape[-2] > RANK
                assert v.dtype == torch.float32 or (v.dtype == F64 and not big), (
                    f"state {k!r} is {v.dtype}{tuple(v.shape)}"
                )


# --- fast paths == reference formulas (float64) --------------------------------------------------
def _point(gauge: str, L: int = 3, m: int = 17, n: int = 11, r: int = 4, seed: int = 1):
    g = _gen(seed)
    M = torch.randn(L, m, r, dtype=F64, generator=g)
    N = torch.randn(L, n, r, dtype=F64, generator=g)
    if gauge == "diag1e3":
        R = torch.diag(torch.tensor([1e3] + [1.0] * (r - 2) + [1e-3], dtype=F64))
        M, N = M @ R, N @ torch.linalg.inv(R).mT
    frame = make_frame(M, N)
    t = project_dense(frame, torch.randn(L, m, n, dtype=F64, generator=g))
    return FactorPoint(M, N), frame, t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("gauge", ["identity", "diag1e3"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("metric_name", ["balanced", "preconditioned", "flat"])
def test_lift_sqnorm_equals_inner_of_assembled_lift(metric_name, damping, gauge) -> None:
    metric = get_metric(metric_name, damping)
    x, frame, t = _point(gauge)
    u = assemble_lift(frame, t, metric.lift_coefficients(frame, t.M))
    ref = metric.inner(x, u, u)
    assert _rel(metric.lift_sqnorm(frame, t), ref) < 1e-11
    # a shared FrameCore gives the same coefficients as a fresh one
    core = FrameCore.of(frame)
    for a, b in zip(metric.coefficients(frame, t.M, core), metric.lift_coefficients(frame, t.M)):
        assert _rel(a, b) < 1e-13


@pytest.mark.parametrize("solver", ["svd", "newton", "schulz"])
@pytest.mark.parametrize("gauge", ["identity", "diag1e3"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("metric_name", ["balanced", "preconditioned"])
def test_balanced_representative_norm_r_by_r_route(metric_name, damping, gauge, solver) -> None:
    """The ``r x r`` route (with each :class:`FrameCore` solver) equals the metric's inner
    product of the lift assembled at the balanced representative ``(U Φ Σ^{1/2}, V Ψ Σ^{1/2})``
    (the reference formula)."""
    metric = get_metric(metric_name, damping)
    _, frame, t = _point(gauge)
    phi, sig, psi_h = torch.linalg.svd(frame.RM @ frame.RN.mT)
    psi = psi_h.mT
    root = torch.diag_embed(sig.sqrt())
    Ub, Vb = frame.U @ phi, frame.V @ psi
    bal = type(frame)(Ub, root, Vb, root)
    tb = FixedRankTangent(phi.mT @ t.M @ psi, t.Up @ psi, t.Vp @ phi)
    u = assemble_lift(bal, tb, metric.lift_coefficients(bal, tb.M))
    ref = metric.inner(FactorPoint(Ub @ root, Vb @ root), u, u).sqrt()
    with use_core_solver(solver):
        assert _rel(balanced_representative_norm(metric, frame, t), ref) < 1e-11


def test_transport_and_transposed_products_match_dense() -> None:
    x, frame, t = _point("diag1e3")
    g = _gen(4)
    x2 = FactorPoint(x.M + 0.1 * torch.randn_like(x.M), x.N + 0.1 * torch.randn_like(x.N))
    new = make_frame(*x2)
    got = transport_factored(new, frame.U, frame.V, t)
    ref = project_dense(new, tangent_to_dense(frame, t))
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-12
    a = torch.randn(3, 40, 5, dtype=F64, generator=g)
    b = torch.randn(3, 5, 6, dtype=F64, generator=g)
    c = torch.randn(3, 40, 6, dtype=F64, generator=g)
    assert _rel(mm_t(a, b), a @ b) < 1e-14
    assert _rel(addmm_t(c, a, b, beta=0.5, alpha=-2.0), 0.5 * c - 2.0 * (a @ b)) < 1e-14
    assert _rel(addmm_t(c[0], a[0], b[0], beta=0.5, alpha=-2.0), 0.5 * c[0] - 2.0 * (a[0] @ b[0])) < 1e-14


@pytest.mark.parametrize(
    "options",
    [{}, {"low_memory": True}, {"riemannian_second_moment": True}],
    ids=["full", "low_memory", "riemannian_v"],
)
def test_blocked_dense_adam_equals_whole_tensor_update(options, monkeypatch) -> None:
    """The cache-blocked loop of AdamPreconditioner (blocks of 2 pairs forced here) computes the
    same step and state as the whole-tensor formulation, over 3 steps."""
    x, frame, _ = _point("identity", L=5)
    geometry = QuotientGeometry("balanced")
    ctx = StepContext(geometry, QuotientPoint(x, frame, geometry), {}, 17, 11, 4)
    hp = {"betas": (0.9, 0.99), "eps": 1e-8}
    pre = AdamPreconditioner(**options)
    states = [pre.init_state(17, 11, 4, x.M.new_zeros(())) for _ in range(2)]
    states = [{k: v.expand((5,) + v.shape).clone() for k, v in st.items()} for st in states]
    monkeypatch.setattr(pre_mod, "DENSE_BLOCK_BYTES", 2 * 17 * 11 * 8)
    g = _gen(9)
    for step in (1, 2, 3):
        xi = project_factor_grads(
            frame,
            torch.randn(5, 17, 4, dtype=F64, generator=g),
            torch.randn(5, 11, 4, dtype=F64, generator=g),
        )
        blocked = to_tangent(frame, pre.update(states[0], xi, ctx, hp, step))
        whole = to_tangent(frame, pre._update_dense(states[1], xi, ctx, hp, step))
        for a, b in zip(blocked, whole):
            assert _rel(a, b) < 1e-13
        for k in states[0]:
            assert _rel(states[0][k], states[1][k]) < 1e-13 or not states[1][k].abs().max() > 0


def test_lifted_adam_fp32_step_matches_fp64() -> None:
    """The shadow descent ``X − X̃_after`` is an exact difference, so a float32 Lifted(Adam)
    follows the float64 run closely (3 steps, change of X relative error)."""

    def run(dtype: torch.dtype) -> torch.Tensor:
        g = _gen(1)
        B = torch.nn.Parameter((3 * torch.randn(40, 4, generator=g, dtype=F64)).to(dtype))
        A = torch.nn.Parameter(torch.randn(4, 30, generator=g, dtype=F64).to(dtype))
        T = torch.randn(40, 30, generator=g, dtype=F64).to(dtype)
        opt = Lifted(torch.optim.Adam)([{"params": [B, A], "lora_pair": True}], lr=1e-2)
        X0 = (B @ A).detach().double()
        for _ in range(3):
            opt.zero_grad()
            ((B @ A - T) ** 2).sum().backward()
            opt.step()
        return (B @ A).detach().double() - X0

    d64, d32 = run(F64), run(torch.float32)
    assert ((d32 - d64).norm() / d64.norm()).item() < 2e-4


# --- batched == per pair while the stacked buffers are invalidated --------------------------------
def _zoo_groups(seed: int = 3, device: str = "cpu"):
    g = _gen(seed)
    shapes = [(12, 10, 3)] * 3 + [(9, 13, 2)]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=F64, generator=g).to(device)

    pairs = [(torch.nn.Parameter(rand(m, r)), torch.nn.Parameter(rand(r, n))) for m, n, r in shapes]
    targets = [rand(m, n) for m, n, _ in shapes]
    head = torch.nn.Parameter(rand(5))
    groups = [
        {"params": [B, A], "lora_pair": True, "name": f"l{i}"} for i, (B, A) in enumerate(pairs)
    ]
    return groups + [{"params": [head]}], pairs, head, targets


def _build(entry: ZooEntry, groups, foreach: bool):
    kw = {"foreach": foreach}
    if entry.robust_start:
        kw["robust_steps"] = 0
    return entry.factory(groups, **kw)


def _run_with_invalidations(
    entry: ZooEntry, foreach: bool, device: str = "cpu", invalidate: bool = True
) -> list[torch.Tensor]:
    groups, pairs, head, targets = _zoo_groups(device=device)
    opt = _build(entry, groups, foreach)
    for t in range(8):
        opt.zero_grad(set_to_none=True)
        loss = (head**2).sum()
        for i, ((B, A), X) in enumerate(zip(pairs, targets)):
            if invalidate and t == 3 and i == 1:
                continue  # no gradient for pair 1: the 3-pair bucket becomes a 2-pair bucket
            loss = loss + 0.5 * ((B @ A - (1 + 0.1 * t) * X) ** 2).sum()
        loss.backward()
        opt.step()
        if invalidate and t == 4:  # round trip into a fresh optimizer: no stacked buffers yet
            sd = copy.deepcopy(opt.state_dict())
            opt = _build(entry, groups, foreach)
            opt.load_state_dict(sd)
    return [p.detach().cpu().clone() for BA in pairs for p in BA] + [head.detach().cpu().clone()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_batched_equals_per_pair_across_buffer_invalidation(entry: ZooEntry, device: str) -> None:
    batched = _run_with_invalidations(entry, True, device)
    looped = _run_with_invalidations(entry, False, device)
    for a, b in zip(batched, looped):
        assert (a - b).abs().max().item() < 1e-12 * max(1.0, b.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_cuda_follows_cpu(entry: ZooEntry) -> None:
    """Same float64 trajectory on CUDA (CholeskyQR2 frames, cuSOLVER) as on CPU, 8 steps.

    Compared are the products ``X = B A`` and the ordinary parameter, not the factors: LoRAM
    writes back ``B = U S``, ``A = Vᵀ`` from an SVD whose singular-vector signs are a convention
    of the library (cuSOLVER's differ from LAPACK's), so its factors may differ by column signs
    while ``X`` is the same (measured on an H100: factors 11.6 apart, products equal)."""
    cpu = _products(_run_with_invalidations(entry, True, "cpu", invalidate=False))
    cuda = _products(_run_with_invalidations(entry, True, "cuda", invalidate=False))
    for a, b in zip(cuda, cpu):
        assert (a - b).abs().max().item() < 1e-8 * max(1.0, b.abs().max().item())


def _products(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[B₁A₁, B₂A₂, …, head]`` from the ``[B₁, A₁, B₂, A₂, …, head]`` of a run."""
    return [params[i] @ params[i + 1] for i in range(0, len(params) - 1, 2)] + [params[-1]]


LIFTED = [e for e in ZOO if issubclass(e.cls, LiftedOptimizer)]


@pytest.mark.parametrize("solver", ["newton", "schulz"])
@pytest.mark.parametrize("entry", LIFTED, ids=zoo_ids(LIFTED))
def test_svd_free_core_solver_follows_svd_route(entry: ZooEntry, solver: str, device: str) -> None:
    """The SVD-free Lyapunov solvers of :class:`FrameCore` (the accelerator route for r > 32)
    give the SVD route's float64 trajectory (8 steps, lift and metric norms) to 1e-9."""
    with use_core_solver("svd"):
        ref = _run_with_invalidations(entry, True, device, invalidate=False)
    with use_core_solver(solver):
        got = _run_with_invalidations(entry, True, device, invalidate=False)
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() < 1e-9 * max(1.0, b.abs().max().item())


def test_core_solver_choice(monkeypatch) -> None:
    """SVD on CPU and for r <= 32; the sign iteration on accelerators above r = 32; overridable."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert core_solver(cpu, 64) == "svd" and core_solver(cuda, 32) == "svd"
    assert core_solver(cuda, 64) == ACCELERATOR_SOLVER
    with use_core_solver("schulz"):
        assert core_solver(cpu, 4) == "schulz"
    assert core_solver(cpu, 4) == "svd"
    with pytest.raises(ValueError, match="core solver"), use_core_solver("eig"):
        pass
    monkeypatch.setattr(metrics_mod, "_solver_override", "qr")  # a bad GEOLORA_CORE_SOLVER
    with pytest.raises(ValueError, match="GEOLORA_CORE_SOLVER='qr'"):
        core_solver(cpu, 4)


def test_pair_states_are_views_of_one_buffer_per_bucket() -> None:
    groups, pairs, head, targets = _zoo_groups()
    opt = LoRARite(groups, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(0.5 * ((B @ A - X) ** 2).sum() for (B, A), X in zip(pairs, targets)).backward()
        opt.step()
    states = [opt.state[B] for B, _ in pairs[:3]]  # the three same-shape pairs
    for k in ("exp_avg_M", "basis_U", "exp_avg_sq_N"):
        ptrs = {st[k].untyped_storage().data_ptr() for st in states}
        assert len(ptrs) == 1, f"{k}: the same-shape pairs do not share one buffer"
    # load_state_dict replaces the tensors (here: views of the deep copy's storage); the next
    # step stacks them into a new buffer of the optimizer's own
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    states = [opt.state[B] for B, _ in pairs[:3]]
    loaded = {st["exp_avg_M"].untyped_storage().data_ptr() for st in states}
    opt.zero_grad()
    sum(0.5 * ((B @ A - X) ** 2).sum() for (B, A), X in zip(pairs, targets)).backward()
    opt.step()
    now = {st["exp_avg_M"].untyped_storage().data_ptr() for st in states}
    assert len(now) == 1 and now != loaded


FAILING = {
    "adams (functional state)": lambda g: AdamS(g, lr=1e-2, robust_steps=0),
    "lora_rite (functional state)": lambda g: LoRARite(g, lr=1e-2),
    "lifted_adam (state updated in place)": lambda g: Lifted(torch.optim.Adam)(g, lr=1e-2),
}


@pytest.mark.parametrize("name", list(FAILING))
def test_non_finite_update_leaves_state_untouched(name: str) -> None:
    """A factor that loses rank after the first steps makes the update non-finite: step()
    raises and neither the parameters nor any state tensor (persistent buffers) changed."""
    groups, pairs, head, targets = _zoo_groups()
    groups = groups[:3]
    pairs = pairs[:3]
    opt = FAILING[name](groups)

    def closure_loss() -> torch.Tensor:
        return sum(0.5 * ((B @ A - X) ** 2).sum() for (B, A), X in zip(pairs, targets))

    for _ in range(2):
        opt.zero_grad()
        closure_loss().backward()
        opt.step()
    with torch.no_grad():
        pairs[1][0][:, 0] = 0.0  # rank r − 1
    opt.zero_grad()
    closure_loss().backward()
    before_params = [p.detach().clone() for BA in pairs for p in BA]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, q in zip(before_params, [p for BA in pairs for p in BA]):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for idx, st in before["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after["state"][idx][k]), f"state {k!r} of param {idx} changed"


def test_transposed_layout_helpers_keep_values() -> None:
    """``mm_t`` returns the column-major layout that the tall products expect."""
    a = torch.randn(2, 30, 4, dtype=F64)
    b = torch.randn(2, 4, 4, dtype=F64)
    out = mm_t(a, b)
    assert transpose(out).is_contiguous() and torch.allclose(out, a @ b, rtol=0, atol=1e-13)
