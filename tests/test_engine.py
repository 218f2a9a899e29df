"""The step engine's guarantees (geolora/optim/engine.py, validation.py, adamw.py):

* a step that raises changes nothing — robust-start pairs, bucketed pairs and ordinary groups
  are all computed and checked before any is written (a NaN learning rate from a schedule, a
  finite lr large enough to overflow);
* an optimizer state that would become non-finite (a finite but huge gradient) is caught at the
  step that produces it: ``"raise"`` leaves everything untouched, ``"skip"`` skips the pair;
* ``load_state_dict`` validates before it accepts: another class, rank or shape, missing keys,
  wrongly shaped tensors and hyperparameters the constructor would reject raise ``ValueError``
  and leave the optimizer unchanged and usable;
* convolution factors train through their matrix views.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from optim_zoo import ZOO, ZooEntry, zoo_ids
from test_reliability import assert_same, small_loss, small_model, train

from geolora.optim import AdamS, LoRAPlus, LoRARite
from geolora.optim.checkpoint import load_optimizer_state, save_optimizer_state


def _mixed_phases(entry: ZooEntry, **kw):
    """Pair l0 (B = 0) stays in the robust start, l1 takes the optimizer's own update, and the
    ordinary group ``head`` takes AdamW — after three steps, all three paths are live."""
    groups, params, targets = small_model()
    groups[0]["robust_steps"] = 50
    with torch.no_grad():
        params[0].zero_()
    opt = entry.factory(groups, robust_steps=0, **kw)
    train(opt, params, targets, range(3))
    return opt, params, targets


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(opt, params, snap) -> None:
    """Parameters and optimizer state bitwise as in ``snap`` (the param groups hold what the
    test assigned, e.g. a NaN lr)."""
    before_params, before_state = snap
    for i, (p, q) in enumerate(zip(before_params, params)):
        assert torch.equal(p, q), f"parameter {i} changed although step() raised"
    assert_same(before_state, opt.state_dict()["state"])


def _bad_lr(entry: ZooEntry, lr: float):
    """Three ordinary steps, then every group's lr set to ``lr`` (what a schedule does) and the
    gradients of the fourth step computed; returns the optimizer, params and a snapshot."""
    opt, params, targets = _mixed_phases(entry)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    small_loss(params, targets, 3).backward()
    return opt, params, _snapshot(opt, params)


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_nan_lr_from_a_schedule_changes_nothing(entry: ZooEntry) -> None:
    opt, params, snap = _bad_lr(entry, float("nan"))
    with pytest.raises(ValueError, match="invalid lr: nan"):
        opt.step()
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_overflowing_lr_raises_cleanly_or_stays_finite(entry: ZooEntry) -> None:
    """A finite lr of 3e38 overflows some update: then the step raises FloatingPointError (not
    a raw RuntimeError) and writes nothing; where nothing overflows, all results are finite."""
    opt, params, snap = _bad_lr(entry, 3e38)
    try:
        opt.step()
    except FloatingPointError as exc:
        assert "nothing was updated" in str(exc)
        _assert_unchanged(opt, params, snap)
    else:
        assert all(bool(torch.isfinite(p).all()) for p in params)


def test_overflowing_lr_is_caught_for_the_ordinary_and_robust_paths() -> None:
    """AdamW's step size lr / (1 − β₁) overflows float32 at lr = 3e38: the robust pair and the
    ordinary group would have been written with inf before (issue: reliability II)."""
    opt, params, snap = _bad_lr(next(e for e in ZOO if e.name == "adams"), 3e38)
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    _assert_unchanged(opt, params, snap)


def test_inf_lr_is_refused_at_construction_and_in_add_param_group() -> None:
    with pytest.raises(ValueError, match="invalid lr: inf"):
        AdamS(small_model()[0], lr=float("inf"))
    groups, _, _ = small_model()
    opt = AdamS(groups[:1], lr=1e-2)
    with pytest.raises(ValueError, match="invalid lr: inf"):
        opt.add_param_group(groups[1] | {"lr": float("inf")})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="invalid other_lr: -1"):
        AdamS(small_model()[0], lr=1e-2, other_lr=-1.0)


# --- non-finite optimizer state ----------------------------------------------------------------
def _huge_gradient_step(opt, params, targets):
    opt.zero_grad(set_to_none=True)
    small_loss(params, targets, 3).backward()
    params[3].grad[0, 0] = 1e30  # l1.lora_A: finite, but its square overflows float32


def _all_state_finite(opt) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_huge_gradient_never_leaves_a_nonfinite_state(entry: ZooEntry) -> None:
    """raise mode: the step that would make the state non-finite raises and writes nothing, and
    the adapter keeps training on the next (ordinary) steps; an optimizer whose state stays
    finite takes the step (SGD-like ones then hold huge but finite factors)."""
    opt, params, targets = _mixed_phases(entry)
    _huge_gradient_step(opt, params, targets)
    snap = _snapshot(opt, params)
    try:
        opt.step()
    except FloatingPointError as exc:
        assert "l1" in str(exc) and "nothing was updated" in str(exc)
        _assert_unchanged(opt, params, snap)
        before = params[2].detach().clone()
        train(opt, params, targets, range(4, 6))
        assert not torch.equal(before, params[2]), "l1 stopped moving"
    assert _all_state_finite(opt)
    assert all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_huge_gradient_skip_mode_skips_only_that_pair(entry: ZooEntry) -> None:
    opt, params, targets = _mixed_phases(entry, nonfinite="skip")
    _huge_gradient_step(opt, params, targets)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert _all_state_finite(opt)
    skipped = opt.state[params[2]].get("nonfinite_skips", 0)
    for i in (0, 1, 4):
        assert not torch.equal(before[i], params[i]), f"parameter {i} was not updated"
    if skipped:
        assert skipped == 1
        assert torch.equal(before[2], params[2]) and torch.equal(before[3], params[3])
        before = params[2].detach().clone()
        train(opt, params, targets, range(4, 6))
        assert not torch.equal(before, params[2]), "l1 stopped moving"


def test_adams_state_overflow_is_reported_as_state() -> None:
    """AdamS keeps a dense float32 second moment: 1e30² overflows it (the issue's report)."""
    entry = next(e for e in ZOO if e.name == "adams")
    opt, params, targets = _mixed_phases(entry)
    _huge_gradient_step(opt, params, targets)
    with pytest.raises(FloatingPointError, match="optimizer state of l1"):
        opt.step()


# --- load_state_dict validates before it accepts -----------------------------------------------
def _trained(entry: ZooEntry, rank_l0: int = 3, seed: int = 0):
    groups, params, targets = small_model(seed=seed)
    if rank_l0 != 3:
        B0 = torch.nn.Parameter(torch.randn(12, rank_l0) / 2)
        A0 = torch.nn.Parameter(torch.randn(rank_l0, 10) / 3)
        groups[0]["params"] = [B0, A0]
        params[0], params[1] = B0, A0
    opt = entry.factory(groups, robust_steps=1)
    train(opt, params, targets, range(3))
    return opt, params, targets


def _corruptions(entry: ZooEntry):
    """``(id, make_bad_state(good_state) -> state, excerpt of the error)``."""

    def first_tensor_key(sd):
        keys = [k for k, v in sd["state"][0].items() if torch.is_tensor(v) and v.dim() > 0]
        return keys[0] if keys else "step"

    def drop_key(sd):
        sd["state"][0].pop(first_tensor_key(sd))
        return sd

    def bad_shape(sd):
        k = first_tensor_key(sd)
        sd["state"][0][k] = torch.zeros(7, 7, dtype=sd["state"][0][k].dtype)
        return sd

    def group(key, value):
        def f(sd):
            sd["param_groups"][0][key] = value
            return sd

        return f

    def other_class(sd):
        sd["optimizer_class"] = "SomethingElse"
        return sd

    return [
        ("missing_key", drop_key, "lacks key"),
        ("bad_shape", bad_shape, "has shape (7, 7)"),
        ("betas_one", group("robust_betas", (1.0, 0.999)), "robust_betas[0]"),
        ("negative_robust_steps", group("robust_steps", -1), "robust_steps"),
        ("negative_scaling", group("scaling", -1.0), "scaling"),
        ("nan_lr", group("lr", float("nan")), "invalid lr: nan"),
        ("other_class", other_class, "saved by SomethingElse"),
    ]


CORRUPTIONS = [c[0] for c in _corruptions(ZOO[0])]


@pytest.mark.parametrize("which", CORRUPTIONS)
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_bad_state_dict_is_refused_and_the_optimizer_stays_usable(
    entry: ZooEntry, which: str
) -> None:
    opt, params, targets = _trained(entry)
    twin, twin_params, _ = _trained(entry)
    good = opt.state_dict()
    _, corrupt, excerpt = next(c for c in _corruptions(entry) if c[0] == which)
    bad = corrupt(copy.deepcopy(good))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape(excerpt)):
        opt.load_state_dict(bad)
    assert_same(before, opt.state_dict())
    train(opt, params, targets, range(3, 5))  # still usable, and exactly as before
    train(twin, twin_params, targets, range(3, 5))
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_state_of_another_rank_is_refused_where_it_depends_on_the_rank(entry: ZooEntry) -> None:
    """A rank-2 pair's state loaded into a rank-3 pair: refused when the state's shapes depend
    on r (factor-space, r x r or manifold states); matrix-space states (m x n moments, RACS
    scales) are the same object at every rank and load."""
    src, _, _ = _trained(entry, rank_l0=2)
    opt, params, targets = _trained(entry)
    shapes = [
        {k: tuple(v.shape) for k, v in o.state_dict()["state"][0].items() if torch.is_tensor(v)}
        for o in (src, opt)
    ]
    if shapes[0] != shapes[1]:
        with pytest.raises(ValueError, match=r"of l0.lora_B has shape"):
            opt.load_state_dict(src.state_dict())
    else:
        opt.load_state_dict(src.state_dict())
        train(opt, params, targets, range(3, 4))
        assert all(bool(torch.isfinite(p).all()) for p in params)


def test_state_of_another_optimizer_is_refused() -> None:
    groups, params, targets = small_model()
    a = LoRAPlus(groups, lr=1e-3)
    train(a, params, targets, range(2))
    groups2, _, _ = small_model()
    b = LoRARite(groups2, lr=1e-3)
    with pytest.raises(ValueError, match="saved by LoRAPlus, not LoRARite"):
        b.load_state_dict(a.state_dict())


def test_truncated_checkpoint_is_a_value_error(tmp_path) -> None:
    groups, params, targets = small_model()
    opt = AdamS(groups, lr=1e-2, robust_steps=1)
    train(opt, params, targets, range(2))
    path = tmp_path / "opt.pt"
    save_optimizer_state(opt, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    lengths = sorted({0, 1, 10, 100, len(data) // 3, len(data) // 2, len(data) - 1} | {
        int(len(data) * f) for f in (0.05, 0.25, 0.75, 0.9, 0.99)
    })
    for n in lengths:
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.pt"):
            load_optimizer_state(cut)


# --- convolution factors -----------------------------------------------------------------------
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_conv_factors_train_like_their_matrix_views(entry: ZooEntry) -> None:
    """A conv pair ``B: (out, r, 1, 1)``, ``A: (r, in, k, k)`` follows the same trajectory as the
    2-D pair ``B.view(out, r)``, ``A.view(r, in·k·k)`` (bitwise)."""
    g = torch.Generator().manual_seed(5)
    out, r, cin, k = 6, 2, 3, 2
    B4 = torch.nn.Parameter(torch.randn(out, r, 1, 1, generator=g) / 2)
    A4 = torch.nn.Parameter(torch.randn(r, cin, k, k, generator=g) / 3)
    B2 = torch.nn.Parameter(B4.detach().view(out, r).clone())
    A2 = torch.nn.Parameter(A4.detach().view(r, -1).clone())
    X = torch.randn(out, cin * k * k, generator=g)

    def run(B, A):
        opt = entry.factory([{"params": [B, A], "lora_pair": True, "name": "c"}], robust_steps=1)
        for _ in range(4):
            opt.zero_grad()
            (0.5 * (B.view(out, r) @ A.view(r, -1) - X).pow(2).sum()).backward()
            opt.step()

    run(B4, A4)
    run(B2, A2)
    assert B4.shape == (out, r, 1, 1) and A4.shape == (r, cin, k, k)
    assert torch.equal(B4.detach().view(out, r), B2.detach())
    assert torch.equal(A4.detach().view(r, -1), A2.detach())
    assert bool(torch.isfinite(B4.detach()).all())


def test_bad_input_page_lists_the_step_and_load_cases() -> None:
    """docs/bad_input.md's step/load table names every case tested here."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "bad_input.md").read_text()
    section = text.split("## During a step and at load time")[1].split("## LoRA tooling")[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")}
    expected = set(CORRUPTIONS) | {
        "nan_lr_schedule",
        "overflowing_lr",
        "state_overflow",
        "other_rank",
        "truncated_file",
    }
    assert rows - {"case", "---"} == expected
