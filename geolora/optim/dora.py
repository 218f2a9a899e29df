"""An invariant optimizer for DoRA: the quotient ``(B, A)/GL(r)`` times the magnitudes.

DoRA (Liu, Wang, Yin, Molchanov, Wang, Cheng & Chen, "DoRA: Weight-Decomposed Low-Rank
Adaptation", ICML 2024, arXiv:2402.09353, eq. 5) adapts a frozen ``W₀: (m, n)`` as::

    W' = diag(μ / ‖W₀ + s X‖_row) (W₀ + s X),      X = B A,  μ ∈ R^m

(peft's ``lora_magnitude_vector``; the norm is over each output row, and peft — following the
paper's §4.3 — detaches it from the gradient). The loss is a function ``f(X, μ)``, so the
parameters ``(B, A, μ)`` live on the product ``M = (R*^{m×r} × R*^{n×r}) / GL(r) × R^m``: the
factor gauge ``(B, A) → (B R, R⁻¹ A)`` changes neither ``X`` nor ``μ``.

Geometry. On ``M`` take the product metric

    g((Ḃ, Ȧ, μ̇), (Ḃ', Ȧ', μ̇')) = g^q_{(B,A)}((Ḃ, Ȧ), (Ḃ', Ȧ')) + μ̇ᵀ D(μ) μ̇'

with ``g^q`` any gauge-invariant quotient metric of geolora (default: the balanced metric of Zheng &
Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview
Guo2XGgxZA, eq. 7, :mod:`geolora.manifolds.metrics`) and ``D(μ) = I``
(``magnitude_metric="euclidean"``) or ``D(μ) = diag(μ)⁻²`` (``"log"``, the scale-invariant metric of
the positive orthant). The vertical space at ``(B, A, μ)`` is ``{(B Ω, −Ω A, 0)}``, so the
horizontal space is the product of ``g^q``'s horizontal space and ``R^m``, and the horizontal lift
of a tangent vector ``(Ẋ, μ̇)`` of the base ``R_r^{m×n} × R^m`` is ``(lift^q(P_T Ẋ), μ̇)``.
Autograd's gradients are ``∇_B = ∇_X f Aᵀ``, ``∇_A = Bᵀ ∇_X f`` with ``∇_X f = s ∂f/∂W'`` chained
through the normalisation (exactly, or with peft's detached norm: either way a function of
``(X, μ)``), and ``∇_μ f``; the Riemannian gradient is ``(lift^q(P_T ∇_X f), D(μ)⁻¹ ∇_μ f)``.

The optimizer preconditions each component with its own state:

* the pair: :class:`~geolora.optim.lifted.LiftedOptimizer`'s template with Adam on ``T_X``
  (exactly :class:`~geolora.optim.AdamS`: ``ξ = P_T(∇_X f)``, Adam moments in matrix space,
  Sylvester lift, factor move), robust AdamW start from ``B = 0``;
* the magnitude (a linked group ``{"params": [μ], "dora_magnitude": True, "name": <pair>}``,
  :func:`geolora.optim.lora_param_groups` with ``dora="linked"``): Adam with the same ``lr``,
  ``betas``, ``eps`` — on ``μ`` itself (``"euclidean"``, = DoRA's AdamW) or on ``u = log μ`` with
  gradient ``μ ⊙ ∇_μ f`` and ``μ ← exp(u)`` (``"log"``: the Riemannian gradient ``μ² ⊙ ∇_μ f`` of
  ``D = diag(μ)⁻²`` in the chart ``u``, with the exponential map of that metric; ``μ`` stays
  positive).

Invariance. Under ``(B, A) → (B R, R⁻¹ A)``: ``X`` and ``μ``, hence ``∇_X f`` and ``∇_μ f``,
are unchanged; ``ξ`` and the Adam state live in matrix space and the lift is equivariant (LoRA-S
Theorem 1), so the new factors are ``(B⁺ R, R⁻¹ A⁺)`` and ``X⁺`` is unchanged; ``μ⁺`` depends on
``∇_μ f`` and its own state only. By induction the ``(X, μ)`` trajectories from both
representatives coincide (``tests/test_dora.py``: 2.5e-14 in float64 on a peft DoRA model). The
robust AdamW start acts on the factors and is not invariant (as for AdamS); pass
``robust_steps=0`` and a full-rank start for the invariant method from step 1.

Pairs without a magnitude group are trained exactly as by AdamS, so the optimizer also serves
plain LoRA models; ordinary groups get AdamW. No library had an optimizer for DoRA's product
geometry; the pair part reuses geolora's lifted machinery unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype
from geolora.manifolds.metrics import QuotientMetric
from geolora.optim.adamw import PendingAdamW
from geolora.optim.lifted import AdamS
from geolora.optim.polar import adamw_step

__all__ = ["InvariantDoRA", "magnitude_adam_update"]

MAGNITUDE_KEY = "dora_magnitude"
MAGNITUDE_METRICS = ("euclidean", "log")


def magnitude_adam_update(
    mu: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    metric: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step of DoRA magnitudes under ``metric`` (module docstring); inputs unchanged.

    ``"euclidean"``: AdamW on ``μ`` (decoupled ``weight_decay``). ``"log"``: Adam on ``u = log μ``
    with gradient ``μ ⊙ ∇_μ f``, decay ``u ← (1 − lr·wd) u`` (towards ``μ = 1``), ``μ⁺ = exp(u⁺)``;
    needs ``μ > 0``. Returns ``(μ⁺, exp_avg⁺, exp_avg_sq⁺)``.
    """
    hp = {"step": step, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if metric == "euclidean":
        return adamw_step(mu, grad, exp_avg, exp_avg_sq, **hp)
    u, m, v = adamw_step(mu.log(), mu * grad, exp_avg, exp_avg_sq, **hp)
    return u.exp(), m, v


class InvariantDoRA(AdamS):
    """Adam on DoRA's product geometry ``(B, A)/GL(r) × R^m`` (module docstring).

    Args:
        params: LoRA-pair groups, linked magnitude groups ``{"params": [μ],
            "dora_magnitude": True, "name": <pair name>, ...}`` (after their pair), ordinary
            groups — :func:`geolora.optim.lora_param_groups` ``(model, dora="linked")``.
        lr, betas, eps, weight_decay: shared by the pair (AdamS: decoupled ``K + λI`` decay) and
            the magnitudes (decoupled decay of ``μ``, or of ``log μ``).
        magnitude_metric: ``"euclidean"`` (DoRA's) or ``"log"`` (positive magnitudes).
        robust_steps, low_memory, riemannian_second_moment, bias_correction, metric: as
            :class:`~geolora.optim.AdamS` (for the pairs).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.

    Magnitude state (on ``μ``, compute dtype): ``step``, ``exp_avg``, ``exp_avg_sq`` (``2m``).
    """

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        magnitude_metric: str = "euclidean",
        low_memory: bool = False,
        riemannian_second_moment: bool = False,
        bias_correction: bool = True,
        robust_steps: int = 100,
        metric: str | QuotientMetric = "balanced",
        **kwargs: Any,
    ) -> None:
        if magnitude_metric not in MAGNITUDE_METRICS:
            raise ValueError(
                f"invalid magnitude_metric: {magnitude_metric!r} (expected {MAGNITUDE_METRICS})"
            )
        self.magnitude_metric = magnitude_metric
        self._magnitudes = MagnitudeAdam(magnitude_metric)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            low_memory=low_memory,
            riemannian_second_moment=riemannian_second_moment,
            bias_correction=bias_correction,
            robust_steps=robust_steps,
            metric=metric,
            **kwargs,
        )

    @property
    def group_kinds(self) -> dict[str, Any]:  # type: ignore[override]
        return {MAGNITUDE_KEY: self._magnitudes}


class MagnitudeAdam:
    """The ``dora_magnitude`` group kind of :class:`InvariantDoRA`
    (:attr:`~geolora.optim.base.LoRAOptimizer.group_kinds`): Adam on the magnitudes under the
    magnitude metric (:func:`magnitude_adam_update`), computed on copies and written with the
    rest of the step. State (on ``μ``, compute dtype): ``step``, ``exp_avg``, ``exp_avg_sq``."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def validate(self, opt: Any, group: dict[str, Any]) -> None:
        """One 1-D floating tensor whose length is the output size of the LoRA pair of the same
        ``name`` (and ``adapter``), added before it."""
        name = group.get("name")
        label = f"DoRA magnitude group {name!r}"
        if len(group["params"]) != 1:
            raise ValueError(f"{label} must hold exactly one tensor, got {len(group['params'])}")
        (mu,) = group["params"]
        if not isinstance(mu, Tensor) or not mu.is_floating_point() or mu.dim() != 1:
            raise ValueError(f"{label}: the magnitude must be a 1-D floating tensor")
        pair = next(
            (
                g
                for g in opt.param_groups
                if g.get("lora_pair")
                and g.get("name") == name
                and g.get("adapter") == group.get("adapter")
            ),
            None,
        )
        if pair is None:
            raise ValueError(
                f"{label} has no LoRA pair group of the same name (and adapter) before it; "
                "build the groups with lora_param_groups(model, dora='linked')"
            )
        out = pair["params"][0].shape[0]
        if mu.shape[0] != out:
            raise ValueError(
                f"{label}: magnitude has shape {tuple(mu.shape)}, the pair's output size is {out}"
            )

    def update(self, opt: Any, group: dict[str, Any], label: str) -> PendingAdamW | None:
        (mu,) = group["params"]
        if mu.grad is None:
            return None
        st = opt.state[mu]
        cdt = compute_dtype(mu.dtype)
        x = mu.detach().to(cdt)
        if self.metric == "log" and not bool((x > 0).all()):
            raise ValueError(
                f"DoRA magnitude {group.get('name')!r} has entries <= 0; magnitude_metric='log' "
                "needs positive magnitudes"
            )
        zeros = torch.zeros(mu.shape, dtype=cdt, device=mu.device)
        step = st["step"] + 1 if "step" in st else torch.tensor(1.0)
        new, m, v = magnitude_adam_update(
            x,
            mu.grad.to(cdt),
            st.get("exp_avg", zeros),
            st.get("exp_avg_sq", zeros),
            step=int(step.item()),
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            metric=self.metric,
        )
        return PendingAdamW(
            [group],
            label,
            targets=[mu],
            values=[new.to(mu.dtype)],
            states=[(st, {"step": step, "exp_avg": m, "exp_avg_sq": v}, ())],
        )

    def expected_state(self, opt: Any, group: dict[str, Any], i: int, p: Tensor, values: dict):
        return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
