"""Batched linear algebra for low-rank geometry.

Every routine accepts leading batch dimensions ``(..., m, r)`` so that same-shape LoRA layers
can be stacked and processed in one call. Small ``r x r`` problems (Sylvester / Lyapunov solves,
eigendecompositions) run in float64 by default: they are cheap and their conditioning is the
square of the factors' (``docs/design.md``, "Small r × r problems in float64").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "sym",
    "skew",
    "transpose",
    "gram64",
    "mm_t",
    "addmm_t",
    "cat_columns",
    "compute_dtype",
    "qr_pos",
    "qf",
    "cholesky_qr2",
    "polar",
    "polar_overlap",
    "solve_sylvester",
    "solve_sylvester_gram",
    "solve_lyapunov_core",
    "tri_solve_right",
    "check_finite",
    "rank_deficient",
]


def transpose(a: Tensor) -> Tensor:
    """Swap the last two dimensions (batched ``Aᵀ``)."""
    return a.transpose(-1, -2)


def mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``A B`` evaluated as ``(Bᵀ Aᵀ)ᵀ``: same values, result in column-major ("tall") layout.

    For a tall result ``(..., m, r)`` with small ``r`` (``U A``, ``Z V``, ``Zᵀ U``) CPU BLAS
    is several times faster this way (measured, MKL, r = 8: 3x for ``(24, 384, 8) @ (24, 8, 8)``,
    3-7x for ``(24, 384, 384) @ (24, 384, 8)``; equal for r ≥ 16), and the column-major result
    matches the layout of ``torch.linalg.qr``'s ``Q`` and of triangular solves, so the next
    products stay fast.
    """
    return transpose(transpose(b) @ transpose(a))


def gram64(f: Tensor) -> Tensor:
    """``FᵀF`` in float64, ``(..., k, r) -> (..., r, r)`` (products of float32 entries are exact
    in float64). A column-major ``F`` (``Fᵀ`` contiguous, like the stacked ``N = Aᵀ``) is
    evaluated as ``Fᵗ (Fᵗ)ᵀ`` on the converted ``Fᵀ``, which CPU BLAS runs 1.3-2x faster at small
    ``r`` than ``FᵀF`` on a row-major ``F`` (measured, MKL, ``(24, 384, r)``, r = 8 and 32); a
    transposing copy to get there from a row-major ``F`` would cost more than it saves."""
    if f.dim() >= 2 and transpose(f).is_contiguous() and not f.is_contiguous():
        ft = transpose(f).to(torch.float64)
        return ft @ transpose(ft)
    f64 = f.to(torch.float64)
    return transpose(f64) @ f64


def cat_columns(a: Tensor, b: Tensor) -> Tensor:
    """``[a b]`` along the last dimension, stored column-major (LAPACK's layout, so a QR that
    follows needs no transposed copy, and the products with these tall factors prefer it).
    ``(..., p, k₁), (..., p, k₂) -> (..., p, k₁ + k₂)``."""
    return transpose(torch.cat([transpose(a), transpose(b)], dim=-2))


def addmm_t(c: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``β C + α A B`` (batched) in one ``baddbmm`` for 3-D operands, evaluated transposed like
    :func:`mm_t` (column-major result); other shapes fall back to ``matmul``."""
    if c.dim() == 3 and a.dim() == 3 and b.dim() == 3:
        out = torch.baddbmm(transpose(c), transpose(b), transpose(a), beta=beta, alpha=alpha)
        return transpose(out)
    out = a @ b
    if alpha != 1.0:
        out = alpha * out
    return out + (c if beta == 1.0 else beta * c)


def sym(a: Tensor) -> Tensor:
    """Symmetric part ``(A + Aᵀ) / 2`` over the last two dimensions."""
    return 0.5 * (a + transpose(a))


def skew(a: Tensor) -> Tensor:
    """Skew-symmetric part ``(A − Aᵀ) / 2`` over the last two dimensions."""
    return 0.5 * (a - transpose(a))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working dtype for points and states: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite(name: str, *tensors: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if any tensor holds NaN or inf."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def rank_deficient(t: Tensor, rtol: float | None = None) -> bool:
    """``True`` if the matrix ``t: (p, k)`` is numerically rank deficient: ``σ_min(t) ≤ rtol ·
    σ_max(t)`` or ``t = 0``. Singular values in ``t``'s compute dtype; ``rtol`` defaults to 1e-12
    in float64 and 1e-6 otherwise."""
    t = t.detach().to(compute_dtype(t.dtype))
    if rtol is None:
        rtol = 1e-12 if t.dtype == torch.float64 else 1e-6
    s = torch.linalg.svdvals(t)
    return not (bool(s[0] > 0) and bool(s[-1] > rtol * s[0]))


def _sign_fix(q: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    # Make diag(R) >= 0 so the factorization is unique and continuous in A.
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    s = torch.where(d < 0, -1.0, 1.0).to(d.dtype)
    return q * s.unsqueeze(-2), r * s.unsqueeze(-1)


def cholesky_qr2(a: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR by CholeskyQR2 (two Cholesky–QR passes), with a Householder fallback.

    ``AᵀA = LLᵀ``, ``Q₁ = A L⁻ᵀ``; repeat on ``Q₁``; ``R = R₂ R₁``. It needs only an ``r x r``
    Cholesky factorization and a triangular solve, which on GPUs is ~25x faster than batched
    Householder QR of tall factors (``docs/design.md``, "GPU costs"). Unconditionally stable for
    cond(A) ≲ 1e7 in fp64 (≲ 1e3 in fp32); batches whose Cholesky fails fall back to
    ``torch.linalg.qr``. Returns ``(Q, R)`` with ``Q: (..., m, r)`` orthonormal, ``R: (..., r, r)``
    upper triangular, ``diag(R) > 0``.
    """
    wd = torch.float64
    a64 = a.to(wd)

    def one_pass(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g = transpose(x) @ x
        l, info = torch.linalg.cholesky_ex(g)
        rt = transpose(l)  # R = Lᵀ
        q = torch.linalg.solve_triangular(rt, x, upper=True, left=False)
        return q, rt, info

    q1, r1, info1 = one_pass(a64)
    q2, r2, info2 = one_pass(q1)
    bad = (info1 != 0) | (info2 != 0)
    q, r = q2, r2 @ r1
    if bool(bad.any()):
        qh, rh = torch.linalg.qr(a64)
        qh, rh = _sign_fix(qh, rh)
        m = bad.reshape(bad.shape + (1, 1))
        q = torch.where(m, qh, q)
        r = torch.where(m, rh, r)
    return q.to(a.dtype), r.to(a.dtype)


def qr_pos(a: Tensor, method: str = "auto", *, sign_fix: bool = True) -> tuple[Tensor, Tensor]:
    """Thin QR ``A = Q R`` with ``diag(R) ≥ 0`` (unique for full column rank, continuous).

    ``method``: ``"householder"`` (``torch.linalg.qr``), ``"cholesky"`` (CholeskyQR2) or
    ``"auto"`` (Householder on CPU, CholeskyQR2 on accelerators). Shapes ``(..., m, r) -> (Q, R)``.
    ``sign_fix=False`` skips the sign normalisation of the Householder route (``diag(R)`` of
    either sign) for callers that are exactly covariant under ``Q → Q D``, ``R → D R``.
    """
    if method == "auto":
        method = "householder" if a.device.type == "cpu" else "cholesky"
    if method == "householder":
        q, r = torch.linalg.qr(a)
        return _sign_fix(q, r) if sign_fix else (q, r)
    if method == "cholesky":
        return cholesky_qr2(a)
    raise ValueError(f"unknown QR method {method!r}; use 'auto', 'householder' or 'cholesky'")


def qf(a: Tensor, method: str = "auto") -> Tensor:
    """Q factor of the sign-fixed thin QR (``diag(R) > 0``): ``(..., m, r) -> (..., m, r)``."""
    return qr_pos(a, method)[0]


def polar(a: Tensor) -> Tensor:
    """Orthonormal polar factor ``A (AᵀA)^{-1/2} = U Vᵀ`` of ``A = U Σ Vᵀ``, ``(..., m, r)``.

    The closest matrix with orthonormal columns to ``A`` in Frobenius norm.
    """
    u, _, vh = svd_small(a, full_matrices=False)
    return u @ vh


def polar_overlap(c: Tensor, *, max_iter: int = 16, tol: float = 1e-8) -> Tensor:
    """Orthogonal polar factor of square ``c: (..., r, r)`` with singular values in ``(0, 1]``,
    such as the overlap ``UᵀU⁺`` of two orthonormal frames; ``c``'s dtype (use float64).

    Newton–Schulz iteration ``X ← X + ½ X (I − XᵀX)`` from ``X₀ = c`` (Higham, "Functions of
    Matrices", 2008, Sec. 8.3): each singular value goes ``σ ← σ (3 − σ²) / 2``, so overlaps of
    nearby frames (``σ ≈ 1``) converge quadratically in a few ``r × r`` products — about a
    quarter of the time of an ``r × r`` SVD on a CPU at ``r = 32`` (measured). The loop stops one iteration after
    ``max|I − XᵀX| ≤ tol`` holds for every matrix (the last iteration squares the error to
    rounding). Matrices that have not converged after ``max_iter`` iterations (a singular value
    near 0, i.e. frames with nearly orthogonal directions, or non-finite entries) get the polar
    factor of :func:`polar` (SVD) instead, so the result is defined wherever :func:`polar`'s is.
    """
    if max_iter < 1:
        raise ValueError(f"polar_overlap: max_iter must be >= 1, got {max_iter}")
    r = c.shape[-1]
    eye = torch.eye(r, dtype=c.dtype, device=c.device)
    x = c
    done = torch.zeros(c.shape[:-2], dtype=torch.bool, device=c.device)
    for _ in range(max_iter):
        e = eye - transpose(x) @ x
        done = e.abs().amax(dim=(-2, -1)) <= tol
        x = torch.baddbmm(x, x, e, alpha=0.5) if x.dim() == 3 else x + 0.5 * (x @ e)
        if bool(done.all()):
            return x
    bad = ~done
    if c.dim() == 2:
        return polar(c)
    x = x.clone()
    x[bad] = polar(c[bad])
    return x


def tri_solve_right(b: Tensor, r: Tensor, *, transpose_r: bool = False) -> Tensor:
    """``B R⁻¹`` (or ``B R⁻ᵀ`` with ``transpose_r``) for upper-triangular ``R``, batched."""
    if transpose_r:
        return torch.linalg.solve_triangular(transpose(r), b, upper=False, left=False)
    return torch.linalg.solve_triangular(r, b, upper=True, left=False)


def solve_sylvester(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Solve ``A X + X B = C`` for symmetric positive (semi)definite ``A``, ``B`` (batched).

    With ``A = Qa Λa Qaᵀ``, ``B = Qb Λb Qbᵀ``: ``X = Qa [(Qaᵀ C Qb) / (λa_i + λb_j)] Qbᵀ``.
    Computed in float64; the result has ``C``'s dtype. Shapes ``(..., p, p), (..., q, q),
    (..., p, q)``.
    """
    wd = torch.float64
    la, qa = torch.linalg.eigh(sym(a.to(wd)))
    lb, qb = torch.linalg.eigh(sym(b.to(wd)))
    ct = transpose(qa) @ c.to(wd) @ qb
    x = qa @ (ct / (la.unsqueeze(-1) + lb.unsqueeze(-2))) @ transpose(qb)
    return x.to(c.dtype)


def _sylvester_gram_route(ga: Tensor, gb: Tensor, c: Tensor, left: bool) -> Tensor:
    # A = G_M G_N is diagonalised through the Cholesky factor of one Gram matrix:
    # right route (G_N = L Lᵀ): P = L⁻ᵀ Q, P⁻¹ = Qᵀ Lᵀ with Lᵀ G_M L = Q Λ Qᵀ;
    # left route (G_M = L Lᵀ):  P = L Q,   P⁻¹ = Qᵀ L⁻¹ with Lᵀ G_N L = Q Λ Qᵀ.
    if left:
        l = torch.linalg.cholesky(ga)
        lam, q = torch.linalg.eigh(sym(transpose(l) @ gb @ l))
        p = l @ q
        p_inv = transpose(q) @ torch.linalg.solve_triangular(
            l, torch.eye(l.shape[-1], dtype=l.dtype, device=l.device), upper=False
        )
    else:
        l = torch.linalg.cholesky(gb)
        lam, q = torch.linalg.eigh(sym(transpose(l) @ ga @ l))
        p = torch.linalg.solve_triangular(transpose(l), q, upper=True)  # L⁻ᵀ Q
        p_inv = transpose(q) @ transpose(l)
    ct = p_inv @ c @ p
    return p @ (ct / (lam.unsqueeze(-1) + lam.unsqueeze(-2))) @ p_inv


def solve_sylvester_gram(g_m: Tensor, g_n: Tensor, c: Tensor, damping: float = 0.0) -> Tensor:
    """Solve ``A K + K A = C`` with ``A = G_M G_N``, batched, no Python loop (Zheng & Wu,
    "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026,
    OpenReview Guo2XGgxZA, eq. 9).

    ``A`` is similar to a symmetric positive definite matrix: with the Cholesky factorization
    ``G_N = L Lᵀ`` and ``Lᵀ G_M L = Q Λ Qᵀ``, ``P = L⁻ᵀ Q`` gives ``A = P Λ P⁻¹`` with
    ``P⁻¹ = Qᵀ Lᵀ``; then ``K = P [(P⁻¹ C P) / (λ_i + λ_j)] P⁻¹``. The mirror route through
    ``G_M = L Lᵀ`` is computed too and, per batch element, the one with the smaller residual is
    kept (each route loses accuracy with the condition of the Gram matrix it factors).
    ``damping`` δ replaces ``G`` by ``G + δI`` (for rank-deficient / zero-initialised factors).
    Computed in float64, returned in ``C``'s dtype. Shapes: all ``(..., r, r)``. The optimizers
    use the better-conditioned gauge-free form :func:`solve_lyapunov_core` instead.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    wd = torch.float64
    gm, gn, c64 = sym(g_m.to(wd)), sym(g_n.to(wd)), c.to(wd)
    if damping:
        eye = torch.eye(gm.shape[-1], dtype=wd, device=gm.device)
        gm, gn = gm + damping * eye, gn + damping * eye
    a = gm @ gn
    best, best_res = None, None
    for left in (False, True):
        k = _sylvester_gram_route(gm, gn, c64, left)
        res = (a @ k + k @ a - c64).flatten(-2).norm(dim=-1)
        if best is None:
            best, best_res = k, res
        else:
            take = (res < best_res).reshape(res.shape + (1, 1))
            best = torch.where(take, k, best)
    return best.to(c.dtype)


def solve_lyapunov_core(
    w: Tensor,
    s: Tensor,
    damping: float = 0.0,
    *,
    svd: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Solve ``W Wᵀ K' + K' W Wᵀ = S Wᵀ`` for the gauge-free Sylvester matrix ``K'``.

    This is LoRA-S eq. 9 in orthonormal coordinates (``docs/design.md``, "Gauge-free lift"): with
    ``M = U R_M``, ``N = V R_N``, core ``W = R_M R_Nᵀ``, ``S = Uᵀ Ẋ V`` and
    ``K = R_Mᵀ K' R_M⁻ᵀ``. With the SVD ``W = Φ Σ Ψᵀ``:
    ``K' = Φ [(Φᵀ S Ψ Σ) / (σ_i² + σ_j² + 2δ)] Φᵀ``. Its conditioning depends on the singular
    values of ``X = U W Vᵀ`` only, not on the factor balance. Computed in float64.
    ``svd``: ``(Φ, σ, Ψ)`` of ``w`` if already known (float64; ``Ψ``, not ``Ψᵀ``), so that
    several solves with the same ``W`` share one SVD. Shapes ``(..., r, r)``.
    """
    wd = torch.float64
    if svd is None:
        phi, sig, psi_h = svd_small(w.to(wd))
        psi = transpose(psi_h)
    else:
        phi, sig, psi = svd
    t = transpose(phi) @ s.to(wd) @ psi * sig.unsqueeze(-2)
    sig2 = sig * sig + damping
    k = phi @ (t / (sig2.unsqueeze(-1) + sig2.unsqueeze(-2))) @ transpose(phi)
    return k.to(s.dtype)


#: Methods of :func:`solve_lyapunov_spd`.
LYAPUNOV_METHODS = ("newton", "schulz")
#: A batch element counts as converged when ``‖P − I‖_F`` ends below this (quadratic / linear
#: convergence takes it to ~1e-14 within a few more steps); others get NaN solutions.
_SIGN_CONVERGED = 1e-6
#: Largest ``cond_F(A) = ‖A‖_F ‖A⁻¹‖_F`` accepted: the forward error of the iterations is
#: ~``cond(A)·eps``, so beyond 1e14 (≥ 1 % error) an element gets NaN like a singular one.
_SIGN_MAX_COND = 1e14


@dataclass
class SignIteration:
    """The ``C``-independent part of a sign-function iteration for ``A X + X A = C``
    (:func:`lyapunov_sequence`): ``steps`` — ``(μ, P⁻¹)`` per Newton step or ``(P, P²)`` per
    Newton–Schulz step; ``scale`` — ``‖A‖_F`` by which Newton–Schulz scales ``Z₀`` (and ``C``);
    ``failed`` — batch elements where ``A`` was not numerically positive definite, had
    ``cond_F(A) > 1e14`` or did not converge (their solutions are NaN, so a caller's finiteness
    check fails instead of using a wrong finite value)."""

    method: str
    steps: list[tuple[Tensor, ...]]
    scale: Tensor | None
    failed: Tensor


def _sign_residual(p: Tensor, eye: Tensor) -> Tensor:
    return (p - eye).flatten(-2).norm(dim=-1)


def lyapunov_sequence(
    a: Tensor, method: str = "newton", *, tol: float = 1e-13, max_iter: int | None = None
) -> SignIteration:
    """The ``C``-independent part of the sign-function iteration for ``A X + X A = C``.

    ``sign([[A, −C], [0, −A]]) = [[I, −2X], [0, −I]]`` (``docs/design.md``, "GPU costs"; with
    ``T = [[I, X], [0, I]]``, ``[[A, −C], [0, −A]] = T diag(A, −A) T⁻¹``). Both iterations keep the
    block-triangular form ``[[P, Q], [0, −P]]`` and the ``P`` sequence does not depend on ``C``,
    so it is computed once here and reused by every right-hand side
    (:func:`apply_lyapunov_sequence`):

    * ``"newton"``: scaled Newton ``Z ← ½(μZ + (μZ)⁻¹)``, i.e. ``P ← ½(μP + P⁻¹/μ)`` with ``P⁻¹``
      from a Cholesky factorization and Frobenius scaling ``μ = (‖P⁻¹‖/‖P‖)^{1/2}`` until
      ``‖P − I‖ < 1e-2``; quadratic convergence, about 8–10 steps at ``cond(A) = 1e12``.
    * ``"schulz"``: inverse-free Newton–Schulz ``Z ← ½ Z (3I − Z²)`` from ``Z₀ = Z / ‖A‖_F``;
      only matrix products but linear convergence for small eigenvalues: about
      ``log_{1.5} cond(A) + 6`` steps.

    ``A``: symmetric positive definite, ``(..., r, r)``, computed in float64. Iterates until
    ``max ‖P − I‖_F < tol`` over the batch elements that have not failed (one host sync per
    step) or ``max_iter`` (default 40 / 100). The forward error of ``X`` grows like
    ``cond(A)·eps``. Raises ``ValueError`` for an unknown method.
    """
    if method not in LYAPUNOV_METHODS:
        raise ValueError(f"method must be one of {LYAPUNOV_METHODS}, got {method!r}")
    a = sym(a.to(torch.float64))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    steps: list[tuple[Tensor, ...]] = []
    scale: Tensor | None = None
    a_inv = spd_inverse(a)  # NaN where A is not numerically positive definite
    cond = a.flatten(-2).norm(dim=-1) * a_inv.flatten(-2).norm(dim=-1)
    ill = ~(cond <= _SIGN_MAX_COND)  # also NaN
    if method == "newton":
        max_iter = 40 if max_iter is None else max_iter
        p, p_inv, scaled = a, a_inv, True
        for i in range(max_iter):
            if i:
                p_inv = spd_inverse(p)
            if scaled:
                mu = (p_inv.flatten(-2).norm(dim=-1) / p.flatten(-2).norm(dim=-1)).sqrt()
                mu = mu[..., None, None]
            else:
                mu = torch.ones_like(p[..., :1, :1])
            steps.append((mu, p_inv))
            p = sym(0.5 * (mu * p + p_inv / mu))
            err = float(torch.nan_to_num(_sign_residual(p, eye), nan=0.0).max())
            if err < tol:
                break
            scaled = scaled and err > 1e-2
    else:
        max_iter = 100 if max_iter is None else max_iter
        scale = a.flatten(-2).norm(dim=-1)[..., None, None]
        p = a / scale
        for _ in range(max_iter):
            p2 = p @ p
            steps.append((p, p2))
            p = sym(0.5 * p @ (3.0 * eye - p2))
            err = float(torch.nan_to_num(_sign_residual(p, eye), nan=0.0).max())
            if err < tol:
                break
    failed = ill | ~(_sign_residual(p, eye) < _SIGN_CONVERGED)
    return SignIteration(method, steps, scale, failed)


def spd_inverse(p: Tensor) -> Tensor:
    """``P⁻¹`` of symmetric positive definite ``P`` by Cholesky, batched; NaN where ``P`` is not
    numerically positive definite (never a wrong finite inverse from a partial factorization,
    and no singular factor reaches LAPACK, which would raise). Shapes ``(..., r, r)``."""
    chol, info = torch.linalg.cholesky_ex(p)
    bad = (info != 0)[..., None, None]
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    inv = torch.cholesky_inverse(torch.where(bad, eye, chol))
    return torch.where(bad, float("nan"), inv)


def apply_lyapunov_sequence(seq: SignIteration, c: Tensor) -> Tensor:
    """``X`` with ``A X + X A = C`` from the :func:`lyapunov_sequence` of ``A`` (float64).

    Newton: ``Q ← ½(μQ + P⁻¹QP⁻¹/μ)``; Newton–Schulz: ``Q ← ½(3Q − P²Q + PQP − QP²)``; from
    ``Q₀ = −C`` (scaled like ``Z₀``), ``X = −Q/2``; NaN for the ``failed`` batch elements.
    Shapes ``(..., r, q)``.
    """
    q = -c.to(torch.float64)
    if seq.method == "newton":
        for mu, p_inv in seq.steps:
            q = 0.5 * (mu * q + (p_inv @ q @ p_inv) / mu)
    else:
        q = q / seq.scale
        for p, p2 in seq.steps:
            pq = p @ q
            q = 0.5 * (3.0 * q - p @ pq + pq @ p - q @ p2)
    return torch.where(seq.failed[..., None, None], float("nan"), -0.5 * q)


def solve_lyapunov_spd(a: Tensor, c: Tensor, method: str = "newton", **kw: Any) -> Tensor:
    """Solve ``A X + X A = C`` for symmetric positive definite ``A`` by a matrix sign-function
    iteration (no eigendecomposition; see :func:`lyapunov_sequence`). Computed in float64,
    returned in ``C``'s dtype (NaN where ``A`` is not numerically positive definite). Shapes
    ``(..., r, r)``, ``(..., r, q)``."""
    return apply_lyapunov_sequence(lyapunov_sequence(a, method, **kw), c).to(c.dtype)


#: Above this size, batched ``r x r`` eigendecompositions / SVDs of accelerator tensors (both
#: dimensions in ``(n, 4n]``) are computed on the CPU: cuSOLVER's batched kernels stop at 32, and the per-matrix fallback is
#: slower than the round trip (H100, 224 fp64 matrices of 64×64: SVD 363 ms on the GPU vs
#: 155 ms through the CPU; ``benchmarks/gpu_perf.py``). ``None`` disables the routing.
HOST_DECOMPOSITION_ABOVE: int | None = 32


def _on_host(a: Tensor) -> bool:
    # only batches of small matrices (r x r cores, 2r x 2r): a tall m x r matrix stays on the
    # device, where its decomposition is dominated by the m-long products, not by r
    n = HOST_DECOMPOSITION_ABOVE
    return (
        n is not None
        and a.device.type != "cpu"
        and a.dim() > 2
        and min(a.shape[-2:]) > n
        and max(a.shape[-2:]) <= 4 * n
    )


def _env_threads() -> int:
    raw = os.environ.get("GEOLORA_HOST_THREADS", "")
    if not raw:
        return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"GEOLORA_HOST_THREADS must be an integer >= 1, got {raw!r}") from None
    if k < 1:
        raise ValueError(f"GEOLORA_HOST_THREADS must be an integer >= 1, got {raw!r}")
    return k


#: Worker threads of the host route (:func:`eigh_small`, :func:`eigvalsh_small`,
#: :func:`svd_small` on accelerators): the CPU batch is split into this many chunks decomposed
#: concurrently (LAPACK releases the GIL; each matrix gets the same LAPACK call). Default: the
#: usable cores, at most 8 — on an H100 host (16 cores) 8 workers halved the r = 64 step of
#: LoRA-RITE (309 → 164 ms), LoRAM-FR (826 → 373) and LoRAM-BR (295 → 157) for 224 pairs
#: (``docs/benchmarks/gpu.md``). Set with :func:`set_host_threads` or ``GEOLORA_HOST_THREADS``
#: (``1``: one batched call). CPU tensors never take this route.
HOST_THREADS: int = _env_threads()
_pool: ThreadPoolExecutor | None = None


def set_host_threads(k: int) -> None:
    """Set :data:`HOST_THREADS` (``ValueError`` unless ``k`` is an integer >= 1)."""
    global HOST_THREADS, _pool
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"host threads must be an integer >= 1, got {k!r}")
    HOST_THREADS = k
    if _pool is not None and _pool._max_workers != k:  # noqa: SLF001
        _pool.shutdown(wait=True)
        _pool = None


@contextmanager
def use_host_threads(k: int) -> Iterator[None]:
    """``with use_host_threads(k):`` — :data:`HOST_THREADS` is ``k`` inside the block."""
    old = HOST_THREADS
    set_host_threads(k)
    try:
        yield
    finally:
        set_host_threads(old)


def host_map(fn: Any, a: Tensor) -> Any:
    """``fn(a)`` for a batch ``a`` of matrices on the CPU, computed as :data:`HOST_THREADS`
    chunks of the batch in a thread pool when that is > 1 (``fn`` returns a tensor or a tuple
    of tensors with the batch dimensions of ``a`` in front)."""
    global _pool
    k = HOST_THREADS
    flat = a.reshape(-1, *a.shape[-2:])
    if k <= 1 or flat.shape[0] < 2 * k:
        return fn(a)
    if _pool is None:
        _pool = ThreadPoolExecutor(k, thread_name_prefix="geolora-linalg")
    outs = list(_pool.map(fn, flat.chunk(k)))

    def join(parts: list[Tensor]) -> Tensor:
        t = torch.cat(parts)
        return t.reshape(*a.shape[:-2], *t.shape[1:])

    if isinstance(outs[0], Tensor):
        return join(outs)
    return tuple(join(list(p)) for p in zip(*outs))


def eigh_small(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a batch of small symmetric matrices, through the CPU on
    accelerators above :data:`HOST_DECOMPOSITION_ABOVE` (same results up to rounding)."""
    if _on_host(a):
        lam, q = host_map(torch.linalg.eigh, a.cpu())
        return lam.to(a.device), q.to(a.device)
    return torch.linalg.eigh(a)


def eigvalsh_small(a: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` with the routing of :func:`eigh_small`."""
    if _on_host(a):
        return host_map(torch.linalg.eigvalsh, a.cpu()).to(a.device)
    return torch.linalg.eigvalsh(a)


def svd_small(a: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` of a batch of small matrices with the routing of :func:`eigh_small`."""
    if _on_host(a):
        out = host_map(partial(torch.linalg.svd, full_matrices=full_matrices), a.cpu())
        return tuple(t.to(a.device) for t in out)  # type: ignore[return-value]
    return torch.linalg.svd(a, full_matrices=full_matrices)
