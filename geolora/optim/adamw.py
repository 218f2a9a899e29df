"""AdamW inside a geolora optimizer: ordinary (non-LoRA) parameter groups and the robust start.

One geolora optimizer trains a whole model: groups without ``lora_pair`` are updated with AdamW
(the arithmetic of ``torch.optim.AdamW`` with ``foreach=False``, so the results are the same to the
bit), and a LoRA pair whose factors are rank deficient (e.g. ``B = 0``) or still inside its first
``robust_steps`` steps takes AdamW steps on its factors (the "robust start" of Zheng & Wu,
"LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview
Guo2XGgxZA, appendix A.16).

Both are computed *before* anything is written (:class:`PendingAdamW`): the step computes every
update — robust, pair buckets, ordinary groups —, checks that all results are finite, and only
then writes any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, transpose

__all__ = [
    "ADAMW_DEFAULTS",
    "ROBUST_DEFAULTS",
    "ROBUST_STATE_KEYS",
    "PendingAdamW",
    "adamw_update_",
    "ordinary_group_update",
    "robust_pair_update",
]

#: Optimizer-wide AdamW hyperparameters of the ordinary groups (``other_lr=None``: the group's
#: ``lr``). A group's own ``weight_decay``/``betas``/``eps`` (as torch users write them) win.
ADAMW_DEFAULTS: dict[str, Any] = {
    "other_lr": None,
    "other_betas": (0.9, 0.999),
    "other_eps": 1e-8,
    "other_weight_decay": 0.01,
}
#: AdamW hyperparameters of the robust start (its learning rate is the pair's ``lr``).
ROBUST_DEFAULTS: dict[str, Any] = {
    "robust_betas": (0.9, 0.999),
    "robust_eps": 1e-8,
    "robust_weight_decay": 0.0,
}
#: State keys of a pair during its robust start (removed when the pair leaves it).
ROBUST_STATE_KEYS = (
    "robust_exp_avg_B",
    "robust_exp_avg_sq_B",
    "robust_exp_avg_A",
    "robust_exp_avg_sq_A",
)


def adamw_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
    2019, arXiv:1711.05101, Alg. 2), same operations and order as ``torch.optim.AdamW``
    (``foreach=False``, ``amsgrad=False``, ``maximize=False``)::

        p ← (1 − lr λ) p;  m ← m + (1 − β₁)(g − m);  v ← β₂ v + (1 − β₂) g²
        p ← p − (lr / (1 − β₁ᵗ)) m / (sqrt(v) / sqrt(1 − β₂ᵗ) + ε)
    """
    beta1, beta2 = betas
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


@dataclass
class PendingAdamW:
    """AdamW updates computed on private copies, not yet written (see the module docstring).

    ``values[i]`` is written into ``targets[i]`` (a parameter or its matrix view); each entry of
    ``states`` is ``(state dict, new tensors for its keys, keys to remove)``. ``groups`` are the
    param groups concerned (for ``nonfinite="skip"`` accounting), ``label`` names them in errors.
    """

    groups: list[dict]
    label: str
    targets: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    states: list[tuple[dict, dict[str, Tensor], tuple[str, ...]]] = field(default_factory=list)

    @classmethod
    def pair_write(
        cls, group: dict, label: str, B: Tensor, A: Tensor, new: Any, st: dict, state: dict
    ) -> PendingAdamW:
        """The write of a pair's new factors ``new = (M, N)`` into ``B = M``, ``A = Nᵀ`` (in
        their dtypes) and of ``state`` into its state dict ``st``, the robust-start moments
        dropped."""
        values = [new.M.to(B.dtype), transpose(new.N).to(A.dtype)]
        return cls([group], label, [B, A], values, [(st, state, ROBUST_STATE_KEYS)])

    def results(self) -> list[Tensor]:
        """Everything the step would write: new parameter values and new state tensors."""
        news = [v for _, new, _ in self.states for v in new.values() if isinstance(v, Tensor)]
        return self.values + news

    def commit(self) -> None:
        """Write the computed update."""
        if all(type(t) is Tensor for t in self.targets):
            torch._foreach_copy_(self.targets, self.values)
        else:  # e.g. DTensor parameters (FSDP2), which have no multi-tensor copy
            for t, v in zip(self.targets, self.values):
                t.copy_(v)
        for st, new, drop in self.states:
            for k in drop:
                st.pop(k, None)
            st.update(new)


def _step_after(st: dict, key: str) -> Tensor:
    """The counter ``st[key]`` plus one (a new tensor; 1 if absent)."""
    return st[key] + 1 if key in st else torch.tensor(1.0)


def ordinary_group_update(group: dict, state: Any, label: str) -> PendingAdamW | None:
    """AdamW step of an ordinary group on copies (``None`` if no parameter has a gradient)."""
    lr = group["lr"] if group["other_lr"] is None else group["other_lr"]
    pending = PendingAdamW([group], label)
    for p in group["params"]:
        if p.grad is None:
            continue
        st = state[p]
        step = _step_after(st, "step")
        if "exp_avg" in st:
            m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        else:
            m = torch.zeros_like(p, memory_format=torch.preserve_format)
            v = torch.zeros_like(p, memory_format=torch.preserve_format)
        new_p = p.detach().clone()
        adamw_update_(
            new_p,
            p.grad,
            m,
            v,
            int(step.item()),
            lr,
            group["other_betas"],
            group["other_eps"],
            group["other_weight_decay"],
        )
        pending.targets.append(p)
        pending.values.append(new_p)
        pending.states.append((st, {"step": step, "exp_avg": m, "exp_avg_sq": v}, ()))
    return pending if pending.targets else None


def robust_pair_update(
    group: dict,
    st: dict,
    factors: tuple[Tensor, Tensor],
    grads: tuple[Tensor | None, Tensor | None],
    label: str,
) -> PendingAdamW:
    """One robust-start AdamW step of a pair's factors ``(B, A)`` (matrix views, gradients
    likewise; a missing gradient counts as zero) on copies in the compute dtype (float32 for
    bf16/fp16 factors; for fp32/fp64 the same arithmetic as ``torch.optim.AdamW``)."""
    B = factors[0]
    cdt = compute_dtype(B.dtype)
    rstep = _step_after(st, "robust_step")
    new: dict[str, Tensor] = {"robust_step": rstep}
    if "step" not in st:
        new["step"] = torch.tensor(0.0)
    pending = PendingAdamW([group], label)
    for nm, p, gp in (("B", B, grads[0]), ("A", factors[1], grads[1])):
        gp = gp if gp is not None else torch.zeros_like(p)
        m_key, v_key = f"robust_exp_avg_{nm}", f"robust_exp_avg_sq_{nm}"
        m = st[m_key].clone() if m_key in st else torch.zeros_like(p, dtype=cdt)
        v = st[v_key].clone() if v_key in st else torch.zeros_like(p, dtype=cdt)
        p_c = p.detach().to(cdt, copy=True)
        adamw_update_(
            p_c,
            gp.to(cdt),
            m,
            v,
            int(rstep.item()),
            group["lr"],
            group["robust_betas"],
            group["robust_eps"],
            group["robust_weight_decay"],
        )
        pending.targets.append(p)
        pending.values.append(p_c if p_c.dtype == p.dtype else p_c.to(p.dtype))
        new[m_key], new[v_key] = m, v
    pending.states.append((st, new, ()))
    return pending
