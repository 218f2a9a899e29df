"""Reliability of every zoo optimizer: degenerate starts, non-finite gradients, bad input,
exact resume across processes, and the safe checkpoint loading path.

The problems are tiny LoRA regressions ``0.5‖B A − X*‖²`` (``m, n ≈ 12``, ``r = 3``) so the
whole file stays fast; the optimizers come from ``tests/optim_zoo.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bad_input_cases import CASES, HEADER, BadInput, markdown_rows  # noqa: E402
from optim_zoo import EXPECTED_NAMES, IMPORT_ERRORS, ZOO, ZooEntry, zoo_ids  # noqa: E402
from pair_problems import assert_resume_exact  # noqa: E402

from geolora.optim import AdamS  # noqa: E402
from geolora.optim.checkpoint import load_optimizer_state, save_optimizer_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO_BY_NAME = {e.name: e for e in ZOO}


def test_zoo_complete() -> None:
    """Every optimizer of the design is importable and in the zoo (fails until all landed)."""
    assert not IMPORT_ERRORS, f"zoo modules that exist but do not import: {IMPORT_ERRORS}"
    missing = [n for n in EXPECTED_NAMES if n not in ZOO_BY_NAME]
    assert not missing, f"optimizers missing from the zoo: {missing}"
    for e in ZOO:
        assert isinstance(
            e.factory([pair_group(*degenerate_init("b_zero", 6, 5, 2, 0), "p")]),
            torch.optim.Optimizer,
        )


# --- tiny LoRA regressions -------------------------------------------------------------------
def target(m: int, n: int, r: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``X* = U diag(s) Vᵀ`` of rank r with singular values evenly spaced in ``[1, 2]``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(1.0, 2.0, r, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


def pair_group(B: nn.Parameter, A: nn.Parameter, name: str) -> dict[str, Any]:
    return {"params": [B, A], "lora_pair": True, "scaling": 1.0, "name": name}


def degenerate_init(
    kind: str, m: int, n: int, r: int, seed: int
) -> tuple[nn.Parameter, nn.Parameter]:
    """Factors with a rank-deficient start: ``B = 0``, a zero column of B, two equal columns of
    B, or two equal rows of A (the other factor is a generic Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) / math.sqrt(r)
    A = torch.randn(r, n, generator=g) / math.sqrt(n)
    if kind == "b_zero":
        B.zero_()
    elif kind == "b_zero_column":
        B[:, 0] = 0.0
    elif kind == "b_duplicate_columns":
        B[:, 1] = B[:, 0]
    elif kind == "a_duplicate_rows":
        A[1] = A[0]
    else:
        raise ValueError(f"unknown init kind {kind!r}")
    return nn.Parameter(B), nn.Parameter(A)


DEGENERATE = ("b_zero", "b_zero_column", "b_duplicate_columns", "a_duplicate_rows")


MAX_STEP = 1.0  # ‖X*‖_F ≈ 2.7: no single step of a sane optimizer moves X this far


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_degenerate_starts_train(entry: ZooEntry, device) -> None:
    """1000 steps from each rank-deficient start (one pair per start, ``robust_steps=0`` so the
    switch from the AdamW start to the optimizer's own update is exercised): factors, state and
    losses stay finite, no step moves ``X`` by more than ``MAX_STEP``, every loss halves, and at
    least 990 steps are the optimizer's own (none of them AdamW without ``needs_robust_start``)."""
    m, n, r = 12, 10, 3
    pairs, targets = [], []
    for i, kind in enumerate(DEGENERATE):
        B, A = degenerate_init(kind, m, n, r, seed=10 + i)
        pairs.append((nn.Parameter(B.detach().to(device)), nn.Parameter(A.detach().to(device))))
        targets.append(target(m, n, r, seed=i).to(device))
    opt = entry.factory(
        [pair_group(B, A, k) for (B, A), k in zip(pairs, DEGENERATE)], robust_steps=0
    )

    def products() -> list[torch.Tensor]:
        return [(B @ A).detach() for B, A in pairs]

    def losses() -> torch.Tensor:
        return torch.stack([0.5 * ((B @ A - X) ** 2).sum() for (B, A), X in zip(pairs, targets)])

    with torch.no_grad():
        first = losses()
    max_step = [0.0] * len(pairs)
    worst_at = [0] * len(pairs)
    old = products()
    for t in range(1000):
        opt.zero_grad(set_to_none=True)
        losses().sum().backward()
        opt.step()
        new = products()
        for i, (a, b) in enumerate(zip(old, new)):
            d = float((b - a).norm())
            if not d <= max_step[i]:  # also catches NaN
                max_step[i], worst_at[i] = d, t
        old = new
    with torch.no_grad():
        last = losses()
    for i, (kind, (B, A), l0, l1) in enumerate(
        zip(DEGENERATE, pairs, first.tolist(), last.tolist())
    ):
        assert bool(torch.isfinite(B).all() and torch.isfinite(A).all()), (
            f"{kind}: non-finite factors"
        )
        assert max_step[i] <= MAX_STEP, (
            f"{kind}: step {worst_at[i]} moved X by {max_step[i]:.3g} (loss {l0:.4g} -> {l1:.4g})"
        )
        assert l1 < 0.5 * l0, f"{kind}: loss {l0:.4g} -> {l1:.4g} did not halve in 1000 steps"
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert bool(torch.isfinite(v).all()), f"non-finite optimizer state {k!r}"
    # The optimizer's own update ran (not only the AdamW fallback of the base class).
    for kind, (B, _) in zip(DEGENERATE, pairs):
        st = opt.state[B]
        robust, own = int(st.get("robust_step", 0)), int(st["step"])
        assert own >= 990, f"{kind}: only {own} of 1000 steps were the optimizer's own update"
        if not entry.needs_robust_start:
            assert robust == 0, f"{kind}: {robust} AdamW fallback steps"


# --- non-finite gradients --------------------------------------------------------------------
def small_model(
    seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[list[dict[str, Any]], list[nn.Parameter], list[torch.Tensor]]:
    """Two full-rank pairs ``l0`` (12x10, r 3), ``l1`` (8x12, r 2) and an ordinary group
    ``head`` (a bias of length 12) with their regression targets, on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device))

    B0 = param(torch.randn(12, 3, generator=g) / 2)
    A0 = param(torch.randn(3, 10, generator=g) / 3)
    B1 = param(torch.randn(8, 2, generator=g) / 2)
    A1 = param(torch.randn(2, 12, generator=g) / 3)
    bias = param(torch.zeros(12))
    groups = [
        pair_group(B0, A0, "l0"),
        pair_group(B1, A1, "l1"),
        {"params": [bias], "name": "head"},
    ]
    targets = [target(12, 10, 3, 1).to(device), target(8, 12, 2, 2).to(device)]
    return groups, [B0, A0, B1, A1, bias], targets


def small_loss(params: list[nn.Parameter], targets: list[torch.Tensor], step: int) -> torch.Tensor:
    """Regression with a step-dependent perturbation of the targets (a deterministic minibatch)."""
    B0, A0, B1, A1, bias = params
    g = torch.Generator().manual_seed(1000 + step)
    X0 = targets[0] + 0.1 * torch.randn(targets[0].shape, generator=g).to(targets[0].device)
    X1 = targets[1] + 0.1 * torch.randn(targets[1].shape, generator=g).to(targets[1].device)
    return 0.5 * ((B0 @ A0 + bias[:, None] - X0) ** 2).sum() + 0.5 * ((B1 @ A1 - X1) ** 2).sum()


def train(opt: torch.optim.Optimizer, params, targets, steps: range) -> None:
    for t in steps:
        opt.zero_grad(set_to_none=True)
        small_loss(params, targets, t).backward()
        opt.step()


def assert_same(a: Any, b: Any, where: str = "state_dict") -> None:
    """Bitwise equality of nested state (tensors: same dtype, shape and bits)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


BAD_GRADS = {
    "lora_B_nan": (2, "l1.lora_B", float("nan")),
    "lora_A_inf": (1, "l0.lora_A", float("inf")),
    "ordinary_neg_inf": (4, "head[0]", float("-inf")),
}


@pytest.mark.parametrize("where", list(BAD_GRADS))
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_nonfinite_gradient_raises_and_leaves_everything_untouched(
    entry: ZooEntry, where: str, device
) -> None:
    groups, params, targets = small_model(device=device)
    # robust_steps=1: the state holds the optimizer's own (post-robust-start) tensors.
    opt = entry.factory(groups, robust_steps=1)
    train(opt, params, targets, range(3))
    opt.zero_grad(set_to_none=True)
    small_loss(params, targets, 3).backward()
    idx, label, bad = BAD_GRADS[where]
    params[idx].grad[0, ...].view(-1)[0] = bad
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match=re.escape(label)):
        opt.step()
    for p, q in zip(before_params, params):
        assert torch.equal(p, q), "a parameter changed although step() raised"
    assert_same(before_state, opt.state_dict())


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_nonfinite_skip_mode_skips_the_group_and_counts(entry: ZooEntry, device) -> None:
    groups, params, targets = small_model(device=device)
    opt = entry.factory(groups, robust_steps=1, nonfinite="skip")
    train(opt, params, targets, range(3))
    B1, A1 = params[2], params[3]
    for k in (1, 2):
        before = [p.detach().clone() for p in params]
        l1_state = copy.deepcopy({i: opt.state_dict()["state"].get(i) for i in (2, 3)})
        opt.zero_grad(set_to_none=True)
        small_loss(params, targets, 2 + k).backward()
        A1.grad[0, 0] = float("nan")
        opt.step()
        assert torch.equal(before[2], B1) and torch.equal(before[3], A1), "skipped pair changed"
        for i in (0, 1, 4):
            assert not torch.equal(before[i], params[i]), f"param {i} of a finite group not updated"
        after = copy.deepcopy(opt.state_dict()["state"])
        assert after[2].pop("nonfinite_skips") == k
        if k == 2:
            l1_state[2].pop("nonfinite_skips")
        assert_same(l1_state, {i: after.get(i) for i in (2, 3)}, "l1 state")
    before = B1.detach().clone()
    train(opt, params, targets, range(5, 6))
    assert not torch.equal(before, B1), "pair not updated after the non-finite steps"
    assert opt.state[B1]["nonfinite_skips"] == 2


# --- bad input ---------------------------------------------------------------------------------
def _check_bad(case: BadInput, make, exact: bool) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is asserted below
        case.build(make)
    exc = info.value
    assert isinstance(exc, case.exc), (
        f"{case.id}: {type(exc).__name__}: {exc} (want {case.exc.__name__})"
    )
    assert case.names in str(exc), f"{case.id}: message does not name {case.names!r}: {exc}"
    if exact:
        assert case.excerpt in str(exc), f"{case.id}: {exc!s} lacks {case.excerpt!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_adams(case: BadInput) -> None:
    """Every row of docs/bad_input.md, verbatim, for AdamS."""
    _check_bad(case, AdamS, exact=True)


ALL_SCOPE = [c for c in CASES if c.scope == "all"]


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
@pytest.mark.parametrize("case", ALL_SCOPE, ids=[c.id for c in ALL_SCOPE])
def test_bad_input_every_optimizer(case: BadInput, entry: ZooEntry) -> None:
    """Rows with scope "all": same exception type, message naming the parameter/option."""
    _check_bad(case, entry.factory, exact=False)


def test_bad_input_doc_matches_cases() -> None:
    text = (ROOT / "docs" / "bad_input.md").read_text(encoding="utf-8")
    lines = [ln.rstrip() for ln in text.splitlines()]
    assert all(h in lines for h in HEADER), "docs/bad_input.md lacks the table header"
    rows = [ln for ln in lines if ln.startswith("| `")]
    assert rows == markdown_rows(), "docs/bad_input.md table != tests/bad_input_cases.py CASES"
    for c in CASES:
        assert c.names in c.excerpt, f"{c.id}: the documented excerpt must name {c.names!r}"
        assert c.scope in ("all", "adams")
    assert len({c.id for c in CASES}) == len(CASES)


def test_rejected_param_group_leaves_optimizer_unchanged() -> None:
    """A bad ``add_param_group`` on a live optimizer raises and does not keep the group."""
    groups, params, targets = small_model()
    opt = AdamS(groups[:1], lr=1e-2)
    for bad in (
        {"params": [params[2], params[3]], "lora_pair": True, "name": "l1", "lr": -1.0},
        {"params": [params[4]], "name": "head", "other_betas": (0.9, 2.0)},
    ):
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1, "the rejected group stayed in param_groups"


# --- exact resume in a new process ------------------------------------------------------------
RESUME_SPLIT, RESUME_TOTAL = 3, 7


def _resume_setup(entry: ZooEntry):
    """Model (pair l0 with B = 0 so it starts in the robust phase) + optimizer."""
    groups, params, targets = small_model(seed=3)
    with torch.no_grad():
        params[0].zero_()
    return entry.factory(groups, robust_steps=2), params, targets


def resume_worker(workdir: str) -> None:
    """Run in a fresh interpreter: load every checkpoint of ``workdir`` with
    ``torch.load(weights_only=True)``, continue training, save the final parameters."""
    torch.set_num_threads(1)
    results: dict[str, str] = {}
    for entry in ZOO:
        base = Path(workdir) / entry.name
        if not (base / "params.pt").exists():
            continue
        try:
            opt, params, targets = _resume_setup(entry)
            saved = torch.load(base / "params.pt", weights_only=True)
            with torch.no_grad():
                for p, q in zip(params, saved):
                    p.copy_(q)
            opt.load_state_dict(load_optimizer_state(base / "opt.pt"))
            train(opt, params, targets, range(RESUME_SPLIT, RESUME_TOTAL))
            torch.save([p.detach() for p in params], base / "final.pt")
            results[entry.name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported per optimizer by the test
            results[entry.name] = f"{type(exc).__name__}: {exc}"
    (Path(workdir) / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """Checkpoint every zoo optimizer after ``RESUME_SPLIT`` steps, continue all of them in ONE
    new process, and return (dir, per-optimizer result, setup errors here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("resume")
    local: dict[str, str] = {}
    try:
        for entry in ZOO:
            base = work / entry.name
            base.mkdir()
            try:
                opt, params, targets = _resume_setup(entry)
                train(opt, params, targets, range(RESUME_SPLIT))
                torch.save([p.detach().clone() for p in params], base / "params.pt")
                save_optimizer_state(opt, base / "opt.pt")
                train(opt, params, targets, range(RESUME_SPLIT, RESUME_TOTAL))
                torch.save([p.detach() for p in params], base / "uninterrupted.pt")
            except Exception as exc:  # noqa: BLE001
                local[entry.name] = f"{type(exc).__name__}: {exc}"
                (base / "params.pt").unlink(missing_ok=True)
    finally:
        torch.set_num_threads(old)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import test_reliability as t; t.resume_worker(sys.argv[2])"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, json.loads((work / "results.json").read_text()), local


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_exact_resume_in_new_process(entry: ZooEntry, resumed) -> None:
    """Train 3 steps, save params + state_dict, continue 4 steps in a new process after
    ``torch.load(weights_only=True)``: parameters equal the uninterrupted run bitwise (fp32).
    The split falls inside the robust start of pair l0 (B = 0, robust_steps = 2)."""
    work, results, local = resumed
    assert entry.name not in local, f"saving failed: {local.get(entry.name)}"
    assert results.get(entry.name) == "ok", (
        f"resume in a new process failed: {results.get(entry.name)}"
    )
    final = torch.load(work / entry.name / "final.pt", weights_only=True)
    ref = torch.load(work / entry.name / "uninterrupted.pt", weights_only=True)
    for i, (a, b) in enumerate(zip(final, ref)):
        assert a.dtype == torch.float32
        assert torch.equal(a, b), f"param {i}: max |diff| {(a - b).abs().max().item():.3g}"


def test_resume_bf16_keeps_fp32_state() -> None:
    """bf16 factors carry fp32 optimizer state; a state_dict round trip must keep it fp32."""
    g = torch.Generator().manual_seed(0)
    X = target(12, 10, 3, 0)

    def make():
        B = nn.Parameter(torch.randn(12, 3, generator=g).bfloat16())
        A = nn.Parameter(torch.randn(3, 10, generator=g).bfloat16())
        return B, A, AdamS([pair_group(B, A, "l0")], lr=1e-2, robust_steps=0)

    def loss(B, A):
        return 0.5 * ((B.float() @ A.float() - X) ** 2).sum()

    def state_kept(sd, opt2):
        assert_same(sd["state"], opt2.state_dict()["state"])

    assert_resume_exact(make, loss, split=3, total=5, check_loaded=state_kept)


# --- checkpoint security -----------------------------------------------------------------------
class _Payload:
    """Unpickling this calls ``open(path, "w")``: a visible side effect standing in for any code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = {"state": {0: {"exp_avg": _Payload(str(marker))}}, "param_groups": [{"params": [0]}]}
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="refused to load optimizer state") as info:
        load_optimizer_state(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the payload ran"
    # The payload is live: the unrestricted unpickler does run it.
    torch.load(path, weights_only=False)["state"][0]["exp_avg"].close()
    assert marker.exists()


def test_checkpoint_helpers_are_exported() -> None:
    """The documented loading path is ``geolora.optim.load_optimizer_state``."""
    import geolora.optim

    assert geolora.optim.load_optimizer_state is load_optimizer_state
    assert geolora.optim.save_optimizer_state is save_optimizer_state


def test_save_refuses_state_that_would_not_load(tmp_path: Path) -> None:
    bad = {"state": {0: {"fn": _Payload(str(tmp_path / "x"))}}, "param_groups": []}
    with pytest.raises(TypeError, match=re.escape("state[0]['fn'] is a _Payload")):
        save_optimizer_state(bad, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(TypeError, match="optimizer_or_state"):
        save_optimizer_state([1, 2], tmp_path / "bad.pt")


def test_load_rejects_non_optimizer_files(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        load_optimizer_state(tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_optimizer_state(tmp_path / "junk.pt")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    groups, params, targets = small_model()
    opt = AdamS(groups, lr=1e-2, robust_steps=1)
    train(opt, params, targets, range(3))
    save_optimizer_state(opt, tmp_path / "opt.pt")
    assert_same(opt.state_dict(), load_optimizer_state(tmp_path / "opt.pt"))
