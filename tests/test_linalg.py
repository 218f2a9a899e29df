"""Batched linear algebra: QR variants, polar, Sylvester/Lyapunov solvers vs scipy."""

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from geolora import linalg
from geolora.linalg import (
    apply_lyapunov_sequence,
    cholesky_qr2,
    eigh_small,
    eigvalsh_small,
    lyapunov_sequence,
    polar,
    polar_overlap,
    qf,
    qr_pos,
    skew,
    solve_lyapunov_core,
    solve_lyapunov_spd,
    solve_sylvester,
    solve_sylvester_gram,
    svd_small,
    sym,
)

f64 = torch.float64


def spd_with_condition(r: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, r, dtype=f64, generator=gen))
    ev = torch.logspace(0, np.log10(cond), r, dtype=f64)
    return q @ torch.diag(ev) @ q.T


def test_sym_skew_split():
    a = torch.randn(3, 5, 5, dtype=f64)
    assert torch.allclose(sym(a) + skew(a), a, atol=1e-15)
    assert torch.allclose(sym(a), sym(a).mT)
    assert torch.allclose(skew(a), -skew(a).mT)


@pytest.mark.parametrize("method", ["householder", "cholesky"])
def test_qr_pos_unique_and_batched(method, device):
    a = torch.randn(4, 30, 6, dtype=f64).to(device)
    q, r = qr_pos(a, method)
    assert torch.allclose(q @ r, a, atol=1e-12)
    assert torch.allclose(q.mT @ q, torch.eye(6, dtype=f64, device=device), atol=1e-12)
    assert bool((torch.diagonal(r, dim1=-2, dim2=-1) > 0).all())
    assert torch.allclose(torch.triu(r), r)
    for i in range(4):
        qi, ri = qr_pos(a[i], method)
        assert torch.allclose(qi, q[i], atol=1e-12) and torch.allclose(ri, r[i], atol=1e-12)


def test_cholesky_qr2_matches_householder_and_falls_back(device):
    a = torch.randn(2, 50, 5, dtype=f64).to(device)
    q1, r1 = cholesky_qr2(a)
    q2, r2 = qr_pos(a, "householder")
    assert torch.allclose(q1, q2, atol=1e-12) and torch.allclose(r1, r2, atol=1e-10)
    a[1, :, 2] = 0.0  # rank deficient: Cholesky fails, Householder fallback keeps Q R = A
    q, r = cholesky_qr2(a)
    assert torch.isfinite(q).all()
    assert torch.allclose(q @ r, a, atol=1e-12)


def test_qf_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown QR method"):
        qf(torch.randn(5, 2), "magic")


def test_polar_is_closest_orthonormal():
    a = torch.randn(3, 20, 4, dtype=f64)
    p = polar(a)
    assert torch.allclose(p.mT @ p, torch.eye(4, dtype=f64), atol=1e-12)
    # Pᵀ A is symmetric positive definite for the polar factor.
    h = p.mT @ a
    assert torch.allclose(h, h.mT, atol=1e-12)
    assert bool((torch.linalg.eigvalsh(h) > 0).all())


@pytest.mark.parametrize("r", [1, 8, 32])
def test_polar_overlap_equals_the_svd_polar_factor(r):
    """Newton–Schulz on overlaps of frames: nearby frames, a signed permutation (columns that
    swapped order), unrelated frames (small singular values) and a singular overlap (the SVD
    fallback) all give :func:`polar`'s factor; the 2-D input too."""
    gen = torch.Generator().manual_seed(r)
    u = torch.linalg.qr(torch.randn(6, 50, r, dtype=f64, generator=gen))[0]
    near = torch.linalg.qr(u + 1e-2 * torch.randn(u.shape, dtype=f64, generator=gen))[0]
    far = torch.linalg.qr(torch.randn(u.shape, dtype=f64, generator=gen))[0]
    perm = torch.eye(r, dtype=f64)[torch.randperm(r, generator=gen)]
    c = torch.cat([u.mT @ near, (u.mT @ near) @ (-perm), u.mT @ far])
    c[-1, :, 0] = 0.0  # singular: no Newton–Schulz limit, the SVD's factor
    got, want = polar_overlap(c), polar(c)
    assert float((got - want).abs().max()) < 1e-13
    assert float((got.mT @ got - torch.eye(r, dtype=f64)).abs().max()) < 1e-13
    assert float((polar_overlap(c[0]) - want[0]).abs().max()) < 1e-13


def test_solve_sylvester_gram_matches_scipy_100_cases():
    """G_M G_N K + K G_M G_N = C vs scipy.linalg.solve_sylvester on 100 batched cases with
    condition numbers of G_M, G_N from 1 to 1e8.

    The forward difference between any two backward-stable solvers is ~cond(A)·eps with
    cond(A) ≈ cond(G_M)·cond(G_N); measured (r=6, worst of 10): 1e-15 at (1, 1), 5e-10 at
    (1e4, 1e4), 1e-5 at (1e4, 1e8), 5e-2 at (1e8, 1e8) — with residuals equal to scipy's. So we
    assert 1e-10 agreement where cond(G_M)·cond(G_N) <= 1e6 and, everywhere, a residual no worse
    than 10x scipy's or ``eps·cond(A)`` (capped at 1e-10): the similarity route is not strictly
    backward stable like scipy's Bartels–Stewart, and with another LAPACK build (torch 2.11,
    scipy 1.18 on the GPU machine) one (1e3, 1e2) case had 17x scipy's residual, 6e-12 =
    0.3·eps·cond(A).
    """
    gen = torch.Generator().manual_seed(0)
    conds = np.logspace(0, 8, 9)
    cases = []
    for i in range(100):
        r = 2 + i % 7
        cm, cn = float(conds[i % 9]), float(conds[(i // 9) % 9])
        cases.append(
            (
                r,
                cm,
                cn,
                spd_with_condition(r, cm, gen),
                spd_with_condition(r, cn, gen),
                torch.randn(r, r, dtype=f64, generator=gen),
            )
        )
    checked_tight = 0
    for r in range(2, 9):
        group = [c for c in cases if c[0] == r]
        K = solve_sylvester_gram(
            torch.stack([c[3] for c in group]),
            torch.stack([c[4] for c in group]),
            torch.stack([c[5] for c in group]),
        )
        for j, (_, cm, cn, gm, gn, c) in enumerate(group):
            A, C, Kj = (gm @ gn).numpy(), c.numpy(), K[j].numpy()
            ref = sla.solve_sylvester(A, A, C)

            def resid(X, A=A, C=C):
                return np.linalg.norm(A @ X + X @ A - C) / np.linalg.norm(C)

            rel = np.linalg.norm(Kj - ref) / np.linalg.norm(ref)
            if cm * cn <= 1e6:
                assert rel < 1e-10, (cm, cn, rel)
                checked_tight += 1
            bound = max(10 * resid(ref), min(np.finfo(np.float64).eps * cm * cn, 1e-10))
            assert resid(Kj) <= bound + 1e-14, (cm, cn, resid(Kj), resid(ref))
    assert checked_tight >= 40


def test_solve_sylvester_gram_damping():
    gm = torch.zeros(3, 3, dtype=f64)
    gn = spd_with_condition(3, 10.0, torch.Generator().manual_seed(1))
    c = torch.randn(3, 3, dtype=f64)
    k = solve_sylvester_gram(gm, gn, c, damping=1e-3)
    a = (gm + 1e-3 * torch.eye(3, dtype=f64)) @ (gn + 1e-3 * torch.eye(3, dtype=f64))
    assert torch.allclose(a @ k + k @ a, c, atol=1e-9)
    with pytest.raises(ValueError, match="damping"):
        solve_sylvester_gram(gm, gn, c, damping=-1.0)


def test_solve_sylvester_general_spd():
    gen = torch.Generator().manual_seed(2)
    a = spd_with_condition(4, 1e3, gen)
    b = spd_with_condition(5, 1e2, gen)
    c = torch.randn(4, 5, dtype=f64, generator=gen)
    x = solve_sylvester(a, b, c)
    ref = sla.solve_sylvester(a.numpy(), b.numpy(), c.numpy())
    assert np.abs(x.numpy() - ref).max() / np.abs(ref).max() < 1e-10


def test_lyapunov_core_solves_its_equation():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 5, dtype=f64, generator=gen)
    s = torch.randn(6, 5, 5, dtype=f64, generator=gen)
    k = solve_lyapunov_core(w, s)
    a = w @ w.mT
    assert torch.allclose(a @ k + k @ a, s @ w.mT, atol=1e-10)


def _core(r: int, cond_w: float, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A core ``W = P diag(s) Qᵀ`` with ``cond(W) = cond_w`` and a right-hand side ``S``."""
    p = torch.linalg.qr(torch.randn(batch, r, r, dtype=f64, generator=gen))[0]
    q = torch.linalg.qr(torch.randn(batch, r, r, dtype=f64, generator=gen))[0]
    s = torch.logspace(0, -np.log10(cond_w), r, dtype=f64)
    return (p * s) @ q.mT, torch.randn(batch, r, r, dtype=f64, generator=gen)


@pytest.mark.parametrize("method", ["newton", "schulz"])
@pytest.mark.parametrize("r", [3, 16, 40])
def test_sign_iteration_lyapunov_matches_svd_route(method, r, device):
    """``A X + X A = C`` with ``A = W Wᵀ`` by the SVD-free sign iterations equals the SVD closed
    form; the forward error grows like ``cond(A) · eps = cond(W)² · eps``: < 1e-12 at
    ``cond(W) = 10`` and < 1e-9 at ``cond(W) = 1e3`` (measured 3e-15 / 1.5e-11)."""
    gen = torch.Generator().manual_seed(r)
    for cond_w, tol in ((10.0, 1e-12), (1e3, 1e-9)):
        w, s = (t.to(device) for t in _core(r, cond_w, 5, gen))
        ref = solve_lyapunov_core(w, s)
        a, c = w @ w.mT, s @ w.mT
        x = solve_lyapunov_spd(a, c, method)
        assert ((x - ref).norm() / ref.norm()).item() < tol
        # the C-independent sequence serves several right-hand sides
        seq = lyapunov_sequence(a, method)
        x2 = apply_lyapunov_sequence(seq, 2.0 * c)
        assert torch.allclose(x2, 2.0 * x, rtol=1e-12, atol=0)


def test_sign_iteration_converges_fast_and_rejects_unknown_methods():
    gen = torch.Generator().manual_seed(0)
    w, _ = _core(16, 1e5, 4, gen)  # cond(A) = 1e10
    assert len(lyapunov_sequence(w @ w.mT, "newton").steps) <= 12  # quadratic (measured 8)
    assert len(lyapunov_sequence(w @ w.mT, "schulz").steps) <= 80  # linear (measured 63)
    with pytest.raises(ValueError, match="method"):
        lyapunov_sequence(w, "eig")


@pytest.mark.parametrize("method", ["newton", "schulz"])
def test_sign_iteration_singular_a_gives_nan_not_a_wrong_solution(method, device):
    """A singular ``A`` (a rank-deficient core ``W``) in one batch element: that element's
    solution is NaN (so an optimizer's finiteness check raises, like the SVD route's division
    by zero), the other elements are still solved to full accuracy."""
    gen = torch.Generator().manual_seed(2)
    w, s = _core(6, 10.0, 3, gen)
    w[1, :, -1] = 0.0  # rank 5
    w, s = w.to(device), s.to(device)
    a, c = w @ w.mT, s @ w.mT
    x = solve_lyapunov_spd(a, c, method)
    assert bool(torch.isnan(x[1]).all())
    # an exactly singular A (Cholesky fails outright) gives NaN too, not a LinAlgError
    x0 = solve_lyapunov_spd(torch.zeros_like(a), c, method)
    assert bool(torch.isnan(x0).all())
    ref = solve_lyapunov_core(w[[0, 2]], s[[0, 2]])
    assert ((x[[0, 2]] - ref).norm() / ref.norm()).item() < 1e-12


def test_small_decompositions_match_torch(device):
    """``eigh_small`` / ``eigvalsh_small`` / ``svd_small`` (routed through the CPU for n > 32 on
    accelerators) equal ``torch.linalg`` on the device, and return tensors on the device."""
    gen = torch.Generator().manual_seed(5)
    for n in (8, 40):
        a = torch.randn(3, n, n, dtype=f64, generator=gen).to(device)
        s = a + a.mT
        lam, q = eigh_small(s)
        assert lam.device == s.device and q.device == s.device
        assert torch.allclose(q @ torch.diag_embed(lam) @ q.mT, s, atol=1e-12)
        assert torch.allclose(eigvalsh_small(s), torch.linalg.eigvalsh(s), atol=1e-12)
        u, sig, vh = svd_small(a)
        assert sig.device == a.device
        assert torch.allclose(u @ torch.diag_embed(sig) @ vh, a, atol=1e-12)
        assert torch.allclose(sig, torch.linalg.svdvals(a), atol=1e-12)


def test_host_map_threads_give_the_same_bits():
    """The threaded host route splits the batch and joins the chunks: each matrix is decomposed
    by the same LAPACK call, so the results are bitwise those of one batched call (also with
    leading batch dimensions and a batch that does not split evenly); bad settings are refused."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 11, 9, 9, dtype=f64, generator=gen)
    s = a + a.mT
    ref = (torch.linalg.eigh(s), torch.linalg.eigvalsh(s), torch.linalg.svd(a))
    old = linalg.HOST_THREADS
    with linalg.use_host_threads(3):
        got = (
            linalg.host_map(torch.linalg.eigh, s),
            linalg.host_map(torch.linalg.eigvalsh, s),
            linalg.host_map(torch.linalg.svd, a),
        )
    assert linalg.HOST_THREADS == old
    assert torch.equal(got[1], ref[1])
    for g, r in ((got[0], ref[0]), (got[2], ref[2])):
        assert len(g) == len(r)
        for x, y in zip(g, r):
            assert x.shape == y.shape and torch.equal(x, y)
    for bad in (0, -1, 2.0, "4"):
        with pytest.raises(ValueError, match="host threads"):
            linalg.set_host_threads(bad)
