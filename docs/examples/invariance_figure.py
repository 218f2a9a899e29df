"""Figure for docs/concepts.md: AdamW vs AdamS from two factorizations of the same adapter.

A rank-3 LoRA pair ``ΔW = B A`` (20×15) is trained to fit a target matrix, once from ``(B, A)``
and once from the *same* adapter written as ``(B R, R⁻¹ A)`` with ``R = diag(10, 1, 0.1)``.
Both starts are the same matrix ``X₀ = B A``, so an optimizer that only cares about ``X`` must
follow the same trajectory from both. The script plots the two loss curves of each optimizer and
the relative distance ``‖X_k − X'_k‖_F / ‖X_k‖_F`` between the two trajectories.

Run ``python docs/examples/invariance_figure.py`` to rewrite ``docs/img/invariance.png``
(deterministic: float64, fixed seed, about a second on a laptop CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from geolora.optim import AdamS

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "img" / "invariance.png"


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B₀, A₀, R, target)``: factors 20×3 and 3×15, the gauge ``R`` and a rank-3 target."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    target = torch.randn(20, 3, **kw) @ torch.randn(3, 15, **kw)
    B0, A0 = 0.5 * torch.randn(20, 3, **kw), 0.5 * torch.randn(3, 15, **kw)
    R = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    return B0, A0, R, target


def trajectory(
    make_opt: Callable[[list[dict]], torch.optim.Optimizer],
    B0: torch.Tensor,
    A0: torch.Tensor,
    target: torch.Tensor,
    steps: int,
) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and iterates ``X_k = B_k A_k`` (k = 0 … steps) of ``½‖B A − target‖²``."""
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = make_opt([{"params": [B, A], "lora_pair": True, "name": "demo"}])
    losses, xs = [], [(B @ A).detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((B @ A - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        xs.append((B @ A).detach().clone())
    return losses, xs


def compare(steps: int = 100, lr: float = 0.1) -> dict[str, dict[str, list[float]]]:
    """Loss curves from both starts and the trajectory deviation, for AdamW and AdamS."""
    B0, A0, R, target = problem()
    optimizers = {
        "AdamW": lambda g: torch.optim.AdamW(g, lr=lr, weight_decay=0.0),
        "AdamS": lambda g: AdamS(g, lr=lr, robust_steps=0),
    }
    out: dict[str, dict[str, list[float]]] = {}
    for name, make_opt in optimizers.items():
        loss_1, x_1 = trajectory(make_opt, B0, A0, target, steps)
        loss_2, x_2 = trajectory(make_opt, B0 @ R, torch.linalg.inv(R) @ A0, target, steps)
        dev = [((a - b).norm() / a.norm()).item() for a, b in zip(x_1, x_2)]
        out[name] = {"loss": loss_1, "loss_gauged": loss_2, "deviation": dev}
    return out


def main(out: str | Path = DEFAULT_OUT, steps: int = 100) -> dict[str, dict[str, list[float]]]:
    """Compute the curves and save the two-panel figure to ``out`` (PNG); return the curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = compare(steps)
    colors = {"AdamW": "tab:red", "AdamS": "tab:blue"}
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_dev = fig.subplots(1, 2)
    k = range(1, steps + 1)
    for name, curves in res.items():
        c = colors[name]
        ax_loss.semilogy(k, curves["loss"], color=c, lw=2.2, label=f"{name} from (B, A)")
        ax_loss.semilogy(
            k,
            curves["loss_gauged"],
            color=c,
            lw=1.4,
            ls="--",
            marker="o" if name == "AdamS" else None,
            markevery=10,
            ms=5,
            mfc="none",
            label=f"{name} from (B R, R⁻¹A)",
        )
        floor = [max(d, 1e-17) for d in curves["deviation"][1:]]
        ax_dev.semilogy(k, floor, color=c, lw=2, label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(r"loss $\frac{1}{2}\Vert BA - T\Vert_F^2$")
    ax_loss.set_title("Same adapter, two factorizations")
    ax_loss.legend(fontsize=9)
    ax_dev.axhline(1e-16 * 100, color="gray", ls=":", lw=1)
    ax_dev.text(2, 2.5e-14, "round-off level", color="gray", fontsize=9)
    ax_dev.set_xlabel("step")
    ax_dev.set_ylabel(r"$\Vert X_k - X'_k\Vert_F \,/\, \Vert X_k\Vert_F$")
    ax_dev.set_title("Distance between the two X trajectories")
    ax_dev.set_ylim(1e-17, 10)
    ax_dev.legend(fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp/version metadata: the same code writes the same bytes.
    fig.savefig(out, dpi=100, metadata={"Software": None})
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny problem: extra threads only add overhead
    curves = main()
    for name, c in curves.items():
        print(
            f"{name}: final loss {c['loss'][-1]:.2e} vs {c['loss_gauged'][-1]:.2e}, "
            f"max trajectory deviation {max(c['deviation']):.1e}"
        )
    print(f"wrote {DEFAULT_OUT}")
