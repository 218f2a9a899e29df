"""Arithmetic floors of the cheap factored optimizers, measured: plain-torch prototypes of their
critical path next to the library's step and ``torch.optim.AdamW`` in the same process.

Each prototype works on factors, gradients and states that are already stacked per bucket
(``(L, m, r)`` for ``M = B``, column-major ``(L, n, r)`` for ``N = Aᵀ``) and does only the
arithmetic of the step — no stacking, no finiteness check, no write-back into per-pair
parameters. It is what a step costs if the engine costs nothing, so ``library / prototype`` is
the engine's overhead and ``prototype / AdamW`` the floor of the ratio to AdamW. The
prototypes' results equal the library's (checked at start, float64, 1e-12). For the dense
optimizers (AdamS, AdamS-low-memory, Lifted(Adam): ``m x n`` moments by the papers'
definition) the prototype is only their ``O(mnr)`` dense work (:class:`DenseFloor`), a lower
bound the library's step is compared with.

Per pair (``m × r`` and ``n × r`` factors), in passes over the ``(m + n) r`` factor numbers and
flops:

* LoRA+ (AdamW on both factors): AdamW's arithmetic, ~12 passes, no products.
* ScaledGD (momentum 0.9, the registry's setting): two float64 Grams ``MᵀM``, ``NᵀN``
  (``2 (m + n) r²`` flops at float64 speed, plus a converting pass each), two ``r × r`` Cholesky inverses (LAPACK, per-matrix cost), two
  ``(m or n) × r × r`` products (``2 (m + n) r²`` flops, float32), heavy ball and axpy (6 passes).
* RP-AdamW (δ = 1e-6, weight decay 0.01): ScaledGD's gradient, then AdamW's moments and
  step (~14 passes).
* LoRA-RITE (defaults: EMA, escaped mass, bias correction, ``row_normalize``): two Householder
  QRs (``~4 (m + n) r²`` flops, LAPACK per matrix), two float64 gradient Grams (``2 (m + n) r²``
  flops at float64 speed plus a converting pass each), two ``(m or n) × r × r`` transports
  ``VᵀV_old``, ``UᵀU_old``, four ``(m or n) × r × r`` products for the unmagnified gradients and
  the moments, two for the step (``~14 (m + n) r²`` flops in all), and per pair and side two
  ``r × r`` eigenvalue solves and one ``eigh`` in float64 (LAPACK, ~70 µs each at r = 32 here).
* LRACS: its five power iterations alone (:class:`RACSFloor`) — a lower bound of the step.
* LoRAM-FR / LoRAM-BR: their retraction alone as the library computes it (:class:`RetractionFloor`:
  FR two Householder QRs of ``(m or n) x 2r`` blocks, the ``2r x 2r`` float64 SVD, the new
  frames; BR the QR of ``V + cV̇p``, the R of ``K⁺``, the ``r x r`` float64 SVD), and the whole
  template arithmetic without the engine (``loram_fr*``, ``loram_br*``: :class:`TemplateFloor`
  replays the optimizer's ``_update_pairs`` on one step's stacked buffers). Per pair the
  tall products are ~17 (BR) and ~22 (FR) ``(m or n) x r x r`` products — at ``r = 8`` a
  ``(24, 384, 8) x (24, 8, 8)`` product takes about as long as one AdamW pass over its factor.
* Dense: ``ξ`` written once (``2r`` flops per entry), the moments (~8 passes over ``m n``), two
  ``m x n`` by ``r`` products (``4 m n r`` flops).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/floors.py [--rank 8 32] [--rounds 5] [--only loram_br]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from geolora.bench.perf import MINILM_SHAPES, adamw_factory, make_pairs, optimizer_factories
from geolora.linalg import addmm_t, gram64, mm_t, spd_inverse, sym
from geolora.optim.preconditioners.racs import racs_scalings


def _buckets(groups: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """``(M, N, ∇M, ∇N)`` stacked per shape, ``N`` and ``∇N`` column-major."""
    by: dict[tuple, list] = {}
    for g in groups:
        B, A = g["params"]
        by.setdefault((tuple(B.shape), tuple(A.shape)), []).append((B, A))
    out = []
    for pairs in by.values():
        M = torch.stack([B.detach() for B, _ in pairs])
        N = torch.stack([A.detach() for _, A in pairs]).mT
        gM = torch.stack([B.grad for B, _ in pairs])
        gN = torch.stack([A.grad for _, A in pairs]).mT
        out.append((M, N, gM, gN))
    return out


def _adam(g, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8):
    m = torch.lerp(m, g, 1 - betas[0])
    v = torch.mul(v, betas[1]).addcmul_(g, g, value=1 - betas[1])
    den = (v.sqrt() / math.sqrt(1 - betas[1] ** step)).add_(eps)
    return m, v, den, lr / (1 - betas[0] ** step)


def _scaled(M, N, gM, gN, damping=0.0):
    eye = damping * torch.eye(M.shape[-1], dtype=torch.float64)
    inv_N = spd_inverse(sym(gram64(N)) + eye).to(gM.dtype)
    inv_M = spd_inverse(sym(gram64(M)) + eye).to(gN.dtype)
    return mm_t(gM, inv_N), mm_t(gN, inv_M)


class LoRAPlusProto:
    def __init__(self, buckets, lr=1e-4, ratio=16.0):
        self.b, self.lr, self.ratio, self.t = buckets, lr, ratio, 0
        self.s = [[torch.zeros_like(x) for x in (gM, gM, gN, gN)] for _, _, gM, gN in buckets]

    def step(self):
        self.t += 1
        for i, (M, N, gM, gN) in enumerate(self.b):
            mM, vM, mN, vN = self.s[i]
            mM, vM, dM, aM = _adam(gM, mM, vM, self.t, self.lr * self.ratio)
            mN, vN, dN, aN = _adam(gN, mN, vN, self.t, self.lr)
            self.s[i] = [mM, vM, mN, vN]
            self.b[i] = (torch.addcdiv(M, mM, dM, value=-aM), torch.addcdiv(N, mN, dN, value=-aN),
                         gM, gN)


class ScaledGDProto:
    def __init__(self, buckets, lr=1e-4, momentum=0.9):
        self.b, self.lr, self.mu = buckets, lr, momentum
        self.s = [None] * len(buckets)

    def step(self):
        for i, (M, N, gM, gN) in enumerate(self.b):
            dM, dN = _scaled(M, N, gM, gN)
            if self.s[i] is not None:  # heavy ball, torch SGD's convention (b₁ = d₁)
                dM, dN = torch.add(dM, self.s[i][0], alpha=self.mu), torch.add(
                    dN, self.s[i][1], alpha=self.mu)
            self.s[i] = (dM, dN)
            self.b[i] = (torch.add(M, dM, alpha=-self.lr), torch.add(N, dN, alpha=-self.lr), gM, gN)


class RPAdamWProto(LoRAPlusProto):
    def __init__(self, buckets, lr=1e-4, damping=1e-6, eps=1e-6, weight_decay=0.01):
        super().__init__(buckets, lr, 1.0)
        self.damping, self.eps, self.wd = damping, eps, weight_decay

    def step(self):
        self.t += 1
        shrink = 1 - self.lr * self.wd
        for i, (M, N, gM, gN) in enumerate(self.b):
            sM, sN = _scaled(M, N, gM, gN, self.damping)
            mM, vM, mN, vN = self.s[i]
            mM, vM, dM, a = _adam(sM, mM, vM, self.t, self.lr, eps=self.eps)
            mN, vN, dN, _ = _adam(sN, mN, vN, self.t, self.lr, eps=self.eps)
            self.s[i] = [mM, vM, mN, vN]
            self.b[i] = (torch.addcdiv(M * shrink, mM, dM, value=-a),
                         torch.addcdiv(N * shrink, mN, dN, value=-a), gM, gN)


class RITEProto:
    """LoRA-RITE (Yen et al. 2025, Algorithm 1) with the library's defaults and precision choices:
    Householder QR frames, float64 gradient Grams (``row_normalize``), the transported second
    moment, the escaped mass from two ``r x r`` eigenvalue solves, ``eigh`` for
    ``(V̂ + ρ̂ I)^{-1/2}``, first moments in the factor dtype; both sides' ``r x r`` work stacked,
    as in :mod:`geolora.optim.preconditioners.rite`."""

    def __init__(self, buckets, lr=1e-4, betas=(0.9, 0.999), eps=1e-6):
        self.b, self.lr, self.betas, self.eps, self.t = buckets, lr, betas, eps, 0
        self.s = []
        for M, N, _, _ in buckets:
            L, m, r = M.shape
            z64 = torch.zeros(2, L, r, r, dtype=torch.float64)
            self.s.append({"U": torch.zeros_like(M), "V": torch.zeros_like(N),
                           "mM": torch.zeros_like(M), "mN": torch.zeros_like(N),
                           "sq": z64, "rho": torch.zeros(2, L, dtype=torch.float64)})

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        wd = torch.float64
        for i, (M, N, gM, gN) in enumerate(self.b):
            st, dt, r = self.s[i], M.dtype, M.shape[-1]
            U, RM = torch.linalg.qr(M)
            V, RN = torch.linalg.qr(N)
            eye = torch.eye(r, dtype=wd)
            inv_RN, inv_RM = torch.linalg.solve_triangular(
                torch.stack([RN, RM]).to(wd), eye, upper=True).to(dt).unbind(0)
            gMb, gNb = mm_t(gM, inv_RN), mm_t(gN, inv_RM)
            P = torch.stack([V.mT @ st["V"], U.mT @ st["U"]])
            rows = torch.tensor([M.shape[-2], N.shape[-2]], dtype=wd).reshape(2, 1, 1, 1)
            gram = torch.stack([gram64(gMb), gram64(gNb)]) / rows
            P64 = P.to(wd)
            V_tr = sym(P64 @ st["sq"] @ P64.mT)
            lam2 = torch.linalg.eigvalsh(torch.stack([st["sq"], V_tr]))
            rho = b2 * (st["rho"] + (lam2[0] - lam2[1]).abs().amax(-1))
            st["sq"] = b2 * V_tr + (1 - b2) * gram
            st["rho"] = rho
            lam, Q = torch.linalg.eigh((st["sq"] + rho[..., None, None] * eye) / bc2)
            pre = ((Q * ((1 - b1) / (lam.clamp_min(0).sqrt() + self.eps)).unsqueeze(-2)) @ Q.mT)
            pre = pre.to(dt)
            st["mM"] = mM = addmm_t(mm_t(gMb, pre[0]), st["mM"], P[0].mT, alpha=b1)
            st["mN"] = mN = addmm_t(mm_t(gNb, pre[1]), st["mN"], P[1].mT, alpha=b1)
            st["U"], st["V"] = U, V
            self.b[i] = (addmm_t(M, mM, inv_RN.mT, alpha=-self.lr / bc1),
                         addmm_t(N, mN, inv_RM.mT, alpha=-self.lr / bc1), gM, gN)


class DenseFloor:
    """The ``O(mnr)`` work of the dense optimizers (AdamS, its low-memory variant, Lifted(Adam)):
    per pair the dense ``ξ = A Bᵀ`` from width-``2r`` factors, Adam's moments on the ``m x n``
    entries (the first moment dense, or factored with ``low_memory``), ``Ẋ = m / (√v + ε)`` and
    the two products ``Ẋ V``, ``Ẋᵀ U`` — no frames, no lift, so a lower bound of the step."""

    def __init__(self, buckets, low_memory=False, betas=(0.9, 0.999), eps=1e-8):
        self.b, self.lm, self.betas, self.eps = [], low_memory, betas, eps
        g = torch.Generator().manual_seed(0)
        for M, N, _, _ in buckets:
            L, m, r = M.shape
            n = N.shape[1]
            rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
            self.b.append({
                "A": rnd(L, m, 2 * r), "B": rnd(L, n, 2 * r), "U": rnd(L, m, r), "V": rnd(L, n, r),
                "Am": rnd(L, m, 2 * r), "Bm": rnd(L, n, 2 * r),
                "m": None if low_memory else torch.zeros(L, m, n), "v": torch.zeros(L, m, n),
            })

    def step(self):
        b1, b2 = self.betas
        for d in self.b:
            xi = d["A"] @ d["B"].mT
            if self.lm:
                m = d["Am"] @ d["Bm"].mT
            else:
                d["m"] = m = torch.lerp(d["m"], xi, 1 - b1)
            d["v"] = v = torch.mul(d["v"], b2).addcmul_(xi, xi, value=1 - b2)
            Xd = torch.div(m, torch.sqrt(v, out=xi).add_(self.eps), out=xi)
            mm_t(Xd, d["V"]), mm_t(Xd.mT, d["U"])


class RACSFloor:
    """LRACS's power iteration alone (LoRA-S eq. 14, 5 iterations, as in
    :func:`geolora.optim.preconditioners.racs.racs_scalings`) on width-``2r`` factors
    ``A: (L, m, 2r)``, ``B: (L, n, 2r)`` of the projected gradient: per iteration ``AᵀQA``,
    ``B C``, ``BᵀSB``, ``A D`` (``4 (m + n) (2r)²`` flops) and five passes over the factors —
    a lower bound of the LRACS step (no frame, projection, lift or limiter)."""

    def __init__(self, buckets, iters=5):
        g = torch.Generator().manual_seed(0)
        self.iters = iters
        self.b = [(torch.randn(M.shape[0], M.shape[1], 2 * M.shape[2], generator=g),
                   torch.randn(N.shape[0], N.shape[1], 2 * N.shape[2], generator=g))
                  for M, N, _, _ in buckets]

    def step(self):
        for A, B in self.b:
            racs_scalings(A, B, self.iters)


class _Captured:
    """The arguments of one step's ``_update_pairs`` calls (one per bucket) of the registry's
    optimizer ``name``, captured after ``warm`` steps on the MiniLM shapes at rank ``r`` (so
    that LoRAM is on its manifold)."""

    def __init__(self, name: str, r: int, warm: int = 3) -> None:
        self.opt = optimizer_factories([name])[name](make_pairs(MINILM_SHAPES, r), 1e-4)
        for _ in range(warm):
            self.opt.step()
        self.calls: list[tuple] = []
        inner = self.opt._update_pairs

        def spy(group, x, g, work, step):
            self.calls.append((group, x, g, dict(work), step))
            return inner(group, x, g, work, step)

        self.opt._update_pairs = spy
        self.opt.step()
        self.opt._update_pairs = inner


class TemplateFloor(_Captured):
    """The template's arithmetic without the engine: the optimizer's own ``_update_pairs``
    replayed on one step's pre-stacked factors, gradients and states (no stacking, finiteness
    check or write-back). ``library / this`` is the engine's share of the step."""

    def __init__(self, buckets, name: str = "loram_br") -> None:
        M = buckets[0][0]
        super().__init__(name, M.shape[-1])

    def step(self):
        for group, x, g, work, step in self.calls:
            self.opt._update_pairs(group, x, g, dict(work), step)


class RetractionFloor(_Captured):
    """LoRAM's retraction alone, as the library computes it on pre-stacked buckets (FR: QRs of
    ``[U Up]``, ``[V Vp]``, the ``2r x 2r`` float64 SVD and the new frames, LoRAM Alg. 3; BR: the
    Q-factor retraction, the ``r x r`` float64 SVD of the canonical representative, Alg. 7), along
    the step's direction — a lower bound of the step (no gradient, moments or transport)."""

    def __init__(self, buckets, name: str = "loram_br") -> None:
        M = buckets[0][0]
        super().__init__(name, M.shape[-1])
        geo, self.todo = self.opt.geometry, []
        for group, x, g, work, step in self.calls:
            p = geo.point(x, work, group, step)
            self.todo.append((p, geo.gradient(p, g, group, step), group))

    def step(self):
        for p, d, group in self.todo:
            self.opt.geometry.retract(p, d, group)


#: Lower bounds (part of the step: not checked against the library): the dense optimizers'
#: ``O(mnr)`` work, LRACS's power iteration, LoRAM's retraction and template arithmetic.
DENSE_FLOORS: dict[str, Callable] = {
    "lracs": RACSFloor,
    "adams": DenseFloor,
    "adams_lm": lambda b: DenseFloor(b, low_memory=True),
    "lifted_adam": DenseFloor,
    "loram_fr": lambda b: RetractionFloor(b, "loram_fr"),
    "loram_br": lambda b: RetractionFloor(b, "loram_br"),
}

#: The template's arithmetic without the engine (:class:`TemplateFloor`), next to the library.
TEMPLATE_FLOORS: dict[str, Callable] = {
    "loram_fr": lambda b: TemplateFloor(b, "loram_fr"),
    "loram_br": lambda b: TemplateFloor(b, "loram_br"),
}

PROTOS: dict[str, Callable] = {
    "loraplus": LoRAPlusProto,
    "scaled_gd": ScaledGDProto,
    "rpadamw": RPAdamWProto,
    "lora_rite": RITEProto,
}


def _times(step: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.process_time()
        step()
        out.append(time.process_time() - t0)
    return out


def _check(name: str) -> float:
    """Relative difference of the prototype's ``X = M Nᵀ`` from the library's after 3 steps
    (float64)."""
    groups = make_pairs(MINILM_SHAPES[:1], 8, dtype=torch.float64)
    proto = PROTOS[name](_buckets(groups), lr=1e-2)
    opt = optimizer_factories([name])[name](groups, 1e-2)
    for _ in range(3):
        opt.step()
        proto.step()
    M, N = proto.b[0][:2]
    X = M @ N.mT  # compared as X = M Nᵀ: ScaledGD's maintenance rebalancing changes the gauge only
    lib = torch.stack([g["params"][0].detach() @ g["params"][1].detach() for g in groups])
    return float((X - lib).norm() / lib.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="+", help="registry names to time (default: all)")
    args = ap.parse_args()
    for name in PROTOS:
        if args.only and name not in args.only:
            continue
        err = _check(name)
        if err > 1e-12:
            raise SystemExit(f"{name}: the prototype differs from the library by {err:.2e}")
    print(f"threads {torch.get_num_threads()}; process CPU time, min over rounds of the median")
    print(f"{'optimizer':>10} {'r':>3} {'AdamW ms':>9} {'library':>8} {'proto':>8} "
          f"{'lib/AdamW':>9} {'floor':>6}")
    rows = [(k, v) for k, v in PROTOS.items()] + list(DENSE_FLOORS.items())
    rows += [(f"{k}*", v) for k, v in TEMPLATE_FLOORS.items()]
    only = set(args.only or [])
    for r in args.rank:
        for label, proto_cls in rows:
            name = label.rstrip("*")
            if only and name not in only:
                continue
            base = adamw_factory(torch.device("cpu"))(make_pairs(MINILM_SHAPES, r), 1e-4)
            opt = optimizer_factories([name])[name](make_pairs(MINILM_SHAPES, r), 1e-4)
            proto = proto_cls(_buckets(make_pairs(MINILM_SHAPES, r)))
            for o in (base, opt, proto):
                _times(o.step, 3)
            t = {"a": [], "o": [], "p": []}
            for _ in range(args.rounds):
                for k, o in (("a", base), ("o", opt), ("p", proto)):
                    t[k].append(statistics.median(_times(o.step, args.steps)))
            a, o, p = (1e3 * min(t[k]) for k in "aop")
            print(f"{label:>10} {r:>3} {a:9.2f} {o:8.2f} {p:8.2f} {o / a:9.2f} {p / a:6.2f}")


if __name__ == "__main__":
    main()
