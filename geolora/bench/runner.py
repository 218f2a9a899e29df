"""Training harness: run one optimizer on one task and record what happened.

:func:`run` sets the task up, builds the optimizer from the registry, trains for ``steps``
steps and returns a :class:`RunResult` with the loss curve, the task metrics, timings and the
optimizer's state memory. A run whose loss becomes non-finite, or whose step raises a numerical
``RuntimeError`` (e.g. a failed Cholesky), stops early with ``diverged=True``; it never takes
the whole benchmark down.

Timings use ``time.perf_counter`` around each step (the device is synchronised first on
accelerators) and report medians over the steps after the first three (warm-up: allocator,
lazy state init); with three steps or fewer all steps count.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from geolora.bench.registry import REGISTRY, OptimizerRegistry
from geolora.bench.tasks import Task

__all__ = ["RunResult", "optimizer_state_bytes", "run"]

_WARMUP_STEPS = 3


@dataclass
class RunResult:
    """Outcome of one (task, optimizer, seed) run.

    Attributes:
        optimizer, task: names.
        lr, seed, rank, factor_scale: the settings used.
        steps: steps actually taken (fewer than ``requested_steps`` when diverged).
        requested_steps: steps asked for.
        losses: training loss per step (the last one may be non-finite when diverged).
        metrics: test metrics from ``evaluate("test")``, validation metrics from
            ``evaluate("val")`` with a ``val_`` prefix, and ``final_train_loss`` (mean of the
            last ``max(1, steps // 10)`` finite losses).
        ms_per_step: median wall time of a full step (forward, backward, optimizer step), ms.
        ms_optimizer_step: median wall time of ``optimizer.step()`` alone, ms.
        state_mib: optimizer state memory: tensor bytes in ``optimizer.state`` / 2^20.
        wall_s: wall time of the run including setup and evaluation, s (a task's one-time
            ``prepare(device)``, shared by all runs, is done before and not counted).
        diverged: True when the run stopped on a non-finite loss or a numerical error.
        error: the error message of a numerical failure, else None.
        init: the adapter init the run asked for (None: the task's default).
        val_curve: ``[[step, validation primary metric], ...]`` every ``eval_every`` steps
            (empty when the task evaluates only at the end).
    """

    optimizer: str
    task: str
    lr: float
    seed: int
    rank: int
    factor_scale: float
    steps: int
    requested_steps: int
    losses: list[float]
    metrics: dict[str, float]
    ms_per_step: float
    ms_optimizer_step: float
    state_mib: float
    wall_s: float
    diverged: bool = False
    error: str | None = None
    init: str | None = None
    val_curve: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of ``nbytes`` of every tensor in ``optimizer.state`` (nested containers included)."""

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.nelement() * obj.element_size()
        if isinstance(obj, Mapping):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so perf_counter measures them (no-op on CPU)."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if callable(sync):
        sync()


def _median_ms(seconds: list[float]) -> float:
    timed = seconds[_WARMUP_STEPS:] if len(seconds) > _WARMUP_STEPS else seconds
    return 1e3 * statistics.median(timed) if timed else math.nan


def run(
    task: Task,
    optimizer_name: str,
    *,
    lr: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    rank: int = 8,
    progress: Any | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    factor_scale: float = 0.0,
    init: str | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    registry: OptimizerRegistry = REGISTRY,
    on_step: Callable[[int], None] | None = None,
    eval_every: int | None = None,
) -> RunResult:
    """Train ``task`` with the registered optimizer ``optimizer_name``.

    Args:
        task: a :class:`~geolora.bench.tasks.Task`.
        optimizer_name: registry key, e.g. ``"adamw"``.
        lr: learning rate; default ``task.lr_overrides[name]`` else the registry default.
        steps: training steps; default ``task.default_steps``.
        seed: seeds the task (data, init) and torch's global RNG inside the run.
        rank: LoRA rank r.
        progress: a ``rich.progress.Progress``; the run adds one bar and advances it per step.
        device, dtype: where and in which precision the model lives.
        factor_scale: k; LoRA pairs start at ``(10^k B, 10^-k A)`` (same ΔW).
        init: adapter init passed to ``task.setup(init=...)`` (None: not passed, the task's
            default); the init-scale runs use a nonzero one (``"gaussian"``).
        optimizer_kwargs: extra keyword arguments for the optimizer factory.
        registry: where to look the optimizer up.
        on_step: called with 1 after every finished training step (progress displays).
        eval_every: record the validation primary metric every this many steps in
            ``val_curve`` (default: ``task.eval_every`` when set, else 0 = off).

    Returns:
        A :class:`RunResult`. Same arguments on the same device give the same losses.
    """
    spec = registry.get(optimizer_name)
    if steps is None:
        steps = task.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr is None:
        lr = float(getattr(task, "lr_overrides", {}).get(spec.name, spec.default_lr))
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    device = torch.device(device)
    if eval_every is None:
        eval_every = int(getattr(task, "eval_every", 0) or 0)
    primary = getattr(task, "primary_metric", None)
    setup_kw: dict[str, Any] = {}
    if init is not None:
        setup_kw["init"] = init
    if getattr(spec, "adapter", "lora") != "lora":
        setup_kw["adapter"] = spec.adapter

    label = f"{task.name} · {spec.name}"
    bar = None
    if progress is not None:
        bar = progress.add_task(label, total=steps)
    prepare = getattr(task, "prepare", None)
    if callable(prepare):  # shared one-time work (e.g. cached frozen layers), not timed
        if bar is not None:
            progress.update(bar, description=f"{label} (preparing task)")
        prepare(device)
        if bar is not None:
            progress.update(bar, description=label)

    t_start = time.perf_counter()
    losses: list[float] = []
    step_s: list[float] = []
    opt_s: list[float] = []
    diverged = False
    error: str | None = None
    curve: list[list[float]] = []

    # fork_rng keeps the caller's global RNG untouched while making any global draws
    # (e.g. LoRA init inside inject_lora) a function of ``seed``.
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else None, device_type="cuda" if on_cpu else device.type):
        torch.manual_seed(seed)
        setup = task.setup(seed, rank, device, dtype=dtype, factor_scale=factor_scale, **setup_kw)
        optimizer = spec.build(setup.param_groups(), lr, **dict(optimizer_kwargs or {}))
        batches = setup.batches()
        for _ in range(steps):
            batch = next(batches)
            _synchronize(device)
            t0 = time.perf_counter()
            try:
                optimizer.zero_grad(set_to_none=True)
                loss = setup.loss(batch)
                value = float(loss.detach())
                losses.append(value)
                if not math.isfinite(value):
                    diverged = True
                    break
                loss.backward()
                _synchronize(device)
                t1 = time.perf_counter()
                optimizer.step()
                _synchronize(device)
                t2 = time.perf_counter()
            except (RuntimeError, FloatingPointError) as exc:  # numerical failure, e.g. LinAlgError
                diverged, error = True, f"{type(exc).__name__}: {exc}"
                break
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
            if bar is not None:
                progress.advance(bar)
            if on_step is not None:
                on_step(1)
            done = len(step_s)
            if eval_every and primary and done % eval_every == 0 and done < steps:
                curve.append([done, _val_primary(setup, primary)])
        # parameters may have turned non-finite in the last step without a loss to show it
        with torch.no_grad():
            if not diverged and any(
                not bool(torch.isfinite(p).all()) for g in optimizer.param_groups for p in g["params"]
            ):
                diverged = True
        try:
            metrics = {k: float(v) for k, v in setup.evaluate("test").items()}
            metrics.update({f"val_{k}": float(v) for k, v in setup.evaluate("val").items()})
            if eval_every and primary and f"val_{primary}" in metrics:
                curve.append([len(step_s), metrics[f"val_{primary}"]])
        except (RuntimeError, FloatingPointError) as exc:
            metrics = {}
            diverged = True
            error = error or f"{type(exc).__name__} in evaluate: {exc}"

    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-max(1, len(finite) // 10) :] if finite else []
    metrics["final_train_loss"] = statistics.fmean(tail) if tail else math.nan
    if bar is not None:
        status = "[red]diverged" if diverged else "done"
        progress.update(bar, description=f"{label} ({status})", completed=steps)

    return RunResult(
        optimizer=spec.name,
        task=task.name,
        lr=float(lr),
        seed=seed,
        rank=rank,
        factor_scale=float(factor_scale),
        steps=len(step_s),
        requested_steps=steps,
        losses=losses,
        metrics={k: float(v) for k, v in metrics.items()},
        ms_per_step=_median_ms(step_s),
        ms_optimizer_step=_median_ms(opt_s),
        state_mib=optimizer_state_bytes(optimizer) / 2**20,
        wall_s=time.perf_counter() - t_start,
        diverged=diverged,
        error=error,
        init=init,
        val_curve=curve,
    )


def _val_primary(setup: Any, primary: str) -> float:
    """The validation primary metric in the middle of training (NaN on a numerical error)."""
    try:
        return float(setup.evaluate("val").get(primary, math.nan))
    except (RuntimeError, FloatingPointError):
        return math.nan
