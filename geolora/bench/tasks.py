"""Benchmark tasks: the :class:`Task` protocol and two synthetic tasks with known answers.

A :class:`Task` is a recipe (hyperparameters, data size); ``task.setup(seed, rank, device)``
builds one :class:`TaskRun`: a fresh model, its parameter groups in the geolora convention
(a LoRA pair is ``{"params": [B, A], "lora_pair": True, "scaling": s, "name": str}``,
``ΔW = s·B A``, ``B: (out, r)``, ``A: (r, in)``), an endless batch iterator, the training loss
and an evaluation. Everything random is drawn from generators seeded by ``seed``, so two
setups with the same arguments are identical.

Synthetic tasks (each runs a few hundred steps in about a second on a CPU core):

* :class:`SensingTask`: planted rank-r matrix sensing with a Gaussian measurement operator
  and a zero base (Recht, Fazel & Parrilo 2010; the ScaledGD setting of Tong, Ma & Chi 2021).
* :class:`TeacherStudentTask`: a linear teacher ``W0 + ΔW*`` with low-rank ``ΔW*`` and a
  LoRA student on the frozen ``W0``, trained with stochastic minibatches.

The MiniLM genre-classification task lives in :mod:`geolora.bench.minilm`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "FactorPair",
    "SensingTask",
    "Task",
    "TaskRun",
    "TeacherStudentTask",
    "check_setup_args",
    "macro_f1",
    "rescale_lora_pairs",
]


@runtime_checkable
class TaskRun(Protocol):
    """One set-up instance of a task: model, groups, data and evaluation."""

    model: nn.Module

    def param_groups(self) -> list[dict[str, Any]]:
        """Groups for the optimizer: LoRA pairs (``lora_pair=True``) and plain groups."""
        ...

    def batches(self) -> Iterator[Any]:
        """An endless iterator of training batches (deterministic given the seed)."""
        ...

    def loss(self, batch: Any) -> torch.Tensor:
        """Scalar training loss on ``batch`` (differentiable w.r.t. the groups' params)."""
        ...

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on ``split`` (``"val"`` or ``"test"``), no gradients: e.g. accuracy.

        Learning rates are chosen on ``"val"`` only; ``"test"`` is reported.
        """
        ...


@runtime_checkable
class Task(Protocol):
    """A benchmark task.

    Attributes:
        name: short identifier used in tables and file names.
        default_steps: training steps of a full bench run.
        quick_steps: training steps under ``geolora bench --quick``.
        primary_metric: key of :meth:`TaskRun.evaluate` that ranks optimizers.
        higher_is_better: direction of ``primary_metric``.

    Optional attributes: ``lr_overrides`` (per-optimizer centres of the lr grid on this task,
    replacing the registry default); ``prepare(device)`` for one-time work shared by all runs (the MiniLM
    tasks cache their frozen layers there; :func:`geolora.bench.runner.run` calls it before
    starting the clock, and ``setup`` must call it too); ``eval_every`` (record the validation
    metric every this many steps); ``baseline()`` (the primary metric of a trivial predictor,
    e.g. the majority class, drawn on the plots); ``config()`` (a JSON-able dict of settings:
    it enters the sweep signature, so changing a setting never reuses old runs).

    ``setup`` receives ``init=...`` only for the init-scale runs (a nonzero init such as
    ``"gaussian"``) and ``adapter=...`` only for an optimizer whose spec asks for another
    adapter kind than ``"lora"``; build the adapter with :func:`geolora.bench.adapters.adapt`
    to support both. Everything random must come from ``seed``.
    """

    name: str
    default_steps: int
    quick_steps: int
    primary_metric: str
    higher_is_better: bool

    def setup(
        self,
        seed: int,
        rank: int,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        factor_scale: float = 0.0,
    ) -> TaskRun:
        """Build a fresh :class:`TaskRun`; ``factor_scale`` k rescales B by 10^k, A by 10^-k
        (optionally also ``init=`` and ``adapter=`` keywords, see the class docstring)."""
        ...


def check_setup_args(seed: int, rank: int, dtype: torch.dtype, factor_scale: float) -> None:
    """Shared validation of :meth:`Task.setup` arguments (ValueError/TypeError naming them)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(factor_scale, (int, float)) or not math.isfinite(factor_scale):
        raise ValueError(f"factor_scale must be a finite number, got {factor_scale!r}")


def check_positive_ints(**values: object) -> None:
    """ValueError naming the first keyword whose value is not a positive int (bools refused)."""
    for key, val in values.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive int, got {val!r}")


class TaskSchedule:
    """The run length and lr-grid centres every built-in task carries.

    Subclasses set ``default_lrs`` (per-optimizer lr-grid centres on the task) and call
    :meth:`_init_schedule` from ``__init__``; user ``lr_overrides`` win over ``default_lrs``.
    """

    default_lrs: Mapping[str, float] = {}
    default_steps: int
    quick_steps: int
    lr_overrides: Mapping[str, float]

    def _init_schedule(
        self, default_steps: int, quick_steps: int, lr_overrides: Mapping[str, float] | None
    ) -> None:
        check_positive_ints(default_steps=default_steps, quick_steps=quick_steps)
        self.default_steps = default_steps
        self.quick_steps = quick_steps
        self.lr_overrides = {**self.default_lrs, **(lr_overrides or {})}


SPLITS = ("val", "test")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _check_factor_pair(adapter: str) -> None:
    if adapter != "lora":
        raise ValueError(f"adapter must be 'lora' on the synthetic tasks (a FactorPair), got {adapter!r}")


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Macro-averaged F1: mean over classes c of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``.

    Classes absent from both ``pred`` and ``target`` (``2TP + FP + FN = 0``) are left out of the
    mean (scikit-learn's default label set). Shapes: ``pred``, ``target`` integer ``(N,)``.
    """
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"pred and target must be 1-D of equal shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if pred.numel() == 0:
        raise ValueError("pred must not be empty")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            raise ValueError(f"{name} has labels outside [0, num_classes={num_classes})")
    pred, target = pred.long().cpu(), target.long().cpu()
    tp = torch.bincount(target[pred == target], minlength=num_classes).double()
    pred_count = torch.bincount(pred, minlength=num_classes).double()
    true_count = torch.bincount(target, minlength=num_classes).double()
    denom = pred_count + true_count  # = 2TP + FP + FN
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())


def rescale_lora_pairs(param_groups: list[dict[str, Any]], factor_scale: float) -> None:
    """Move every LoRA pair along its gauge orbit: ``B ← 10^k B``, ``A ← 10^-k A``.

    ``ΔW = s·B A`` is unchanged (up to rounding); a gauge-invariant optimizer then follows the
    same ΔW trajectory for every k, a factor-wise one (AdamW) does not. In place, no grad.
    """
    if factor_scale == 0:
        return
    c = 10.0**factor_scale
    with torch.no_grad():
        for group in param_groups:
            if group.get("lora_pair", False):
                B, A = group["params"]
                B.mul_(c)
                A.div_(c)


def _generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for stream ``salt`` of ``seed`` (data drawn on CPU, then moved)."""
    return torch.Generator().manual_seed(1_000_003 * seed + salt)


def _planted_low_rank(
    m: int, n: int, r: int, condition: float, gen: torch.Generator
) -> torch.Tensor:
    """``X* = U diag(σ) Vᵀ`` with Haar ``U (m×r)``, ``V (n×r)``, σ geometric from 1 to 1/condition."""
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0.0, -math.log10(condition), r, dtype=torch.float64)
    return (U * sigma) @ V.T


class FactorPair(nn.Module):
    """A LoRA pair ``ΔW = s·B A`` on an optional frozen base ``W0``: ``y = x (W0 + ΔW)ᵀ``.

    Shapes: ``B (out, r)``, ``A (r, in)``, ``W0 (out, in)`` (a buffer; zero when absent).
    """

    def __init__(
        self,
        B: torch.Tensor,
        A: torch.Tensor,
        scaling: float = 1.0,
        base: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"B (out, r) and A (r, in) must match, got B {tuple(B.shape)}, A {tuple(A.shape)}")
        if base is not None and base.shape != (B.shape[0], A.shape[1]):
            raise ValueError(f"base must have shape {(B.shape[0], A.shape[1])}, got {tuple(base.shape)}")
        self.B = nn.Parameter(B)
        self.A = nn.Parameter(A)
        self.scaling = float(scaling)
        self.register_buffer("base", base)

    def delta(self) -> torch.Tensor:
        """``ΔW = s·B A`` (out, in)."""
        return self.scaling * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scaling * ((x @ self.A.T) @ self.B.T)
        if self.base is not None:
            y = y + x @ self.base.T
        return y

    def group(self, name: str) -> dict[str, Any]:
        """The geolora LoRA-pair group of this module."""
        return {"params": [self.B, self.A], "lora_pair": True, "scaling": self.scaling, "name": name}


def _small_random_factors(
    out: int, inp: int, r: int, init_scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced small init: columns of B and rows of A have norm ≈ ``init_scale``."""
    B = init_scale * torch.randn(out, r, generator=gen, dtype=torch.float64) / math.sqrt(out)
    A = init_scale * torch.randn(r, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
    return B, A


class _SensingRun:
    """Set-up :class:`SensingTask`: full-batch loss ``0.5/p Σ_i (⟨A_i, s·B A⟩ − y_i)²``."""

    def __init__(self, model: FactorPair, ops: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
        self.model = model
        self._ops = ops  # (p, m*n): row i is vec(A_i)
        self._y = y  # (p,)
        self._target = target  # X* (m, n)

    def param_groups(self) -> list[dict[str, Any]]:
        return [self.model.group("X")]

    def batches(self) -> Iterator[None]:
        while True:  # full-batch task: the batch carries nothing
            yield None

    def loss(self, batch: Any = None) -> torch.Tensor:
        residual = self._ops @ self.model.delta().reshape(-1) - self._y
        return 0.5 * residual.pow(2).mean()

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        _check_split(split)  # no data split: the metric is the distance to the known X*
        X = self.model.delta()
        rel = torch.linalg.norm(X - self._target) / torch.linalg.norm(self._target)
        return {"rel_error": float(rel), "loss": float(self.loss())}


class SensingTask(TaskSchedule):
    """Planted low-rank matrix sensing with a zero base.

    Unknown ``X* ∈ R^{m×n}`` of rank ``r*`` (singular values geometric from 1 to
    ``1/condition``), ``p = oversampling · r*(m + n)`` Gaussian measurements
    ``y_i = ⟨A_i, X*⟩``, ``(A_i)_{jk} ~ N(0, 1)`` (so ``E[loss] = ½‖X − X*‖_F²``).
    The LoRA pair ``X = s·B A`` (``B: m×r``, ``A: r×n``) starts from a small balanced random
    init (``init_scale``) and minimises ``f(B, A) = 0.5/p Σ_i (⟨A_i, s·B A⟩ − y_i)²``
    over the full batch. Metric: ``rel_error = ‖s·B A − X*‖_F / ‖X*‖_F``.
    Reference setting: Tong, Ma & Chi, "Accelerating ill-conditioned low-rank matrix
    estimation via scaled gradient descent", JMLR 2021.

    Cost (measured, 1 CPU thread, m=48, n=40, r=8, float32, p=2816): ≈ 1.1–1.5 ms per AdamW
    step, a 300-step run ≈ 0.4–1.4 s. Default ``lr_overrides``: AdamW 3e-2, the best of
    {1e-2, 3e-2, 1e-1} at 300 steps (rel_error 7e-4 / 8e-6 for seeds 0 / 1; condition 10 was
    too easy: 4e-7 at 1e-2). The other optimizers' overrides are the best of their registry lr
    times {0.03, 0.1, 0.3, 1, 3, 10, 30} at 300 steps, seed 0
    (``geolora bench --task sensing --lr-sweep 0.03,0.1,0.3,1,3,10,30``); rel_error there:
    LoRA-RITE 2.5e-7, AdamS 3.1e-7, AdamW 7.2e-4, LoRA+ 7.2e-4, RP-AdamW 9.6e-3,
    LoRAM-BR 1.6e-2, Stiefel-LoRA 1.6e-2, LRACS 2.9e-2, LoRAM-FR 4.2e-2.
    """

    name = "sensing"
    #: torch threads worth using: the matrices are tiny, more threads only add sync cost
    max_threads = 1
    primary_metric = "rel_error"
    higher_is_better = False
    default_lrs: Mapping[str, float] = {
        "adamw": 3e-2,
        "loraplus": 1e-2,
        "rpadamw": 1e-2,
        "lora_rite": 6e-2,
        "adams": 3e-3,
        "lracs": 1e-2,
        "loram_fr": 1.5e-3,
        "loram_br": 1e-2,
        "stiefel_lora": 3e-2,
    }

    def __init__(
        self,
        m: int = 48,
        n: int = 40,
        *,
        true_rank: int | None = None,
        condition: float = 100.0,
        oversampling: float = 4.0,
        init_scale: float = 0.1,
        scaling: float = 1.0,
        default_steps: int = 300,
        quick_steps: int = 150,
        lr_overrides: Mapping[str, float] | None = None,
    ) -> None:
        check_positive_ints(m=m, n=n)
        self._init_schedule(default_steps, quick_steps, lr_overrides)
        if true_rank is not None and (not isinstance(true_rank, int) or not 1 <= true_rank <= min(m, n)):
            raise ValueError(f"true_rank must be an int in [1, min(m, n)={min(m, n)}], got {true_rank!r}")
        if not condition >= 1:
            raise ValueError(f"condition must be >= 1, got {condition!r}")
        if not oversampling > 0:
            raise ValueError(f"oversampling must be > 0, got {oversampling!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if not scaling > 0:
            raise ValueError(f"scaling must be > 0, got {scaling!r}")
        self.m, self.n = m, n
        self.true_rank = true_rank
        self.condition = float(condition)
        self.oversampling = float(oversampling)
        self.init_scale = float(init_scale)
        self.scaling = float(scaling)

    def setup(
        self,
        seed: int,
        rank: int,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        factor_scale: float = 0.0,
        init: str = "gaussian",
        adapter: str = "lora",
    ) -> _SensingRun:
        """Draw ``X*``, the operator and the init from ``seed``; LoRA rank ``rank``.

        The init is always the small balanced Gaussian one (``init="gaussian"``): from
        ``B = 0`` the sensing loss sits at a saddle.
        """
        check_setup_args(seed, rank, dtype, factor_scale)
        _check_factor_pair(adapter)
        if init != "gaussian":
            raise ValueError(f"init must be 'gaussian' on the sensing task, got {init!r}")
        if rank > min(self.m, self.n):
            raise ValueError(f"rank must be <= min(m, n) = {min(self.m, self.n)}, got {rank}")
        r_star = self.true_rank if self.true_rank is not None else rank
        gen = _generator(seed, salt=1)
        target = _planted_low_rank(self.m, self.n, r_star, self.condition, gen)
        p = max(1, math.ceil(self.oversampling * r_star * (self.m + self.n)))
        ops = torch.randn(p, self.m * self.n, generator=gen, dtype=torch.float64)
        y = ops @ target.reshape(-1)
        B, A = _small_random_factors(self.m, self.n, rank, self.init_scale, _generator(seed, salt=2))
        to = {"device": device, "dtype": dtype}
        model = FactorPair(B.to(**to), A.to(**to), scaling=self.scaling)
        run = _SensingRun(model, ops.to(**to), y.to(**to), target.to(**to))
        rescale_lora_pairs(run.param_groups(), factor_scale)
        return run


class _TeacherStudentRun:
    """Set-up :class:`TeacherStudentTask`."""

    def __init__(
        self,
        model: FactorPair,
        train: tuple[torch.Tensor, torch.Tensor],
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
        delta_star: torch.Tensor,
        batch_size: int,
        gen: torch.Generator,
    ) -> None:
        self.model = model
        self._x, self._y = train
        self._splits = splits
        self._delta_star = delta_star
        self._batch_size = batch_size
        self._gen = gen
        with torch.no_grad():
            # the best possible predictor is the teacher itself
            self._optimum = {
                s: float((x @ (model.base + delta_star).T - y).pow(2).mean())
                for s, (x, y) in splits.items()
            }

    def param_groups(self) -> list[dict[str, Any]]:
        return [self.model.group("delta")]

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self._x.shape[0]
        while True:  # epochs of a seeded permutation; a partial last batch is dropped
            perm = torch.randperm(n, generator=self._gen).to(self._x.device)
            for start in range(0, n - self._batch_size + 1, self._batch_size):
                idx = perm[start : start + self._batch_size]
                yield self._x[idx], self._y[idx]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.model(x) - y).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        x, y = self._splits[_check_split(split)]
        mse = float((self.model(x) - y).pow(2).mean())
        delta = self.model.delta()
        rel = torch.linalg.norm(delta - self._delta_star) / torch.linalg.norm(self._delta_star)
        return {
            "test_mse": mse,
            "excess_mse": mse - self._optimum[split],
            "optimum_mse": self._optimum[split],
            "delta_rel_error": float(rel),
        }


class TeacherStudentTask(TaskSchedule):
    """Linear teacher–student regression with a LoRA student on a frozen base.

    Teacher ``y = (W0 + ΔW*) x + ε``, ``x ~ N(0, I_in)``, ``ε ~ N(0, noise² I_out)``,
    ``(W0)_{jk} ~ N(0, 1/in)``, ``ΔW*`` of rank ``r*`` with singular values geometric from 1
    to ``1/condition``. Student: ``ŷ = (W0 + s·B A) x`` with the same frozen ``W0``,
    ``B = 0`` and ``A ~ N(0, 1/in)`` (standard LoRA init), trained on ``n_train`` samples by
    minibatches of ``batch_size`` with loss ``½ mean_b ‖ŷ_b − y_b‖²``.
    Metrics on ``n_test`` fresh samples: ``test_mse`` (mean over samples and outputs),
    ``optimum_mse`` (the teacher's own test MSE, i.e. the noise level reached by ΔW = ΔW*),
    ``excess_mse = test_mse − optimum_mse`` and ``delta_rel_error = ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F``.

    Cost (measured, 1 CPU thread, 64→48, r=8, batch 32, float32): ≈ 0.16 ms per AdamW step,
    a 400-step run < 0.1 s. Default ``lr_overrides``: AdamW 3e-3, the best of {1e-3, 3e-3, 1e-2}
    (excess_mse 7e-4 vs optimum 9.9e-3 at seed 0).
    """

    name = "teacher_student"
    max_threads = 1
    primary_metric = "excess_mse"
    higher_is_better = False
    default_lrs: Mapping[str, float] = {"adamw": 3e-3}

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 48,
        *,
        true_rank: int | None = None,
        condition: float = 10.0,
        noise: float = 0.1,
        n_train: int = 2048,
        n_test: int = 1024,
        batch_size: int = 32,
        scaling: float = 1.0,
        default_steps: int = 400,
        quick_steps: int = 200,
        lr_overrides: Mapping[str, float] | None = None,
    ) -> None:
        check_positive_ints(
            in_features=in_features, out_features=out_features, n_train=n_train, n_test=n_test,
            batch_size=batch_size,
        )
        self._init_schedule(default_steps, quick_steps, lr_overrides)
        if batch_size > n_train:
            raise ValueError(f"batch_size must be <= n_train = {n_train}, got {batch_size}")
        lim = min(in_features, out_features)
        if true_rank is not None and (not isinstance(true_rank, int) or not 1 <= true_rank <= lim):
            raise ValueError(f"true_rank must be an int in [1, {lim}], got {true_rank!r}")
        if not condition >= 1:
            raise ValueError(f"condition must be >= 1, got {condition!r}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        if not scaling > 0:
            raise ValueError(f"scaling must be > 0, got {scaling!r}")
        self.in_features, self.out_features = in_features, out_features
        self.true_rank = true_rank
        self.condition = float(condition)
        self.noise = float(noise)
        self.n_train, self.n_test, self.batch_size = n_train, n_test, batch_size
        self.scaling = float(scaling)

    def setup(
        self,
        seed: int,
        rank: int,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        factor_scale: float = 0.0,
        init: str = "zero",
        adapter: str = "lora",
    ) -> _TeacherStudentRun:
        """Draw teacher, data and init from ``seed``; LoRA rank ``rank``; ``init`` "zero"
        (B = 0) or "gaussian" (B small, nonzero)."""
        check_setup_args(seed, rank, dtype, factor_scale)
        _check_factor_pair(adapter)
        d_in, d_out = self.in_features, self.out_features
        if rank > min(d_in, d_out):
            raise ValueError(f"rank must be <= min(in, out) = {min(d_in, d_out)}, got {rank}")
        r_star = self.true_rank if self.true_rank is not None else rank
        gen = _generator(seed, salt=11)
        f64 = torch.float64
        base = torch.randn(d_out, d_in, generator=gen, dtype=f64) / math.sqrt(d_in)
        delta_star = _planted_low_rank(d_out, d_in, r_star, self.condition, gen)
        teacher = base + delta_star

        def sample(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(k, d_in, generator=gen, dtype=f64)
            y = x @ teacher.T + self.noise * torch.randn(k, d_out, generator=gen, dtype=f64)
            return x, y

        train, test = sample(self.n_train), sample(self.n_test)
        val = sample(self.n_test)  # drawn after test, so test is the same as before val existed
        init_gen = _generator(seed, salt=12)
        A = torch.randn(rank, d_in, generator=init_gen, dtype=f64) / math.sqrt(d_in)
        if init == "zero":
            B = torch.zeros(d_out, rank, dtype=f64)
        elif init == "gaussian":  # geolora.lora.init "gaussian": B ~ N(0, 1e-4 / r)
            B = 1e-2 * torch.randn(d_out, rank, generator=init_gen, dtype=f64) / math.sqrt(rank)
        else:
            raise ValueError(f"init must be 'zero' or 'gaussian', got {init!r}")
        to = {"device": device, "dtype": dtype}
        model = FactorPair(B.to(**to), A.to(**to), scaling=self.scaling, base=base.to(**to))
        run = _TeacherStudentRun(
            model,
            (train[0].to(**to), train[1].to(**to)),
            {s: (x.to(**to), y.to(**to)) for s, (x, y) in (("val", val), ("test", test))},
            delta_star.to(**to),
            self.batch_size,
            _generator(seed, salt=13),
        )
        rescale_lora_pairs(run.param_groups(), factor_scale)
        return run
