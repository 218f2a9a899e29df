"""Riemannian Adam and SGD on any geolora manifold (and on geoopt manifold parameters).

Bécigneul & Ganea, "Riemannian adaptive optimization methods", ICLR 2019 (arXiv:1810.00760),
Alg. 1 (RADAM) as implemented by geoopt's ``RiemannianAdam``: for a point ``x`` with Euclidean
gradient ``∇f(x)``::

    g  = egrad2rgrad(x, ∇f(x) + λ x)                     (λ: L2 weight decay, tensor points only)
    m  ← β₁ m + (1 − β₁) g                                (a tangent vector at x)
    v  ← β₂ v + (1 − β₂) ‖g‖²_x        (norm-based, default; one number per point)
    v  ← β₂ v + (1 − β₂) g ⊙ g         (coordinate_wise=True; LoRAM's choice, Alg. 1)
    d  = (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
    x⁺, m ← retr_transp(x, −lr d, m)                      (momentum transported to T_{x⁺})

The coordinate-wise second moment is the choice of LoRAM (Jiang, Wang & Stich, "LoRAM: Low-Rank
Adaptation of Large Language Models on Manifold", ICLR 2025 Workshop on Sparsity in LLMs,
OpenReview 6cLPObfitT, Alg. 1). The optimizers only use the manifold seam (``egrad2rgrad``,
``inner``, ``retr``, ``retr_transp``); the functional cores :func:`adam_direction`,
:func:`riemannian_adam_update` and :func:`riemannian_sgd_update` take leading batch dimensions
and (Named)tuple points, and are shared with the LoRA optimizers (:mod:`geolora.optim.loram`,
:mod:`geolora.optim.stiefel_lora`).

Parameters and groups of :class:`RiemannianAdam` / :class:`RiemannianSGD` (plain
``torch.optim.Optimizer`` subclasses, one point at a time):

* a :class:`ManifoldParameter` (``nn.Parameter`` carrying ``.manifold``) or a
  ``geoopt.ManifoldParameter`` is a point of its manifold. geoopt Stiefel manifolds are mapped to
  :class:`geolora.manifolds.stiefel.Stiefel` (embedded metric, :func:`~geolora.manifolds.stiefel.
  from_geoopt`); any other geoopt manifold is used through its own geoopt methods;
* a group ``{"params": [...], "manifold": M}`` puts every tensor of the group on ``M``; for a
  manifold whose points are tuples (``FixedRank``: ``(U, S, V)``, ``BoundedRank``: ``(K, V)``,
  ``FactorQuotient``: ``(M, N)``) the group's tensors, in field order, form ONE point;
* any other tensor is Euclidean with an element-wise inner product, so it gets plain Adam / SGD
  (geoopt's convention).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from geolora.manifolds.base import Manifold, tree_leaves, tree_map
from geolora.manifolds.euclidean import Euclidean
from geolora.optim.validation import check_gradients, prepare_group, validate_betas
from geolora.optim.validation import check_range as _check_range

__all__ = [
    "ManifoldParameter",
    "RiemannianAdam",
    "RiemannianSGD",
    "adam_direction",
    "riemannian_adam_update",
    "riemannian_sgd_update",
    "resolve_manifold",
]


# --- parameters -------------------------------------------------------------------------------
def _rebuild_manifold_parameter(
    data: Tensor, manifold: Any, requires_grad: bool
) -> ManifoldParameter:
    return ManifoldParameter(data, manifold, requires_grad)


class ManifoldParameter(torch.nn.Parameter):
    """An ``nn.Parameter`` that is a point of ``manifold`` (attribute ``.manifold``).

    ``ManifoldParameter(tensor, manifold, requires_grad=True)``; the tensor is not projected or
    checked (call ``manifold.check_point(p)`` for that). Deep copies and pickles keep the class
    and the manifold. :class:`RiemannianAdam` / :class:`RiemannianSGD` keep it on the manifold.
    """

    manifold: Any

    def __new__(
        cls, data: Tensor | None = None, manifold: Any = None, requires_grad: bool = True
    ) -> ManifoldParameter:
        if manifold is None:
            raise TypeError(
                "ManifoldParameter needs a manifold: ManifoldParameter(tensor, manifold)"
            )
        if data is None:
            data = torch.empty(0)
        if not isinstance(data, Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        inst = torch.Tensor._make_subclass(cls, data.detach(), requires_grad)
        inst.manifold = manifold
        return inst

    def __deepcopy__(self, memo: dict) -> ManifoldParameter:
        if id(self) in memo:
            return memo[id(self)]
        data = self.data.clone(memory_format=torch.preserve_format)
        result = type(self)(data, copy.deepcopy(self.manifold, memo), self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto: int):  # type: ignore[override]
        return (_rebuild_manifold_parameter, (self.data, self.manifold, self.requires_grad))

    def __repr__(self) -> str:
        return f"ManifoldParameter on {self.manifold!r} containing:\n{torch.Tensor.__repr__(self)}"


class _GeooptManifold:
    """A geoopt manifold seen through geolora's seam (geoopt's own formulas, reductions and
    ``ndim``)."""

    def __init__(self, manifold: Any) -> None:
        self.manifold = manifold
        self.ndim = int(manifold.ndim)

    def egrad2rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        return self.manifold.egrad2rgrad(x, g)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        return self.manifold.inner(x, u, v)

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        return self.manifold.retr(x, u)

    def retr_transp(self, x: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.manifold.retr_transp(x, u, v)

    def __repr__(self) -> str:
        return f"geoopt:{self.manifold!r}"


def _is_geoopt_manifold(m: Any) -> bool:
    try:
        import geoopt
    except ImportError:  # pragma: no cover - geoopt is a dependency
        return False
    return isinstance(m, geoopt.manifolds.base.Manifold)


def resolve_manifold(param: Tensor, manifold: Any = None) -> Any:
    """The geolora-seam manifold of a point tensor.

    ``manifold`` (a group's) or else ``param.manifold`` (ours or geoopt's); none → element-wise
    Euclidean (``Euclidean(ndim=0)``: Adam / SGD). geoopt Stiefel manifolds become
    :class:`geolora.manifolds.stiefel.Stiefel` of the parameter's shape (embedded metric);
    other geoopt manifolds are wrapped. ``TypeError`` for anything else.
    """
    m = manifold if manifold is not None else getattr(param, "manifold", None)
    if m is None:
        return Euclidean(ndim=0)
    if isinstance(m, Manifold):
        return m
    if _is_geoopt_manifold(m):
        import geoopt

        if isinstance(m, geoopt.Stiefel):
            from geolora.manifolds.stiefel import from_geoopt

            return from_geoopt(param)
        return _GeooptManifold(m)
    raise TypeError(
        f"manifold must be a geolora Manifold or a geoopt manifold, got {type(m).__name__}"
    )


def _point_type(manifold: Any) -> type | None:
    """NamedTuple type of the points of a multi-tensor manifold, ``None`` for tensor points."""
    from geolora.manifolds.bounded_rank import BoundedRank
    from geolora.manifolds.fixed_rank import FixedRank
    from geolora.manifolds.quotient import FactorQuotient
    from geolora.manifolds.types import BoundedRankPoint, FactorPoint, FixedRankPoint

    for cls, pt in ((FixedRank, FixedRankPoint), (BoundedRank, BoundedRankPoint)):
        if isinstance(manifold, cls):
            return pt
    if isinstance(manifold, FactorQuotient):
        return FactorPoint
    return None


def _egrad2rgrad_tuple(manifold: Any, x: tuple, grads: tuple[Tensor, ...]) -> tuple:
    """Riemannian gradient from the autograd gradients of the fields of a tuple point.

    FixedRank: ``f(U diag(S) Vᵀ)`` gives ``∂f/∂U = ∇f V diag(S)``, ``∂f/∂V = ∇fᵀ U diag(S)``, so
    ``∇f V`` and ``∇fᵀ U`` are these divided by ``S > 0`` (``∂f/∂S`` is redundant) and feed
    ``project_factored`` (LoRAM Alg. 2). Other manifolds (BoundedRank, FactorQuotient) take the
    tuple of factor gradients in ``egrad2rgrad`` directly.
    """
    from geolora.manifolds.fixed_rank import FixedRank

    if isinstance(manifold, FixedRank):
        gU, _, gV = grads
        s = x.S.unsqueeze(-2)
        return manifold.project_factored(x, gU / s, gV / s)
    return manifold.egrad2rgrad(x, tuple(grads))


# --- functional cores -------------------------------------------------------------------------
def _inner_keepdim(manifold: Any, x: Any, u: Any) -> Tensor:
    """``<u, u>_x`` with singleton dims appended so it broadcasts against every field of ``u``."""
    val = manifold.inner(x, u)
    nd = int(getattr(manifold, "ndim", 2))
    return val.reshape(val.shape + (1,) * nd)


def adam_direction(
    manifold: Any,
    x: Any,
    rgrad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    betas: tuple[float, float],
    eps: float,
    coordinate_wise: bool = False,
    bias_correction: bool = True,
    max_exp_avg_sq: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """Moments and ascent direction of one Riemannian Adam step (module docstring formulas).

    ``x``: point, ``rgrad``/``exp_avg``: tangent vectors at ``x`` (tensors or NamedTuples, any
    batch dims); ``exp_avg_sq``: same structure as ``rgrad`` (``coordinate_wise``) or the
    norm-based ``(..., 1, …)`` tensor (batch shape plus ``manifold.ndim`` singleton dims);
    ``max_exp_avg_sq``: AMSGrad running maximum or ``None``. ``step`` is 1-based.
    Returns ``(direction, exp_avg, exp_avg_sq, max_exp_avg_sq)``, all new tensors; the step is
    ``x⁺ = R_x(−lr · direction)``.
    """
    b1, b2 = betas
    m = tree_map(lambda a, g: b1 * a + (1 - b1) * g, exp_avg, rgrad)
    if coordinate_wise:
        v = tree_map(lambda s, g: b2 * s + (1 - b2) * (g * g), exp_avg_sq, rgrad)
    else:
        v = b2 * exp_avg_sq + (1 - b2) * _inner_keepdim(manifold, x, rgrad)
    vmax = None if max_exp_avg_sq is None else tree_map(torch.maximum, max_exp_avg_sq, v)
    vden = v if vmax is None else vmax
    bc1 = 1.0 - b1**step if bias_correction else 1.0
    bc2 = 1.0 - b2**step if bias_correction else 1.0
    if coordinate_wise:
        d = tree_map(lambda a, s: (a / bc1) / ((s / bc2).sqrt() + eps), m, vden)
    else:
        denom = (vden / bc2).sqrt() + eps
        d = tree_map(lambda a: (a / bc1) / denom, m)
    return d, m, v, vmax


def riemannian_adam_update(
    manifold: Any,
    x: Any,
    rgrad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    coordinate_wise: bool = False,
    bias_correction: bool = True,
    max_exp_avg_sq: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """One Riemannian Adam step: :func:`adam_direction`, then
    ``x⁺, m ← retr_transp(x, −lr · direction, m)``.

    Returns ``(x⁺, exp_avg at x⁺, exp_avg_sq, max_exp_avg_sq)``. With
    ``coordinate_wise=True, bias_correction=False`` this is exactly LoRAM Alg. 1 (lines 5–12).
    """
    d, m, v, vmax = adam_direction(
        manifold,
        x,
        rgrad,
        exp_avg,
        exp_avg_sq,
        step=step,
        betas=betas,
        eps=eps,
        coordinate_wise=coordinate_wise,
        bias_correction=bias_correction,
        max_exp_avg_sq=max_exp_avg_sq,
    )
    x_new, m_new = manifold.retr_transp(x, tree_map(lambda t: -lr * t, d), m)
    return x_new, m_new, v, vmax


def riemannian_sgd_update(
    manifold: Any,
    x: Any,
    rgrad: Any,
    momentum_buffer: Any,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[Any, Any]:
    """One Riemannian SGD step with transported momentum (torch.optim.SGD's recursion).

    ``b ← g`` (first step, ``momentum_buffer=None``) or ``b ← μ b + (1 − τ) g``;
    ``d = g + μ b`` (Nesterov) or ``d = b``; ``x⁺, b ← retr_transp(x, −lr d, b)``.
    Without momentum ``x⁺ = R_x(−lr g)``. Returns ``(x⁺, b at x⁺ or None)``.
    """
    if momentum == 0.0:
        return manifold.retr(x, tree_map(lambda g: -lr * g, rgrad)), None
    if momentum_buffer is None:
        b = tree_map(lambda g: g.clone(), rgrad)
    else:
        b = tree_map(lambda a, g: momentum * a + (1 - dampening) * g, momentum_buffer, rgrad)
    d = tree_map(lambda g, a: g + momentum * a, rgrad, b) if nesterov else b
    return manifold.retr_transp(x, tree_map(lambda t: -lr * t, d), b)


# --- optimizers -------------------------------------------------------------------------------
class _RiemannianOptimizer(torch.optim.Optimizer):
    """Groups of manifold points, validation and gradient checks shared by Adam and SGD."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = prepare_group(
            self, param_group, ("params", "manifold", "name"), shown=("manifold",)
        )
        params = param_group["params"]
        manifold = param_group.get("manifold")
        if manifold is not None and not (
            isinstance(manifold, Manifold) or _is_geoopt_manifold(manifold)
        ):
            raise TypeError(
                "group option 'manifold' must be a geolora Manifold or a geoopt manifold, got "
                f"{type(manifold).__name__}"
            )
        ptype = _point_type(manifold) if manifold is not None else None
        if ptype is not None and len(params) != len(ptype._fields):
            raise ValueError(
                f"params: a group on {manifold!r} holds one point, its tensors "
                f"{ptype._fields} in this order; got {len(params)} tensor(s)"
            )
        for p in params:
            own = getattr(p, "manifold", None)
            if manifold is not None and own is not None and own is not manifold:
                raise ValueError(
                    f"manifold given twice: the group's {manifold!r} and the parameter's {own!r}"
                )
            if manifold is None and own is not None and _point_type(own) is not None:
                raise ValueError(
                    f"params: a point of {own!r} is several tensors; pass them as one group "
                    "{'params': [fields...], 'manifold': manifold}"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_hyperparameters(group)
            if ptype is not None and group.get("weight_decay", 0.0):
                raise ValueError(
                    f"weight_decay must be 0 for a group on {manifold!r} (L2 decay of the point's "
                    "fields has no meaning there)"
                )
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer unchanged
            raise

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        _check_range("lr", group["lr"], 0.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)

    def _points(self, group: dict[str, Any]) -> Iterable[tuple[list[Tensor], Any, type | None]]:
        """``(tensors of one point, manifold, point type or None)`` of a group."""
        gm = group.get("manifold")
        ptype = _point_type(gm) if gm is not None else None
        if ptype is not None:
            yield group["params"], gm, ptype
            return
        for p in group["params"]:
            yield [p], resolve_manifold(p, gm), None

    def _check_grads(self) -> None:
        check_gradients(self.param_groups, _point_label)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One step over all points (``closure`` re-evaluates the loss): for each point with a
        gradient, its Riemannian gradient and :meth:`_update_point`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            for params, manifold, ptype in self._points(group):
                got = self._gather(params, ptype, group["weight_decay"])
                if got is None:
                    continue
                x, g = got
                rgrad = self._rgrad(manifold, x, g, ptype)
                st = self.state[params[0]]
                self._write(params, self._update_point(group, manifold, x, rgrad, st))
        return loss

    def _update_point(
        self, group: dict[str, Any], manifold: Any, x: Any, rgrad: Any, st: dict
    ) -> Any:
        """The new point from the Riemannian gradient ``rgrad`` at ``x``; updates the point's
        state ``st`` (its first tensor's)."""
        raise NotImplementedError

    @staticmethod
    def _gather(
        params: list[Tensor], ptype: type | None, weight_decay: float
    ) -> tuple[Any, Any] | None:
        """``(point, Euclidean gradient)`` of one point, or ``None`` if it has no gradient."""
        if all(p.grad is None for p in params):
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if ptype is None:
            x, g = params[0].detach(), grads[0]
            if weight_decay:
                g = g + weight_decay * x
            return x, g
        return ptype(*(p.detach() for p in params)), tuple(grads)

    @staticmethod
    def _rgrad(manifold: Any, x: Any, g: Any, ptype: type | None) -> Any:
        if ptype is None:
            return manifold.egrad2rgrad(x, g)
        return _egrad2rgrad_tuple(manifold, x, g)

    @staticmethod
    def _write(params: list[Tensor], x_new: Any) -> None:
        for p, t in zip(params, tree_leaves(x_new)):
            p.copy_(t)


def _point_label(gi: int, group: dict[str, Any], i: int) -> str:
    label = f"param_groups[{gi}]['params'][{i}]"
    return label if group.get("name") is None else f"{label} ({group['name']})"


def _load_tangent(state: dict, prefix: str, like: Any) -> Any:
    if isinstance(like, Tensor):
        return state[prefix]
    return type(like)(*(state[f"{prefix}.{f}"] for f in like._fields))


def _store_tangent(state: dict, prefix: str, t: Any) -> None:
    if isinstance(t, Tensor):
        state[prefix] = t
        return
    for f, v in zip(t._fields, t):
        state[f"{prefix}.{f}"] = v


class RiemannianAdam(_RiemannianOptimizer):
    """Riemannian Adam (Bécigneul & Ganea 2019, Alg. 1; geoopt's ``RiemannianAdam``) on any
    geolora or geoopt manifold — formulas in the module docstring.

    Args:
        params: tensors / :class:`ManifoldParameter` s / groups (a group may set ``"manifold"``).
        lr: learning rate. betas, eps: Adam's (defaults ``(0.9, 0.999)``, ``1e-8`` as the paper).
        weight_decay: L2 coefficient added to the Euclidean gradient before ``egrad2rgrad`` (as
            geoopt; it vanishes on Stiefel, whose points have fixed norm); tensor points only.
        amsgrad: use ``max(v)`` (RAMSGrad, Alg. 1 of the paper).
        coordinate_wise: element-wise second moment on the tangent coordinates instead of the
            norm-based ``‖g‖²_x`` (it is not transported; LoRAM Alg. 1 does the same).

    State per point (on its first tensor): ``step`` (tensor), ``exp_avg`` (tangent vector, its
    fields as ``exp_avg.<field>`` for tuple points), ``exp_avg_sq`` (likewise, or one number per
    point), ``max_exp_avg_sq`` with ``amsgrad``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        coordinate_wise: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "coordinate_wise": coordinate_wise,
        }
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        validate_betas("betas", group["betas"])
        group["betas"] = tuple(group["betas"])
        _check_range("eps", group["eps"], 0.0)
        for key in ("amsgrad", "coordinate_wise"):
            if not isinstance(group[key], bool):
                raise ValueError(f"invalid {key}: {group[key]!r} (expected a bool)")

    def _update_point(
        self, group: dict[str, Any], manifold: Any, x: Any, rgrad: Any, st: dict
    ) -> Any:
        cw, ams = group["coordinate_wise"], group["amsgrad"]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            zeros = tree_map(torch.zeros_like, rgrad)
            _store_tangent(st, "exp_avg", zeros)
            sq = zeros if cw else torch.zeros_like(_inner_keepdim(manifold, x, rgrad))
            _store_tangent(st, "exp_avg_sq", sq)
            if ams:
                _store_tangent(st, "max_exp_avg_sq", sq)
        st["step"] += 1
        sq_like = rgrad if cw else st["exp_avg_sq"]
        x_new, m, v, vmax = riemannian_adam_update(
            manifold,
            x,
            rgrad,
            _load_tangent(st, "exp_avg", rgrad),
            _load_tangent(st, "exp_avg_sq", sq_like),
            step=int(st["step"].item()),
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            coordinate_wise=cw,
            max_exp_avg_sq=_load_tangent(st, "max_exp_avg_sq", sq_like) if ams else None,
        )
        _store_tangent(st, "exp_avg", m)
        _store_tangent(st, "exp_avg_sq", v)
        if ams:
            _store_tangent(st, "max_exp_avg_sq", vmax)
        return x_new


class RiemannianSGD(_RiemannianOptimizer):
    """Riemannian SGD with transported (Nesterov) momentum on any geolora or geoopt manifold
    (Bonnabel 2013; geoopt's ``RiemannianSGD``; recursion of ``torch.optim.SGD``, see
    :func:`riemannian_sgd_update`).

    Args:
        params: as :class:`RiemannianAdam`. lr: learning rate.
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (Nesterov needs momentum > 0 and
            dampening 0).
        weight_decay: L2 coefficient added before ``egrad2rgrad`` (tensor points only).

    State per point: ``momentum_buffer`` (tangent vector at the current point, transported each
    step) when ``momentum > 0``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        _check_range("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
        _check_range("dampening", group["dampening"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"invalid nesterov: {group['nesterov']!r} (expected a bool)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening = 0, got momentum="
                f"{group['momentum']}, dampening={group['dampening']}"
            )

    def _update_point(
        self, group: dict[str, Any], manifold: Any, x: Any, rgrad: Any, st: dict
    ) -> Any:
        mu = group["momentum"]
        has_buf = any(k.startswith("momentum_buffer") for k in st)
        buf = _load_tangent(st, "momentum_buffer", rgrad) if (mu and has_buf) else None
        x_new, b = riemannian_sgd_update(
            manifold,
            x,
            rgrad,
            buf,
            lr=group["lr"],
            momentum=mu,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
        )
        if b is not None:
            _store_tangent(st, "momentum_buffer", b)
        return x_new
