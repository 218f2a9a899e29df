"""``compare``: the bench protocol end to end (tune, seeds, init scales, statistics, files).

:func:`compare` is what ``geolora bench`` runs; it can be called from Python with any
:class:`~geolora.bench.tasks.Task` object (one worker) or a :class:`TaskRef` (any number of
worker processes, which rebuild the task themselves). The steps:

1. every optimizer's learning rate is tuned on a log grid on the *validation* metric (or
   taken from a shipped tuning run, :func:`shipped_lrs`, unless ``tune=True``);
2. ``seeds`` runs at the chosen rate; the test metric's mean and 95 % t-interval, the paired
   difference to AdamW on the same seeds, the lr robustness and the costs are summarised;
3. optionally the init-scale runs (start from ``(10^k B, 10^-k A)``, nonzero init);
4. ``results.json``, ``results.csv`` and the plots are written to ``out``; the headline names
   a winner only when the intervals separate it.

Every run is recorded in an Optuna study as it ends (:mod:`geolora.bench.sweep`), so the same
call resumes an interrupted sweep.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geolora.bench.adapters import GAUGE_ADAPTERS
from geolora.bench.registry import REGISTRY, OptimizerRegistry

__all__ = [
    "BUILTIN_TASKS",
    "DEMO_OPTIMIZERS",
    "TaskRef",
    "compare",
    "config_id",
    "full_optimizers",
    "optimizer_config",
    "shipped_lrs",
    "versions",
]

#: ``--task`` names of the built-in tasks.
BUILTIN_TASKS = ("minilm", "plays", "sensing", "teacher")

#: The optimizers ``geolora bench`` compares without ``--optimizers`` / ``--full``: the AdamW
#: baseline, a factor-wise AdamW variant and three invariant methods (lifted, matrix-
#: preconditioned, retraction-based); chosen so that ``make demo`` fits its budget.
DEMO_OPTIMIZERS = ("adamw", "loraplus", "lora_rite", "adams", "loram_br")

#: Shipped learning rates (see :func:`shipped_lrs`).
TUNED_LRS_FILE = Path(__file__).with_name("tuned_lrs.json")


def full_optimizers(registry: OptimizerRegistry = REGISTRY) -> list[str]:
    """``--full``: every registered optimizer except the ``grid_*`` template variants."""
    import geolora.bench.catalog  # noqa: F401  (registers the optimizers)

    return [n for n in registry.names() if not n.startswith("grid_")]


@dataclass(frozen=True)
class TaskRef:
    """A picklable recipe of a task, rebuilt in every worker process.

    ``name``: a built-in task (:data:`BUILTIN_TASKS`), ``"module:Class"`` or
    ``"path/to/file.py:Class"`` (a user task built with no arguments), or ``"data"`` for
    ``--data FILE`` (with ``options``: ``data``, ``model``, column names, fractions, seed,
    ``top_layers``).
    """

    name: str
    quick: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """The task object (raises ValueError / FileNotFoundError naming the bad input)."""
        opts = dict(self.options)
        cache = opts.pop("cache_dir", None)
        if self.name == "data":
            return _data_task(self.quick, cache, **opts)
        if self.name in ("minilm", "plays"):
            from geolora.bench.minilm import MiniLMGenreTask, MiniLMPlayTask, default_cache_dir

            cls = MiniLMGenreTask if self.name == "minilm" else MiniLMPlayTask
            task = cls.quick(**opts) if self.quick else cls(**opts)  # top_layers None: all
            task.cache_dir = Path(cache) if cache else default_cache_dir()
            return task
        if self.name == "sensing":
            from geolora.bench.tasks import SensingTask

            return SensingTask(**opts)
        if self.name == "teacher":
            from geolora.bench.tasks import TeacherStudentTask

            return TeacherStudentTask(**opts)
        if ":" in self.name:
            return _user_task(self.name)
        raise ValueError(
            f"--task {self.name!r}: unknown task; choose from {', '.join(BUILTIN_TASKS)} or give "
            "module:Class (a Task, see docs/bench_custom.md)"
        )


def _user_task(ref: str) -> Any:
    from geolora.bench.tasks import Task

    mod_name, _, cls_name = ref.rpartition(":")
    if not mod_name or not cls_name:
        raise ValueError(f"--task {ref!r}: expected module:Class or file.py:Class")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"--task {ref!r}: no such file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module next to where the command runs
        try:
            module = importlib.import_module(mod_name)
        except ImportError as err:
            raise ValueError(f"--task {ref!r}: cannot import module {mod_name!r} ({err})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ValueError(f"--task {ref!r}: module {mod_name!r} has no attribute {cls_name!r}")
    task = cls() if isinstance(cls, type) else cls
    if not isinstance(task, Task):
        need = ", ".join(("name", "default_steps", "quick_steps", "primary_metric",
                          "higher_is_better", "setup()"))
        raise ValueError(f"--task {ref!r}: {cls_name} is not a Task (needs {need})")
    if not hasattr(task, "lr_overrides"):
        task.lr_overrides = {}
    return task


def _data_task(
    quick: bool,
    cache: str | None,
    *,
    data: str,
    model: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    data_seed: int = 0,
    top_layers: int | None = None,
    max_length: int = 64,
) -> Any:
    from geolora.bench.encoder import EncoderClassificationTask, check_model_dir
    from geolora.bench.userdata import load_table

    table = load_table(
        data,
        text_column=text_column,
        label_column=label_column,
        split_column=split_column,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=data_seed,
    )
    if model is not None:
        check_model_dir(model)
    return EncoderClassificationTask(
        name=Path(data).stem.replace(" ", "_") or "data",
        records=table.records,
        num_classes=table.num_classes,
        label_names=table.label_names,
        model_path=model,
        top_layers=top_layers,
        max_length=max_length,
        default_steps=200,
        quick_steps=40,
        cache_dir=cache or _default_cache(),
    )


def _default_cache() -> Path:
    from geolora.bench.minilm import default_cache_dir

    return default_cache_dir()


def versions() -> dict[str, str]:
    """Versions of everything that shapes a number: packages, Python, platform, git commit."""
    out: dict[str, str] = {}
    import geolora

    out["geolora"] = getattr(geolora, "__version__", "?")
    for mod in ("torch", "transformers", "optuna", "numpy", "scipy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # not installed: say so rather than fail
            out[mod] = "not installed"
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    out["torch_threads"] = str(torch.get_num_threads())
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        if commit:
            out["git"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def shipped_lrs(task_name: str, rank: int) -> dict[str, Any]:
    """The shipped tuning of ``task_name`` at LoRA rank ``rank`` (``{}`` when there is none).

    Returns the entry of ``geolora/bench/tuned_lrs.json``: ``command``, ``study``,
    ``versions``, ``signature``, ``steps`` and ``optimizers`` (``{name: {"lr_chosen": lr,
    "lr_grid": [[lr, val mean, diverged, low, high], ...]}}``).
    """
    if not TUNED_LRS_FILE.is_file():
        return {}
    data = json.loads(TUNED_LRS_FILE.read_text())
    entry = data.get(task_name)
    if not entry or entry.get("rank") != rank:
        return {}
    return entry


def _probe_optimizer(spec: Any, **kw: Any) -> torch.optim.Optimizer:
    """``spec``'s optimizer (with ``kw``) on a 6×6 linear adapted with the spec's adapter kind
    at rank 2: what the bench asks of an optimizer before running it. The global RNG is left
    as it was."""
    from geolora.bench.adapters import adapt

    torch_state = torch.random.get_rng_state()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 6))
        groups = adapt(model, spec.adapter or "lora", rank=2, seed=0)
        return spec.build(groups, spec.default_lr, **kw)
    finally:
        torch.random.set_rng_state(torch_state)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    return repr(v)


def optimizer_config(name: str, registry: OptimizerRegistry = REGISTRY) -> dict[str, Any]:
    """The hyperparameters of optimizer ``name`` besides its lr: the class and every entry of
    ``optimizer.defaults`` (the class's defaults with the bench's fixed arguments applied),
    read from an optimizer built on a 6×6 probe adapter of the spec's kind.

    A shipped lr and a recorded run count only under the same configuration (see
    :func:`config_id`), so changing a default (e.g. LoRA-RITE's ``row_normalize``) reruns
    that optimizer instead of reusing results of the old one. Internals (the template's parts,
    the step engine) are not part of it: a refactoring that keeps the hyperparameters keeps the
    results (the reference-trajectory tests hold the numbers).
    """
    spec = registry.get(name)
    f = spec.factory
    factory = f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
    try:
        opt = _probe_optimizer(spec)
    except Exception as err:  # a user's factory that needs its own model: name it only
        return {"factory": factory, "probe": f"not built on the probe ({type(err).__name__})"}
    cfg = {k: _jsonable(v) for k, v in sorted(opt.defaults.items()) if k != "lr"}
    return {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", **cfg}


def config_id(config: dict[str, Any]) -> str:
    """A short stable id (12 hex digits of SHA-1 of the sorted JSON) of an optimizer config."""
    import hashlib

    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def config_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """``"row_normalize False -> True, ..."``: how ``new`` differs from ``old`` (for messages)."""
    if not old:
        return "no configuration recorded"
    keys = sorted(set(old) | set(new))
    diff = [f"{k} {old.get(k, '-')!s} -> {new.get(k, '-')!s}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diff) or "same"


def _robust_kwargs(name: str, registry: OptimizerRegistry) -> dict[str, Any]:
    """``{"robust_steps": 0}`` when the optimizer takes it (init-scale runs start from nonzero
    factors, so no AdamW warm start is needed, and one would break invariance)."""
    try:
        _probe_optimizer(registry.get(name), robust_steps=0)
    except TypeError:
        return {}
    except ValueError as err:
        if "robust_steps" in str(err):
            return {}
        raise
    return {"robust_steps": 0}


class _Runner:
    """``run_fn`` of :func:`geolora.bench.sweep.work`: one run of the task -> result dict."""

    def __init__(self, task: Any, steps: int, rank: int, registry: OptimizerRegistry) -> None:
        self.task, self.steps, self.rank, self.registry = task, steps, rank, registry
        self._robust: dict[str, dict[str, Any]] = {}

    def __call__(self, key: Any, on_step: Any) -> dict[str, Any]:
        from geolora.bench.runner import run

        kw: dict[str, Any] = {}
        if key.init != "default":
            if key.optimizer not in self._robust:
                self._robust[key.optimizer] = _robust_kwargs(key.optimizer, self.registry)
            kw = self._robust[key.optimizer]
        res = run(
            self.task,
            key.optimizer,
            lr=key.lr,
            steps=self.steps,
            seed=key.seed,
            rank=self.rank,
            factor_scale=key.factor_scale,
            init=None if key.init == "default" else key.init,
            optimizer_kwargs=kw,
            registry=self.registry,
            on_step=on_step,
        )
        d = res.to_dict()
        d["init"] = key.init
        return d


def _worker_main(
    ref: TaskRef,
    protocol: Any,
    storage: str,
    study: str,
    signature: str,
    steps: int,
    rank: int,
    index: int,
    threads: int,
    q: Any,
) -> None:
    """Entry point of a worker process (spawned): rebuild the task, work, report steps."""
    from geolora.bench import catalog  # noqa: F401  (registers the optimizers)
    from geolora.bench.sweep import Plan, RunStore, install_signal_handlers, work

    install_signal_handlers()
    torch.set_num_threads(threads)
    try:
        task = ref.build()
        store = RunStore(storage, study, signature, protocol.configs)
        work(
            Plan(protocol),
            store,
            _Runner(task, steps, rank, REGISTRY),
            worker_index=index,
            on_step=lambda n: q.put(("step", n)),
            on_run=lambda key, what: q.put(("run", f"{key.optimizer} lr={key.lr:.3g} seed={key.seed}"
                                            + (f" k={key.factor_scale:g}" if key.init != "default" else ""), what)),
        )
    except KeyboardInterrupt:
        sys.exit(130)


def compare(
    task: Any,
    *,
    optimizers: Sequence[str] | None = None,
    out: str | os.PathLike[str] = "results/bench",
    seeds: int = 3,
    steps: int | None = None,
    rank: int = 8,
    quick: bool = False,
    tune: bool = False,
    grid_points: int = 5,
    grid_step: float = 0.5,
    tune_seeds: int = 1,
    init_scales: Sequence[float] = (),
    init_seeds: int = 1,
    robust_tol: float = 0.1,
    storage: str | None = None,
    study: str = "geolora-bench",
    workers: int = 1,
    threads: int | None = None,
    console: Any = None,
    command: str | None = None,
    registry: OptimizerRegistry = REGISTRY,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run the bench protocol on ``task`` and write ``out/results.json``, ``results.csv`` and
    plots; returns the summary (also in ``results.json["summary"]``).

    Args:
        task: a Task object (``workers`` must be 1) or a :class:`TaskRef`.
        optimizers: registry names (default :data:`DEMO_OPTIMIZERS`); AdamW is added when
            missing, as the paired baseline.
        seeds: seeds per optimizer at the chosen lr (intervals need >= 2; 3 or more advised).
        steps: training steps (default: the task's, or its ``quick_steps`` with ``quick``).
        tune: tune every optimizer even when a shipped lr exists.
        grid_points, grid_step: the lr grid (points, spacing in decades) around each
            optimizer's centre (task override, else registry default).
        tune_seeds: seeds per grid point (their mean validation metric chooses the lr).
        init_scales: k values of the init-scale runs (empty: none).
        init_seeds: seeds per init-scale point.
        robust_tol: relative tolerance of the lr-robustness width.
        storage: Optuna storage URL (default: SQLite file ``out/study.db``).
        study: Optuna study name.
        workers: local worker processes.
        threads: torch threads per worker (default: CPU count // workers, at least 1).
        console: a rich Console (default: a new one).
        command: the command line recorded with the results.
        report_only: run nothing; summarise the runs already in the study (a sweep in
            progress: optimizers still tuning have no row values, seeds count what is done).
    """
    from rich.console import Console

    import geolora.bench.catalog  # noqa: F401  (registers the optimizers)
    from geolora.bench import report
    from geolora.bench.sweep import Plan, Protocol, RunStore, results_for, signature_of, work

    console = console or Console()
    names = list(optimizers or DEMO_OPTIMIZERS)
    for n in names:
        registry.get(n)  # unknown name: ValueError listing the known ones, before any work
    if "adamw" not in names:
        names.insert(0, "adamw")
    for key, val, lo in (("seeds", seeds, 1), ("grid_points", grid_points, 1), ("tune_seeds", tune_seeds, 1),
                         ("init_seeds", init_seeds, 1), ("workers", workers, 1), ("rank", rank, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {val!r}")
    ref = task if isinstance(task, TaskRef) else None
    if ref is None and workers > 1:
        raise ValueError("workers > 1 needs a TaskRef (each worker process rebuilds the task)")
    task_obj = ref.build() if ref is not None else task
    if steps is None:
        steps = task_obj.quick_steps if quick else task_obj.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    overrides = getattr(task_obj, "lr_overrides", {}) or {}
    centers = {n: float(overrides.get(n, registry.get(n).default_lr)) for n in names}
    configs = {n: optimizer_config(n, registry) for n in names}
    shipped_entry = {} if tune else shipped_lrs(task_obj.name, rank)
    shipped_opts = shipped_entry.get("optimizers", {})
    shipped, stale = {}, {}
    for n in names:
        e = shipped_opts.get(n)
        if not e or not e.get("lr_chosen"):
            continue
        if e.get("config") != configs[n]:  # tuned under other defaults: tune again
            stale[n] = config_changes(e.get("config"), configs[n])
            continue
        shipped[n] = float(e["lr_chosen"])
    lr_sources = {}
    for n in shipped:
        lr_sources[n] = (f"shipped: tuned by `{shipped_entry.get('command', '?')}` "
                         f"({shipped_entry.get('steps')} steps)")
    protocol = Protocol(
        optimizers=names,
        centers=centers,
        primary=task_obj.primary_metric,
        higher_is_better=bool(task_obj.higher_is_better),
        seeds=seeds,
        grid_points=grid_points,
        grid_step=grid_step,
        tune_seeds=tuple(range(tune_seeds)),
        shipped=shipped,
        init_scales=tuple(float(k) for k in init_scales),
        init_seeds=init_seeds,
        no_init_scale=tuple(n for n in names if registry.get(n).adapter not in GAUGE_ADAPTERS),
        configs={n: config_id(c) for n, c in configs.items()},
    )
    plan = Plan(protocol)
    signature = signature_of(task_obj, steps, rank)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    store = RunStore(storage, study, signature, protocol.configs)
    released = store.release_stale()
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        threads = min(threads, int(getattr(task_obj, "max_threads", threads)))
    done, _ = store.snapshot()
    n_total = plan.expected_runs(done)
    console.print(
        f"[bold]geolora bench[/]: task={task_obj.name}, steps={steps}, rank={rank}, seeds={seeds}, "
        f"optimizers={', '.join(names)}; lr grid {grid_points} points × {tune_seeds} seed(s)"
        + (f", shipped lrs for {', '.join(shipped)}" if shipped else "")
        + (f", init scales k={list(protocol.init_scales)}" if protocol.init_scales else "")
        + f"; study {study} in {storage}, {workers} worker(s) × {threads} thread(s)"
        + (f"; released {released} stale claim(s)" if released else "")
    )
    for n, why in stale.items():
        console.print(f"[yellow]shipped lr of {n} not used[/]: it was tuned under another "
                      f"configuration ({why}); tuning {n} in this sweep")
    t0 = time.perf_counter()
    prepare = getattr(task_obj, "prepare", None)
    if callable(prepare) and plan.pending(done) and not report_only:
        # shared one-time work (frozen-layer cache) once, here, before workers load it;
        # a model folder that cannot be loaded fails now, before any training
        with console.status(f"preparing {task_obj.name} (frozen layers, cached on disk)"):
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            prepare("cpu")
    interrupted: BaseException | None = None
    with _progress(console) as progress:
        done_runs = sum(1 for _ in results_for(plan, done))
        bar = progress.add_task("runs", total=max(1, n_total) * steps, completed=done_runs * steps)

        def describe(text: str) -> None:
            progress.update(bar, description=text)

        def refresh() -> None:
            # the plan grows as learning rates get chosen: keep the total (and ETA) exact
            d, _ = store.snapshot()
            finished = sum(1 for _ in results_for(plan, d))
            progress.update(bar, total=max(1, plan.expected_runs(d), finished) * steps)

        try:
            if report_only:
                pass
            elif workers == 1:
                torch.set_num_threads(threads)
                runner = _Runner(task_obj, steps, rank, registry)

                def on_run(key: Any, what: str) -> None:
                    if what == "start":
                        describe(f"{key.optimizer} lr={key.lr:.3g} seed={key.seed}"
                                 + (f" k={key.factor_scale:g}" if key.init != "default" else ""))
                    else:
                        refresh()

                work(plan, store, runner, on_step=lambda n: progress.advance(bar, n), on_run=on_run)
            else:
                _run_workers(ref, protocol, storage, study, signature, steps, rank, workers, threads,
                             progress, bar, refresh)
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM via install_signal_handlers
            interrupted = exc
    if interrupted is not None:
        d, _ = store.snapshot()
        console.print(
            f"[yellow]interrupted[/]: {sum(1 for _ in results_for(plan, d))} run(s) are recorded in "
            f"the study; run the same command again to resume"
        )
        raise interrupted
    done, _ = store.snapshot()
    runs = results_for(plan, done)
    summary = report.protocol_summary(
        plan, runs, robust_tol=robust_tol, lr_sources=lr_sources,
        shipped_tables={n: shipped_opts[n].get("lr_grid", []) for n in shipped},
    )
    baseline_fn = getattr(task_obj, "baseline", None)
    baseline = float(baseline_fn()) if callable(baseline_fn) else None
    results = [r for _, r in runs]
    summary.update(
        {
            "task": task_obj.name,
            "steps": steps,
            "rank": rank,
            "seeds": seeds,
            "primary_metric": task_obj.primary_metric,
            "higher_is_better": bool(task_obj.higher_is_better),
            "baseline": baseline,
            "protocol": {
                "lr_grid_points": grid_points,
                "lr_grid_step_decades": grid_step,
                "tune_seeds": tune_seeds,
                "tuned_on": f"val_{task_obj.primary_metric}",
                "interval": "Student t, 95%, over seeds",
                "robust_tol": robust_tol,
                "init_scales": list(protocol.init_scales),
                "init_seeds": init_seeds,
                "init_scale_init": protocol.init_scale_init,
            },
            "shipped_tuning": {k: v for k, v in shipped_entry.items() if k != "optimizers"}
            if shipped else None,
            "signature": signature,
            "optimizer_configs": configs,
            "study": {"storage": storage, "name": study},
            "command": command or "geolora.bench.compare(...)",
            "versions": versions(),
            "complete": plan.finished(done),
            "wall_s": time.perf_counter() - t0,
            "runs_wall_s": sum(float(r.get("wall_s") or 0.0) for r in results),
        }
    )
    title = f"{task_obj.name}: {steps} steps, r={rank}, {seeds} seeds"
    report.save_results(out, results, summary)
    _plots(out, summary, results, title, registry)
    report.print_protocol_table(summary["rows"], task_obj.primary_metric, title, console)
    if summary["init_scale"]:
        _print_init_table(summary["init_scale"], task_obj.primary_metric, console)
    console.print(f"[bold]{summary['headline']}[/]")
    console.print(f"wrote {out}/results.json, results.csv and plots in {time.perf_counter() - t0:.0f} s")
    return summary


def _plots(out: Path, summary: dict[str, Any], results: list[dict[str, Any]], title: str,
           registry: OptimizerRegistry) -> None:
    from geolora.bench import report

    primary = summary["primary_metric"]
    rows = summary["rows"]
    report.plot_metric_intervals(
        rows, primary, out / "metric.png", f"{title}: test {primary}, mean and 95% interval",
        higher_is_better=summary["higher_is_better"], winner=summary["winner"],
        baseline=summary.get("baseline"),
    )
    report.plot_lr_sensitivity(rows, primary, out / "lr_sensitivity.png",
                               f"{title}: validation {primary} vs learning rate")
    report.plot_losses(results, out / "loss_curves.png", f"{title}: training loss")
    report.plot_val_curves(rows, results, primary, out / "val_curves.png",
                           f"{title}: validation {primary} during training (chosen lr)")
    if summary["init_scale"]:
        report.plot_init_scale(
            summary["init_scale"], primary, out / "init_scale.png",
            f"{summary['task']}: test {primary} from (10^k B, 10^-k A)",
            invariant={n: registry.get(n).invariant for n in summary["init_scale"]},
        )


def _print_init_table(table: dict[str, Any], primary: str, console: Any) -> None:
    from rich.table import Table

    ks = sorted({k for row in table.values() for k in row["by_k"]}, key=float)
    t = Table(title=f"init scale: test {primary} from (10^k B, 10^-k A), nonzero init")
    t.add_column("optimizer")
    for k in ks:
        t.add_column(f"k={k}", justify="right")
    t.add_column("max − min", justify="right")
    for name, row in table.items():
        cells = []
        for k in ks:
            v = row["by_k"].get(k)
            cells.append("-" if v is None or v["mean"] is None or not math.isfinite(v["mean"])
                         else f"{v['mean']:.4g}")
        rng = row.get("range")
        t.add_row(name, *cells, "-" if rng is None else f"{rng:.3g}")
    console.print(t)


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _run_workers(
    ref: TaskRef, protocol: Any, storage: str, study: str, signature: str, steps: int, rank: int,
    workers: int, threads: int, progress: Any, bar: Any, refresh: Any,
) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main,
                    args=(ref, protocol, storage, study, signature, steps, rank, i, threads, q))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    current: dict[str, str] = {}
    try:
        last = 0.0
        while any(p.is_alive() for p in procs) or not q.empty():
            try:
                msg = q.get(timeout=0.2)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "step":
                    progress.advance(bar, msg[1])
                elif msg[0] == "run":
                    if msg[2] == "start":
                        current[msg[1]] = msg[1]
                    else:
                        current.pop(msg[1], None)
                    progress.update(bar, description=" | ".join(current.values()) or "runs")
            if time.monotonic() - last > 5:
                refresh()
                last = time.monotonic()
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            raise RuntimeError(f"worker process(es) failed with exit code(s) {bad}")
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker drops its claim and exits
        for p in procs:
            p.join(timeout=60)
        raise
