"""PoLAR: ``ΔW = s · X Θ Yᵀ`` with ``X``, ``Y`` trained by the landing field (no retraction).

Lion, Zhang, Li & He, "PoLAR: Polar-Decomposed Low-Rank Adapter Representation", NeurIPS 2025
(arXiv:2506.03133). The adapter (:class:`geolora.lora.ThreeFactorLinear`, ``init="polar"``) has
direction matrices ``X = U: (m, r)``, ``Y = V: (n, r)`` meant to lie on Stiefel manifolds and an
unconstrained scale matrix ``Θ = S: (r, r)``. Per three-factor group and step, with the autograd
gradients ``G_X``, ``G_Θ``, ``G_Y``:

* the landing field (Ablin & Peyré 2022; :mod:`geolora.manifolds.landing`) replaces the
  gradient of each direction matrix::

      Λ(X) = (G_X Xᵀ − X G_Xᵀ) X + λ X (XᵀX − I)      (and likewise Λ(Y) from G_Y)

* ``direction="adam"`` (the authors' recipe): AdamW steps on ``X`` with gradient ``Λ(X)``, on ``Y``
  with ``Λ(Y)`` (element-wise moments, no weight decay) and on ``Θ`` with ``G_Θ`` (decoupled
  ``weight_decay``): ``X ← X − lr m̂ / (√v̂ + ε)`` — torch's ``AdamW`` update, bit for bit;
* ``direction="sgd"``: the landing algorithm itself, ``X ← X − η_X Λ(X)`` with
  ``η_X = min(lr, η*(X))`` the safe step of :func:`~geolora.manifolds.landing.landing_safe_step`
  for ``safe_eps = ε`` (``None``: ``η_X = lr``), ``Θ ← (1 − lr·wd) Θ − lr G_Θ``. Started with
  ``‖XᵀX − I‖_F ≤ ε``, the factors then never leave that region (the landing theory; tested).

No retraction is ever computed: ``X`` and ``Y`` are only near the manifold, at a distance set by the
balance of the two terms of ``Λ``. Ordinary parameter groups get AdamW (the base class). Pair groups
(``lora_pair``) are not accepted: PoLAR is its own adapter shape.

Invariance: not under the LoRA gauge; the adapter's own gauge is ``(X O₁, O₁ᵀ Θ O₂, Y O₂)``
(``O₁``, ``O₂`` orthogonal). ``direction="sgd"`` is equivariant under it (``ψ``, ``‖XᵀX − I‖`` and
the safe step are invariant), so its ``ΔW`` trajectory does not depend on the representative;
element-wise Adam is not (both tested).

Deviations from the authors' code (github.com/kcc-lion/polar, its landing callback):

* ``ψ X`` is computed as ``G (XᵀX) − X (GᵀX)`` in ``O(n r²)``; the authors form the ``n × n``
  matrix ``G Xᵀ − X Gᵀ`` (same values up to rounding, ``O(n² r)`` work and ``n²`` memory);
* the moments are kept in float32 for bf16/fp16 parameters (the authors' mixed-precision trainer
  keeps fp32 master weights; here the parameters themselves are updated);
* ``weight_decay`` acts on ``Θ`` only. The authors' commonsense runs use the Trainer's
  ``weight_decay=0``; their GLUE script builds ``torch.optim.AdamW`` with its default 0.01, which
  also decays ``X`` and ``Y`` (the landing term then pulls them back);
* ``direction="sgd"`` and the safe step are not in the authors' code (they come from Ablin et al.).

Defaults: ``lr=4e-3`` is the authors' learning rate for PoLAR on commonsense reasoning (README:
``train_and_eval.sh polar 4e-3 5e-3 ...``); ``landing_lambda=1.0`` is the default of their
training scripts and their GLUE setting (the commonsense and Gemma runs use 5e-3 and 0.05: ``λ``
weighs the attraction against the gradient, whose scale depends on the task — with ``O(1)``
gradients, as in the tests, ``λ = 5e-3`` lets ``‖XᵀX − I‖_F`` reach 1 and ``λ = 1`` keeps it
below 0.1); AdamW's ``betas``, ``eps``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype
from geolora.manifolds.landing import landing_field, landing_safe_step
from geolora.optim.adamw import PendingAdamW, adamw_update_
from geolora.optim.base import LoRAOptimizer
from geolora.optim.three_factor import TRIPLE_KEY, validate_triple
from geolora.optim.validation import check_positive
from geolora.optim.validation import check_range as _check_range

__all__ = ["PoLAR", "adamw_step", "landing_adam_update", "landing_sgd_update"]

DIRECTIONS = ("adam", "sgd")


def adamw_step(
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW step (``torch.optim.AdamW``'s operations) without modifying its inputs:
    returns ``(p⁺, exp_avg⁺, exp_avg_sq⁺)``. Element-wise, any shape."""
    p, exp_avg, exp_avg_sq = p.clone(), exp_avg.clone(), exp_avg_sq.clone()
    adamw_update_(p, g, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    return p, exp_avg, exp_avg_sq


def landing_adam_update(
    x: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    lam: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PoLAR's step of a direction matrix: Adam on the landing field ``Λ(X)`` (module docstring).
    ``x, g: (..., n, r)``; returns ``(X⁺, exp_avg⁺, exp_avg_sq⁺)``."""
    field = landing_field(x, g, lam)
    return adamw_step(x, field, exp_avg, exp_avg_sq, step=step, lr=lr, betas=betas, eps=eps)


def landing_sgd_update(
    x: Tensor, g: Tensor, *, lr: float, lam: float, safe_eps: float | None
) -> tuple[Tensor, Tensor]:
    """The landing step ``X⁺ = X − η Λ(X)`` with ``η = min(lr, η*(X))`` (``η = lr`` when
    ``safe_eps`` is None). ``x, g: (..., n, r)``; returns ``(X⁺, η)`` (``η``: batch shape)."""
    field = landing_field(x, g, lam)
    eta = torch.full(x.shape[:-2], lr, dtype=torch.float64, device=x.device)
    if safe_eps is not None:
        eta = torch.minimum(eta, landing_safe_step(x, g, lam, safe_eps, field))
    return x - eta.to(x.dtype)[..., None, None] * field, eta


class PoLAR(LoRAOptimizer):
    """PoLAR's optimizer: landing on ``X``, ``Y``, Adam (or SGD) on ``Θ`` (module docstring).

    Args:
        params: three-factor groups ``{"params": [U, S, V], "lora_triple": True, ...}``
            (:func:`geolora.optim.lora_param_groups` of a model with
            :class:`geolora.lora.ThreeFactorLinear` modules) and ordinary groups.
        lr: learning rate of all three factors.
        betas, eps: Adam's (``direction="adam"``).
        weight_decay: decoupled decay of ``Θ``.
        landing_lambda: ``λ > 0``, the weight of the attraction ``λ X (XᵀX − I)``.
        direction: ``"adam"`` (the authors') or ``"sgd"`` (the plain landing algorithm).
        safe_eps: ``ε ∈ (0, 1)`` of the safe step (``direction="sgd"``; ``None``: no cap).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options (``nonfinite``, ``other_*``).

    State per adapter (on ``U``, compute dtype): ``step``; with ``"adam"``
    ``exp_avg_{U,S,V}``, ``exp_avg_sq_{U,S,V}`` (``2 (m + n + r) r`` numbers).
    """

    def __init__(
        self,
        params,
        lr: float = 4e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        landing_lambda: float = 1.0,
        direction: str = "adam",
        safe_eps: float | None = 0.5,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("robust_steps", 0):
            raise ValueError(
                f"{type(self).__name__} has no robust start (it trains no LoRA pairs); got "
                f"robust_steps={kwargs['robust_steps']!r}"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "landing_lambda": landing_lambda,
            "direction": direction,
            "safe_eps": safe_eps,
        }
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        check_positive("landing_lambda", group["landing_lambda"])
        if group["direction"] not in DIRECTIONS:
            raise ValueError(f"invalid direction: {group['direction']!r} (expected {DIRECTIONS})")
        if group["safe_eps"] is not None:
            _check_range("safe_eps", group["safe_eps"], 0.0, 1.0, hi_open=True)
            if group["safe_eps"] == 0:
                raise ValueError("invalid safe_eps: 0 (expected a number in (0, 1) or None)")

    def _update_pairs(self, group, x, g, state, step):  # pragma: no cover - pairs are refused
        raise TypeError("PoLAR trains three-factor adapters, not LoRA pairs")


class LandingTriple:
    """The ``lora_triple`` group kind of :class:`PoLAR` (:attr:`~geolora.optim.base.
    LoRAOptimizer.group_kinds`): one landing step of ``X = U``, ``Y = V`` and a Euclidean step
    of ``Θ = S`` (module docstring), computed on copies and written with the rest of the step."""

    def validate(self, opt: LoRAOptimizer, group: dict[str, Any]) -> None:
        validate_triple(group)

    def update(self, opt: LoRAOptimizer, group: dict[str, Any], label: str) -> PendingAdamW | None:
        params = group["params"]
        if all(p.grad is None for p in params):
            return None
        U, S, V = params
        st = opt.state[U]
        cdt = compute_dtype(U.dtype)
        adam = group["direction"] == "adam"
        moments = {}
        if adam:
            for nm, p in zip("USV", params):
                for key in (f"exp_avg_{nm}", f"exp_avg_sq_{nm}"):
                    moments[key] = (
                        st[key] if key in st else torch.zeros(p.shape, dtype=cdt, device=p.device)
                    )
        step = st["step"] + 1 if "step" in st else torch.tensor(1.0)
        k = int(step.item())
        x = [p.detach().to(cdt) for p in params]
        g = [(p.grad if p.grad is not None else torch.zeros_like(p)).to(cdt) for p in params]
        lr, lam = group["lr"], group["landing_lambda"]
        new: dict[str, Tensor] = {}
        if adam:
            hp = {"step": k, "lr": lr, "betas": group["betas"], "eps": group["eps"]}
            for i, nm in ((0, "U"), (2, "V")):
                new[nm], new[f"exp_avg_{nm}"], new[f"exp_avg_sq_{nm}"] = landing_adam_update(
                    x[i], g[i], moments[f"exp_avg_{nm}"], moments[f"exp_avg_sq_{nm}"], lam=lam, **hp
                )
            new["S"], new["exp_avg_S"], new["exp_avg_sq_S"] = adamw_step(
                x[1],
                g[1],
                moments["exp_avg_S"],
                moments["exp_avg_sq_S"],
                weight_decay=group["weight_decay"],
                **hp,
            )
        else:
            for i, nm in ((0, "U"), (2, "V")):
                new[nm], _ = landing_sgd_update(
                    x[i], g[i], lr=lr, lam=lam, safe_eps=group["safe_eps"]
                )
            new["S"] = (1.0 - lr * group["weight_decay"]) * x[1] - lr * g[1]
        values = [new.pop(nm).to(p.dtype) for p, nm in zip(params, "USV")]
        new["step"] = step
        return PendingAdamW([group], label, targets=list(params), values=values, states=[(st, new, ())])

    def expected_state(self, opt, group, i, p, values):
        if i != 0:
            return {}
        U, S, V = group["params"]
        out: dict[str, Any] = {"step": ()}
        if group.get("direction", "adam") == "adam":
            for nm, t in zip("USV", (U, S, V)):
                out[f"exp_avg_{nm}"] = tuple(t.shape)
                out[f"exp_avg_sq_{nm}"] = tuple(t.shape)
        return out


PoLAR.group_kinds = {TRIPLE_KEY: LandingTriple()}
PoLAR.trains_pairs = False
