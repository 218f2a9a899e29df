"""Benchmark harness: tasks, registry, runner, macro-F1 and the MiniLM task."""

from __future__ import annotations

import io
import math

import pytest
import torch

from geolora.bench import registry
from geolora.bench.minilm import MiniLMGenreTask, load_minilm, masked_mean
from geolora.bench.registry import OptimizerRegistry, OptimizerSpec
from geolora.bench.runner import RunResult, optimizer_state_bytes, run
from geolora.bench.tasks import SensingTask, Task, TeacherStudentTask, macro_f1


def _assert_finite_result(res: RunResult, steps: int) -> None:
    assert not res.diverged and res.error is None
    assert res.steps == res.requested_steps == steps == len(res.losses)
    for value in (res.lr, res.ms_per_step, res.ms_optimizer_step, res.state_mib, res.wall_s):
        assert math.isfinite(value) and value > 0
    assert res.ms_optimizer_step <= res.ms_per_step
    assert res.metrics and all(math.isfinite(v) for v in res.metrics.values())
    assert all(math.isfinite(v) for v in res.losses)


@pytest.mark.parametrize(
    "task", [SensingTask(), TeacherStudentTask()], ids=["sensing", "teacher_student"]
)
def test_synthetic_tasks_train_with_adamw(task: Task) -> None:
    assert isinstance(task, Task)
    res = run(task, "adamw", lr=1e-2, steps=60, seed=3)
    _assert_finite_result(res, 60)
    first, last = res.losses[:5], res.losses[-5:]
    assert sum(last) < 0.5 * sum(first)
    assert res.metrics["final_train_loss"] == pytest.approx(sum(res.losses[-6:]) / 6)


def test_sensing_metric_falls_and_teacher_excess_is_consistent() -> None:
    sensing = run(SensingTask(), "adamw", lr=1e-2, steps=150)
    assert sensing.metrics["rel_error"] < 0.1
    ts = run(TeacherStudentTask(), "adamw", lr=1e-2, steps=200)
    m = ts.metrics
    assert m["excess_mse"] == pytest.approx(m["test_mse"] - m["optimum_mse"])
    # noise 0.1 -> the teacher's own test MSE is close to 0.01
    assert m["optimum_mse"] == pytest.approx(0.01, rel=0.1)
    assert 0 < m["excess_mse"] < m["optimum_mse"]


def test_runs_are_deterministic_and_seed_dependent() -> None:
    task = TeacherStudentTask()
    a = run(task, "adamw", steps=20, seed=1)
    b = run(task, "adamw", steps=20, seed=1)
    c = run(task, "adamw", steps=20, seed=2)
    assert a.losses == b.losses and a.metrics == b.metrics
    assert a.losses != c.losses


def test_factor_scale_keeps_delta_and_moves_factors() -> None:
    task = SensingTask()
    base = task.setup(0, 8, "cpu", dtype=torch.float64)
    scaled = task.setup(0, 8, "cpu", dtype=torch.float64, factor_scale=2)
    torch.testing.assert_close(scaled.model.delta(), base.model.delta(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scaled.model.B, 100 * base.model.B, rtol=1e-12, atol=0)
    # AdamW is not gauge invariant: the same ΔW start gives a different trajectory
    r0 = run(task, "adamw", lr=1e-2, steps=30, dtype=torch.float64)
    r2 = run(task, "adamw", lr=1e-2, steps=30, dtype=torch.float64, factor_scale=2)
    assert r0.losses[0] == pytest.approx(r2.losses[0], rel=1e-10)
    assert abs(r0.losses[-1] - r2.losses[-1]) > 1e-3 * r0.losses[0]


def test_adamw_state_memory_is_exact() -> None:
    task = SensingTask(m=48, n=40)
    setup = task.setup(0, 8, "cpu")
    opt = registry.get("adamw").build(setup.param_groups(), 1e-2)
    setup.loss(None).backward()
    opt.step()
    n = 48 * 8 + 8 * 40
    # exp_avg + exp_avg_sq (float32) per element, plus a float32 'step' tensor per parameter
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 2 * 4
    res = run(task, "adamw", steps=4)
    assert res.state_mib * 2**20 == 2 * 4 * n + 2 * 4


def test_macro_f1_hand_checked() -> None:
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 2, FP 1, FN 0 -> 4/5
    expected = (1 / 2 + 2 / 3 + 4 / 5) / 3
    assert macro_f1(pred, target, 3) == pytest.approx(expected, abs=1e-15)
    # a class absent from both pred and target does not count
    assert macro_f1(pred, target, 5) == pytest.approx(expected, abs=1e-15)
    assert macro_f1(target, target, 3) == 1.0
    # predicting one class only: F1 of the others is 0
    assert macro_f1(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 2]), 3) == pytest.approx(
        (2 * 2 / (4 + 2)) / 3
    )
    with pytest.raises(ValueError, match="pred"):
        macro_f1(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="pred"):
        macro_f1(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)


def test_registry_lookup_and_errors() -> None:
    assert "adamw" in registry.names()
    spec = registry.get("adamw")
    assert spec.invariant is False and spec.default_lr > 0
    with pytest.raises(ValueError, match="adamw"):
        registry.get("no-such-optimizer")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)
    with pytest.raises(ValueError, match="default_lr"):
        OptimizerSpec("x", torch.optim.SGD, default_lr=-1.0, invariant=False, description="")
    with pytest.raises(TypeError, match="factory"):
        OptimizerSpec("x", 3, default_lr=1.0, invariant=False, description="")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known optimizers: adamw"):
        run(SensingTask(), "nope", steps=2)
    with pytest.raises(ValueError, match="steps"):
        run(SensingTask(), "adamw", steps=0)
    with pytest.raises(ValueError, match="rank"):
        run(SensingTask(), "adamw", steps=2, rank=0)


def test_task_learning_rates() -> None:
    assert run(SensingTask(), "adamw", steps=2).lr == SensingTask.default_lrs["adamw"]
    assert run(SensingTask(lr_overrides={"adamw": 0.5}), "adamw", steps=2).lr == 0.5
    assert run(SensingTask(), "adamw", steps=2, lr=0.25).lr == 0.25


def test_adamw_keeps_geolora_group_keys() -> None:
    setup = TeacherStudentTask().setup(0, 4, "cpu")
    opt = registry.get("adamw").build(setup.param_groups())
    (group,) = opt.param_groups
    assert group["lora_pair"] is True and group["name"] == "delta" and group["lr"] == 1e-3
    assert group["weight_decay"] == 0.0


def test_divergence_and_numerical_errors_stop_the_run() -> None:
    reg = OptimizerRegistry()
    reg.register(
        OptimizerSpec("sgd", lambda g, lr, **kw: torch.optim.SGD(g, lr=lr), 1e-2, False, "plain SGD")
    )

    class Failing(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            raise torch.linalg.LinAlgError("cholesky failed")

    reg.register(OptimizerSpec("fail", lambda g, lr, **kw: Failing(g, lr=lr), 1e-2, False, "fails"))
    blown = run(SensingTask(), "sgd", lr=1e6, steps=50, registry=reg)
    assert blown.diverged and blown.steps < 50 and not math.isfinite(blown.losses[-1])
    assert blown.to_dict()["losses"][-1] is None
    failed = run(TeacherStudentTask(), "fail", steps=5, registry=reg)
    assert failed.diverged and failed.steps == 0 and "cholesky failed" in failed.error


def test_progress_bar_is_advanced() -> None:
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=io.StringIO())) as progress:
        run(SensingTask(), "adamw", steps=7, progress=progress)
        (bar,) = progress.tasks
        assert bar.completed == bar.total == 7 and "adamw" in bar.description


def test_minilm_task_trains_from_the_packaged_model(tmp_path) -> None:
    kw = dict(top_layers=1, n_train=8, n_val=4, n_test=6, batch_size=4, max_length=64,
              cache_dir=tmp_path, cache_dtype=torch.float32, eval_every=1)
    task = MiniLMGenreTask(**kw)
    res = run(task, "adamw", steps=2, seed=0, rank=4)
    assert res.steps == 2 and all(math.isfinite(v) for v in res.losses)
    for split in ("", "val_"):
        assert 0 <= res.metrics[f"{split}accuracy"] <= 1 and 0 <= res.metrics[f"{split}macro_f1"] <= 1
        assert math.isfinite(res.metrics[f"{split}loss"])
    # validation curve every step (eval_every=1): the last point is the final validation value
    assert [p[0] for p in res.val_curve] == [1, 2]
    assert res.val_curve[-1][1] == res.metrics["val_accuracy"]
    assert run(task, "adamw", steps=2, seed=0, rank=4).losses == res.losses
    assert run(task, "adamw", steps=2, seed=1, rank=4).losses != res.losses

    setup = task.setup(0, 4, "cpu")
    groups = setup.param_groups()
    pairs = [g for g in groups if g.get("lora_pair")]
    assert len(pairs) == 6 and all(g["scaling"] == 16 / 4 for g in pairs)
    assert groups[-1]["name"] == "other" and len(groups[-1]["params"]) == 2  # head weight + bias

    # with B = 0 the cached lower layers + adapted top layer reproduce the full model exactly
    bert, tokenizer = load_minilm()
    test = task._records()["test"]
    enc = tokenizer([r["text"] for r in test], padding="max_length", truncation=True,
                    max_length=task.max_length, return_tensors="pt")
    encoded = task._encoded["test"]
    assert encoded.labels.tolist() == [r["label"] for r in test]
    with torch.no_grad():
        setup.model.eval()
        ref = masked_mean(bert(**enc).last_hidden_state, enc["attention_mask"])
        mine = setup.model.encode(encoded.hidden, encoded.mask)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)

    # a second task object reads the disk cache instead of recomputing it
    (cache_file,) = tmp_path.glob("minilm-genre-*.pt")
    again = MiniLMGenreTask(**kw)
    again.prepare()
    assert torch.equal(again._encoded["train"].hidden, task._encoded["train"].hidden)
    assert len(list(tmp_path.glob("minilm-genre-*.pt"))) == 1 and cache_file.exists()

    # validation plays are training plays, never test plays, and never in the training subset
    from geolora.bench.minilm import VAL_PLAYS
    from geolora.data import load_shakespeare_genre

    val_texts = {r["text"] for r in load_shakespeare_genre("train") if r["play"] in VAL_PLAYS}
    recs = task._records()
    assert all(r["text"] in val_texts for r in recs["val"])
    assert not any(r["text"] in val_texts for r in recs["train"])
    assert 0 < task.baseline() <= 1


def test_minilm_all_layers_and_play_task(tmp_path) -> None:
    import geolora.bench.catalog  # noqa: F401  (registers adams)
    from geolora.bench.minilm import MiniLMPlayTask

    genre = MiniLMGenreTask(n_train=4, n_val=2, n_test=2, batch_size=2, cache_dir=tmp_path)
    setup = genre.setup(0, 2, "cpu")
    pairs = [g for g in setup.param_groups() if g.get("lora_pair")]
    assert len(pairs) == 6 * 6  # every linear layer of the six layers
    plays = MiniLMPlayTask(n_train=8, n_val=4, n_test=4, batch_size=4, cache_dir=tmp_path)
    assert plays.num_classes == 37 and len(plays.label_names) == 37
    recs = plays._records()
    texts = [r["text"] for s in ("train", "val", "test") for r in recs[s]]
    assert len(texts) == len(set(texts)) == 16  # disjoint splits
    res = run(plays, "adams", steps=2, rank=2)
    assert res.steps == 2 and 0 <= res.metrics["accuracy"] <= 1
    # init-scale runs: a nonzero init moved along the gauge orbit keeps ΔW
    a = plays.setup(0, 2, "cpu", init="gaussian", dtype=torch.float64)
    b = plays.setup(0, 2, "cpu", init="gaussian", factor_scale=2, dtype=torch.float64)
    ga, gb = [[g for g in s.param_groups() if g.get("lora_pair")][0] for s in (a, b)]
    torch.testing.assert_close(gb["params"][0], 100 * ga["params"][0])
    torch.testing.assert_close(gb["params"][0] @ gb["params"][1], ga["params"][0] @ ga["params"][1])
    assert float(ga["params"][0].detach().abs().max()) > 0


def test_minilm_task_validates_arguments() -> None:
    quick = MiniLMGenreTask.quick(top_layers=1)
    assert (quick.n_train, quick.n_test, quick.default_steps, quick.top_layers) == (1024, 512, 40, 1)
    with pytest.raises(ValueError, match="top_layers"):
        MiniLMGenreTask(top_layers=0)
    with pytest.raises(ValueError, match="n_train"):
        MiniLMGenreTask(n_train=4, batch_size=8)
    with pytest.raises(TypeError, match="target"):
        MiniLMGenreTask(target="query")


def test_full_training_step_benchmark_times_both_optimizers():
    """``geolora bench --perf --full-step``: a real MiniLM LoRA step per optimizer and AdamW."""
    from geolora.bench.perf import bench_training_step

    (res,) = bench_training_step(["scaled_gd"], 2, batch_size=2, seq_len=8, steps=1, warmup=1)
    assert res.optimizer == "scaled_gd" and res.rank == 2
    assert res.step_ms > 0 and res.adamw_ms > 0
    assert abs(res.ratio - res.step_ms / res.adamw_ms) < 1e-12


def test_task_ref_passes_top_layers() -> None:
    from geolora.bench.protocol import TaskRef

    assert TaskRef("plays", options={"top_layers": None}).build().top_layers is None
    assert TaskRef("plays").build().top_layers == 1
    assert TaskRef("minilm", options={"top_layers": 2}).build().top_layers == 2
    assert TaskRef("minilm", quick=True).build().default_steps == 40
