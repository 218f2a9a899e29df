"""A planted low-rank target and the exact-resume check, shared by the per-method test files
(LoRA-Pro, Riemannion, RefLoRA)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

__all__ = ["assert_resume_exact", "planted"]


def planted(
    m: int = 12, n: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64, sv=(2.0, 1.5, 1.0)
) -> torch.Tensor:
    """``X* = U diag(sv) Vᵀ`` (``m x n``, rank ``len(sv)``, ``U``, ``V`` random orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sv)
    U = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))[0]
    return ((U * torch.tensor(sv, dtype=torch.float64)) @ V.T).to(dtype)


def assert_resume_exact(
    make: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    split: int,
    total: int = 10,
    check_loaded: Callable[[dict, torch.optim.Optimizer], None] | None = None,
) -> None:
    """Train ``split`` steps, copy the parameters and a deep copy of ``state_dict()`` into a
    fresh ``make()``, then continue both for ``total − split`` steps: the parameters must be
    bitwise equal. ``make() -> (B, A, optimizer)``; ``loss(B, A)`` the training loss;
    ``check_loaded(saved_state_dict, resumed_optimizer)`` runs right after the load."""

    def step(B, A, opt):
        opt.zero_grad()
        loss(B, A).backward()
        opt.step()

    B, A, opt = make()
    for _ in range(split):
        step(B, A, opt)
    sd = copy.deepcopy(opt.state_dict())
    B2, A2, opt2 = make()
    with torch.no_grad():
        B2.copy_(B)
        A2.copy_(A)
    opt2.load_state_dict(sd)
    if check_loaded is not None:
        check_loaded(sd, opt2)
    for _ in range(total - split):
        step(B, A, opt)
        step(B2, A2, opt2)
    assert torch.equal(B, B2) and torch.equal(A, A2)
