"""Any element-wise torch optimizer as a preconditioner on ``T_X`` (quotient geometries).

Zheng & Wu, "LoRA-S", ICLR 2026 (OpenReview Guo2XGgxZA), Alg. 1 and §4.1: any preconditioner
acting on the matrix ``X = M Nᵀ`` gives a transformation-invariant optimizer. An element-wise
torch optimizer is one when it runs on a dense *shadow* of ``X``: per pair and step the shadow
``X̃ ← X`` gets ``.grad = ξ`` and the wrapped optimizer takes one ordinary step with its own code
and state (stored under ``shadow_<key>``); the direction is ``(X̃_before − X̃_after) / lr``
(details: :mod:`geolora.optim.wrap`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import mm_t, transpose
from geolora.manifolds.frame import tangent_to_dense
from geolora.manifolds.types import FixedRankTangent

__all__ = ["STATE_PREFIX", "TorchOptimizerPreconditioner"]

STATE_PREFIX = "shadow_"


class TorchOptimizerPreconditioner:
    """Runs a torch optimizer on dense shadows ``X̃ = X`` with ``.grad = ξ`` (module docstring).

    Returns ``P_T`` of the descent ``(X̃_before − X̃_after) / lr`` (zero for ``lr = 0``). The wrapped
    optimizer's state starts empty and is stored under ``shadow_<key>`` after the first step;
    its hyperparameters ``hp_names`` are read from the param group.
    """

    name = "torch"
    gauge_rules: dict[str, str] = {}  # state of a shadow of X: matrix space

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        hp_names: tuple[str, ...],
        defaults: dict[str, Any] | None = None,
    ):
        self.optimizer_class = optimizer_class
        self.hp_names = hp_names
        self.defaults = dict(defaults or {})

    def validate(self, hp: dict[str, Any]) -> None:
        """The wrapped optimizer validates its own hyperparameters (its error names them)."""
        try:
            self.optimizer_class([torch.zeros(1)], **{k: hp[k] for k in self.hp_names})
        except (ValueError, TypeError) as exc:
            raise type(exc)(
                f"invalid hyperparameter for the wrapped {self.optimizer_class.__name__} in "
                f"param group {hp.get('name', '')!r}: {exc}"
            ) from exc

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: Any, hp: dict, step: int
    ) -> FixedRankTangent:
        frame = ctx.frame
        # The shadows are views of one stacked X = U W Vᵀ, which after the step *is* the
        # stacked X̃_after; their gradients are views of the stacked ξ.
        UW = mm_t(frame.U, frame.W)
        after = UW @ transpose(frame.V)
        grad = tangent_to_dense(frame, xi)
        shadows = list(after.unbind(0))
        for sh, g in zip(shadows, grad.unbind(0)):
            sh.grad = g
        opt = self.optimizer_class(shadows, **{k: hp[k] for k in self.hp_names})
        keys = [k[len(STATE_PREFIX) :] for k in state if k.startswith(STATE_PREFIX)]
        given: dict[str, list[Tensor]] = {}
        if keys:
            # Per-shadow state = views of the stacked state buffers (updated in place by most
            # torch optimizers, which then need no re-stacking).
            given = {k: list(state[STATE_PREFIX + k].unbind(0)) for k in keys}
            for i, sh in enumerate(shadows):
                opt.state[sh] = {k: given[k][i] for k in keys}
        opt.step()
        for k, v in opt.state[shadows[0]].items():
            if v is None:
                continue
            if not isinstance(v, Tensor):
                raise TypeError(
                    f"{self.optimizer_class.__name__} keeps a non-tensor state entry {k!r} "
                    f"({type(v).__name__}); Lifted() supports optimizers whose state is tensors"
                )
            vals = [opt.state[sh][k] for sh in shadows]
            if k in given and all(a is b for a, b in zip(vals, given[k])):
                if not v.is_floating_point() or v.dtype == after.dtype:
                    continue  # updated in place in the stacked buffer
            if v.is_floating_point():
                vals = [t.to(after.dtype) for t in vals]
            state[STATE_PREFIX + k] = torch.stack(vals)
        for sh in shadows:
            sh.grad = None
        lr = hp["lr"]
        if not lr > 0:
            z = torch.zeros_like(xi.M)
            return FixedRankTangent(z, torch.zeros_like(xi.Up), torch.zeros_like(xi.Vp))
        # X − X̃_after in X̃_after's buffer, with X = (U W) Vᵀ recomputed by the same product
        # (no dense copy of X is kept; the difference of the nearby X and X̃_after is exact).
        if after.dim() == 3:
            diff = after.baddbmm_(UW, transpose(frame.V), beta=-1.0)
        else:
            diff = torch.sub(UW @ transpose(frame.V), after, out=after)
        t = ctx.project(diff)
        return FixedRankTangent(t.M / lr, t.Up / lr, t.Vp / lr)
