"""Build geolora parameter groups from a model or its named parameters.

A LoRA pair becomes the group ``{"params": [B, A], "lora_pair": True, "scaling": s,
"name": "<module>"}`` with ``B: (out, r)``, ``A: (r, in)`` and ``ΔW = s · B A``
(``M = B``, ``N = Aᵀ``, ``X = M Nᵀ``). Every other trainable parameter goes to one ordinary
group (no ``lora_pair`` key), which geolora optimizers update with AdamW.

Recognised names:

* geolora :class:`~geolora.lora.layers.LoRALinear`: ``<module>.lora_A``, ``<module>.lora_B``;
* peft LoRA on ``nn.Linear``: ``<module>.lora_A.<adapter>.weight``,
  ``<module>.lora_B.<adapter>.weight`` (one group per (module, adapter); the group also carries
  ``"adapter"``);
* peft LoRA on ``nn.Embedding``: ``<module>.lora_embedding_B.<adapter>`` ``(embedding_dim, r)``
  is ``B`` and ``<module>.lora_embedding_A.<adapter>`` ``(r, num_embeddings)`` is ``A``. peft
  adds ``s (B A)ᵀ`` to the ``(num_embeddings, embedding_dim)`` table, so ``X = B A`` is the
  transposed update and the loss is a function of ``X``: autograd's gradients are exactly
  ``∇_B = ∇_X Aᵀ``, ``∇_A = Bᵀ ∇_X`` — the geolora convention, with ``ΔW = s Xᵀ``.

* peft LoRA on ``nn.Conv1d/2d/3d``: ``lora_B.<adapter>.weight`` ``(out, r, 1, ...)`` and
  ``lora_A.<adapter>.weight`` ``(r, in, k, ...)`` are a pair as they are; the optimizers work on
  their matrix views ``B.view(out, r)``, ``A.view(r, in·k⋯)`` (no copies), and
  ``ΔW = s B A`` is the convolution's kernel update;
* peft DoRA magnitudes ``<module>.lora_magnitude_vector.<adapter>.weight`` ``(out,)``: ordinary
  parameters by default (``dora="ordinary"``: every optimizer trains them with AdamW; a warning
  says they are not treated with their pair); with ``dora="linked"`` each becomes the group
  ``{"params": [m], "dora_magnitude": True, "name": "<module>", "adapter": ...}`` right after its
  pair's group, for :class:`geolora.optim.InvariantDoRA`;
* three-factor adapters (:class:`geolora.lora.ThreeFactorLinear`): ``<module>.lora_U``,
  ``<module>.lora_S``, ``<module>.lora_V`` become ``{"params": [U, S, V], "lora_triple": True,
  "scaling": s, "name": "<module>"}`` (for :class:`geolora.optim.PoLAR` and
  :func:`geolora.optim.StelLA`).

Not supported as pairs, never silently trained as ordinary parameters: peft LoRA variants whose
forward is not ``lora_B(lora_A(·))`` (DoRA and aLoRA are), peft's multi-expert ``ParamWrapper``
factors, and any other trainable ``lora_*`` or peft adapter parameter.
``unsupported="raise"`` (default) raises ``ValueError`` naming them; ``unsupported="ordinary"``
trains them with AdamW in the ordinary group and warns (:class:`UnsupportedLoRAWarning`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["UnsupportedLoRAWarning", "lora_param_groups"]

_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")
_PEFT_EMB = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<factor>[AB])\.(?P<adapter>[^.]+)$")
_DORA = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector\.(?P<adapter>[^.]+)(?:\.weight)?$")
_LORA_BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.bias$")
_GEOLORA = re.compile(r"^(?:(?P<module>.+)\.)?lora_(?P<factor>[AB])$")
_THREE = re.compile(r"^(?:(?P<module>.+)\.)?lora_(?P<factor>[USV])$")
DORA_MODES = ("ordinary", "linked")
_LORA_LIKE = re.compile(r"(?:^|\.)lora_\w*(?:\.(?P<adapter>[^.]+))?")
#: peft LoRA variants whose forward uses the factors only as ``lora_B(lora_A(·))`` (DoRA with
#: its detached weight norm, aLoRA on a subset of tokens): the gradients keep the pair form.
_PAIR_VARIANTS = frozenset({"DoraLinearVariant", "DoraEmbeddingVariant", "ALoraLinearVariant"})
UNSUPPORTED_MODES = ("raise", "ordinary")

NamedParams = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


class UnsupportedLoRAWarning(UserWarning):
    """LoRA-related parameters that ``lora_param_groups`` puts in the ordinary AdamW group."""


#: peft adapter attributes that hold plain dense parameters (a trained copy of a module, new
#: token embeddings): ordinary parameters, correctly trained with AdamW.
_ORDINARY_ADAPTER_ATTRS = frozenset({"modules_to_save", "trainable_tokens_delta"})


def _tuner_layer(modules: Mapping[str, nn.Module], name: str) -> tuple[str, nn.Module] | None:
    """The innermost peft tuner layer (a module with ``adapter_layer_names``) holding parameter
    ``name`` under one of its adapter attributes, as ``(module name, module)``; ``None`` for
    the attributes in :data:`_ORDINARY_ADAPTER_ATTRS`."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        mod = modules.get(".".join(parts[:cut]))
        names = getattr(mod, "adapter_layer_names", None)
        if names is not None:
            attr = parts[cut]
            if attr in names and attr not in _ORDINARY_ADAPTER_ATTRS:
                return ".".join(parts[:cut]), mod
            return None
    return None


def _variant_problem(module: nn.Module | None, adapter: str | None) -> str | None:
    """Why a peft layer's (lora_A, lora_B) are not a geolora pair, or ``None``."""
    if module is None or adapter is None:
        return None
    if getattr(module, "num_experts", 1) != 1:
        return f"peft multi-expert LoRA ({module.num_experts} experts share the factors)"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ not in _PAIR_VARIANTS:
        return f"peft LoRA variant {type(variant).__name__}"
    return None


def _scaling(model: nn.Module | None, module_name: str, adapter: str | None) -> float:
    """``module.scaling`` (geolora) or ``module.scaling[adapter]`` (peft); 1.0 without a model
    or when the module has no ``scaling`` attribute."""
    if model is None:
        return 1.0
    module = model.get_submodule(module_name) if module_name else model
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        return 1.0
    if adapter is not None:
        if not isinstance(scaling, Mapping) or adapter not in scaling:
            raise ValueError(f"module {module_name!r} has no scaling for adapter {adapter!r}")
        scaling = scaling[adapter]
    return float(scaling)


def lora_param_groups(
    model_or_named_params: nn.Module | NamedParams,
    *,
    lr: float | None = None,
    other_lr: float | None = None,
    other_weight_decay: float | None = None,
    adapter: str | Iterable[str] | None = None,
    unsupported: str = "raise",
    dora: str = "ordinary",
) -> list[dict[str, Any]]:
    """Split trainable parameters into LoRA-pair groups and one ordinary group.

    Args:
        model_or_named_params: a model (scalings are read from its modules) or
            ``(name, tensor)`` pairs / a ``{name: tensor}`` mapping (scaling 1.0; peft variants
            and other tuners are then recognised by name only).
        lr: learning rate put in every LoRA group (omitted: the optimizer default).
        other_lr: learning rate of the ordinary group.
        other_weight_decay: weight decay of the ordinary group.
        adapter: restrict peft pairs to this adapter name (or names); factors of other
            peft adapters are left out of all groups. geolora pairs are always included.
        unsupported: what to do with trainable LoRA parameters that are not a supported pair
            (module docstring): ``"raise"`` a ``ValueError``, or ``"ordinary"``: train them
            with AdamW in the ordinary group and warn (:class:`UnsupportedLoRAWarning`).
        dora: where peft DoRA magnitude vectors go: ``"ordinary"`` (the ordinary group, with a
            warning) or ``"linked"`` (one ``dora_magnitude`` group after its pair's group).

    Returns:
        LoRA groups in order of first appearance of their factors, then the ordinary group
        ``{"params": [...], "name": "other"}`` if any parameter is left. Frozen parameters
        (``requires_grad=False``) are skipped; shared tensors are counted once.

    Raises:
        ValueError: a factor without its trainable partner, mismatched ranks, non-2-D
            geolora factors, an unsupported LoRA parameter (``unsupported="raise"``), a linked
            DoRA magnitude without its pair or of the wrong length, or an ``adapter`` that does
            not occur (messages name the parameter / module).

    Warns:
        UnsupportedLoRAWarning: DoRA magnitude vectors (``dora="ordinary"``), and with
            ``unsupported="ordinary"`` the unsupported parameters, trained as ordinary parameters
            (names in the message).
    """
    if unsupported not in UNSUPPORTED_MODES:
        raise ValueError(f"unsupported must be one of {UNSUPPORTED_MODES}, got {unsupported!r}")
    if dora not in DORA_MODES:
        raise ValueError(f"dora must be one of {DORA_MODES}, got {dora!r}")
    model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
    if model is not None:
        named = list(model.named_parameters())
        modules = dict(model.named_modules())
    elif isinstance(model_or_named_params, Mapping):
        named, modules = list(model_or_named_params.items()), {}
    else:
        named, modules = list(model_or_named_params), {}
    wanted = None if adapter is None else ({adapter} if isinstance(adapter, str) else set(adapter))
    for value, what in (
        (lr, "lr"),
        (other_lr, "other_lr"),
        (other_weight_decay, "other_weight_decay"),
    ):
        if value is not None and not value >= 0:
            raise ValueError(f"{what} must be non-negative, got {what}={value!r}")

    pairs: dict[tuple[str, str | None], dict[str, tuple[str, torch.Tensor]]] = {}
    others: list[torch.Tensor] = []
    rejected: list[tuple[str, torch.Tensor, str]] = []  # (name, tensor, why)
    dora_names: list[str] = []
    triples: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    magnitudes: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}
    seen: set[int] = set()
    adapters_found: set[str] = set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        three = _THREE.match(name)
        if three is not None:
            triples.setdefault(three["module"] or "", {})[three["factor"]] = (name, p)
            continue
        match = _PEFT.match(name) or _PEFT_EMB.match(name) or _GEOLORA.match(name)
        other = None if match else (_DORA.match(name) or _LORA_BIAS.match(name))
        tuner = _tuner_layer(modules, name) if modules else None
        loose = None if (match or other) else _LORA_LIKE.search(name)
        ad = next(
            (m.groupdict().get("adapter") for m in (match, other, loose) if m is not None), None
        )
        if ad is not None and (match or other or tuner is not None):
            adapters_found.add(ad)
            if wanted is not None and ad not in wanted:
                continue
        if match is None:
            if other is not None and other.re is _DORA:
                if dora == "linked":
                    magnitudes[(other["module"], other["adapter"])] = (name, p)
                else:
                    dora_names.append(name)
                    others.append(p)
            elif other is None and (loose is not None or tuner is not None):
                owner = (
                    f" of {type(tuner[1]).__module__}.{type(tuner[1]).__name__}"
                    if tuner is not None
                    else ""
                )
                rejected.append((name, p, f"an adapter parameter{owner}, not a LoRA pair"))
            else:
                others.append(p)
            continue
        module_name = match["module"] or ""
        why = None
        if match.re is _GEOLORA:
            if p.dim() != 2:
                raise ValueError(
                    f"LoRA factor {name!r} has shape {tuple(p.shape)}; only 2-D "
                    "(Linear) LoRA factors are supported"
                )
        else:
            why = _variant_problem(modules.get(module_name), ad)
        if why is not None:
            rejected.append((name, p, why))
            continue
        pairs.setdefault((module_name, ad), {})[match["factor"]] = (name, p)
    if wanted is not None and not wanted <= adapters_found:
        raise ValueError(
            f"adapter {sorted(wanted - adapters_found)} not found among trainable "
            f"LoRA factors (found {sorted(adapters_found)})"
        )
    if rejected:
        listing = "; ".join(f"{n!r}: {why}" for n, _, why in rejected[:6])
        more = f" (and {len(rejected) - 6} more)" if len(rejected) > 6 else ""
        if unsupported == "raise":
            raise ValueError(
                f"{len(rejected)} trainable LoRA parameter(s) are not a pair geolora supports: "
                f"{listing}{more}. Pass unsupported='ordinary' to train them as ordinary "
                "(AdamW) parameters, or freeze them"
            )
        warnings.warn(
            f"training {len(rejected)} unsupported LoRA parameter(s) as ordinary (AdamW) "
            f"parameters, without pair geometry: {listing}{more}",
            UnsupportedLoRAWarning,
            stacklevel=2,
        )
        others.extend(t for _, t, _ in rejected)
    if dora_names:
        warnings.warn(
            f"{len(dora_names)} DoRA magnitude vector(s) are trained as ordinary (AdamW) "
            f"parameters, not invariantly with their pair (dora='linked' with InvariantDoRA "
            f"does): {dora_names[:6]}",
            UnsupportedLoRAWarning,
            stacklevel=2,
        )

    groups: list[dict[str, Any]] = []
    for (module_name, ad), factors in pairs.items():
        if set(factors) != {"A", "B"}:
            ((present_name, _),) = factors.values()
            absent = "lora_B" if "A" in factors else "lora_A"
            raise ValueError(
                f"LoRA factor {present_name!r} has no trainable {absent} partner "
                "(missing or frozen)"
            )
        (b_name, b), (a_name, a) = factors["B"], factors["A"]
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"rank mismatch: {b_name!r} is {tuple(b.shape)} (out, r) but "
                f"{a_name!r} is {tuple(a.shape)} (r, in)"
            )
        group: dict[str, Any] = {
            "params": [b, a],
            "lora_pair": True,
            "scaling": _scaling(model, module_name, ad),
            "name": module_name,
        }
        if ad is not None:
            group["adapter"] = ad
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
        if ad is not None and (module_name, ad) in magnitudes:
            groups.append(_magnitude_group(magnitudes.pop((module_name, ad)), group, lr))
    if magnitudes:
        (m_name, _), *_ = magnitudes.values()
        raise ValueError(f"DoRA magnitude {m_name!r} has no trainable LoRA pair (lora_A, lora_B)")
    groups.extend(_triple_group(model, module_name, f, lr) for module_name, f in triples.items())
    if others:
        group = {"params": others, "name": "other"}
        if other_lr is not None:
            group["lr"] = other_lr
        if other_weight_decay is not None:
            group["weight_decay"] = other_weight_decay
        groups.append(group)
    return groups


def _magnitude_group(
    entry: tuple[str, torch.Tensor], pair: dict[str, Any], lr: float | None
) -> dict[str, Any]:
    """The linked group of a DoRA magnitude vector ``m: (out,)`` of ``pair``."""
    name, m = entry
    out = pair["params"][0].shape[0]
    if m.dim() != 1 or m.shape[0] != out:
        raise ValueError(
            f"DoRA magnitude {name!r} has shape {tuple(m.shape)}; expected ({out},), the output "
            f"size of LoRA pair {pair['name']!r}"
        )
    group: dict[str, Any] = {
        "params": [m],
        "dora_magnitude": True,
        "name": pair["name"],
        "adapter": pair["adapter"],
    }
    if lr is not None:
        group["lr"] = lr
    return group


def _triple_group(
    model: nn.Module | None,
    module_name: str,
    factors: dict[str, tuple[str, torch.Tensor]],
    lr: float | None,
) -> dict[str, Any]:
    """The ``lora_triple`` group ``[U, S, V]`` of a three-factor adapter, shapes checked."""
    absent = [f"lora_{f}" for f in "USV" if f not in factors]
    if absent:
        ((present, _), *_) = factors.values()
        raise ValueError(
            f"three-factor factor {present!r} has no trainable {absent} (missing or frozen)"
        )
    (u_name, U), (s_name, S), (v_name, V) = factors["U"], factors["S"], factors["V"]
    for nm, t in ((u_name, U), (v_name, V)):
        if t.dim() != 2:
            raise ValueError(f"three-factor factor {nm!r} must be 2-D, got {tuple(t.shape)}")
    r = U.shape[1]
    if V.shape[1] != r or tuple(S.shape) not in ((r, r), (r,)):
        raise ValueError(
            f"rank mismatch: {u_name!r} is {tuple(U.shape)} (out, r), {s_name!r} is "
            f"{tuple(S.shape)} ((r, r) or (r,)), {v_name!r} is {tuple(V.shape)} (in, r)"
        )
    group: dict[str, Any] = {
        "params": [U, S, V],
        "lora_triple": True,
        "scaling": _scaling(model, module_name, None),
        "name": module_name,
    }
    if lr is not None:
        group["lr"] = lr
    return group
