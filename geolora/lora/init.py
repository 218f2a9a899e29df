"""Initialization strategies for the LoRA factors ``A: (r, in)``, ``B: (out, r)``.

Random draws are made on the CPU (``generator`` is a CPU ``torch.Generator``; ``None``
uses the global CPU RNG) in float32 (float64 for float64 factors) and then copied to the
factors' device and dtype, so a seed gives the same factors on every device.

Strategies (``ΔW = s · B A`` at initialization, ``s = alpha / r``):

* ``"zero"`` — ``B = 0``, ``A ~ U(−1/√in, 1/√in)``: the default of Hu et al. (2022) and
  peft (``kaiming_uniform_(a=√5)``). ``ΔW = 0``: the adapted model starts at the base model.
* ``"gaussian"`` (aliases ``"both"`` and ``"biased"``, the name in Zheng & Wu, "LoRA-S: An Efficient
  Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview Guo2XGgxZA, appendix
  A.16 "Biased Initialization") — ``A ~ N(0, 1/in)``, ``B ~ N(0, std²/r)``, default ``std = 1e-2``.
  Both factors are nonzero, so ``ΔW ≠ 0`` and quotient-geometry optimizers (whose Gram matrices
  ``BᵀB``, ``A Aᵀ`` must be invertible) can start at once. Scale: for an input with i.i.d.
  unit-variance entries every output entry of ``s B A x`` has standard deviation ``s · std``
  (``A x`` has unit-variance entries, ``B`` sums ``r`` of them with variance ``std²/r``). The base
  weight is not changed, so the model's function moves by ``ΔW``.
* ``"orthogonal"`` — ``B = 0``, ``A`` with orthonormal rows (``A Aᵀ = I_r``, Haar-distributed
  via a sign-fixed QR of a Gaussian ``in × r`` matrix). ``ΔW = 0``; the first gradient
  ``∇_B = s ∇_W Aᵀ`` sees a well-conditioned ``A``.
* ``"stiefel"`` — ``A = 0``, ``B`` with orthonormal columns (``BᵀB = I_r``, Haar): the
  start of Stiefel-LoRA (``B`` on the Stiefel manifold; Park et al., "Riemannian Optimization for
  LoRA on the Stiefel Manifold", Findings of EMNLP 2025, arXiv:2508.17901). ``ΔW = 0``.
* :func:`spectral_init_` — LoRA-One (Zhang, Liu & Chen 2025; LoRA-S A.16, eq. Spectral-init):
  data-dependent, from one full-weight gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from geolora.lora.layers import LoRALinear, compute_dtype, disable_lora, lora_modules

__all__ = ["INIT_STRATEGIES", "init_lora_", "spectral_init_"]

InitFn = Callable[[LoRALinear, torch.Generator | None], None]


def _qf(
    shape: tuple[int, int], generator: torch.Generator | None, dtype: torch.dtype
) -> torch.Tensor:
    """Haar-distributed ``(n, r)`` matrix with orthonormal columns: Q of a Gaussian's QR with
    ``diag(R) > 0``."""
    g = torch.randn(shape, generator=generator, dtype=dtype)
    q, rr = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(rr))
    sign[sign == 0] = 1
    return q * sign


@torch.no_grad()
def _set(module: LoRALinear, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    """Copy ``a`` into ``lora_A`` and ``b`` into ``lora_B`` (``None`` → zeros)."""
    for param, value in ((module.lora_A, a), (module.lora_B, b)):
        if value is None:
            param.zero_()
        else:
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def _zero(module: LoRALinear, generator: torch.Generator | None) -> None:
    bound = 1.0 / math.sqrt(module.in_features)
    cd = compute_dtype(module.lora_A.dtype)
    a = torch.empty(module.r, module.in_features, dtype=cd).uniform_(
        -bound, bound, generator=generator
    )
    _set(module, a, None)


def _gaussian(module: LoRALinear, generator: torch.Generator | None, std: float = 1e-2) -> None:
    cd = compute_dtype(module.lora_A.dtype)
    a = torch.randn(module.r, module.in_features, generator=generator, dtype=cd)
    b = torch.randn(module.out_features, module.r, generator=generator, dtype=cd)
    _set(module, a / math.sqrt(module.in_features), b * (std / math.sqrt(module.r)))


def _orthogonal(module: LoRALinear, generator: torch.Generator | None) -> None:
    cd = compute_dtype(module.lora_A.dtype)
    _set(module, _qf((module.in_features, module.r), generator, cd).mT, None)


def _stiefel(module: LoRALinear, generator: torch.Generator | None) -> None:
    cd = compute_dtype(module.lora_B.dtype)
    _set(module, None, _qf((module.out_features, module.r), generator, cd))


INIT_STRATEGIES: dict[str, Callable[..., None]] = {
    "zero": _zero,
    "gaussian": _gaussian,
    "both": _gaussian,
    "biased": _gaussian,
    "orthogonal": _orthogonal,
    "stiefel": _stiefel,
}


def init_lora_(
    module: LoRALinear,
    init: str | InitFn = "zero",
    *,
    generator: torch.Generator | None = None,
    std: float | None = None,
) -> None:
    """Initialize ``module.lora_A`` / ``module.lora_B`` in place (strategies: module docstring).

    Args:
        module: a ``LoRALinear``.
        init: a name in :data:`INIT_STRATEGIES` or a callable ``fn(module, generator)``.
        generator: CPU generator for the random draws.
        std: output-perturbation scale of ``"gaussian"`` (only valid for that strategy).
    """
    if callable(init):
        if std is not None:
            raise ValueError("std is only accepted by the 'gaussian' strategy, not a callable init")
        init(module, generator)
        return
    if init not in INIT_STRATEGIES:
        raise ValueError(f"unknown init={init!r}; choose one of {sorted(INIT_STRATEGIES)}")
    fn = INIT_STRATEGIES[init]
    if std is None:
        fn(module, generator)
        return
    if fn is not _gaussian:
        raise ValueError(f"std is only accepted by the 'gaussian' strategy, not init={init!r}")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a finite positive number, got std={std!r}")
    fn(module, generator, std)


def spectral_init_(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    gamma: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """LoRA-One spectral initialization of every LoRA module of ``model``, in place.

    One forward/backward pass of ``loss_fn(model, batch)`` with the LoRA branches disabled
    gives the full-weight gradient ``∇_W L`` of each base weight ``W`` at the base model.
    With the SVD ``−∇_W L = U S Vᵀ`` and ``c = √(γ / s)``::

        B = c · U_r S_r^{1/2}        (out, r)
        A = c · S_r^{1/2} V_rᵀ       (r, in)
        ⇒  s · B A = −γ · U_r S_r V_rᵀ,

    i.e. the adapted model ``W + s B A`` is exactly one step of best-rank-``r`` projected
    full-fine-tuning gradient descent with step ``γ`` (Zhang, Liu & Chen 2025, "LoRA-One",
    Alg. 1; LoRA-S A.16, eq. Spectral-init, which writes ``M₀N₀ᵀ = γ U_r S_r V_rᵀ`` without
    the LoRA scaling: dividing by ``s`` here makes ``γ`` independent of ``alpha / r``).
    The factors are balanced, ``BᵀB = A Aᵀ = (γ/s) S_r``, and the base weights are left
    unchanged, so the model's function changes by ``s B A`` only.

    The gradient is taken with ``torch.autograd.grad``: no ``.grad`` attribute is written
    and ``requires_grad`` flags are restored. The SVD runs in float32 (float64 for float64
    weights). Dropout follows the model's train/eval mode.

    Args:
        model: a model containing ``LoRALinear`` modules (none of them merged).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: passed to ``loss_fn`` unchanged (one large batch approximates the full gradient).
        gamma: step size ``γ > 0`` of the equivalent full-weight gradient step.

    Returns:
        the top-``r`` singular values ``S_r`` of ``−∇_W L`` per module name (diagnostics).

    Raises:
        ValueError: no LoRA module, bad ``gamma``, non-scalar or non-finite loss/gradient,
            or a LoRA module whose base weight does not influence the loss (named).
    """
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite positive number, got gamma={gamma!r}")
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRALinear modules; call inject_lora first")
    weights = [m.base.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with disable_lora(model), torch.enable_grad():
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()})")
            grads = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)

    singular_values = {}
    for (name, module), grad in zip(modules.items(), grads):
        if grad is None:
            raise ValueError(f"the loss does not depend on the base weight of LoRA module {name!r}")
        g = -grad.to(compute_dtype(grad.dtype))
        if not torch.isfinite(g).all():
            raise ValueError(f"non-finite gradient for the base weight of LoRA module {name!r}")
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        root = s[: module.r].sqrt()
        c = math.sqrt(gamma / module.scaling)
        _set(module, c * root[:, None] * vh[: module.r], c * u[:, : module.r] * root)
        singular_values[name] = s[: module.r].clone()
    return singular_values
