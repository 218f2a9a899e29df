"""StelLA: any Euclidean torch optimizer made Riemannian for ``ΔW = s · U S Vᵀ``, ``U``, ``V`` on
Stiefel manifolds.

Li, Sajadmanesh, Li & Lyu, "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel
Manifold", NeurIPS 2025 (arXiv:2510.01938). The adapter is :class:`geolora.lora.ThreeFactorLinear`
(``init="stella"``: ``U``, ``V`` random orthonormal, ``S = I``). For every Stiefel factor
``X ∈ St(n, r)`` (``U`` and ``V`` of each three-factor group) one step of the wrapped optimizer
``O`` becomes, with the Euclidean gradient ``G``:

1. ``G ← G − X GᵀX`` (the Riemannian gradient of the canonical metric,
   :func:`~geolora.manifolds.landing.canonical_rgrad`), handed to ``O`` as ``X.grad``;
2. ``O.step()`` — the unchanged Euclidean optimizer, with its own state, on every parameter
   (``S`` and ordinary parameters get its plain Euclidean step);
3. ``Δ = X_O − X`` (``X_O`` what ``O`` wrote), optionally ``Δ ← Δ / √(n / c)``
   (``grad_scaling=c``), ``Δ ← Δ − X sym(XᵀΔ)`` (projection onto ``T_X``, embedded metric), and
   ``X ← R_X(Δ)`` with the polar retraction ``polar(X + Δ)`` (default), the canonical-metric
   exponential map (``"exp"``, Edelman, Arias & Smith 1998 eq. 2.45) or the QR retraction.

:func:`stella_rgrad` and :func:`stella_retract` are these maps as batched functions;
:func:`StelLA` turns a ``torch.optim.Optimizer`` class into this optimizer (``StelLAAdamW =
StelLA(torch.optim.AdamW)`` is the authors' configuration).

How it differs from geolora's other Stiefel optimizers: :class:`~geolora.optim.RiemannianAdam` on
Stiefel ``ManifoldParameter`` s uses the embedded-metric gradient ``P_X(G)``, keeps its first moment
in the tangent space and transports it by projection, and retracts ``−lr m̂ / (√v̂ + ε)`` itself;
StelLA feeds the canonical gradient to an unmodified Euclidean optimizer whose moments live in
ambient coordinates and are never transported, and projects the optimizer's *step*. The two
differ from the first step on (``docs/optimizers/stella.md`` has the numbers).
:func:`~geolora.optim.Lifted` is unrelated (a torch optimizer on ``X = B A`` of a LoRA pair).

Parameter groups: a three-factor group ``{"params": [U, S, V], "lora_triple": True, ...}`` is
split into ``{"params": [U, V], "stiefel": True, "weight_decay": 0.0, ...}`` and
``{"params": [S], ...}`` (the authors' trainer excludes ``U``, ``V`` from weight decay); a group
``{"params": [...], "stiefel": True}`` is taken as it is (tall ``(n, r)`` matrices, ``n ≥ r``);
every other group is Euclidean.

Deviations from the authors' code (github.com/SonyResearch/stella, its pre- and post-step
hooks):

* ``grad_scaling`` defaults to ``None`` (off): the authors' default ``True`` uses the model's
  ``hidden_size`` as ``c``, which an optimizer does not know — pass it as a number;
* the gradient conversion and the retraction run in float32 for low-precision parameters (the
  authors run them in the parameters' dtype) and the parameters' own ``.grad`` is restored after
  the step (the authors overwrite it);
* non-finite gradients raise ``FloatingPointError`` naming the parameter before anything changes;
* factors are stored tall (``V: (in, r)``), so no transposition is needed (the authors transpose
  their ``(r, in)`` ``V`` weight to the tall orientation and back).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, polar, qf, sym, transpose
from geolora.manifolds.landing import canonical_rgrad
from geolora.optim.three_factor import TRIPLE_KEY, validate_triple
from geolora.optim.validation import check_gradients

__all__ = [
    "StelLA",
    "StelLAAdamW",
    "StelLAOptimizer",
    "stella_retract",
    "stella_rgrad",
    "stiefel_canonical_exp",
]

RETRACTIONS = ("polar", "exp", "qr")
STIEFEL_KEY = "stiefel"


def stella_rgrad(x: Tensor, g: Tensor) -> Tensor:
    """Step 1: ``G − X GᵀX`` (canonical-metric Riemannian gradient), ``(..., n, r)``."""
    return canonical_rgrad(x, g)


def stiefel_canonical_exp(x: Tensor, u: Tensor) -> Tensor:
    """Exponential map of ``St(n, r)`` under the canonical metric (Edelman, Arias & Smith 1998,
    eq. 2.45): with ``A = XᵀU`` and ``Q R = (I − X Xᵀ) U`` (thin QR),
    ``Exp_X(U) = [X Q] expm([[A, −Rᵀ], [R, 0]]) [I; 0]``. Shapes ``(..., n, r)``; cost
    ``O(n r²)`` plus a ``2r × 2r`` matrix exponential."""
    a = transpose(x) @ u
    q, r = torch.linalg.qr(u - x @ a)
    top = torch.cat([a, -transpose(r)], dim=-1)
    bottom = torch.cat([r, torch.zeros_like(r)], dim=-1)
    e = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))
    k = x.shape[-1]
    return x @ e[..., :k, :k] + q @ e[..., k:, :k]


def stella_retract(
    x: Tensor, x_opt: Tensor, *, retraction: str = "polar", scale: float | None = None
) -> Tensor:
    """Steps 3: ``Δ = (X_O − X) / scale``, ``Δ ← Δ − X sym(XᵀΔ)``, ``R_X(Δ)``. ``x``: the point
    before the optimizer's step, ``x_opt``: after it; ``(..., n, r)``."""
    delta = x_opt - x
    if scale is not None and scale != 1.0:
        delta = delta / scale
    delta = delta - x @ sym(transpose(x) @ delta)
    if retraction == "polar":
        return polar(x + delta)
    if retraction == "exp":
        return stiefel_canonical_exp(x, delta)
    if retraction == "qr":
        return qf(x + delta)
    raise ValueError(f"unknown retraction {retraction!r}; choose one of {RETRACTIONS}")


def _split_groups(params: Any) -> list[Any]:
    """Three-factor groups → a Stiefel group ``[U, V]`` (no weight decay) and a group ``[S]``."""
    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        return groups
    out: list[dict[str, Any]] = []
    for g in groups:
        if not g.get(TRIPLE_KEY, False):
            out.append(g)
            continue
        g = dict(g)
        del g[TRIPLE_KEY]
        g["params"] = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
        validate_triple(g)
        U, S, V = g["params"]
        rest = {k: v for k, v in g.items() if k != "params"}
        out.append({**rest, "params": [U, V], STIEFEL_KEY: True, "weight_decay": 0.0})
        out.append({**rest, "params": [S]})
    return out


class StelLAOptimizer(torch.optim.Optimizer):
    """Base of the classes :func:`StelLA` returns (mixed in before the wrapped optimizer class).

    Args:
        params: tensors or groups (three-factor, ``stiefel`` or ordinary; module docstring).
        retraction: ``"polar"`` (the authors' default), ``"exp"`` or ``"qr"``.
        grad_scaling: ``c`` of the step scaling ``Δ / √(n / c)`` (``None``: off; the authors use
            the model's hidden size).
        **kwargs: the wrapped optimizer's hyperparameters.
    """

    stella_defaults: dict[str, Any] = {}

    def __init__(
        self,
        params: Any,
        *args: Any,
        retraction: str = "polar",
        grad_scaling: float | None = None,
        **kwargs: Any,
    ) -> None:
        if retraction not in RETRACTIONS:
            raise ValueError(f"invalid retraction: {retraction!r} (expected one of {RETRACTIONS})")
        if grad_scaling is not None and not (
            isinstance(grad_scaling, (int, float))
            and math.isfinite(grad_scaling)
            and grad_scaling > 0
        ):
            raise ValueError(
                f"invalid grad_scaling: {grad_scaling!r} (expected a number > 0 or None)"
            )
        self.retraction = retraction
        self.grad_scaling = grad_scaling
        super().__init__(_split_groups(params), *args, **{**self.stella_defaults, **kwargs})
        for group in self.param_groups:
            if group.get(STIEFEL_KEY, False):
                for i, p in enumerate(group["params"]):
                    if p.dim() != 2 or p.shape[0] < p.shape[1]:
                        raise ValueError(
                            f"Stiefel factor {_label(group, i)} must be a tall (n, r) matrix with "
                            f"n >= r, got shape {tuple(p.shape)}"
                        )

    def _scale(self, n: int) -> float | None:
        c = self.grad_scaling
        return None if c is None or n == c else math.sqrt(n / c)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Canonical gradients → the wrapped optimizer's step → projection and retraction."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_gradients(self.param_groups, lambda gi, group, i: _label(group, i))
        stiefel = [
            p
            for group in self.param_groups
            if group.get(STIEFEL_KEY, False)
            for p in group["params"]
            if p.grad is not None
        ]
        before = [p.detach().to(compute_dtype(p.dtype)).clone() for p in stiefel]
        saved = [p.grad for p in stiefel]
        try:
            for p, x in zip(stiefel, before):
                p.grad = stella_rgrad(x, p.grad.to(x.dtype)).to(p.grad.dtype)
            super().step()
        finally:
            for p, g in zip(stiefel, saved):
                p.grad = g
        for p, x in zip(stiefel, before):
            new = stella_retract(
                x, p.detach().to(x.dtype), retraction=self.retraction, scale=self._scale(x.shape[0])
            )
            p.copy_(new)
        return loss


def _label(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return str(names[i])
    base = group.get("name") or "group"
    if group.get(STIEFEL_KEY, False) and len(group["params"]) == 2 and "name" in group:
        return f"{base}.{('lora_U', 'lora_V')[i]}"
    return f"{base}[{i}]"


def StelLA(  # noqa: N802 - a class factory, named like the classes it returns
    torch_optimizer_class: type[torch.optim.Optimizer], **defaults: Any
) -> type[StelLAOptimizer]:
    """``StelLA(torch.optim.X)``: the class of ``X`` made Riemannian on the Stiefel factors
    (module docstring). ``defaults`` become the class's defaults for ``X``'s hyperparameters. The
    class is named ``"StelLA" + X.__name__``; its constructor is
    ``(params, *args, retraction="polar", grad_scaling=None, **kwargs)``.

    Supported: optimizers whose ``step()`` needs no closure (SGD, Adam, AdamW, RMSprop, ...).
    """
    cls = torch_optimizer_class
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(
            f"torch_optimizer_class must be a torch.optim.Optimizer subclass, got {cls!r}"
        )
    if issubclass(cls, StelLAOptimizer):
        raise TypeError(f"{cls.__name__} is already a StelLA optimizer")
    if issubclass(cls, torch.optim.LBFGS):
        raise TypeError("LBFGS needs a closure per step; StelLA() cannot wrap it")
    own = {k: defaults.pop(k) for k in ("retraction", "grad_scaling") if k in defaults}
    if own.get("retraction", "polar") not in RETRACTIONS:
        raise ValueError(
            f"invalid retraction: {own['retraction']!r} (expected one of {RETRACTIONS})"
        )
    name = f"StelLA{cls.__name__}"
    return type(
        name,
        (StelLAOptimizer, cls),
        {
            "stella_defaults": dict(defaults),
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": (
                f"{cls.__name__} made Riemannian on the Stiefel factors of three-factor adapters "
                f"(StelLA; see :mod:`geolora.optim.stella`). Defaults: {defaults!r}."
            ),
        },
    )


StelLAAdamW = StelLA(torch.optim.AdamW)
"""``StelLA(torch.optim.AdamW)``: the authors' configuration (AdamW, polar retraction)."""
