"""Save and load optimizer state safely (``torch.save`` / ``torch.load(weights_only=True)``).

``optimizer.state_dict()`` of every geolora optimizer holds only tensors, numbers, strings,
booleans, ``None`` and containers of them, so it loads with PyTorch's restricted unpickler,
which refuses pickles that would import or call arbitrary objects (a class whose
``__reduce__`` runs code). :func:`load_optimizer_state` always uses that path; never call
``torch.load(weights_only=False)`` on a file you did not write yourself.

Exact resume::

    save_optimizer_state(opt, "opt.pt")          # with the model's parameters, saved likewise
    ...                                           # new process, same model and optimizer setup
    opt.load_state_dict(load_optimizer_state("opt.pt"))
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["load_optimizer_state", "save_optimizer_state"]

_LEAF_TYPES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype)


def _check_leaves(obj: Any, where: str) -> None:
    """``TypeError`` naming the first value the restricted unpickler would refuse."""
    if isinstance(obj, _LEAF_TYPES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not loadable")
            _check_leaves(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_leaves(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) refuses; "
        "optimizer state must hold only tensors, numbers, strings and containers of them"
    )


def save_optimizer_state(
    optimizer_or_state: torch.optim.Optimizer | Mapping[str, Any], path: str | os.PathLike[str]
) -> None:
    """Write ``optimizer.state_dict()`` (or a state dict) to ``path`` with ``torch.save``.

    Raises:
        TypeError: ``optimizer_or_state`` is neither an optimizer nor a mapping, or the state
            holds a value that :func:`load_optimizer_state` could not read back (the message
            names its key path, e.g. ``state[0]['exp_avg']``).
    """
    if isinstance(optimizer_or_state, torch.optim.Optimizer):
        state = optimizer_or_state.state_dict()
    elif isinstance(optimizer_or_state, Mapping):
        state = dict(optimizer_or_state)
    else:
        raise TypeError(
            "optimizer_or_state must be a torch.optim.Optimizer or a state dict, got "
            f"{type(optimizer_or_state).__name__}"
        )
    for key in ("state", "param_groups"):
        if key not in state:
            raise TypeError(f"optimizer_or_state has no {key!r} entry; not an optimizer state dict")
        _check_leaves(state[key], key)
    torch.save(state, path)


def load_optimizer_state(
    path: str | os.PathLike[str], map_location: str | torch.device | None = None
) -> dict[str, Any]:
    """Read an optimizer state dict with ``torch.load(path, weights_only=True)``.

    Args:
        path: file written by :func:`save_optimizer_state` (or ``torch.save(opt.state_dict())``).
        map_location: forwarded to ``torch.load`` (e.g. ``"cpu"``).

    Returns:
        The state dict, for ``optimizer.load_state_dict``.

    Raises:
        ValueError: the file holds objects the restricted unpickler refuses (possibly a
            malicious pickle: nothing in it was executed), is not a valid checkpoint, or is not
            an optimizer state dict (no ``state`` / ``param_groups``).
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refused to load optimizer state from {os.fspath(path)!r}: it contains objects that "
            "torch.load(weights_only=True) does not allow (nothing from it was executed). Only "
            f"load checkpoints you trust. Details: {exc}"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        # A truncated or corrupted file fails inside the zip reader or the unpickler with one
        # of several exception types depending on where it was cut.
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable torch checkpoint (truncated or corrupted?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, dict) and "state" in obj and "param_groups" in obj):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{os.fspath(path)!r} is not an optimizer state dict (expected keys 'state' and "
            f"'param_groups', got {got})"
        )
    return obj
