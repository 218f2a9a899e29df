"""The step plan of :class:`geolora.optim.base.LoRAOptimizer`.

After a step in which every pair was batched, the next steps reuse its buckets (the per-pair
phase decisions, hyperparameter keys and state look-ups are skipped) until something that
decided them changes: a group's items (an lr schedule), a pair gaining or losing its gradient,
a pair's state (``load_state_dict``, assignment), the groups; a factor changed by user code
between steps (in place, or ``p.data = t``) is read anew. These tests run every optimizer with the plan and
with the plan disabled through such changes and require bitwise equal parameters and states,
check that the plan was really used, and that a non-finite result leaves everything unwritten.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_zoo import ZOO, ZooEntry, zoo_ids

f64 = torch.float64
SHAPES = ((9, 3, 7), (9, 3, 7), (9, 3, 7), (5, 2, 6))  # a bucket of three, a bucket of one


def _model(seed: int = 0, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=f64, generator=g).to(device)

    pairs = []
    for m, r, n in SHAPES:
        pairs.append((torch.nn.Parameter(rand(m, r)), torch.nn.Parameter(rand(r, n) / n**0.5)))
    w = torch.nn.Parameter(rand(4, 3))
    targets = [rand(m, n) for m, _, n in SHAPES]
    groups = [
        {"params": [B, A], "lora_pair": True, "name": f"layer{i}"} for i, (B, A) in enumerate(pairs)
    ]
    groups.append({"params": [w]})
    return pairs, w, targets, groups


def _loss(pairs, w, targets) -> torch.Tensor:
    loss = sum(0.5 * ((B @ A - T) ** 2).sum() for (B, A), T in zip(pairs, targets))
    return loss + (w.sum() - 1.0) ** 2


def _build(entry: ZooEntry, groups, plan: bool, in_place: bool | None = None):
    kw = {"robust_steps": 0} if entry.robust_start else {}
    opt = entry.factory(groups, **kw)
    opt.commit_in_place = in_place
    used = [0]
    if plan:
        planned = opt.engine._planned_step

        def counting(p):
            ok = planned(p)
            used[0] += ok
            return ok

        opt.engine._planned_step = counting
    else:
        opt.engine._valid_plan = lambda: None  # every step takes the general path
    return opt, used


def _snapshot(opt, params) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                out.append(v.detach().clone())
    return out


def _train(
    entry: ZooEntry, plan: bool, device: torch.device | str = "cpu", in_place: bool | None = None
):
    pairs, w, targets, groups = _model(device=device)
    opt, used = _build(entry, groups, plan, in_place)
    for k in range(10):
        if k == 3:  # one pair of the bucket of three gets its own learning rate
            opt.param_groups[1]["lr"] = 0.5 * opt.param_groups[1]["lr"]
        opt.zero_grad()
        _loss(pairs, w, targets).backward()
        if k in (5, 6):  # pair 2 has no gradient for two steps (e.g. an unused adapter)
            pairs[2][0].grad = pairs[2][1].grad = None
        if k == 4:  # a pair's state dict is replaced by an equal copy (user code may do so)
            B1 = pairs[1][0]
            opt.state[B1] = copy.deepcopy(opt.state[B1])
        if k == 2:  # user code replaces a factor's data (the next step must read it)
            pairs[1][1].data = pairs[1][1].data * 0.99
        if k == 7:  # ... or changes a factor in place
            with torch.no_grad():
                pairs[0][0].mul_(1.01)
        if k == 8:  # every group's weight decay changes (same bucketing, new values)
            for g in opt.param_groups:
                if "weight_decay" in g:
                    g["weight_decay"] = 0.01
        opt.step()
    params = [p for B, A in pairs for p in (B, A)] + [w]
    return _snapshot(opt, params), used[0], opt


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_planned_steps_equal_the_general_path_bitwise(entry: ZooEntry, device) -> None:
    got, used, _ = _train(entry, plan=True, device=device)
    want, _, _ = _train(entry, plan=False, device=device)
    # the plan served the steps after which nothing changed: 1, 2, 6, 9 (and 8 where no group
    # has a weight_decay)
    assert used >= 4, f"the step plan was used in only {used} of 10 steps"
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_plan_keeps_per_pair_step_counters_and_state_dict() -> None:
    entry = next(e for e in ZOO if e.name == "lora_rite")
    _, _, opt = _train(entry, plan=True)
    steps = [int(opt.state[g["params"][0]]["step"].item()) for g in opt.param_groups[:4]]
    assert steps == [10, 10, 8, 10]  # pair 2 had no gradient in two steps
    sd = copy.deepcopy(opt.state_dict())
    assert [sd["state"][2 * i]["step"].item() for i in range(4)] == [10, 10, 8, 10]


@pytest.mark.parametrize("name", ["lora_rite", "loram_fr", "lracs"])
def test_load_state_dict_into_the_same_optimizer_resumes_exactly(name: str) -> None:
    """Loading replaces the groups and states the plan refers to: the next step re-plans."""
    entry = next(e for e in ZOO if e.name == name)
    pairs, w, targets, groups = _model()
    opt, used = _build(entry, groups, plan=True)
    params = [p for B, A in pairs for p in (B, A)] + [w]

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            _loss(pairs, w, targets).backward()
            opt.step()

    run(3)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    run(3)
    first = _snapshot(opt, params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    opt.load_state_dict(sd)
    run(3)
    assert used[0] >= 3
    for a, b in zip(first, _snapshot(opt, params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("planned", [False, True], ids=["general", "planned"])
def test_nonfinite_result_in_one_bucket_writes_no_bucket(planned: bool) -> None:
    """The results of all buckets are checked before any pair or ordinary parameter is
    written (the first bucket's result is finite, the second's is not)."""
    entry = next(e for e in ZOO if e.name == "scaled_gd")
    pairs, w, targets, groups = _model()
    opt, _ = _build(entry, groups, plan=True)
    params = [p for B, A in pairs for p in (B, A)] + [w]
    for _ in range(2):
        opt.zero_grad()
        _loss(pairs, w, targets).backward()
        opt.step()
    original = opt._update_pairs

    def poisoned(group, x, g, state, step):
        new = original(group, x, g, state, step)
        if x.M.shape[1] == 5:  # the second bucket
            return type(new)(new.M * float("nan"), new.N)
        return new

    opt._update_pairs = poisoned
    if not planned:
        opt.engine._valid_plan = lambda: None
    before = _snapshot(opt, params)
    opt.zero_grad()
    _loss(pairs, w, targets).backward()
    assert (opt.engine._valid_plan() is not None) == planned
    with pytest.raises(FloatingPointError, match="layer3"):
        opt.step()
    for a, b in zip(before, _snapshot(opt, params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_in_place_commit_equals_new_views_bitwise(entry: ZooEntry) -> None:
    """``commit_in_place`` (the accelerator default: results copied into persistent buffers and a
    staging buffer for the factors, views made once) == new views of the new tensors."""
    got, _, _ = _train(entry, plan=True, in_place=True)
    want, _, _ = _train(entry, plan=True, in_place=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_place", [True, False])
def test_in_place_commit_keeps_the_state_views(in_place: bool) -> None:
    """In place, a planned step leaves each pair's state tensors the same objects (views of the
    same buffers, updated); otherwise they are new views."""
    entry = next(e for e in ZOO if e.name == "lora_rite")
    pairs, w, targets, groups = _model()
    opt, used = _build(entry, groups, plan=True, in_place=in_place)
    for _ in range(2):
        opt.zero_grad()
        _loss(pairs, w, targets).backward()
        opt.step()
    B = pairs[0][0]
    before = dict(opt.state[B])
    value = opt.state[B]["exp_avg_M"].clone()
    opt.zero_grad()
    _loss(pairs, w, targets).backward()
    opt.step()
    assert used[0] == 2
    assert not torch.equal(opt.state[B]["exp_avg_M"], value)  # the state did change
    keys = [k for k, v in before.items() if isinstance(v, torch.Tensor)]
    keys = [k for k in keys if k not in ("step", "robust_step")]  # 0-d counters: never new
    assert len(keys) == 8
    same = [opt.state[B][k] is before[k] for k in keys]
    assert all(same) if in_place else not any(same)


def _train_scheduled(entry: ZooEntry, plan: bool, robust_change: bool = False):
    """10 steps under an lr schedule that assigns every group's lr each step (LambdaLR);
    ``robust_change``: at step 5 every group asks for more robust-start steps (the buckets'
    hyperparameter keys stay equal within each bucket)."""
    pairs, w, targets, groups = _model()
    opt, used = _build(entry, groups, plan)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.3 * k))
    for k in range(10):
        if robust_change and k == 5:
            for g in opt.param_groups:  # every pair goes back to the AdamW start
                if "robust_steps" in g:
                    g["robust_steps"] = 8
        opt.zero_grad()
        _loss(pairs, w, targets).backward()
        opt.step()
        sched.step()
    params = [p for B, A in pairs for p in (B, A)] + [w]
    return _snapshot(opt, params), used[0]


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_plan_survives_an_lr_schedule_bitwise(entry: ZooEntry) -> None:
    """A schedule changes every group's lr each step without changing the buckets: the plan is
    kept (its items are refreshed) and the result equals the general path bit for bit."""
    got, used = _train_scheduled(entry, plan=True)
    want, _ = _train_scheduled(entry, plan=False)
    assert used >= 8, f"the step plan was used in only {used} of 10 scheduled steps"
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["lora_rite", "scaled_gd", "loram_br"])
def test_plan_follows_a_robust_steps_change(name: str) -> None:
    """Raising ``robust_steps`` sends the pairs back to the AdamW start: re-planned."""
    entry = next(e for e in ZOO if e.name == name)
    got, _ = _train_scheduled(entry, plan=True, robust_change=True)
    want, _ = _train_scheduled(entry, plan=False, robust_change=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_buckets_merge_again_when_hyperparameters_become_equal() -> None:
    """A pair given its own lr leaves its bucket; given the common lr back, the plan is rebuilt
    with the pairs merged again (as the general path would group them)."""
    entry = next(e for e in ZOO if e.name == "lora_rite")
    pairs, w, targets, groups = _model()
    opt, _ = _build(entry, groups, plan=True)
    lr = opt.param_groups[1]["lr"]
    sizes = []
    for k in range(6):
        if k == 2:
            opt.param_groups[1]["lr"] = 0.5 * lr
        if k == 4:
            opt.param_groups[1]["lr"] = lr
        opt.zero_grad()
        _loss(pairs, w, targets).backward()
        opt.step()
        sizes.append(sorted(len(b.items) for b in opt.engine.plan.buckets))
    assert sizes == [[1, 3]] * 2 + [[1, 1, 2]] * 2 + [[1, 3]] * 2
