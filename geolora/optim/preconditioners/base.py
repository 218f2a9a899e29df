"""The preconditioner protocol, the forms of a direction, and composition (``chain``).

A preconditioner is step 2 of the template (:mod:`geolora.optim.base`): it maps the gradient,
read in the coordinates of the optimizer's geometry, to a *raw* direction, keeping its own state.
It is self-contained in the manner of optax's ``GradientTransformation``: its hyperparameters
and their defaults live on the object (``defaults``) and become per-group hyperparameters of the
optimizer, read back from the param group ``hp`` at every step; the metric and the projection
come from the geometry through the :class:`~geolora.optim.base.StepContext` (no callback into
the optimizer); the move and the projection are not its business.

Forms of a direction (what ``update`` may return), relative to the frame ``(U, V)`` of a
quotient geometry:

* a :class:`~geolora.manifolds.types.FixedRankTangent` ``(S, Up, Vp)``: already tangent,
  ``Ẋ = U S Vᵀ + Up Vᵀ + U Vpᵀ``;
* a dense ``(..., m, n)`` tensor ``Ẋ``;
* :class:`LowRank` ``(A, B)``: ``Ẋ = A Bᵀ``;
* :class:`Products` ``(ZV, ZtU, scale)``: ``Ẋ`` given by ``Ẋ V`` and ``Ẋᵀ U`` (all that the
  projection needs), times ``scale``;
* :class:`OneSided` ``(DM, DN, divisor)``: the tangent ``Ẋ = (DM Vᵀ + U DNᵀ) / divisor``, split
  into the parts the one-sided move gives to each factor (LoRA-RITE, ScaledGD);
* in factor coordinates (:class:`~geolora.optim.geometry.FactorGeometry`): a
  :class:`FactorDirection`;
* on an owned manifold point (:mod:`geolora.optim.manifold_pair`): a tangent vector of that
  manifold.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from geolora.manifolds.types import FixedRankTangent

__all__ = [
    "ClipByNorm",
    "Descent",
    "FactorDirection",
    "IdentityPreconditioner",
    "LowRank",
    "OneSided",
    "Preconditioner",
    "Products",
    "chain",
]


class LowRank(NamedTuple):
    """A matrix ``A Bᵀ`` in factored form (``A: (..., m, k)``, ``B: (..., n, k)``)."""

    A: Tensor
    B: Tensor


class Products(NamedTuple):
    """A matrix ``Ẋ`` given by ``ZV = Ẋ V: (..., m, r)`` and ``ZtU = Ẋᵀ U: (..., n, r)`` (the
    frame's ``U``, ``V``) and a factor ``scale`` (a number or a batch-shaped tensor); its
    projection onto ``T_X`` needs nothing else (Vandereycken 2013, eq. 2.5)."""

    ZV: Tensor
    ZtU: Tensor
    scale: Any = 1.0


class OneSided(NamedTuple):
    """The tangent ``Ẋ = (DM Vᵀ + U DNᵀ) / divisor`` (``DM: (..., m, r)``, ``DN: (..., n, r)``)
    in the split the one-sided move uses: ``Ṁ = DM R_N⁻ᵀ / divisor``, ``Ṅ = DN R_M⁻ᵀ / divisor``
    (the "unmagnified" coordinates of Yen et al., "LoRA Done RITE: Robust Invariant Transformation
    Equilibration for LoRA Optimization", ICLR 2025, arXiv:2410.20625, eq. 11)."""

    DM: Tensor
    DN: Tensor
    divisor: float = 1.0


class FactorDirection(NamedTuple):
    """A direction in factor coordinates ``(Ṁ, Ṅ)``; with ``den`` it is ``num / den / divisor``
    (Adam's quotient, applied by the move in ``torch.optim.AdamW``'s arithmetic), and
    ``lr_scale`` multiplies the learning rate of each factor (LoRA+'s ratio)."""

    M: Tensor
    N: Tensor
    den: tuple[Tensor, Tensor] | None = None
    divisor: float = 1.0
    lr_scale: tuple[float, float] = (1.0, 1.0)


Descent = FixedRankTangent | Tensor | LowRank | Products | OneSided | FactorDirection


class Preconditioner(Protocol):
    """``init_state`` / ``update`` (optax's ``GradientTransformation``, in the coordinates of the
    optimizer's geometry).

    Attributes a preconditioner may declare (all optional):

    * ``name``: a short name;
    * ``defaults``: ``{hyperparameter: default}`` — they become the optimizer's per-group
      hyperparameters; ``update`` reads them from ``hp``;
    * ``wants``: the gradient coordinates it needs from a quotient geometry: ``"tangent"``
      (default, ``ξ = P_T(∇_X f)`` as a ``FixedRankTangent``) or ``"products"``
      (``Products(∇_X f V, ∇_X fᵀ U)``, the unmagnified factor gradients);
    * ``functional_state``: ``True`` if ``update`` never modifies a state tensor in place (it
      assigns new tensors to keys), so the optimizer need not copy the state first;
    * ``validate(hp)``: raise ``ValueError``/``TypeError`` for invalid hyperparameters;
    * ``gauge_rules``: how its state moves under a change of factorisation ``(M R, N R⁻ᵀ)``
      (``{}``: its state lives in matrix space; else ``{key: rule}``,
      :data:`~geolora.optim.gauge.GAUGE_RULES`) — needed by a gauge hook (rebalancing, RefLoRA);
    * ``transport(state, transport)``: for geometries that move their frame during the step (a
      retraction), carry frame-attached state along (see :mod:`geolora.optim.manifold_pair`).
      Quotient geometries transport lazily instead: such a preconditioner stores the frame its
      state lives in and projects at its next update (:func:`~geolora.optim.preconditioners.
      momentum.transport_factored`).
    """

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        """Zero state of one pair; ``like`` gives dtype and device."""
        ...

    def update(self, state: dict[str, Tensor], grad: Any, ctx: Any, hp: dict, step: int) -> Any:
        """Update ``state`` (stacked over pairs; reassign keys or modify in place) and return the
        direction for gradient ``grad`` at 1-based ``step``; ``hp`` is the param group."""
        ...


def _bias(beta: float, step: int, enabled: bool) -> float:
    return 1.0 - beta**step if enabled else 1.0


class IdentityPreconditioner:
    """``Ẋ = ξ``: Riemannian gradient descent (lifted SGD on a quotient geometry)."""

    name = "identity"
    gauge_rules: dict[str, str] = {}  # no state
    functional_state = True
    row_shards = True  # nothing to sum
    defaults: dict[str, Any] = {}

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(self, state, grad, ctx, hp, step):
        return grad


class ClipByNorm:
    """Scale the direction down to norm ``max_norm`` where it is longer (per pair), the norm
    being the geometry's metric norm of its tangent (``ctx.metric_norm``; ``metric=False``: the
    Frobenius norm of ``Ẋ``). Hyperparameter ``max_norm`` (``inf``: no clipping)."""

    name = "clip"
    gauge_rules: dict[str, str] = {}  # no state
    functional_state = True

    def __init__(self, max_norm: float = 1.0, *, metric: bool = True) -> None:
        self.defaults = {"max_norm": max_norm}
        self.metric = metric

    def validate(self, hp: dict) -> None:
        c = hp["max_norm"]
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
            raise ValueError(f"invalid max_norm: {c!r} (expected a number > 0)")

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(self, state, grad, ctx, hp, step):
        t = ctx.project(grad)
        if self.metric:
            norm = ctx.metric_norm(t)
        else:
            norm = sum((a * a).sum(dim=(-2, -1)) for a in t).sqrt()
        norm = norm.to(t.M.dtype)
        c = torch.clamp(hp["max_norm"] / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
        c = c[..., None, None]
        return FixedRankTangent(c * t.M, c * t.Up, c * t.Vp)


class _Chain:
    """Preconditioners applied in order (:func:`chain`)."""

    name = "chain"

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts
        self.defaults: dict[str, Any] = {}
        for p in parts:
            for k, v in getattr(p, "defaults", {}).items():
                if k in self.defaults and self.defaults[k] != v:
                    raise ValueError(
                        f"chain: {type(p).__name__} declares hyperparameter {k!r} = {v!r}, an "
                        f"earlier part {self.defaults[k]!r}; rename one of them"
                    )
                self.defaults[k] = v
        self.wants = getattr(parts[0], "wants", "tangent")
        self.functional_state = all(getattr(p, "functional_state", False) for p in parts)
        rules = [getattr(p, "gauge_rules", None) for p in parts]
        self.gauge_rules = None if None in rules else {k: v for r in rules for k, v in r.items()}

    def validate(self, hp: dict) -> None:
        for p in self.parts:
            check = getattr(p, "validate", None)
            if check is not None:
                check(hp)

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for p in self.parts:
            own = p.init_state(m, n, r, like)
            clash = state.keys() & own.keys()
            if clash:
                raise ValueError(f"chain: parts share state key(s) {sorted(clash)}")
            state.update(own)
        return state

    def update(self, state, grad, ctx, hp, step):
        for p in self.parts:
            grad = p.update(state, grad, ctx, hp, step)
        return grad

    def transport(self, state: dict[str, Tensor], transport: Any) -> None:
        for p in self.parts:
            move = getattr(p, "transport", None)
            if move is not None:
                move(state, transport)


def chain(*preconditioners: Any) -> Any:
    """Compose preconditioners: the direction of one is the input of the next (optax's
    ``chain``). Their hyperparameters and state keys are merged (a clash is an error). Example:
    ``chain(RITEPreconditioner(), ClipByNorm(1.0))`` clips LoRA-RITE's direction by its metric
    norm; with :class:`~geolora.optim.geometry.Lift` under the balanced metric it is an
    invariant optimizer of its own."""
    if not preconditioners:
        raise ValueError("chain() needs at least one preconditioner")
    return _Chain(tuple(preconditioners))
