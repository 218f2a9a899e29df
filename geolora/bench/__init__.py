"""Benchmark harness behind `geolora bench`: tasks, runner, optimizer registry, perf, reports.

* :mod:`geolora.bench.registry`: :class:`OptimizerSpec` and the registry the bench reads.
* :mod:`geolora.bench.tasks`: the :class:`Task` protocol, :class:`SensingTask`,
  :class:`TeacherStudentTask`, :func:`macro_f1`.
* :mod:`geolora.bench.minilm`: :class:`MiniLMGenreTask` (LoRA on all-MiniLM-L6-v2).
* :mod:`geolora.bench.runner`: :func:`run` one optimizer on one task -> :class:`RunResult`.

Importing this package does not import ``transformers``; the MiniLM task loads it on setup.
"""

from geolora.bench.minilm import MiniLMGenreTask
from geolora.bench.registry import REGISTRY, OptimizerRegistry, OptimizerSpec
from geolora.bench.runner import RunResult, run
from geolora.bench.tasks import SensingTask, Task, TaskRun, TeacherStudentTask, macro_f1

__all__ = [
    "REGISTRY",
    "MiniLMGenreTask",
    "OptimizerRegistry",
    "OptimizerSpec",
    "RunResult",
    "SensingTask",
    "Task",
    "TaskRun",
    "TeacherStudentTask",
    "macro_f1",
    "run",
]
