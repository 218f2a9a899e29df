"""Validation of what a LoRA optimizer is given: hyperparameters, param groups, LoRA pairs and
saved state dicts. Everything here runs before anything is written, and every error names the
parameter or key and says what was expected.

A LoRA pair is a param group ``{"params": [B, A], "lora_pair": True, "scaling": s, "name": ...}``
with ``B: (out, r)``, ``A: (r, in)`` and ``ΔW = s·B A``. Convolution LoRA factors (peft's
``lora_B: (out, r, 1, ..., 1)``, ``lora_A: (r, in, k₁, ..., k_d)``) are pairs too: the optimizer
works on their matrix views ``B.view(out, r)``, ``A.view(r, in·k₁⋯k_d)`` (:func:`matrix_view`),
which share the parameters' storage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GROUP_KINDS",
    "check_gradients",
    "check_lr",
    "check_positive",
    "check_range",
    "group_kind",
    "matrix_view",
    "param_label",
    "prepare_group",
    "validate_betas",
    "validate_pair",
]


#: Flag keys of the group kinds besides pairs and ordinary groups, with a hint for optimizers
#: that do not train them (:attr:`LoRAOptimizer.group_kinds`).
GROUP_KIND_HINTS = {
    "lora_triple": "three-factor adapters train with PoLAR or StelLA",
    "dora_magnitude": (
        "linked DoRA magnitudes train with InvariantDoRA; build the groups with "
        "lora_param_groups(model, dora='ordinary') for other optimizers"
    ),
}
GROUP_KINDS = tuple(GROUP_KIND_HINTS)


def group_kind(group: dict[str, Any]) -> str | None:
    """The group's kind flag (:data:`GROUP_KINDS`) or ``None`` (a pair or an ordinary group)."""
    return next((k for k in GROUP_KINDS if group.get(k, False)), None)


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python, never an lr)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(
    name: str, value: Any, lo: float, hi: float = math.inf, hi_open: bool = False
) -> None:
    """``ValueError`` unless ``value`` is a number (not a bool, not NaN) in ``[lo, hi]`` (or
    ``[lo, hi)`` with ``hi_open``)."""
    ok = _is_number(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"invalid {name}: {value!r} (expected a number in {rng})")


def check_positive(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a finite number ``> 0`` (not a bool)."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"invalid {name}: {value!r} (expected a finite number > 0)")


def check_lr(name: str, value: Any, where: str = "") -> None:
    """``ValueError`` unless the learning rate ``value`` is a finite number ``>= 0``.

    An lr schedule assigns ``group["lr"]`` before every step, so the optimizer checks it at
    construction, in ``add_param_group`` and again at every step (``where`` says which group).
    """
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        at = f" in {where}" if where else ""
        raise ValueError(f"invalid {name}: {value!r}{at} (expected a finite number >= 0)")


def validate_betas(name: str, betas: Any, n: int = 2) -> None:
    """``ValueError`` unless ``betas`` is a length-``n`` tuple of numbers in ``[0, 1)``."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == n):
        raise ValueError(f"invalid {name}: {betas!r} (expected {n} numbers in [0, 1))")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, hi_open=True)


def check_bool(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (expected one of {choices})")


def param_label(group: dict, idx: int) -> str:
    """A parameter's name for error messages: ``<pair name>.lora_B`` / ``.lora_A`` for a pair,
    the group's ``param_names`` entry or ``<group name>[i]`` otherwise."""
    name = group.get("name")
    if group.get("lora_pair"):
        base = name if name is not None else "<unnamed lora pair>"
        return f"{base}.{'lora_B' if idx == 0 else 'lora_A'}"
    names = group.get("param_names")
    if names is not None and idx < len(names):
        return str(names[idx])
    return f"{name or 'group'}[{idx}]"


def prepare_group(
    optimizer: torch.optim.Optimizer,
    param_group: Any,
    extra_keys: Iterable[str] = (),
    shown: Iterable[str] = (),
) -> dict[str, Any]:
    """The checks every geolora optimizer's ``add_param_group`` starts with: ``param_group`` is a
    dict whose keys are hyperparameters (``optimizer.defaults``), torch's bookkeeping keys
    (``param_names``, ``initial_lr``) or ``extra_keys``; ``TypeError`` / ``ValueError`` naming the
    group otherwise (``shown``: extra keys the message lists as valid). Returns a copy with
    ``"params"`` as a list, so the caller's dict is neither filled with defaults nor changed by a
    rejection."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
    param_group = dict(param_group)
    defaults = set(optimizer.defaults)
    unknown = set(param_group) - defaults - {"param_names", "initial_lr", *extra_keys}
    if unknown:
        label = param_group.get("name", "param group")
        raise ValueError(
            f"{type(optimizer).__name__}: unknown option(s) {sorted(unknown)} in {label!r}; "
            f"valid options: {sorted(defaults | set(shown))}"
        )
    params = param_group["params"]
    param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
    return param_group


def check_gradients(
    param_groups: Iterable[dict[str, Any]],
    label: Callable[[int, dict[str, Any], int], str] | None = None,
) -> None:
    """``RuntimeError`` for a sparse and ``FloatingPointError`` for a non-finite (NaN or inf)
    gradient, naming the parameter (``label(group index, group, param index)``, default
    :func:`param_label`); called before anything is updated."""
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = param_label(group, i) if label is None else label(gi, group, i)
            if p.grad.is_sparse:
                raise RuntimeError(f"{name}: sparse gradients are not supported")
            if not bool(torch.isfinite(p.grad).all()):
                raise FloatingPointError(
                    f"non-finite gradient (NaN or inf) in parameter {name}; nothing was updated"
                )


def matrix_view(t: Tensor) -> Tensor:
    """The matrix a LoRA factor stands for: ``t`` itself when 2-D, else ``t.view(t.shape[0],
    -1)`` (a convolution factor ``(out, r, 1, ...)`` or ``(r, in, k, ...)``), sharing storage."""
    return t if t.dim() == 2 else t.view(t.shape[0], -1)


def _factor_matrix(label: str, nm: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{label}.{nm} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{label}.{nm} must be floating point, got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(
            f"{label}.{nm} is on the meta device (shape {tuple(t.shape)}, no data): move the "
            f"model to a real device (e.g. model.to_empty(device=...) and load its weights) "
            f"before building the optimizer"
        )
    if t.dim() < 2:
        raise ValueError(
            f"{label}.{nm} must be 2-D, got shape {tuple(t.shape)} (or a convolution factor: "
            f"lora_B (out, r, 1, ...), lora_A (r, in, k, ...))"
        )
    if t.dim() > 2:
        if nm == "lora_B" and any(s != 1 for s in t.shape[2:]):
            raise ValueError(
                f"{label}.lora_B has shape {tuple(t.shape)}: a convolution lora_B must be "
                f"(out, r, 1, ..., 1)"
            )
        try:
            view = t.view(t.shape[0], -1)
        except RuntimeError as exc:
            raise ValueError(
                f"{label}.{nm} of shape {tuple(t.shape)} cannot be viewed as a matrix without "
                f"a copy (strides {t.stride()}); make it contiguous"
            ) from exc
        return view
    return t


def validate_pair(group: dict[str, Any]) -> None:
    """Check a ``lora_pair`` group: exactly ``[B, A]``, distinct floating-point tensors on one
    real device with one dtype, ``B: (m, r)``, ``A: (r, n)`` (or their convolution forms),
    ``1 <= r <= min(m, n)``, ``scaling`` a finite number ``> 0``."""
    label = group.get("name", "<unnamed lora pair>")
    params = group["params"]
    if len(params) != 2:
        raise ValueError(
            f"lora_pair group {label!r} must hold exactly two tensors [B, A], got {len(params)}"
        )
    B, A = params
    if B is A:
        raise ValueError(
            f"lora_pair {label!r}: lora_B and lora_A are the same tensor; a pair needs two "
            f"distinct factors [B, A]"
        )
    Bm = _factor_matrix(label, "lora_B", B)
    Am = _factor_matrix(label, "lora_A", A)
    m, r = Bm.shape
    r2, n = Am.shape
    if r != r2:
        raise ValueError(
            f"lora_pair {label!r}: rank mismatch, lora_B is {tuple(B.shape)} (out, r) but "
            f"lora_A is {tuple(A.shape)} (r, in)"
        )
    if r == 0 or r > min(m, n):
        hint = ""
        if n == m and 1 <= m <= min(r, r2):  # [A, B] of a square layer given as [B, A]?
            hint = (
                "; the factors look swapped: pass [lora_B, lora_A] with lora_B (out, r) and "
                "lora_A (r, in)"
            )
        raise ValueError(
            f"lora_pair {label!r}: rank r={r} must be in [1, min(out, in)={min(m, n)}] "
            f"(lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)}){hint}"
        )
    if B.dtype != A.dtype:
        raise TypeError(f"lora_pair {label!r}: dtype mix, lora_B {B.dtype} vs lora_A {A.dtype}")
    if B.device != A.device:
        raise ValueError(
            f"lora_pair {label!r}: device mix, lora_B on {B.device} vs lora_A on {A.device}"
        )
    s = group.get("scaling", 1.0)
    if not (_is_number(s) and math.isfinite(s) and s > 0):
        raise ValueError(f"lora_pair {label!r}: scaling must be a finite number > 0, got {s!r}")


def validate_state_dict(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """Check a state dict against ``optimizer`` before anything is loaded (issue: a state from
    another optimizer, another shape, with missing keys or hyperparameters the constructor would
    reject must fail at load time, not later inside ``step``).

    Checks: the layout (``state``, ``param_groups``), the optimizer class (when recorded), the
    number of groups and of parameters per group, each saved group's hyperparameters through the
    optimizer's own ``_validate_hyperparameters`` (and the pair structure), and for every saved
    per-parameter state that its keys and tensor shapes match the state a fresh step would
    create (:meth:`LoRAOptimizer._expected_state`). Raises ``ValueError`` naming the parameter and
    the key; nothing is modified.
    """
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups', got "
            f"{type(state_dict).__name__}"
            + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else "")
        )
    saved_cls = state_dict.get("optimizer_class")
    if saved_cls is not None and saved_cls != name:
        raise ValueError(
            f"{name}.load_state_dict: the state was saved by {saved_cls}, not {name}; an "
            f"optimizer's state only loads into the same optimizer class"
        )
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if not isinstance(saved_groups, list) or len(groups) != len(saved_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state has "
            f"{len(saved_groups) if isinstance(saved_groups, list) else '?'} param groups, the "
            f"optimizer {len(groups)}"
        )
    index: dict[int, tuple[dict, int, Tensor]] = {}
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        label = g.get("name", f"param group {gi}")
        if not isinstance(sg, dict) or "params" not in sg:
            raise ValueError(f"{name}.load_state_dict: param group {gi} has no 'params'")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(
                f"{name}.load_state_dict: {label!r} holds {len(g['params'])} parameters, the "
                f"saved group {len(sg['params'])}"
            )
        if bool(sg.get("lora_pair", False)) != bool(g.get("lora_pair", False)):
            raise ValueError(
                f"{name}.load_state_dict: {label!r} is "
                f"{'' if g.get('lora_pair') else 'not '}a LoRA pair, the saved group is "
                f"{'' if sg.get('lora_pair') else 'not '}"
            )
        # (torch adds keys such as "differentiable" to ``defaults`` on unpickling/deepcopy)
        names = getattr(optimizer, "hyperparameter_names", optimizer.defaults)
        optional = getattr(optimizer, "optional_on_load", frozenset())
        missing = [k for k in names if k not in sg and k not in optional]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: saved group {label!r} lacks hyperparameter(s) {missing}"
            )
        probe = {k: v for k, v in sg.items() if k != "params"}
        probe["params"] = g["params"]
        if probe.get("lora_pair"):
            scale = probe.get("scaling", 1.0)
            if not (_is_number(scale) and math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"{name}.load_state_dict: saved pair {label!r} has scaling {scale!r} "
                    f"(expected a finite number > 0)"
                )
        try:
            optimizer._validate_hyperparameters(probe)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{name}.load_state_dict: saved group {label!r} has an invalid hyperparameter: "
                f"{exc}"
            ) from exc
        for i, (pid, p) in enumerate(zip(sg["params"], g["params"])):
            index[pid] = (g, i, p)
    state = state_dict["state"]
    if not isinstance(state, dict):
        raise ValueError(f"{name}.load_state_dict: 'state' must be a dict")
    for pid, values in state.items():
        if pid not in index:
            raise ValueError(
                f"{name}.load_state_dict: state for parameter id {pid!r}, which no saved group "
                f"holds"
            )
        g, i, p = index[pid]
        if not isinstance(values, dict):
            raise ValueError(
                f"{name}.load_state_dict: state of {param_label(g, i)} must be a dict"
            )
        expected = optimizer._expected_state(g, i, p, values)
        if expected is None:
            continue
        for key, shape in expected.items():
            if key not in values:
                raise ValueError(
                    f"{name}.load_state_dict: state of {param_label(g, i)} lacks key {key!r}"
                )
            v = values[key]
            if shape is not None:
                got = tuple(v.shape) if isinstance(v, Tensor) else None
                if got != shape:
                    raise ValueError(
                        f"{name}.load_state_dict: state {key!r} of {param_label(g, i)} has "
                        f"shape {got}, expected {shape} (another rank or layer shape?)"
                    )
            if isinstance(v, Tensor) and v.is_floating_point() and not _finite_everywhere(v):
                raise ValueError(
                    f"{name}.load_state_dict: state {key!r} of {param_label(g, i)} is not finite"
                )


def _finite_everywhere(v: Tensor) -> bool:
    """No NaN/inf in ``v``; for a sharded ``DTensor`` on any rank's shard (every rank loads the
    same state, so every rank takes this collective and raises alike)."""
    from geolora.optim.sharding import StepComm, is_dtensor

    if not is_dtensor(v):
        return bool(torch.isfinite(v).all())
    ok = bool(torch.isfinite(v._local_tensor).all())
    return StepComm([v]).all_true([ok])[0]
