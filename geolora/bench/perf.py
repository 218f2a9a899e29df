"""``geolora bench --perf``: optimizer-step cost against ``torch.optim.AdamW`` in the same run.

The optimizer step alone is timed on stacks of LoRA pairs shaped like a real model (default:
all-MiniLM-L6-v2's 36 linears, 24 of 384×384, 6 of 1536×384 and 6 of 384×1536), with fixed
random gradients, as the median of ``steps`` steps after ``warmup`` steps. Every optimizer is
compared with ``torch.optim.AdamW`` (``foreach=True``; ``fused=True`` on CUDA) on the very same
parameters in the same process, so the ratio is meaningful on any machine. State memory is the
sum of the optimizer's state tensors.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from geolora.bench.registry import REGISTRY
from geolora.bench.runner import optimizer_state_bytes

#: (out, in, count) of all-MiniLM-L6-v2's linears (q, k, v, o: 384×384; FFN up/down).
MINILM_SHAPES: tuple[tuple[int, int, int], ...] = ((384, 384, 24), (1536, 384, 6), (384, 1536, 6))
#: (out, in, count) of LLaMA-7B's 32 layers: q, k, v, o; gate/up (11008×4096); down.
LLAMA7B_SHAPES: tuple[tuple[int, int, int], ...] = (
    (4096, 4096, 128),
    (11008, 4096, 64),
    (4096, 11008, 32),
)


@dataclass
class PerfResult:
    """Median optimizer-step time of one optimizer, with AdamW's from the same run."""

    optimizer: str
    rank: int
    pairs: int
    step_ms: float
    adamw_ms: float
    ratio: float
    state_mib: float
    adamw_state_mib: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_pairs(
    shapes: Sequence[tuple[int, int, int]],
    rank: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """LoRA pair groups with random full-rank factors and fixed random gradients."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for out_f, in_f, count in shapes:
        for i in range(count):
            B = torch.randn(out_f, rank, generator=g) / rank**0.5
            A = torch.randn(rank, in_f, generator=g) / in_f**0.5
            B = torch.nn.Parameter(B.to(device=device, dtype=dtype))
            A = torch.nn.Parameter(A.to(device=device, dtype=dtype))
            B.grad = (torch.randn(out_f, rank, generator=g) * 1e-3).to(device=device, dtype=dtype)
            A.grad = (torch.randn(rank, in_f, generator=g) * 1e-3).to(device=device, dtype=dtype)
            groups.append({"params": [B, A], "lora_pair": True, "name": f"{out_f}x{in_f}.{i}"})
    return groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt: torch.optim.Optimizer, device: torch.device, steps: int, warmup: int) -> float:
    """Median wall time (ms) of ``opt.step()`` over ``steps`` steps after ``warmup`` steps."""
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def adamw_factory(device: torch.device) -> Callable[..., torch.optim.Optimizer]:
    """The baseline: ``torch.optim.AdamW`` with its fastest implementation on ``device``."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, **kw)


def bench_optimizer_step(
    names: Sequence[str],
    ranks: Sequence[int] = (8, 32),
    shapes: Sequence[tuple[int, int, int]] = MINILM_SHAPES,
    *,
    steps: int = 20,
    warmup: int = 5,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[PerfResult]:
    """Time each registered optimizer's step against AdamW on the same pairs (same process).

    Pairs are built fresh for every optimizer (AdamW included), so one optimizer's updates
    never change another's inputs; robust-start phases are disabled so the geometric step is
    what is timed.
    """
    device = torch.device(device)
    out: list[PerfResult] = []
    npairs = sum(c for _, _, c in shapes)
    for r in ranks:
        base_groups = make_pairs(shapes, r, device=device)
        base = adamw_factory(device)(base_groups, 1e-4)
        adamw_ms = time_steps(base, device, steps, warmup)
        adamw_mib = optimizer_state_bytes(base) / 2**20
        for name in names:
            if progress is not None:
                progress(f"{name} r={r}")
            spec = REGISTRY.get(name)
            groups = make_pairs(shapes, r, device=device)
            kw = {"robust_steps": 0} if _accepts_robust(spec) else {}
            opt = spec.build(groups, 1e-4, **kw)
            ms = time_steps(opt, device, steps, warmup)
            out.append(
                PerfResult(
                    optimizer=name,
                    rank=r,
                    pairs=npairs,
                    step_ms=ms,
                    adamw_ms=adamw_ms,
                    ratio=ms / adamw_ms,
                    state_mib=optimizer_state_bytes(opt) / 2**20,
                    adamw_state_mib=adamw_mib,
                )
            )
    return out


def _accepts_robust(spec) -> bool:
    import inspect

    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        return False
    return "robust_steps" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()) and (
        spec.name != "adamw"
    )
