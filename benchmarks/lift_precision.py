"""Float32 accuracy of the balanced horizontal lift: the gauge-free route vs the Gram route.

The numbers of ``docs/design.md`` ("Gauge-free lift"). The lift of ``Ẋ`` at ``X = M Nᵀ`` under
the balanced metric (Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester
Equation", ICLR 2026, OpenReview Guo2XGgxZA, Alg. 1, eq. 9) is computed for the representatives
``(M R, N R⁻ᵀ)`` with ``R = diag(logspace(0, k, r))`` by two routes:

* **gauge-free** — :class:`geolora.manifolds.metrics.BalancedMetric` (orthonormal frame, the
  Lyapunov equation of the ``r × r`` core, solved in float64), the route geolora uses;
* **Gram** — ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N`` through the Cholesky factor of ``G_N`` and the
  ``eigh`` of ``Lᵀ G_M L``, then ``Ṁ = (Ẋ N − M G_N K) G_N⁻¹``, ``Ṅ = (Ẋᵀ M − N G_M Kᵀ) G_M⁻¹``,
  every operation in the working precision (what the design avoided).

For each route and gauge it prints the relative error, against the float64 gauge-free result,
of the float32 lift ``(Ṁ, Ṅ)`` itself and of the matrix step ``Ṁ Nᵀ + M Ṅᵀ`` it induces, and the
float64 agreement of the two routes; last, the relative error of the Gram route's ``r × r``
Sylvester solution ``K`` in float32 against float64 (``cond(G_M) = 10^{2k}``), the reason the
``r × r`` work runs in float64. Usage (a few seconds on a CPU)::

    python benchmarks/lift_precision.py [--m 200 --n 150 --r 16 --seed 0]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from geolora.manifolds.quotient import FactorQuotient
from geolora.manifolds.types import FactorPoint, FactorTangent


def gram_route_sylvester(M: Tensor, N: Tensor, Xdot: Tensor) -> Tensor:
    """``K`` of ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N`` through Cholesky and ``eigh``, in ``M``'s
    dtype."""
    GM, GN = M.T @ M, N.T @ N
    L = torch.linalg.cholesky(GN)
    lam, Q = torch.linalg.eigh(L.T @ GM @ L)
    P = torch.linalg.solve_triangular(L.T, Q, upper=True)  # L⁻ᵀ Q, A = G_M G_N = P Λ P⁻¹
    P_inv = Q.T @ L.T
    C = M.T @ Xdot @ N
    return P @ ((P_inv @ C @ P) / (lam[:, None] + lam[None, :])) @ P_inv


def gram_route_lift(M: Tensor, N: Tensor, Xdot: Tensor) -> FactorTangent:
    """The balanced lift by the Gram-matrix route, all in ``M``'s dtype."""
    GM, GN = M.T @ M, N.T @ N
    K = gram_route_sylvester(M, N, Xdot)
    Md = torch.linalg.solve(GN, (Xdot @ N - M @ GN @ K).T).T
    Nd = torch.linalg.solve(GM, (Xdot.T @ M - N @ GM @ K.T).T).T
    return FactorTangent(Md, Nd)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    m, n, r = args.m, args.n, args.r
    gen = torch.Generator().manual_seed(args.seed)
    Q = FactorQuotient(m, n, r, "balanced")
    x = Q.random_point(generator=gen)
    Z = torch.randn(m, n, dtype=torch.float64, generator=gen)

    print(f"m={m} n={n} r={r}, R = diag(logspace(0, k, r)); relative errors vs float64")
    head = (
        "fp64 routes",
        "fp32 free (Ṁ,Ṅ)",
        "fp32 Gram (Ṁ,Ṅ)",
        "fp32 free step",
        "fp32 Gram step",
        "fp32 Gram K",
    )
    print(f"{'k':>3} " + " ".join(f"{h:>17}" for h in head))
    for k in (0, 1, 2, 3, 4):
        R = torch.diag(torch.logspace(0, k, r, dtype=torch.float64))
        xr = FactorPoint(x.M @ R, x.N @ torch.linalg.inv(R).T)
        lift64 = Q.lift(xr, Z)
        ref = Q.differential(xr, lift64)
        gram64 = Q.differential(xr, gram_route_lift(xr.M, xr.N, Z))
        x32 = FactorPoint(xr.M.float(), xr.N.float())
        free32 = Q.lift(x32, Z.float())
        gram32 = gram_route_lift(x32.M, x32.N, Z.float())
        lifts = [FactorTangent(u.M.double(), u.N.double()) for u in (free32, gram32)]
        cols = [rel(gram64, ref)]
        cols += [rel(torch.cat(u), torch.cat(lift64)) for u in lifts]
        cols += [rel(Q.differential(xr, u), ref) for u in lifts]
        k32 = gram_route_sylvester(x32.M, x32.N, Z.float()).double()
        cols.append(rel(k32, gram_route_sylvester(xr.M, xr.N, Z)))
        print(f"{k:>3} " + " ".join(f"{c:>17.1e}" for c in cols))


if __name__ == "__main__":
    main()
