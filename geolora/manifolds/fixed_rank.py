"""The manifold of m×n matrices of fixed rank r, embedded geometry (Vandereycken 2013)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, qr_pos, transpose
from geolora.manifolds.base import Manifold, check_finite_tree, tree_sum_inner
from geolora.manifolds.types import FixedRankPoint, FixedRankTangent
from geolora.retractions import fixed_rank as _fr

__all__ = ["FixedRank"]


class FixedRank(Manifold):
    r"""Fixed-rank matrices ``R_r^{m×n} = {X ∈ R^{m×n} : rank X = r}`` as an embedded submanifold.

    References: Vandereycken, "Low-rank matrix completion by Riemannian optimization",
    SIAM J. Optim. 2013; Manopt ``fixedrankembeddedfactory``; pymanopt ``FixedRankEmbedded``;
    Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on Manifold", ICLR
    2025 Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT (LoRAM below), Algorithms 1–4.

    * point: :class:`FixedRankPoint` ``(U, S, V)``, ``X = U diag(S) Vᵀ``, ``U: (..., m, r)`` and
      ``V: (..., n, r)`` orthonormal, ``S: (..., r)`` positive;
    * tangent space ``T_X = {U M Vᵀ + Up Vᵀ + U Vpᵀ : UᵀUp = 0, VᵀVp = 0}``, stored as
      :class:`FixedRankTangent` ``(M, Up, Vp)`` (``M: r×r``, ``Up: m×r``, ``Vp: n×r``);
      dimension ``(m + n − r) r``;
    * metric: the Euclidean one of ``R^{m×n}`` restricted to ``T_X``; by the orthogonality of the
      three terms ``<Ẋ, Ẋ'> = tr(MᵀM') + tr(UpᵀUp') + tr(VpᵀVp')``;
    * projection ``P_X(Z) = P_U Z + Z P_V − P_U Z P_V``: ``M = UᵀZV``, ``Up = ZV − U M``,
      ``Vp = ZᵀU − V Mᵀ`` — it needs only ``ZV`` and ``ZᵀU``, see :meth:`project_factored`
      (LoRAM Alg. 2); ``egrad2rgrad = proj``;
    * retraction: rank-r truncated SVD of ``X + Ẋ`` (the metric projection, second order),
      computed from QRs of ``[U Up]``, ``[V Vp]`` and the SVD of a ``2r×2r`` core
      (LoRAM Alg. 3), O((m + n) r²);
    * transport by projection ``P_{T_Y}(Ẋ)`` in factored form (LoRAM Alg. 4), O((m + n) r²).

    ``S = 0`` (LoRAM starts there, Alg. 1) is *not* a point of this manifold — ``check_point``
    rejects it — but :meth:`from_factors` / :meth:`from_matrix` with ``allow_zero=True`` return
    such a "point" with orthonormal ``U``, ``V``: projection, retraction and transport only use
    ``U``, ``V`` orthonormal, so the optimizers run from it exactly as LoRAM does (the first
    retraction produces ``S⁺ > 0`` for a generic step).
    """

    name = "FixedRank"

    def __init__(self, m: int, n: int, r: int) -> None:
        for label, val in (("m", m), ("n", n), ("r", r)):
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"{label} must be an int, got {label}={val!r}")
        if m <= 0 or n <= 0:
            raise ValueError(f"m and n must be positive, got m={m}, n={n}")
        if r <= 0 or r > min(m, n):
            raise ValueError(f"rank r must satisfy 0 < r <= min(m, n) = {min(m, n)}, got r={r}")
        self.m, self.n, self.r = m, n, r

    # --- validation helpers -------------------------------------------------------------------
    def _point_reason(self, x: Any, name: str = "x") -> str | None:
        if not (isinstance(x, tuple) and len(x) == 3):
            return f"{name} must be a FixedRankPoint(U, S, V), got {type(x).__name__}"
        if not all(isinstance(t, Tensor) for t in x):
            return f"{name} fields U, S, V must be torch.Tensors"
        u, s, v = x
        m, n, r = self.m, self.n, self.r
        if u.dim() < 2 or tuple(u.shape[-2:]) != (m, r):
            return f"{name}.U has shape {tuple(u.shape)}, expected (..., {m}, {r})"
        if v.dim() < 2 or tuple(v.shape[-2:]) != (n, r):
            return f"{name}.V has shape {tuple(v.shape)}, expected (..., {n}, {r})"
        if s.dim() < 1 or s.shape[-1] != r:
            return f"{name}.S has shape {tuple(s.shape)}, expected (..., {r})"
        batch = u.shape[:-2]
        if v.shape[:-2] != batch or s.shape[:-1] != batch:
            return (
                f"{name} batch dims differ: U {tuple(u.shape[:-2])}, S {tuple(s.shape[:-1])}, "
                f"V {tuple(v.shape[:-2])}"
            )
        return None

    def _point(self, x: Any, name: str = "x") -> FixedRankPoint:
        reason = self._point_reason(x, name)
        if reason is not None:
            raise ValueError(f"{self.name}: {reason}")
        return x if isinstance(x, FixedRankPoint) else FixedRankPoint(*x)

    def _tangent_reason(self, x: FixedRankPoint, t: Any, name: str = "u") -> str | None:
        if not (isinstance(t, tuple) and len(t) == 3):
            return f"{name} must be a FixedRankTangent(M, Up, Vp), got {type(t).__name__}"
        if not all(isinstance(a, Tensor) for a in t):
            return f"{name} fields M, Up, Vp must be torch.Tensors"
        batch = tuple(x.U.shape[:-2])
        for field, a, shape in zip(
            ("M", "Up", "Vp"), t, ((self.r, self.r), (self.m, self.r), (self.n, self.r))
        ):
            expected = batch + shape
            if tuple(a.shape) != expected:
                return f"{name}.{field} has shape {tuple(a.shape)}, expected {expected}"
        return None

    def _tangent(self, x: FixedRankPoint, t: Any, name: str = "u") -> FixedRankTangent:
        reason = self._tangent_reason(x, t, name)
        if reason is not None:
            raise ValueError(f"{self.name}: {reason}")
        return t if isinstance(t, FixedRankTangent) else FixedRankTangent(*t)

    def _factor(self, x: FixedRankPoint, t: Any, name: str, rows: int) -> None:
        expected = tuple(x.U.shape[:-2]) + (rows, self.r)
        if not isinstance(t, Tensor) or tuple(t.shape) != expected:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{self.name}: {name} has shape {got}, expected {expected}")

    # --- geometry -----------------------------------------------------------------------------
    def proj(self, x: FixedRankPoint, u: Tensor) -> FixedRankTangent:
        """``P_X(Z)`` for a dense ambient ``Z: (..., m, n)`` (batch dims = the point's)."""
        x = self._point(x)
        expected = tuple(x.U.shape[:-2]) + (self.m, self.n)
        if not isinstance(u, Tensor) or tuple(u.shape) != expected:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"{self.name}: ambient Z has shape {got}, expected {expected}")
        return _fr.fixed_rank_project(x, u @ x.V, transpose(u) @ x.U)

    def project_factored(self, x: FixedRankPoint, zv: Tensor, ztu: Tensor) -> FixedRankTangent:
        """``P_X(Z)`` from ``ZV: (..., m, r)`` and ``ZᵀU: (..., n, r)``, never forming ``Z``.

        With LoRAM's trick (Alg. 2) — ``W = A Vᵀ + U Bᵀ``, ``A = U diag(S)``,
        ``B = 0`` — autograd gives ``A.grad = ∇f V`` and ``B.grad = ∇fᵀ U``: pass them here.
        """
        x = self._point(x)
        self._factor(x, zv, "ZV", self.m)
        self._factor(x, ztu, "ZtU", self.n)
        return _fr.fixed_rank_project(x, zv, ztu)

    def egrad2rgrad(self, x: FixedRankPoint, g: Tensor) -> FixedRankTangent:
        """``grad f(X) = P_X(∇f(X))`` (embedded metric); ``g: (..., m, n)``."""
        return self.proj(x, g)

    def inner(
        self, x: FixedRankPoint, u: FixedRankTangent, v: FixedRankTangent | None = None
    ) -> Tensor:
        """``tr(MᵀM') + tr(UpᵀUp') + tr(VpᵀVp')`` = Frobenius inner product of the matrices."""
        x = self._point(x)
        u = self._tangent(x, u, "u")
        v = u if v is None else self._tangent(x, v, "v")
        return tree_sum_inner(u, v)

    def retr(self, x: FixedRankPoint, u: FixedRankTangent) -> FixedRankPoint:
        """Truncated-SVD retraction (LoRAM Alg. 3), see :func:`fixed_rank_retraction`."""
        x = self._point(x)
        u = self._tangent(x, u)
        check_finite_tree(f"{self.name}.retr: x", x)
        check_finite_tree(f"{self.name}.retr: u", u)
        return _fr.fixed_rank_retraction(x, u)

    def transp(self, x: FixedRankPoint, y: FixedRankPoint, v: FixedRankTangent) -> FixedRankTangent:
        """Projection transport ``P_{T_Y}(v)`` in factored form (LoRAM Alg. 4)."""
        x = self._point(x)
        y = self._point(y, "y")
        if y.U.shape[:-2] != x.U.shape[:-2]:
            raise ValueError(
                f"{self.name}: batch dims of x {tuple(x.U.shape[:-2])} and y "
                f"{tuple(y.U.shape[:-2])} differ"
            )
        v = self._tangent(x, v, "v")
        return _fr.fixed_rank_transport(x, y, v)

    # --- conversions --------------------------------------------------------------------------
    def tangent2ambient(self, x: FixedRankPoint, u: FixedRankTangent) -> Tensor:
        """Dense ``Ẋ = U M Vᵀ + Up Vᵀ + U Vpᵀ``, ``(..., m, n)`` (tests / small problems only)."""
        a, b = self.tangent2factors(x, u)
        return a @ transpose(b)

    def tangent2factors(self, x: FixedRankPoint, u: FixedRankTangent) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``Ẋ = A Bᵀ``: ``A = [U M + Up, U]: (..., m, 2r)``, ``B = [V, Vp]``."""
        x = self._point(x)
        return _fr.fixed_rank_tangent_factors(x, self._tangent(x, u))

    def to_matrix(self, x: FixedRankPoint) -> Tensor:
        """Dense ``X = U diag(S) Vᵀ``, ``(..., m, n)``."""
        x = self._point(x)
        return (x.U * x.S.unsqueeze(-2)) @ transpose(x.V)

    def _truncate(self, u: Tensor, s: Tensor, v: Tensor, allow_zero: bool, what: str):
        # u: (..., m, k), s: (..., k) decreasing, v: (..., n, k), k >= r.
        r = self.r
        u, s, v = u[..., :r], s[..., :r], v[..., :r]
        if not allow_zero:
            eps = torch.finfo(s.dtype).eps
            tol = max(self.m, self.n) * eps * s[..., :1]
            if bool((s[..., -1:] <= tol).any()):
                raise ValueError(
                    f"{self.name}: {what} has rank < r={r} (smallest kept singular value "
                    f"{float(s[..., -1].min()):.3e}); it is not a point of FixedRank. Pass "
                    "allow_zero=True to get orthonormal U, V with S containing zeros "
                    "(the LoRAM S = 0 start)"
                )
        return FixedRankPoint(u, s, v)

    def from_matrix(self, X: Tensor, *, allow_zero: bool = False) -> FixedRankPoint:
        """Rank-r truncated SVD of a dense ``X: (..., m, n)`` (Eckart–Young).

        ``ValueError`` if ``rank X < r``, unless ``allow_zero`` (then ``S`` has zeros, see the
        class docstring).
        """
        if not isinstance(X, Tensor) or X.dim() < 2 or tuple(X.shape[-2:]) != (self.m, self.n):
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"{self.name}: X has shape {got}, expected (..., {self.m}, {self.n})")
        check_finite_tree(f"{self.name}.from_matrix: X", X)
        X = X.to(compute_dtype(X.dtype))
        u, s, vh = torch.linalg.svd(X, full_matrices=False)
        return self._truncate(u, s, transpose(vh), allow_zero, "X")

    def from_factors(self, B: Tensor, A: Tensor, *, allow_zero: bool = False) -> FixedRankPoint:
        """Rank-r truncated SVD of ``X = B A`` from LoRA factors, never forming ``m×n``.

        ``B: (..., m, k)``, ``A: (..., k, n)`` (``ΔW = B A``, conventions of ``docs/design.md``),
        any ``k``. ``Q_B R_B = B``, ``Q_A R_A = Aᵀ``, SVD ``R_B R_Aᵀ = Ũ S̃ Ṽᵀ`` (in float64), ``U =
        Q_B Ũ[:, :r]``, ``S = S̃[:r]``, ``V = Q_A Ṽ[:, :r]``; O((m + n) k²).

        ``rank(B A) < r`` (e.g. LoRA's ``B = 0`` init) raises ``ValueError`` unless
        ``allow_zero=True``: then ``S`` has zeros and ``U``, ``V`` stay orthonormal, chosen
        deterministically — ``V`` spans the row space of ``A`` when ``B = 0`` and ``A`` has rank
        r, and the unconstrained columns come from Householder QR of the (zero-padded) factors.
        """
        for label, t in (("B", B), ("A", A)):
            if not isinstance(t, Tensor) or t.dim() < 2:
                raise ValueError(
                    f"{self.name}: {label} must be a tensor of shape (..., rows, cols)"
                )
        if B.shape[-2] != self.m or A.shape[-1] != self.n or B.shape[-1] != A.shape[-2]:
            raise ValueError(
                f"{self.name}: B {tuple(B.shape)} and A {tuple(A.shape)} must be (..., {self.m}, k)"
                f" and (..., k, {self.n})"
            )
        if B.shape[:-2] != A.shape[:-2]:
            raise ValueError(
                f"{self.name}: batch dims of B {tuple(B.shape[:-2])} and A {tuple(A.shape[:-2])}"
                " differ"
            )
        check_finite_tree(f"{self.name}.from_factors: B", B)
        check_finite_tree(f"{self.name}.from_factors: A", A)
        cd = compute_dtype(torch.promote_types(B.dtype, A.dtype))
        b, at = B.to(cd), transpose(A).to(cd)
        k = b.shape[-1]
        if k < self.r:  # zero columns do not change B A and give QR enough orthonormal columns
            pad = (0, self.r - k)
            b, at = torch.nn.functional.pad(b, pad), torch.nn.functional.pad(at, pad)
        qb, rb = _fr.thin_qr(b)
        qa, ra = _fr.thin_qr(at)
        wd = torch.float64
        uc, s, vch = torch.linalg.svd(rb.to(wd) @ transpose(ra.to(wd)), full_matrices=False)
        u = qb @ uc[..., : self.r].to(cd)
        v = qa @ transpose(vch[..., : self.r, :]).to(cd)
        return self._truncate(u, s[..., : self.r].to(cd), v, allow_zero, "B @ A")

    # --- sampling -----------------------------------------------------------------------------
    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> FixedRankPoint:
        """``U = qf(G₁)``, ``V = qf(G₂)`` (Gaussian), ``S`` uniform in [1, 2], decreasing."""

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, dtype=dtype, device=device, generator=generator)

        u = qr_pos(randn(*batch, self.m, self.r))[0]
        v = qr_pos(randn(*batch, self.n, self.r))[0]
        s = 1.0 + torch.rand((*batch, self.r), dtype=dtype, device=device, generator=generator)
        s = torch.sort(s, dim=-1, descending=True).values
        return FixedRankPoint(u, s, v)

    def random_tangent(
        self, x: FixedRankPoint, generator: torch.Generator | None = None
    ) -> FixedRankTangent:
        """Gaussian ``M``, ``Up``, ``Vp`` with ``Up``, ``Vp`` projected: ``Up − U UᵀUp``, ..."""
        x = self._point(x)

        def randn(ref: Tensor, rows: int) -> Tensor:
            shape = (*ref.shape[:-2], rows, self.r)
            return torch.randn(shape, dtype=ref.dtype, device=ref.device, generator=generator)

        m, up, vp = randn(x.U, self.r), randn(x.U, self.m), randn(x.V, self.n)
        up = up - x.U @ (transpose(x.U) @ up)
        vp = vp - x.V @ (transpose(x.V) @ vp)
        return FixedRankTangent(m, up, vp)

    # --- validation ---------------------------------------------------------------------------
    def _check_point(self, x: Any, atol: float, rtol: float) -> tuple[bool, str | None]:
        reason = self._point_reason(x)
        if reason is not None:
            return False, reason
        x = FixedRankPoint(*(t.detach() for t in x))
        for field, t in zip("USV", x):
            if not bool(torch.isfinite(t).all()):
                return False, f"x.{field} contains non-finite values (NaN or inf)"
        u, s, v = x
        for field, q in (("U", u), ("V", v)):
            eye = torch.eye(self.r, dtype=q.dtype, device=q.device)
            err = float((transpose(q) @ q - eye).abs().max())
            if err > atol + rtol:
                return False, f"{field}ᵀ{field} != I: max error {err:.3e}"
        if not bool((s > 0).all()):
            return False, (
                f"S must be positive (rank exactly r={self.r}), min S = {float(s.min()):.3e}"
            )
        return True, None

    def _check_tangent(self, x: Any, u: Any, atol: float, rtol: float) -> tuple[bool, str | None]:
        x = FixedRankPoint(*(t.detach() for t in x))
        reason = self._tangent_reason(x, u)
        if reason is not None:
            return False, reason
        u = FixedRankTangent(*(t.detach() for t in u))
        m, up, vp = u
        for field, t in zip(("M", "Up", "Vp"), u):
            if not bool(torch.isfinite(t).all()):
                return False, f"u.{field} contains non-finite values (NaN or inf)"
        for label, q, p in (("UᵀUp", x.U, up), ("VᵀVp", x.V, vp)):
            err = float((transpose(q) @ p).abs().max())
            scale = float(p.abs().max())
            if err > atol + rtol * scale:
                return False, f"{label} != 0: max |{label}| = {err:.3e} (max entry {scale:.3e})"
        return True, None

    @property
    def dim(self) -> int:
        """``(m + n − r) r``."""
        return (self.m + self.n - self.r) * self.r

    def __repr__(self) -> str:
        return f"FixedRank(m={self.m}, n={self.n}, r={self.r})"
