"""Function-preserving rebalancing of the representative (geolora.optim.gauge.Rebalance), on by
default for the invariant optimizers whose representative is free (issue: reliability II).

* With rebalancing at every step the ``X = B A`` trajectory equals the run without it (fp64,
  1e-10): the gauge moves the factors, the gradient (a covector) and any factor-coordinate state
  consistently, and the optimizers are invariant.
* A drifted pair (factors 1e5 apart) is brought back to the balanced representative at the
  first check, and a long float32 run does not rise after convergence.
"""

from __future__ import annotations

import pytest
import torch
from optim_zoo import ZOO, ZooEntry, zoo_ids

from geolora.optim import AdamS
from geolora.optim.gauge import Rebalance, imbalance

f64 = torch.float64


def _rebalances(entry: ZooEntry) -> bool:
    pair = [torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(2, 5))]
    opt = entry.factory([{"params": pair, "lora_pair": True}])
    return "rebalance_every" in opt.defaults


REBALANCED = [e for e in ZOO if e.invariant and _rebalances(e)]


def _problem(dtype, k: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m, n, r = 14, 11, 3
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=f64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=f64))[0]
    X = ((U * torch.linspace(1, 2, r, dtype=f64)) @ V.T).to(dtype)
    B = torch.nn.Parameter((torch.randn(m, r, generator=g, dtype=f64) * 0.5 * 10**k).to(dtype))
    A = torch.nn.Parameter((torch.randn(r, n, generator=g, dtype=f64) / 10**k).to(dtype))
    return B, A, X


def _trajectory(entry: ZooEntry, every: int, threshold: float, steps: int = 8):
    B, A, X = _problem(f64, 1.5)
    opt = entry.factory(
        [{"params": [B, A], "lora_pair": True, "name": "p"}],
        robust_steps=0,
        rebalance_every=every,
        rebalance_threshold=threshold,
    )
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (B @ A - X).pow(2).sum()).backward()
        opt.step()
        out.append((B @ A).detach().clone())
    return out, (B.detach(), A.detach())


def test_the_invariant_optimizers_rebalance_by_default() -> None:
    assert {e.name for e in REBALANCED} >= {
        "adams",
        "lracs",
        "lifted_sgd",
        "lifted_shampoo",
        "lifted_adam",
        "lora_rite",
        "scaled_gd",
        "invariant_dora",
    }


@pytest.mark.parametrize("entry", REBALANCED, ids=zoo_ids(REBALANCED))
def test_rebalancing_leaves_the_X_trajectory_unchanged(entry: ZooEntry) -> None:
    plain, (B0, A0) = _trajectory(entry, every=0, threshold=0.0)
    every_step, (B1, A1) = _trajectory(entry, every=1, threshold=0.0)
    for a, b in zip(plain, every_step):
        assert float((a - b).norm() / b.norm()) < 1e-10
    # the factors themselves differ: the representative was changed (balanced before the last
    # step, which moves it off balance only to second order)
    assert not torch.allclose(B0, B1)
    assert float(imbalance(B1, A1.T)) < 1e-4
    assert float(imbalance(B0, A0.T)) > 1.0


def test_a_drifted_pair_is_rebalanced_and_a_long_fp32_run_stays_converged() -> None:
    B, A, X = _problem(torch.float32, 5.0, seed=1)
    assert float(imbalance(B.detach().double(), A.detach().double().T)) > 1e9
    opt = AdamS([{"params": [B, A], "lora_pair": True, "name": "p"}], lr=1e-2, robust_steps=0)
    losses = []
    for t in range(1000):
        opt.zero_grad()
        loss = 0.5 * (B @ A - X).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if t == 99:  # the first check (rebalance_every=100) balanced the pair
            assert float(imbalance(B.detach().double(), A.detach().double().T)) < 1e-3
    converged = min(losses)
    assert converged < 1e-10
    assert max(losses[-200:]) < 1e-10, "the loss rose after convergence"


def test_rebalance_validates_its_hyperparameters() -> None:
    B, A, _ = _problem(torch.float32, 0.0)
    group = {"params": [B, A], "lora_pair": True, "name": "p"}
    with pytest.raises(ValueError, match="rebalance_every"):
        AdamS([group], rebalance_every=-1)
    with pytest.raises(ValueError, match="rebalance_threshold"):
        AdamS([group], rebalance_threshold=-0.5)
    with pytest.raises(TypeError, match="gauge_rules"):
        Rebalance().bind(object())
