"""Resumable, distributable sweeps: the bench protocol on top of an Optuna study.

Every run of a sweep is identified by a :class:`RunKey` (optimizer, learning rate, seed, init
scale k, init) inside a task signature (task, steps, rank, settings). A run is deterministic
given its key, so a finished run never needs to be recomputed: each one is recorded in an
Optuna study (Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization
Framework", KDD 2019) as soon as it ends, as a COMPLETE trial whose ``user_attrs`` hold the
key and the full :class:`~geolora.bench.runner.RunResult`. Re-running the same command reads
the study and runs only what is missing; a killed sweep loses only its runs in flight.

Several workers (local processes, or processes on other machines sharing one database URL,
Optuna's RDB storage) share the work: a worker claims a run by asking the study for a trial
(state RUNNING) tagged with the run's key; when two claims of one key race, the lower trial
number keeps it and the other is dropped (state FAIL, ``user_attrs["dropped"]``). Claims of
workers that died are released on the next start: a RUNNING trial whose worker process is gone
(same host) or whose heartbeat is older than :data:`STALE_AFTER_S` is marked FAIL.

The protocol (:class:`Protocol`, :class:`Plan`): per optimizer, tune the learning rate on a
log grid on the validation metric, then run the seeds at the chosen rate, then the init-scale
runs. See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STALE_AFTER_S",
    "Plan",
    "Protocol",
    "RunKey",
    "RunStore",
    "Interrupted",
    "install_signal_handlers",
    "lr_grid",
    "work",
]

#: A RUNNING trial whose worker sent no heartbeat for this long is released (s).
STALE_AFTER_S = 600.0
#: Seconds between a worker's heartbeats.
HEARTBEAT_S = 30.0


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (SIGINT raises KeyboardInterrupt already)."""


def install_signal_handlers() -> Any:
    """Turn SIGTERM into :class:`Interrupted` so that ``finally`` blocks release claims;
    returns the previous handler (to restore)."""

    def handler(signum, frame):  # noqa: ARG001
        raise Interrupted(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _fmt_float(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of a sweep. ``factor_scale`` k starts the adapter at ``(10^k B, 10^-k A)``;
    ``init`` is the adapter init (``"default"``: the task's own, e.g. B = 0 for LoRA)."""

    optimizer: str
    lr: float
    seed: int
    factor_scale: float = 0.0
    init: str = "default"

    def text(self, signature: str) -> str:
        """The study-wide identifier of this run under the task ``signature``."""
        return (
            f"{signature}|opt={self.optimizer}|lr={_fmt_float(self.lr)}|seed={self.seed}"
            f"|k={_fmt_float(self.factor_scale)}|init={self.init}"
        )


def lr_grid(center: float, points: int = 5, step_decades: float = 0.5) -> list[float]:
    """``points`` learning rates ``center · 10^(step·(i − (points−1)/2))``, 6 significant digits.

    The default is 5 points over two decades: ``center × {0.1, 0.316, 1, 3.16, 10}``.
    """
    if not (isinstance(center, (int, float)) and math.isfinite(center) and center > 0):
        raise ValueError(f"center must be a positive finite lr, got {center!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive int, got {points!r}")
    if not step_decades > 0:
        raise ValueError(f"step_decades must be > 0, got {step_decades!r}")
    mid = (points - 1) / 2
    return [float(f"{center * 10 ** (step_decades * (i - mid)):.6g}") for i in range(points)]


@dataclass
class Protocol:
    """Settings of one comparison (see docs/benchmarks.md, "Protocol").

    Attributes:
        optimizers: registry names, AdamW included for the paired comparison.
        centers: per optimizer, the centre of its lr grid (task override or registry default).
        seeds: seeds 0..seeds−1 run at the chosen lr.
        grid_points, grid_step: the lr grid (same size for every optimizer: same budget).
        tune_seeds: seeds of each tuning run (their mean validation metric picks the lr).
        shipped: per optimizer, an lr chosen by an earlier tuning run; those optimizers skip
            tuning (``--tune`` empties it).
        init_scales: k values of the init-scale runs (empty: none); they start from a nonzero
            ``init_scale_init`` init, at the chosen lr, over ``init_seeds`` seeds.
        no_init_scale: optimizers left out of the init-scale runs (their adapters have no
            ``(B, A)`` gauge, e.g. PoLAR's three factors).
        configs: per optimizer, its configuration id; runs recorded under another id are
            stale (see :class:`RunStore`).
        primary, higher_is_better: the metric and its direction; tuning reads ``val_<primary>``.
    """

    optimizers: list[str]
    centers: dict[str, float]
    primary: str
    higher_is_better: bool
    seeds: int = 3
    grid_points: int = 5
    grid_step: float = 0.5
    tune_seeds: tuple[int, ...] = (0,)
    shipped: dict[str, float] = field(default_factory=dict)
    init_scales: tuple[float, ...] = ()
    init_seeds: int = 1
    init_scale_init: str = "gaussian"
    no_init_scale: tuple[str, ...] = ()
    configs: dict[str, str] = field(default_factory=dict)


def val_score(result: Mapping[str, Any], primary: str) -> float:
    """The validation value of ``primary`` of one run result (NaN when diverged)."""
    if result.get("diverged"):
        return math.nan
    v = result.get("metrics", {}).get(f"val_{primary}")
    return math.nan if v is None else float(v)


class Plan:
    """The runs of a :class:`Protocol`, unlocked phase by phase as results arrive."""

    def __init__(self, protocol: Protocol) -> None:
        self.p = protocol

    def tune_keys(self, opt: str) -> list[RunKey]:
        if opt in self.p.shipped:
            return []
        grid = lr_grid(self.p.centers[opt], self.p.grid_points, self.p.grid_step)
        return [RunKey(opt, lr, s) for lr in grid for s in self.p.tune_seeds]

    def tuning_table(
        self, opt: str, done: Mapping[RunKey, Mapping[str, Any]]
    ) -> list[tuple[float, float, int]] | None:
        """``[(lr, mean val score, diverged count)]`` of ``opt``'s grid, None while incomplete."""
        keys = self.tune_keys(opt)
        if not keys or any(k not in done for k in keys):
            return None
        rows = []
        for lr in sorted({k.lr for k in keys}):
            scores = [val_score(done[k], self.p.primary) for k in keys if k.lr == lr]
            div = sum(1 for s in scores if not math.isfinite(s))
            mean = math.nan if div else sum(scores) / len(scores)
            rows.append((lr, mean, div))
        return rows

    def chosen_lr(self, opt: str, done: Mapping[RunKey, Mapping[str, Any]]) -> float | None:
        """Shipped lr, or the grid lr with the best mean validation score (ties: the lower lr);
        None while tuning is incomplete or when every grid point diverged."""
        if opt in self.p.shipped:
            return self.p.shipped[opt]
        table = self.tuning_table(opt, done)
        if table is None:
            return None
        ok = [(lr, m) for lr, m, _ in table if math.isfinite(m)]
        if not ok:
            return None
        sign = 1.0 if self.p.higher_is_better else -1.0
        best = max(sign * m for _, m in ok)
        return min(lr for lr, m in ok if sign * m == best)

    def seed_keys(self, opt: str, lr: float) -> list[RunKey]:
        return [RunKey(opt, lr, s) for s in range(self.p.seeds)]

    def init_keys(self, opt: str, lr: float) -> list[RunKey]:
        if opt in self.p.no_init_scale:
            return []
        return [
            RunKey(opt, lr, s, float(k), self.p.init_scale_init)
            for k in self.p.init_scales
            for s in range(self.p.init_seeds)
        ]

    def pending(self, done: Mapping[RunKey, Mapping[str, Any]]) -> list[RunKey]:
        """Runs not done yet whose phase is unlocked: tuning runs, then seeds, then init."""
        tune, later = [], []
        for opt in self.p.optimizers:
            tune += [k for k in self.tune_keys(opt) if k not in done]
            lr = self.chosen_lr(opt, done)
            if lr is not None:
                later += [k for k in self.seed_keys(opt, lr) + self.init_keys(opt, lr) if k not in done]
        seen: set[RunKey] = set()
        out = []
        for k in tune + later:
            if k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def finished(self, done: Mapping[RunKey, Mapping[str, Any]]) -> bool:
        """True when nothing is pending and no optimizer is still waiting for its tuning."""
        if self.pending(done):
            return False
        return all(
            opt in self.p.shipped or self.tuning_table(opt, done) is not None
            for opt in self.p.optimizers
        )

    def expected_runs(self, done: Mapping[RunKey, Mapping[str, Any]]) -> int:
        """Number of distinct runs of the whole plan (exact once every lr is chosen; before,
        the seeds of a tuning seed are assumed to land on a tuning run)."""
        total: set[RunKey] = set()
        extra = 0
        for opt in self.p.optimizers:
            keys = self.tune_keys(opt)
            total.update(keys)
            lr = self.chosen_lr(opt, done)
            if lr is not None:
                total.update(self.seed_keys(opt, lr) + self.init_keys(opt, lr))
            elif keys:  # tuning not finished: count seeds outside the tuning seeds
                extra += len(set(range(self.p.seeds)) - set(self.p.tune_seeds))
                if opt not in self.p.no_init_scale:
                    extra += len(self.p.init_scales) * self.p.init_seeds
        return len(total) + extra


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """Finished and claimed runs of one sweep, in an Optuna study.

    Args:
        storage: an Optuna storage URL, e.g. ``sqlite:///results/demo/study.db``.
        study_name: the study (one per sweep; several tasks may share it, keys differ).
        signature: the task signature prefixed to every key.
        configs: per optimizer, the id of its configuration (class and every hyperparameter but
            the lr, see :func:`geolora.bench.protocol.optimizer_config`). Each run records the
            id; a finished run whose id differs (or is missing) is not reused, so a sweep
            resumed after an optimizer's defaults changed reruns that optimizer. None: ids are
            neither recorded nor checked.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        signature: str,
        configs: Mapping[str, str] | None = None,
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        kwargs: dict[str, Any] = {}
        if storage.startswith("sqlite"):
            # several processes write the same file: wait for the lock instead of failing
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        self.storage = optuna.storages.RDBStorage(storage, **kwargs)
        self.study = optuna.create_study(
            study_name=study_name,
            storage=self.storage,
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        self.signature = signature
        self.configs = None if configs is None else dict(configs)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _mine(self, t: Any) -> RunKey | None:
        key = t.user_attrs.get("run_key")
        if not isinstance(key, dict) or t.user_attrs.get("signature") != self.signature:
            return None
        if self.configs is not None and (
            t.user_attrs.get("config") != self.configs.get(key["optimizer"])
        ):
            return None  # run with another configuration of this optimizer: stale
        return RunKey(key["optimizer"], key["lr"], key["seed"], key["factor_scale"], key["init"])

    def snapshot(self) -> tuple[dict[RunKey, dict[str, Any]], set[RunKey]]:
        """``(done, running)``: results of finished runs (lowest trial number wins) and the keys
        claimed by live workers."""
        TS = self._optuna.trial.TrialState
        done: dict[RunKey, dict[str, Any]] = {}
        running: set[RunKey] = set()
        trials = self.study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.RUNNING))
        for t in sorted(trials, key=lambda t: t.number):
            key = self._mine(t)
            if key is None:
                continue
            if t.state == TS.COMPLETE and key not in done and "result" in t.user_attrs:
                done[key] = json.loads(t.user_attrs["result"])
            elif t.state == TS.RUNNING:
                running.add(key)
        return done, running

    def release_stale(self, stale_after_s: float = STALE_AFTER_S) -> int:
        """Mark FAIL the RUNNING trials whose worker is dead; returns how many."""
        TS = self._optuna.trial.TrialState
        host = socket.gethostname()
        now = time.time()
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
            worker = str(t.user_attrs.get("worker", ""))
            w_host, _, w_pid = worker.rpartition(":")
            alive_at = float(t.user_attrs.get("alive_at", 0.0))
            dead = w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid))
            if dead or now - alive_at > stale_after_s:
                self.storage.set_trial_user_attr(t._trial_id, "released", "worker gone")
                self.storage.set_trial_state_values(t._trial_id, TS.FAIL)
                n += 1
        return n

    def claim(self, key: RunKey) -> Any | None:
        """A RUNNING trial that owns ``key``, or None when another worker owns or finished it."""
        # the key lives in user_attrs: Optuna's distributions cannot change value space
        # between trials, and a run is not a sample of a search space anyway
        trial = self.study.ask()
        trial.set_user_attr("signature", self.signature)
        trial.set_user_attr("run_key", {**key.__dict__})
        trial.set_user_attr("key", key.text(self.signature))
        if self.configs is not None:
            trial.set_user_attr("config", self.configs.get(key.optimizer))
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("alive_at", time.time())
        TS = self._optuna.trial.TrialState
        for t in self.study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.RUNNING)):
            if t.number == trial.number or self._mine(t) != key:
                continue
            if t.state == TS.COMPLETE or t.number < trial.number:
                self.drop(trial, "claimed by another worker")
                return None
        return trial

    def heartbeat(self, trial: Any) -> None:
        self.storage.set_trial_user_attr(trial._trial_id, "alive_at", time.time())

    def finish(self, trial: Any, result: Mapping[str, Any], value: float) -> None:
        """Record ``result`` and close the trial (COMPLETE); ``value`` is the trial's value."""
        value = value if math.isfinite(value) else -math.inf
        blob = json.dumps(result, allow_nan=True)
        try:
            trial.set_user_attr("result", blob)
            self.study.tell(trial, value)
        except Exception:
            # the claim was released meanwhile (a heartbeat gap): record the run anyway
            attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("dropped", "released")}
            self.study.add_trial(
                self._optuna.trial.create_trial(
                    value=value, user_attrs={**attrs, "result": blob}
                )
            )

    def drop(self, trial: Any, reason: str) -> None:
        """Close ``trial`` as FAIL (a released claim; its run is not recorded)."""
        try:
            trial.set_user_attr("dropped", reason)
            self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        except Exception:  # the trial may already be closed (e.g. released as stale)
            pass


RunFn = Callable[[RunKey, Callable[[int], None]], dict[str, Any]]


def work(
    plan: Plan,
    store: RunStore,
    run_fn: RunFn,
    *,
    worker_index: int = 0,
    on_step: Callable[[int], None] | None = None,
    on_run: Callable[[RunKey, str], None] | None = None,
    poll_s: float = 0.5,
    max_runs: int | None = None,
) -> int:
    """Run pending keys of ``plan`` until the plan is finished; returns the runs done here.

    ``run_fn(key, on_step)`` trains one run and returns its result dict. A claim is dropped
    (so a rerun redoes the run) when ``run_fn`` raises, including on KeyboardInterrupt or
    :class:`Interrupted`, which are re-raised. ``max_runs`` stops after that many runs (tests).
    """
    primary = plan.p.primary
    sign = 1.0 if plan.p.higher_is_better else -1.0
    n_done = 0
    while max_runs is None or n_done < max_runs:
        trial: Any = None
        finished = False
        stop = threading.Event()
        try:
            with _Deferred() as deferred:  # a signal here must not orphan a fresh claim
                done, running = store.snapshot()
                todo = [k for k in plan.pending(done) if k not in running]
                if todo:
                    key = todo[worker_index % len(todo)]
                    trial = store.claim(key)
            deferred.reraise()
            if not todo:
                if plan.finished(done):
                    return n_done
                time.sleep(poll_s)  # waiting for another worker's runs
                continue
            if trial is None:
                continue

            def beat(trial: Any = trial, stop: threading.Event = stop) -> None:
                while not stop.wait(HEARTBEAT_S):
                    try:
                        store.heartbeat(trial)
                    except Exception:  # a missed heartbeat only risks a duplicate run
                        pass

            threading.Thread(target=beat, daemon=True).start()
            if on_run is not None:
                on_run(key, "start")
            result = run_fn(key, on_step or (lambda n: None))
            with _Deferred() as deferred:  # record the finished run even when a signal comes
                store.finish(trial, result, sign * val_score(result, primary))
                finished = True
            deferred.reraise()
        except BaseException:
            # interrupted or failed anywhere between claim and record: release the claim,
            # so that a rerun redoes this run
            if trial is not None and not finished:
                store.drop(trial, "interrupted or failed")
            raise
        finally:
            stop.set()
        n_done += 1
        if on_run is not None:
            on_run(key, "done")
    return n_done


class _Deferred:
    """Hold SIGINT / SIGTERM during a short critical section; :meth:`reraise` delivers them
    (as KeyboardInterrupt / :class:`Interrupted`). A no-op outside the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Deferred:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def reraise(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise Interrupted(f"signal {self.signum}")


def results_for(
    plan: Plan, done: Mapping[RunKey, Mapping[str, Any]]
) -> list[tuple[RunKey, dict[str, Any]]]:
    """The plan's finished runs in a fixed order (optimizer order, then key)."""
    order = {o: i for i, o in enumerate(plan.p.optimizers)}
    wanted: set[RunKey] = set()
    for opt in plan.p.optimizers:
        wanted.update(plan.tune_keys(opt))
        lr = plan.chosen_lr(opt, done)
        if lr is not None:
            wanted.update(plan.seed_keys(opt, lr) + plan.init_keys(opt, lr))
    keys = sorted((k for k in wanted if k in done), key=lambda k: (order[k.optimizer], k))
    return [(k, dict(done[k])) for k in keys]


def signature_of(task: Any, steps: int, rank: int, extra: Sequence[Any] = ()) -> str:
    """Task signature: name, steps, rank and the task's ``config()`` (when it has one)."""
    config = getattr(task, "config", None)
    cfg = config() if callable(config) else {}
    blob = json.dumps({"task": task.name, "steps": steps, "rank": rank, "cfg": cfg, "x": list(extra)},
                      sort_keys=True, default=str)
    import hashlib

    return f"{task.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
