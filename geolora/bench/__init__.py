"""Benchmark harness behind `geolora bench`: protocol, sweeps, tasks, registry, reports.

* :mod:`geolora.bench.protocol`: :func:`compare`, the protocol end to end (tune on validation,
  seeds, intervals, paired difference to AdamW, files).
* :mod:`geolora.bench.sweep`: resumable, distributable sweeps on an Optuna study.
* :mod:`geolora.bench.stats`: t-intervals, paired differences, lr robustness, the headline.
* :mod:`geolora.bench.registry`: :class:`OptimizerSpec` and the registry the bench reads.
* :mod:`geolora.bench.adapters`: :func:`adapt`, the one place that builds adapters.
* :mod:`geolora.bench.tasks`: the :class:`Task` protocol, :class:`SensingTask`,
  :class:`TeacherStudentTask`, :func:`macro_f1`.
* :mod:`geolora.bench.encoder`, :mod:`geolora.bench.minilm`: text classification with LoRA on
  an encoder (:class:`MiniLMGenreTask`, :class:`MiniLMPlayTask`, a user's checkpoint).
* :mod:`geolora.bench.runner`: :func:`run` one optimizer on one task -> :class:`RunResult`.

Importing this package imports neither ``transformers`` nor ``optuna``.
"""

from geolora.bench.adapters import adapt
from geolora.bench.minilm import MiniLMGenreTask, MiniLMPlayTask
from geolora.bench.protocol import TaskRef, compare
from geolora.bench.registry import REGISTRY, OptimizerRegistry, OptimizerSpec
from geolora.bench.runner import RunResult, run
from geolora.bench.tasks import SensingTask, Task, TaskRun, TeacherStudentTask, macro_f1

__all__ = [
    "REGISTRY",
    "MiniLMGenreTask",
    "MiniLMPlayTask",
    "OptimizerRegistry",
    "OptimizerSpec",
    "RunResult",
    "SensingTask",
    "Task",
    "TaskRef",
    "TaskRun",
    "TeacherStudentTask",
    "adapt",
    "compare",
    "macro_f1",
    "run",
]
