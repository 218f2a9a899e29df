"""Three-factor adapters ``ΔW = s · U S Vᵀ`` for ``nn.Linear`` (PoLAR, StelLA).

A wrapped layer computes ``y = W x + b + s · U S Vᵀ x`` with the frozen base weight
``W: (out, in)``, the trainable factors ``U: (out, r)``, ``S: (r, r)`` (or its diagonal ``(r,)``),
``V: (in, r)`` and the scaling ``s = alpha / r``. ``U`` and ``V`` are meant to have orthonormal
columns (points of the Stiefel manifolds ``St(out, r)``, ``St(in, r)``); ``S`` is unconstrained:

* PoLAR (Lion, Zhang, Li & He, "PoLAR: Polar-Decomposed Low-Rank Adapter Representation",
  NeurIPS 2025, arXiv:2506.03133) writes ``ΔW = X Θ Yᵀ`` (``X = U``, ``Θ = S``, ``Y = V``) and
  trains ``X``, ``Y`` with the landing field (:class:`geolora.optim.PoLAR`), so they are only
  *near* the manifold during training;
* StelLA (Li, Sajadmanesh, Li & Lyu, "StelLA: Subspace Learning in Low-rank Adaptation using
  Stiefel Manifold", NeurIPS 2025, arXiv:2510.01938) trains ``U``, ``V`` on the manifold with any
  Euclidean optimizer made Riemannian (:func:`geolora.optim.StelLA`).

One layer type serves both; the initialisation is an option (:data:`THREE_FACTOR_INITS`):

* ``"polar"`` — ``U``, ``V`` Haar-distributed orthonormal, ``S = 0``: ``ΔW = 0`` (the PoLAR
  authors' default, ``nn.init.orthogonal_`` on both direction matrices and a zero scale matrix);
* ``"stella"`` — ``U``, ``V`` Haar orthonormal, ``S = I``: ``ΔW = s U Vᵀ ≠ 0`` (the StelLA authors'
  default ``"rando"``; the base weight is not changed, so the model's function moves by ``ΔW``);
* ``"svd_major"`` / ``"svd_minor"`` — ``U``, ``V`` the top / bottom ``r`` singular vectors of the
  base weight, ``S = I`` (StelLA's ``svd_major`` / ``svd_minor``).

Random draws are made on the CPU in float32 (float64 for float64 factors) from ``generator``
and copied to the factors' device and dtype (same convention as :mod:`geolora.lora.init`).
In geolora's parameter-group convention a three-factor adapter is the group
``{"params": [U, S, V], "lora_triple": True, "scaling": s, "name": module}``
(:func:`geolora.optim.lora_param_groups`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from geolora.lora.init import _qf
from geolora.lora.layers import (
    Selector,
    _LinearAdapter,
    compute_dtype,
    replace_linear_modules,
)

__all__ = [
    "THREE_FACTOR_INITS",
    "ThreeFactorLinear",
    "init_three_factor_",
    "inject_three_factor",
    "merge_three_factor",
    "three_factor_modules",
    "unmerge_three_factor",
]

InitFn = Callable[["ThreeFactorLinear", torch.Generator | None], None]


class ThreeFactorLinear(_LinearAdapter):
    """A frozen ``nn.Linear`` plus a trainable update ``ΔW = s · U S Vᵀ`` (module docstring).

    ``forward(x) = base(x) + s · ((dropout(x) V) Sᵀ) Uᵀ``: three thin products per token
    (``O(r (in + out + r))``), never the ``out × in`` matrix. The adapter branch runs in the dtype
    of ``x``. While merged, ``base.weight`` holds ``W + s U S Vᵀ`` and ``forward`` is ``base(x)``.

    Args:
        base: the ``nn.Linear`` to adapt; its parameters are frozen.
        r: rank, ``1 <= r <= min(in_features, out_features)``.
        alpha: scale numerator, ``s = alpha / r``.
        dropout: dropout probability on the adapter input.
        init: a name in :data:`THREE_FACTOR_INITS` or ``fn(module, generator)``.
        diagonal: ``S`` is a diagonal matrix stored as its diagonal ``(r,)`` (StelLA's
            ``stella_diag_s``, PoLAR's ``"diagonal"`` parameterization); default a full ``(r, r)``.
        dtype: dtype of the factors (default: the base weight's).
        generator: CPU generator for the random draws of ``init``.

    Shapes: ``lora_U (out, r)``, ``lora_S (r, r)`` or ``(r,)``, ``lora_V (in, r)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        *,
        init: str | InitFn = "polar",
        diagonal: bool = False,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(diagonal, bool):
            raise TypeError(f"diagonal must be a bool, got {diagonal!r}")
        kw = self._setup(base, r, alpha, dropout, dtype)
        self.diagonal = diagonal
        s_shape = (self.r,) if diagonal else (self.r, self.r)
        self.lora_U = nn.Parameter(torch.zeros(base.out_features, self.r, **kw))
        self.lora_S = nn.Parameter(torch.zeros(s_shape, **kw))
        self.lora_V = nn.Parameter(torch.zeros(base.in_features, self.r, **kw))
        init_three_factor_(self, init, generator=generator)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """The trainable factors ``(lora_U, lora_S, lora_V)``."""
        return (self.lora_U, self.lora_S, self.lora_V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = F.linear(self.lora_dropout(x), self.lora_V.to(x.dtype).T)  # x V
        S = self.lora_S.to(x.dtype)
        h = h * S if self.diagonal else F.linear(h, S)  # (x V) Sᵀ
        return out + F.linear(h * self.scaling, self.lora_U.to(x.dtype))

    def s_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``S`` as an ``(r, r)`` matrix (the diagonal embedded when ``diagonal``)."""
        S = self.lora_S if dtype is None else self.lora_S.to(dtype)
        return torch.diag(S) if self.diagonal else S

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ΔW = s · U S Vᵀ`` of shape ``(out, in)``, differentiable, in ``dtype`` (default: the
        factors'). Forms the dense matrix: for merging, inspection and tests."""
        dtype = self.lora_U.dtype if dtype is None else dtype
        US = self.lora_U.to(dtype) @ self.s_matrix(dtype)
        return (US @ self.lora_V.to(dtype).T) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, "
            f"diagonal={self.diagonal}, merged={self.merged}"
        )


@torch.no_grad()
def _set(module: ThreeFactorLinear, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    for param, value in ((module.lora_U, U), (module.lora_S, S), (module.lora_V, V)):
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _identity_s(module: ThreeFactorLinear, dtype: torch.dtype, scale: float) -> torch.Tensor:
    eye = torch.ones(module.r, dtype=dtype)
    return scale * (eye if module.diagonal else torch.diag(eye))


def _random_frames(module: ThreeFactorLinear, generator, s_scale: float) -> None:
    cd = compute_dtype(module.lora_U.dtype)
    U = _qf((module.out_features, module.r), generator, cd)
    V = _qf((module.in_features, module.r), generator, cd)
    _set(module, U, _identity_s(module, cd, s_scale), V)


def _polar(module: ThreeFactorLinear, generator: torch.Generator | None) -> None:
    _random_frames(module, generator, 0.0)


def _stella(module: ThreeFactorLinear, generator: torch.Generator | None) -> None:
    _random_frames(module, generator, 1.0)


def _svd(module: ThreeFactorLinear, major: bool) -> None:
    cd = compute_dtype(module.lora_U.dtype)
    w = module.base.weight.detach().to("cpu", cd)
    L, _, Rh = torch.linalg.svd(w, full_matrices=False)
    cols = slice(0, module.r) if major else slice(L.shape[1] - module.r, L.shape[1])
    _set(module, L[:, cols], _identity_s(module, cd, 1.0), Rh[cols].T)


THREE_FACTOR_INITS: dict[str, Callable[..., None]] = {
    "polar": _polar,
    "stella": _stella,
    "svd_major": lambda module, generator: _svd(module, True),
    "svd_minor": lambda module, generator: _svd(module, False),
}


def init_three_factor_(
    module: ThreeFactorLinear,
    init: str | InitFn = "polar",
    *,
    generator: torch.Generator | None = None,
) -> None:
    """Initialize ``module``'s factors in place (strategies: module docstring)."""
    if callable(init):
        init(module, generator)
        return
    if init not in THREE_FACTOR_INITS:
        raise ValueError(f"unknown init={init!r}; choose one of {sorted(THREE_FACTOR_INITS)}")
    THREE_FACTOR_INITS[init](module, generator)


def inject_three_factor(
    model: nn.Module,
    target: Selector = "all-linear",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str | InitFn = "polar",
    exclude: Selector | None = None,
    seed: int | None = None,
    *,
    diagonal: bool = False,
    dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Replace the selected ``nn.Linear`` submodules of ``model`` by :class:`ThreeFactorLinear`.

    Selection, validation and ``seed`` as :func:`geolora.lora.inject_lora` (the same rule:
    ``"all-linear"``, a list of names or a full-match regex; ``exclude``; base layers of existing
    adapters are skipped; every target is checked before the model is modified). With
    ``freeze_base`` only the adapter factors stay trainable
    (:func:`geolora.lora.mark_only_lora_trainable`).

    Returns:
        the qualified names of the replaced modules, in ``named_modules`` order.
    """
    if not callable(init) and init not in THREE_FACTOR_INITS:
        raise ValueError(f"unknown init={init!r}; choose one of {sorted(THREE_FACTOR_INITS)}")
    return replace_linear_modules(
        model,
        target,
        exclude,
        r,
        alpha,
        dropout,
        seed,
        freeze_base,
        lambda module, gen: ThreeFactorLinear(
            module, r, alpha, dropout, init=init, diagonal=diagonal, dtype=dtype, generator=gen
        ),
    )


def three_factor_modules(model: nn.Module) -> dict[str, ThreeFactorLinear]:
    """All :class:`ThreeFactorLinear` submodules by qualified name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ThreeFactorLinear)}


def merge_three_factor(model: nn.Module) -> None:
    """:meth:`ThreeFactorLinear.merge` on every three-factor module of ``model``."""
    for module in three_factor_modules(model).values():
        module.merge()


def unmerge_three_factor(model: nn.Module) -> None:
    """:meth:`ThreeFactorLinear.unmerge` on every three-factor module of ``model``."""
    for module in three_factor_modules(model).values():
        module.unmerge()
