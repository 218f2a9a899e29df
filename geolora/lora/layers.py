"""LoRA for ``nn.Linear``: the :class:`LoRALinear` wrapper and model-level injection.

A wrapped layer computes ``y = W x + b + s · B A x`` with the frozen base weight
``W: (out, in)``, trainable factors ``A: (r, in)``, ``B: (out, r)`` and the scaling
``s = alpha / r`` (Hu et al. 2022, "LoRA", eq. 3). In the geolora conventions
(``docs/design.md``) the pair is ``M = B``, ``N = Aᵀ`` and the low-rank update is ``ΔW = s·B A``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALinear",
    "replace_linear_modules",
    "select_linear_targets",
    "disable_lora",
    "inject_lora",
    "lora_modules",
    "mark_only_lora_trainable",
    "merge_lora",
    "unmerge_lora",
]

# A module selector: "all-linear", a list of names (peft ``target_modules`` rule) or a
# full-match regular expression.
Selector = str | Iterable[str]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype used for exact work on a tensor of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LinearAdapter(nn.Module):
    """What every adapter of an ``nn.Linear`` shares: the frozen ``base``, ``r``, ``alpha``,
    ``s = alpha / r``, input dropout, the factor dtype, and merge / unmerge of
    ``ΔW = delta_weight()``. Subclasses create their factors and define ``delta_weight``,
    ``adapter_parameters`` and ``forward``."""

    geolora_adapter = True  # injection skips the base layer of an adapter module

    def _setup(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype: torch.dtype | None
    ) -> dict[str, torch.device | torch.dtype]:
        """Validate and store the common attributes, freeze ``base``; returns the factory
        keywords (device, dtype) of the factors."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_rank(r, base, "base")
        _check_hparams(alpha, dropout)
        self.base = base
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.dropout_p = float(dropout)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        weight = base.weight
        factor_dtype = weight.dtype if dtype is None else dtype
        if not factor_dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {factor_dtype}")
        for p in base.parameters():
            p.requires_grad_(False)
        return {"device": weight.device, "dtype": factor_dtype}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` (:meth:`delta_weight`) into ``base.weight`` (``W ← W + ΔW``); no-op when
        merged.

        The sum is formed in float32 (float64 for float64 weights) and rounded once to the
        weight dtype, so ``unmerge`` restores fp32 weights to ~1 ulp; for bf16/fp16 weights
        the round trip loses what that dtype cannot hold.
        """
        if self.merged:
            return
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W ← W − ΔW``); no-op when not merged."""
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        weight = self.base.weight
        cd = compute_dtype(weight.dtype)
        delta = self.delta_weight(cd).to(weight.device)
        weight.copy_((weight.to(cd) + sign * delta).to(weight.dtype))


class LoRALinear(_LinearAdapter):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``ΔW = s · B A``.

    ``forward(x) = base(x) + s · dropout(x) Aᵀ Bᵀ``, evaluated as two thin matmuls
    (``O(r (in + out))`` per token, never the ``out × in`` product). The LoRA branch runs
    in the dtype of ``x`` (factors are cast on the fly), so bf16 activations with fp32
    factors work. While merged, ``base.weight`` holds ``W + s B A`` and ``forward`` is
    ``base(x)`` alone (dropout is then not applied to the update).

    Args:
        base: the ``nn.Linear`` to adapt; its parameters are frozen.
        r: rank, ``1 <= r <= min(in_features, out_features)``.
        alpha: scale numerator, ``s = alpha / r``.
        dropout: dropout probability on the LoRA input (``0`` disables it).
        dtype: dtype of ``lora_A`` / ``lora_B``; defaults to ``base.weight.dtype``.
        init: initialization strategy (see :func:`geolora.lora.init.init_lora_`).
        generator: CPU generator for the random draws of ``init``.

    Shapes: ``lora_A (r, in_features)``, ``lora_B (out_features, r)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        init: str | Callable[[LoRALinear, torch.Generator | None], None] = "zero",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        kw = self._setup(base, r, alpha, dropout, dtype)
        self.lora_A = nn.Parameter(torch.zeros(self.r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.r, **kw))
        self._disabled = False
        from geolora.lora.init import init_lora_  # init.py builds on this module

        init_lora_(self, init, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self._disabled:
            return out
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        # Scale the r-dimensional hidden state: r multiplies instead of out.
        h = F.linear(self.lora_dropout(x), a) * self.scaling
        return out + F.linear(h, b)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """The trainable factors ``(lora_A, lora_B)``."""
        return (self.lora_A, self.lora_B)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ΔW = s · B A`` of shape ``(out, in)``, differentiable, in ``dtype``.

        ``dtype`` defaults to the factor dtype. Forms the dense matrix: meant for
        merging, inspection and tests, not for the training forward pass.
        """
        dtype = self.lora_B.dtype if dtype is None else dtype
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, "
            f"merged={self.merged}"
        )


def _check_rank(r: int, linear: nn.Linear, name: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be positive, got r={r}")
    limit = min(linear.in_features, linear.out_features)
    if r > limit:
        raise ValueError(
            f"r={r} exceeds min(in_features, out_features)={limit} of module {name!r} "
            f"({linear.in_features} -> {linear.out_features})"
        )


def _check_hparams(alpha: float, dropout: float) -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite positive number, got alpha={alpha!r}")
    if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")


def _matcher(selector: Selector, what: str) -> Callable[[str], bool]:
    """Name predicate: a list matches ``name == t`` or ``name.endswith('.' + t)``; a str is a
    full-match regex (peft ``target_modules`` semantics)."""
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as err:
            raise ValueError(
                f"{what}={selector!r} is not a valid regular expression: {err}"
            ) from err
        return lambda name: pattern.fullmatch(name) is not None
    names = tuple(selector) if isinstance(selector, Iterable) else ()
    if names and all(isinstance(t, str) for t in names):
        return lambda name: any(name == t or name.endswith("." + t) for t in names)
    if isinstance(selector, Iterable) and not names:
        raise ValueError(f"{what} must not be an empty list")
    raise TypeError(
        f"{what} must be 'all-linear', a regex string or a list of names, got {selector!r}"
    )


def select_linear_targets(
    model: nn.Module,
    target: Selector,
    exclude: Selector | None,
    r: int,
) -> dict[int, tuple[str, nn.Linear, list[tuple[nn.Module, str]]]]:
    """The ``nn.Linear`` submodules an adapter injection replaces (selection rule of
    :func:`inject_lora`), each once: ``{id: (name, module, [(parent, attribute), ...])}`` in
    ``named_modules`` order. The base layer of an adapter module (a class with
    ``geolora_adapter = True``: :class:`LoRALinear`, ``ThreeFactorLinear``) is skipped.
    Raises ``ValueError`` when nothing matches or ``r`` exceeds a target's size."""
    all_linear = isinstance(target, str) and target == "all-linear"
    select = (lambda name: True) if all_linear else _matcher(target, "target")
    excluded = (lambda name: False) if exclude is None else _matcher(exclude, "exclude")

    parents: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    targets: dict[int, tuple[str, nn.Linear, list[tuple[nn.Module, str]]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or not select(name) or excluded(name):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = parents[parent_name] if name else None
        if getattr(parent, "geolora_adapter", False):
            continue
        if isinstance(parent, nn.MultiheadAttention):
            if all_linear:
                continue
            raise ValueError(
                f"module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its "
                "weight directly; LoRA cannot wrap it"
            )
        if parent is None:
            raise ValueError(
                "the model itself is an nn.Linear; wrap it in a container or use LoRALinear(...)"
            )
        entry = targets.setdefault(id(module), (name, module, []))
        entry[2].append((parent, attr))
    if not targets:
        adapted = [
            n
            for n, m in model.named_modules()
            if getattr(m, "geolora_adapter", False) and (all_linear or select(n)) and not excluded(n)
        ]
        if adapted:
            raise ValueError(
                f"target={target!r} selects only modules that are already adapted "
                f"({type(dict(model.named_modules())[adapted[0]]).__name__}): {adapted[:5]}; an "
                f"adapter was injected into this model before"
            )
        raise ValueError(
            f"no nn.Linear module of the model matches target={target!r}"
            + (f" (exclude={exclude!r})" if exclude is not None else "")
        )
    for name, module, _ in targets.values():
        _check_rank(r, module, name)
    return targets


def inject_lora(
    model: nn.Module,
    target: Selector = "all-linear",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str | Callable[[LoRALinear, torch.Generator | None], None] = "zero",
    exclude: Selector | None = None,
    seed: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Replace the selected ``nn.Linear`` submodules of ``model`` by :class:`LoRALinear`.

    Selection (peft ``target_modules`` rule): ``"all-linear"`` takes every ``nn.Linear``;
    a list of names takes modules whose qualified name equals a name or ends with
    ``"." + name``; any other string is a regex that must match the full qualified name.
    ``exclude`` (same rule) removes modules from the selection. ``out_proj`` of an
    ``nn.MultiheadAttention`` (which reads the weight directly) is skipped by
    ``"all-linear"`` and refused when targeted explicitly. Modules already wrapped are skipped.

    All targets are validated before ``model`` is modified. With ``freeze_base`` every
    parameter except the LoRA factors is frozen (:func:`mark_only_lora_trainable`).
    ``seed`` makes the random part of ``init`` reproducible without touching the global RNG.

    Returns:
        the qualified names of the replaced modules, in ``named_modules`` order.

    Raises:
        ValueError: nothing matched (the message names the pattern), ``r <= 0``,
            ``r > min(in, out)`` for a target (the message names the module), bad hparams.
    """
    return replace_linear_modules(
        model,
        target,
        exclude,
        r,
        alpha,
        dropout,
        seed,
        freeze_base,
        lambda module, gen: LoRALinear(
            module, r, alpha, dropout, dtype=dtype, init=init, generator=gen
        ),
    )


def replace_linear_modules(
    model: nn.Module,
    target: Selector,
    exclude: Selector | None,
    r: int,
    alpha: float,
    dropout: float,
    seed: int | None,
    freeze_base: bool,
    make: Callable[[nn.Linear, torch.Generator | None], nn.Module],
) -> list[str]:
    """Replace the selected ``nn.Linear`` modules (:func:`select_linear_targets`) by
    ``make(module, generator)``, every target validated first; ``generator`` is seeded by
    ``seed`` (``None``: the global RNG); with ``freeze_base`` only adapter factors stay
    trainable. Returns the replaced modules' names (the engine of :func:`inject_lora`)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be positive, got r={r}")
    _check_hparams(alpha, dropout)
    targets = select_linear_targets(model, target, exclude, r)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    replaced = []
    for name, module, sites in targets.values():
        wrapped = make(module, generator)
        for parent, attr in sites:
            setattr(parent, attr, wrapped)
        replaced.append(name)
    if freeze_base:
        mark_only_lora_trainable(model)
    return replaced


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` submodules by qualified name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module, keep: Selector | None = None) -> None:
    """Set ``requires_grad`` True on the factors of every adapter module (``lora_A`` / ``lora_B``
    of :class:`LoRALinear`; ``lora_U`` / ``lora_S`` / ``lora_V`` of a ``ThreeFactorLinear``) and
    False elsewhere.

    ``keep`` selects modules (same rule as ``inject_lora``'s ``target``) whose own
    parameters stay trainable too, e.g. ``["classifier"]``.
    """
    kept = (lambda name: False) if keep is None else _matcher(keep, "keep")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if kept(name):
            for p in module.parameters():
                p.requires_grad_(True)
    for module in model.modules():
        if getattr(module, "geolora_adapter", False):
            for p in module.adapter_parameters():
                p.requires_grad_(True)


def merge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.merge` on every LoRA module of ``model``."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.unmerge` on every LoRA module of ``model``."""
    for module in lora_modules(model).values():
        module.unmerge()


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Context in which every LoRA module computes ``base(x)`` only (the base model).

    Raises ValueError for merged modules, whose base weight already contains ``ΔW``.
    """
    modules = lora_modules(model)
    for name, module in modules.items():
        if module.merged:
            raise ValueError(f"LoRA module {name!r} is merged; unmerge it before disabling LoRA")
    previous = {name: module._disabled for name, module in modules.items()}
    for module in modules.values():
        module._disabled = True
    try:
        yield
    finally:
        for name, module in modules.items():
            module._disabled = previous[name]
