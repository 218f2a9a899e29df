"""The step engine of every geolora LoRA optimizer: buckets, step plans, stacking and commit.

The template (:mod:`geolora.optim.base`) says what one step of a stack of LoRA pairs computes;
this module makes a whole ``optimizer.step()`` out of it:

1. **Check.** Learning rates (a schedule assigns them every step) and gradients (one
   ``torch._foreach_norm`` over all of them; NaN/inf raises or, with ``nonfinite="skip"``, skips
   the group).
2. **Sort.** Each pair with a gradient goes to the robust start (AdamW on its factors, while
   rank deficient or inside ``robust_steps``), is entered onto its manifold without an update
   (``"refactor"``), or joins the *bucket* of the pairs with equal ``(m, n, r, dtype, device)``,
   hyperparameters and step count. Ordinary groups take AdamW (:mod:`geolora.optim.adamw`).
3. **Compute.** Each bucket's factors, gradients and states are stacked into ``(L, m, r)``
   tensors and handed to the optimizer's ``_update_pairs`` in one call (``foreach=False``: one
   pair at a time, the reference path the tests compare with). Robust and ordinary updates are
   computed on copies.
4. **Check, then write.** All results — new factors, new parameters and new state tensors —
   are checked for finiteness together (one host sync). Only then is anything written; a
   non-finite result raises ``FloatingPointError`` with nothing modified (``"skip"`` mode: the
   pairs/groups concerned are skipped and counted, the rest is recomputed without them).

Between steps each pair's state tensors (``step`` included) are views ``buffer[i]`` of one
stacked buffer per bucket and key, reused by the bucket's next step without re-stacking (any
replaced tensor, e.g. after ``load_state_dict``, is simply stacked again).

A step in which every pair was batched leaves a *plan* (its buckets); the next steps reuse it —
no per-pair phase decision, hyperparameter key or state look-up, one finiteness check of the
stacked gradients — while the groups, the pairs' state dicts and which pairs have gradients stay
the same and changed group items (an lr schedule) leave the buckets as they were (anything else
re-plans).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.adamw import PendingAdamW, ordinary_group_update
from geolora.optim.sharding import (
    LOCAL,
    CommStats,
    PairShards,
    StepComm,
    local_tensor,
    pair_shards,
)
from geolora.optim.validation import check_lr, group_kind, matrix_view, param_label

if TYPE_CHECKING:
    from geolora.optim.base import LoRAOptimizer


__all__ = ["StepEngine", "all_finite"]

#: State keys that are counters or flags, never stacked.
SCALAR_KEYS = frozenset({"step", "robust_step", "full_rank", "pair", "nonfinite_skips"})
#: Group keys that label a pair and do not change its update (left out of the bucket key).
GROUP_LABEL_KEYS = frozenset({"params", "name", "adapter", "param_names"})


@dataclass
class _Item:
    """One LoRA pair of a bucket: its group, parameters, their matrix views and its state dict
    as the step uses it (the stored dict, or a new one when the step adds or removes keys).

    For sharded factors (``shards``, :mod:`geolora.optim.sharding`) ``Bm``/``Am`` are the
    tensors the math sees when the plan is made (local rows, or gathered whole factors)."""

    group: dict
    B: Tensor
    A: Tensor
    Bm: Tensor
    Am: Tensor
    state: dict
    shards: PairShards | None = None
    fresh: bool = True  # Bm, Am are current (made in this step's planning)

    def grads(self) -> tuple[Tensor, Tensor]:
        """The factor gradients (local shards of sharded ones; zeros where missing)."""
        if self.shards is None:
            return matrix_view(_grad(self.B)), matrix_view(_grad(self.A))
        return self.shards.local_grads()

    def targets(self) -> tuple[Tensor, Tensor]:
        """The tensors the new factors are written into (local shards of sharded ones)."""
        if self.shards is None:
            return self.Bm, self.Am
        return self.shards.local_factors()

    def side(self, opt: Any, key: str) -> str | None:
        return None if self.shards is None else opt._state_side(key, self.group)


@dataclass
class _Bucket:
    """Pairs stepped together: their items and step counters (the views after the last
    commit), plus staging buffers of the in-place commit."""

    items: list[_Item]
    steps: list[Tensor]
    staging: dict[str, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)
    #: ``(B stack (L, m, r), A stack (L, r, n))`` in the parameters' dtype: the values the last
    #: commit wrote into the (ordinary, unsharded) factors, and the version counters of the
    #: factors and of the stacks after that write. While the counters are unchanged (no in-place
    #: write, ``load_state_dict`` or ``nn.init`` on a factor since), the next step of the bucket
    #: reads the stacks instead of stacking the factors again.
    factors: tuple[Tensor, Tensor] | None = None
    versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: the bucket's identity: its pairs' ``B`` (state caches are kept per key)
        self.key: tuple[int, ...] = tuple(id(it.B) for it in self.items)
        self._params = [t for it in self.items for t in (it.B, it.A)]

    @classmethod
    def of(cls, items: list[_Item]) -> _Bucket:
        return cls(items, [it.state["step"] for it in items])

    def stacked_grads(self) -> FactorTangent:
        """``(∇_M, ∇_N)`` stacked in the compute dtype (``∇_N`` stored like ``N``: the
        contiguous A gradients stacked as they are and seen transposed, column-major — stacking
        transposed views would copy each with its own strided kernel on CUDA)."""
        cdt = compute_dtype(self.items[0].Bm.dtype)
        grads = [it.grads() for it in self.items]
        gB = [g[0] for g in grads]
        gA = [g[1] for g in grads]
        shards = self.shards
        if shards is not None and "gather" in shards.sides:  # one gather per side and bucket
            gM = shards.math_stack(gB, 0)
            gN = shards.math_stack(gA, 1).transpose(-1, -2).contiguous()
            return FactorTangent(gM.to(cdt), gN.to(cdt))
        return FactorTangent(torch.stack(gB).to(cdt), _stack_transposed(gA).to(cdt))

    def stacked_factors(self, cdt: torch.dtype) -> FactorPoint:
        """``(M, N)`` stacked in the compute dtype: the plan's ``Bm``, ``Am`` (local rows, or
        whole factors gathered in the step that made the plan), else gathered sides gathered
        anew, one collective per side for the bucket."""
        items = self.items
        shards = self.shards
        if self.factors is not None and self.versions == self.factor_versions():
            MB, AB = self.factors
            return FactorPoint(MB.to(cdt), AB.mT.to(cdt))
        fresh = all(it.fresh for it in items)
        for it in items:
            it.fresh = False
        if shards is None or "gather" not in shards.sides or fresh:
            M = torch.stack([it.Bm for it in items]).to(cdt)
            return FactorPoint(M, _stack_transposed([it.Am for it in items]).to(cdt))
        local = [it.targets() for it in items]
        M = shards.math_stack([t[0] for t in local], 0)
        N = shards.math_stack([t[1] for t in local], 1).transpose(-1, -2).contiguous()
        return FactorPoint(M.to(cdt), N.to(cdt))

    @property
    def shards(self) -> PairShards | None:
        """The layout shared by the bucket's pairs (``None``: ordinary tensors)."""
        return self.items[0].shards

    def factor_versions(self) -> list[int]:
        """Version counters and data pointers of the factors (their matrix views share them;
        ``p.data = t`` changes the pointer, not the counter) and the version counters of the
        kept stacks (:attr:`factors`; an in-place change of a stack by the step invalidates
        it)."""
        params = self._params
        out = [t._version for t in params]
        out += [t.data_ptr() for t in params]
        if self.factors is not None:
            out += [t._version for t in self.factors]
        return out


@dataclass
class _StepPlan:
    """The buckets of the last step, reused while nothing that decided them has changed (see
    :meth:`StepEngine._valid_plan`)."""

    groups: list[dict]
    checks: list[tuple[dict, tuple]]  # (pair group, its items) of every bucketed pair
    buckets: list[_Bucket]
    idle: list[tuple[Tensor, Tensor]]  # pairs without gradients
    other: list[dict]  # ordinary (AdamW) groups


@dataclass
class _PendingBucket:
    """A bucket's computed update, not yet written."""

    bucket: _Bucket
    new: FactorPoint
    work: dict[str, Tensor]
    given: dict[str, Tensor]
    hits: set[str]
    steps: Tensor

    def results(self) -> list[Tensor]:
        return [self.new.M, self.new.N, *self.work.values()]


class StepEngine:
    """Runs ``optimizer.step()`` for a :class:`~geolora.optim.base.LoRAOptimizer` (module
    docstring). Holds the step plan and the stacked state buffers between steps."""

    def __init__(self, opt: LoRAOptimizer) -> None:
        self.opt = opt
        #: What the steps communicated when factors are sharded (reset it to measure a step).
        self.comm_stats = CommStats()
        self._comm = StepComm(())
        self.reset()

    def reset(self) -> None:
        """Forget the plan and the stacked buffers (after ``load_state_dict``)."""
        self._stacks: dict[tuple, dict[str, tuple[Tensor, tuple[Tensor, ...]]]] = {}
        self._prev_stacks: dict[tuple, dict[str, tuple[Tensor, tuple[Tensor, ...]]]] = {}
        self.plan: _StepPlan | None = None
        self._hp_cache: dict[int, tuple[tuple, tuple]] = {}

    # --- the step ----------------------------------------------------------------------------
    def step(self) -> None:
        self._prev_stacks = self._stacks
        self._stacks = {}
        # the ranks this step agrees with (none unless some parameter is a DTensor)
        self._comm = StepComm(
            [p for g in self.opt.param_groups for p in g["params"]], self.comm_stats
        )
        plan = self._valid_plan()
        if plan is None or not self._planned_step(plan):
            self.plan = self._planning_step()

    def _check_lrs(self, groups: list[dict]) -> None:
        for g in groups:
            label = g.get("name") or "param group"
            check_lr("lr", g["lr"], repr(label))
            if not g.get("lora_pair") and g.get("other_lr") is not None:
                check_lr("other_lr", g["other_lr"], repr(label))

    def _check_grads(self) -> set[int]:
        """Ids of groups to skip; raises on non-finite gradients in ``raise`` mode.

        Fast path: one ``torch._foreach_norm`` over all gradients; only if some norm is not
        finite (a NaN/inf entry, or a finite gradient whose norm overflows) are the tensors
        checked one by one, so the result is exactly that of the per-tensor test.
        """
        opt = self.opt
        grads: list[Tensor] = []
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{param_label(group, i)}: sparse gradients are not supported"
                    )
                if p.grad.shape != p.shape:
                    raise ValueError(
                        f"{param_label(group, i)}: gradient shape {tuple(p.grad.shape)} != "
                        f"parameter shape {tuple(p.shape)}"
                    )
                grads.append(p.grad)
        if self._all_finite(grads):
            return set()
        skip: set[int] = set()
        entries = [
            (group, i, p)
            for group in opt.param_groups
            for i, p in enumerate(group["params"])
            if p.grad is not None
        ]
        flags = self._comm.all_true([_finite(p.grad) for _, _, p in entries])
        for (group, i, _), ok in zip(entries, flags):
            if not ok:
                if opt.nonfinite == "raise":
                    raise FloatingPointError(
                        f"non-finite gradient (NaN or inf) in parameter "
                        f"{param_label(group, i)}; nothing was updated. Use "
                        f"nonfinite='skip' to skip such steps instead."
                    )
                skip.add(id(group))
        return skip

    def _planning_step(self) -> _StepPlan | None:
        """The general step: check learning rates and gradients, sort every group into the
        robust start, the manifold entry, a bucket or AdamW, compute everything, check, write.
        Returns the buckets as the plan of the next steps when nothing in this step needs the
        per-pair decisions again (no skipped group, no pair in or entering the robust start, no
        pair with one gradient missing, batched mode)."""
        opt = self.opt
        self._check_lrs(opt.param_groups)
        skip = self._check_grads()
        buckets: dict[tuple, list[_Item]] = defaultdict(list)
        reusable = opt.foreach and not skip
        idle: list[tuple[Tensor, Tensor]] = []
        other: list[dict] = []
        singles: list[PendingAdamW] = []
        for group in opt.param_groups:
            if id(group) in skip:
                _count_skip(opt, group)
                continue
            if not group.get("lora_pair", False):
                other.append(group)
                continue
            B, A = group["params"]
            if B.grad is None and A.grad is None:
                idle.append((B, A))
                continue
            reusable = reusable and B.grad is not None and A.grad is not None
            shards = pair_shards(opt, group, B, A, self.comm_stats)
            if shards is None:
                Bm, Am = matrix_view(B), matrix_view(A)
                dB, dA = Bm, Am
            elif shards.whole:  # gathered: the optimizer sees plain tensors in every phase
                Bm, Am = shards.math_factors()
                dB, dA = Bm, Am
            else:  # row-sharded: decisions and the (element-wise) robust start on the DTensors
                dB, dA = B, A
            st = opt.state[B]
            kind, staged = opt._pair_decision(group, dB, dA, st)
            label = str(group.get("name", "<unnamed>"))
            if kind == "robust":
                if shards is not None and shards.whole:
                    one = self._single(
                        opt._robust_update, group, st, (Bm, Am), shards.math_grads(), label
                    )
                    one = [None if q is None else shards.retarget(q, Bm, Am) for q in one]
                else:
                    grads = (_view_or_none(B.grad), _view_or_none(A.grad))
                    one = self._single(opt._robust_update, group, st, (dB, dA), grads, label)
                singles += one
                reusable = False
                continue
            if shards is not None and not shards.whole:  # local rows, gathered other sides
                Bm, Am = shards.math_factors()
            work = _work_state(opt, group, Bm, Am, st, staged, shards)
            if kind == "refactor":  # (row-sharded: the local rows of the point, its state)
                q = opt._refactor_update(group, Bm, Am, work, st, label)
                singles.append(q if shards is None else shards.retarget(q, Bm, Am))
                reusable = False
                continue
            key = (tuple(Bm.shape), tuple(Am.shape), Bm.dtype, Bm.device)
            key += (int(work["step"].item()), self.hyperparameter_key(group))
            key += (None if shards is None else shards.key,)
            buckets[key].append(_Item(group, B, A, Bm, Am, work, shards))
        runs = (
            list(buckets.values()) if opt.foreach else [[it] for b in buckets.values() for it in b]
        )
        for g in other:
            singles += self._other_update(g)
        clean = len(singles) == len([s for s in singles if s is not None])
        singles = [s for s in singles if s is not None]
        done, ran_clean = self._run([_Bucket.of(items) for items in runs], singles)
        clean = clean and ran_clean
        if not (reusable and clean):
            return None
        return _StepPlan(
            groups=list(opt.param_groups),
            checks=[(it.group, tuple(it.group.items())) for b in done for it in b.items],
            buckets=done,  # with their step views and staging buffers
            idle=idle,
            other=other,
        )

    def _valid_plan(self) -> _StepPlan | None:
        """The previous step's plan if it still decides this step: same groups, same
        hyperparameters (an lr schedule's assignment keeps it when the buckets stay what they
        were), the same state dicts and step counters (``load_state_dict`` replaces them) and no
        gradient on a pair that had none."""
        plan = self.plan
        opt = self.opt
        if plan is None or not opt.foreach:
            return None
        groups = opt.param_groups
        if len(groups) != len(plan.groups) or any(a is not b for a, b in zip(groups, plan.groups)):
            return None
        try:
            changed = [(g, items) for g, items in plan.checks if tuple(g.items()) != items]
        except RuntimeError:  # a multi-element tensor in a group: cannot tell, re-plan
            return None
        if changed:  # e.g. an lr schedule: keep the plan if the buckets stay what they were
            self._check_lrs([g for g, _ in changed])
            if not self._buckets_hold(plan, changed):
                return None
            plan.checks = [(g, tuple(g.items())) for g, _ in plan.checks]
        self._check_lrs(plan.other)
        state = opt.state
        for b in plan.buckets:
            if not all(
                state.get(it.B) is it.state and it.state.get("step") is v
                for it, v in zip(b.items, b.steps)
            ):
                return None
        if any(B.grad is not None or A.grad is not None for B, A in plan.idle):
            return None
        return plan

    def _buckets_hold(self, plan: _StepPlan, changed: list[tuple[dict, tuple]]) -> bool:
        """After some groups' items changed: ``True`` if the general path would still form the
        plan's buckets — every bucket's groups have one hyperparameter key, no two buckets would
        merge, and no pair's phase can change (its ``robust_steps`` is the same)."""
        for g, items in changed:
            if dict(items).get("robust_steps") != g.get("robust_steps"):
                return False
        seen = set()
        for b in plan.buckets:
            hp = {self.hyperparameter_key(it.group) for it in b.items}
            if len(hp) != 1:
                return False
            it = b.items[0]
            key = (tuple(it.Bm.shape), tuple(it.Am.shape), it.Bm.dtype, it.Bm.device)
            key += (int(b.steps[0].item()), hp.pop())
            if key in seen:
                return False
            seen.add(key)
        return True

    def _planned_step(self, plan: _StepPlan) -> bool:
        """Run the plan's buckets after one finiteness check of all gradients. ``False`` (nothing
        was modified) hands the step to :meth:`_planning_step`, which treats the exceptional
        cases — a missing, sparse or non-finite gradient — with its exact per-tensor checks."""
        grads: list[Tensor] = []
        for b in plan.buckets:
            for it in b.items:
                for p in (it.B, it.A):
                    if p.grad is None or p.grad.is_sparse:
                        return False
        for group in plan.other:
            for q in group["params"]:
                if q.grad is not None:
                    if q.grad.is_sparse:
                        return False
                    grads.append(q.grad)
        stacked = [b.stacked_grads() for b in plan.buckets]
        if not self._all_finite([t for g in stacked for t in g] + grads):
            return False
        singles: list[PendingAdamW | None] = []
        for g in plan.other:
            singles += self._other_update(g)
        kept = [s for s in singles if s is not None]
        done, clean = self._run(plan.buckets, kept, grads=stacked)
        if not clean or len(kept) != len(singles):
            self.plan = None
        return True

    def _other_update(self, group: dict) -> list[PendingAdamW | None]:
        """The update of a group that is not a pair: its kind's handler
        (:attr:`~geolora.optim.base.LoRAOptimizer.group_kinds`) or AdamW."""
        opt = self.opt
        label = str(group.get("name") or "param group")
        kind = group_kind(group)
        if kind is not None:
            handler = opt.group_kinds[kind]
            return self._single(lambda g, lab: handler.update(opt, g, lab), group, label)
        return self._single(ordinary_group_update, group, opt.state, label)

    def _single(self, compute, group: dict, *args) -> list[PendingAdamW | None]:
        """``[compute(group, *args)]`` (an AdamW update on copies; ``[]`` if it has nothing to
        do), with an overflow of a scalar (e.g. ``lr / (1 − β₁)`` beyond the float range of the
        tensors) turned into a clear error — or, with ``nonfinite="skip"``, a skip (``[None]``)."""
        try:
            p = compute(group, *args)
        except RuntimeError as exc:
            if not _is_overflow(exc):
                raise
            if self.opt.nonfinite == "raise":
                raise FloatingPointError(
                    f"{type(self.opt).__name__}: the update of {args[-1]} is not finite (a "
                    f"too large learning rate? {exc}); nothing was updated."
                ) from exc
            _count_skip(self.opt, group)
            return [None]
        return [] if p is None else [p]

    # --- compute, check, write ---------------------------------------------------------------
    def _run(
        self,
        buckets: list[_Bucket],
        singles: list[PendingAdamW],
        grads: list[FactorTangent] | None = None,
    ) -> tuple[list[_Bucket], bool]:
        """Compute every bucket, check all results (``singles`` — robust, refactor and ordinary
        updates — included) with one finiteness test, then write everything. Returns the
        buckets written and whether nothing was skipped."""
        opt = self.opt
        clean = True
        if grads is None:
            grads = [b.stacked_grads() for b in buckets]
        pending = self._compute_all(buckets, grads)
        while True:
            results = [t for p in pending if p is not None for t in p.results()]
            results += [t for s in singles for t in s.results()]
            if self._all_finite(results, None not in pending):
                break
            pending = self._agree_failed(pending)
            # exact test (a finite result may overflow its norm; DTensors take this path)
            bad_items, bad_singles = self._find_nonfinite(buckets, pending, singles)
            if not (bad_items or bad_singles):
                break
            if opt.nonfinite == "raise":
                raise _nonfinite_error(opt, bad_items, bad_singles, pending)
            clean = False
            for group in {id(it.group): it.group for it in bad_items}.values():
                _count_skip(opt, group)
            for s in bad_singles:
                for group in s.groups:
                    _count_skip(opt, group)
            singles = [s for s in singles if s not in bad_singles]
            bad_ids = {id(it) for it in bad_items}
            kept = []
            for b in buckets:
                items = [it for it in b.items if id(it) not in bad_ids]
                if len(items) == len(b.items):
                    kept.append(b)
                elif items:
                    kept.append(_Bucket.of(items))
            buckets = kept
            grads = [b.stacked_grads() for b in buckets]
            pending = self._compute_all(buckets, grads)
        for s in singles:
            s.commit()
        for p in pending:
            self._commit_bucket(p)
        return buckets, clean

    def _compute_all(
        self, buckets: list[_Bucket], grads: list[FactorTangent]
    ) -> list[_PendingBucket | None]:
        """:meth:`_compute_or_mark` of every bucket."""
        return [self._compute_or_mark(b, g) for b, g in zip(buckets, grads)]

    def _agree_failed(self, pending: list[_PendingBucket | None]) -> list[_PendingBucket | None]:
        """With sharded factors: a bucket whose computation failed on one rank is marked failed
        on every rank, so that all ranks split it alike (:meth:`_find_nonfinite`)."""
        if not self._comm.active:
            return pending
        ok = self._comm.all_true([p is not None for p in pending])
        return [p if k else None for p, k in zip(pending, ok)]

    def _all_finite(self, tensors: list[Tensor], local_ok: bool = True) -> bool:
        """:func:`all_finite` of the tensors (local shards of ``DTensor`` s) and ``local_ok``,
        AND-ed over the ranks when factors are sharded (a NaN on one rank stops every rank):
        one flag all-reduce."""
        ok = local_ok and all_finite([local_tensor(t) for t in tensors])
        return self._comm.all_true([ok])[0] if self._comm.active else ok

    def _compute_or_mark(self, b: _Bucket, g: FactorTangent) -> _PendingBucket | None:
        """:meth:`_compute_bucket`, with a linear-algebra failure (e.g. ``eigh`` of a NaN
        matrix) recorded as ``None`` (a non-finite result)."""
        try:
            return self._compute_bucket(b, g)
        except torch.linalg.LinAlgError:
            return None
        except RuntimeError as exc:  # a scalar (e.g. -lr) beyond the float range of the tensors
            if _is_overflow(exc):
                return None
            raise

    def _find_nonfinite(
        self,
        buckets: list[_Bucket],
        pending: list[_PendingBucket | None],
        singles: list[PendingAdamW],
    ) -> tuple[list[_Item], list[PendingAdamW]]:
        """The pairs and single updates whose results are not finite (exact per-tensor test;
        a bucket whose computation failed is split into single pairs to find the culprits)."""
        bad: list[_Item] = []
        checks: list[tuple[_Item, bool]] = []
        for b, p in zip(buckets, pending):
            if p is None:
                if len(b.items) == 1:
                    bad += b.items
                    continue
                for it in b.items:
                    one = _Bucket.of([it])
                    q = self._compute_or_mark(one, one.stacked_grads())
                    checks.append((it, q is not None and _finite_rows(q.results(), 0)))
                continue
            for i, it in enumerate(b.items):
                checks.append((it, _finite_rows(p.results(), i)))
        local = [ok for _, ok in checks] + [all(_finite(t) for t in s.results()) for s in singles]
        flags = self._comm.all_true(local)  # the same culprits on every rank
        bad += [it for (it, _), ok in zip(checks, flags) if not ok]
        bad_singles = [s for s, ok in zip(singles, flags[len(checks) :]) if not ok]
        return bad, bad_singles

    def _compute_bucket(self, b: _Bucket, g: FactorTangent) -> _PendingBucket:
        """Stack a bucket's factors and states and compute its update from the stacked
        gradients ``g``; nothing is written (the state buffers handed to ``_update_pairs`` are
        private copies unless the optimizer is ``functional_state``)."""
        opt = self.opt
        states = [it.state for it in b.items]
        cdt = g.M.dtype
        keys = [k for k, v in states[0].items() if isinstance(v, Tensor) and k not in SCALAR_KEYS]
        M, N = b.stacked_factors(cdt)
        stacked, hits = self._stacked_state(b, states, [*keys, "step"])
        steps = stacked.pop("step")
        given = dict(stacked)
        work = dict(stacked)
        if not opt.functional_state:
            for k in hits & work.keys():  # fresh stacks are private copies already
                work[k] = stacked[k].clone()
        step = int(states[0]["step"].item()) + 1
        shards = b.shards
        opt.shard_sum = LOCAL if shards is None else shards.row_sum()
        try:
            new = opt._update_pairs(b.items[0].group, FactorPoint(M, N), g, work, step)
        finally:
            opt.shard_sum = LOCAL
        return _PendingBucket(b, new, work, given, hits, steps)

    def _stacked_state(
        self, b: _Bucket, states: list[dict], keys: list[str]
    ) -> tuple[dict[str, Tensor], set[str]]:
        """The pairs' state tensors stacked along dim 0, and the keys served from the cache.

        After a step the per-pair state tensors are views ``buffer[i]`` of one stacked buffer
        per key (kept for the bucket), so the next step of the same bucket needs no
        ``torch.stack``. The cache is used only while every pair's tensor *is* its view (a
        ``load_state_dict`` or a user assignment replaces it, and the key is re-stacked).
        """
        cached = self._prev_stacks.get(b.key, {})
        stacked: dict[str, Tensor] = {}
        hits: set[str] = set()
        for k in keys:
            entry = cached.get(k)
            if entry is not None and all(st.get(k) is v for st, v in zip(states, entry[1])):
                stacked[k] = entry[0]
                hits.add(k)
            elif b.shards is not None:  # stored DTensors (or whole tensors): the local parts
                side = self.opt._state_side(k, b.items[0].group)
                stacked[k] = _stack_like(
                    [it.shards.local_state(side, it.state[k]) for it in b.items]
                )
            else:
                stacked[k] = _stack_like([st[k] for st in states])
        return stacked, hits

    def _in_place(self, like: Tensor) -> bool:
        flag = self.opt.commit_in_place
        return like.device.type != "cpu" if flag is None else flag

    def _write_back_views(
        self, b: _Bucket, name: str, stack: Tensor, like: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-pair tensors holding ``stack[i]`` in the parameters' dtype and contiguous layout,
        for one ``torch._foreach_copy_`` into the parameters (its fused multi-tensor route on
        CUDA needs equal dtypes and strides; a strided copy would be one kernel per parameter,
        448 launches per step for 224 pairs on an H100). In-place mode
        (:attr:`~geolora.optim.base.LoRAOptimizer.commit_in_place`) copies ``stack`` into a
        staging buffer kept with the bucket and returns its views. Returns the converted stack
        and its views."""
        if not (self._in_place(like) and like.is_contiguous()):
            return _write_back_views(stack, like)
        staged = b.staging.get(name)
        if staged is None or staged[0].shape != stack.shape or staged[0].dtype != like.dtype:
            buf = torch.empty(stack.shape, dtype=like.dtype, device=like.device)
            staged = b.staging[name] = (buf, list(buf.unbind(0)))
        staged[0].copy_(stack)
        return staged

    def _commit_bucket(self, p: _PendingBucket) -> None:
        """Write a computed bucket back: factors, step counters (one stacked buffer whose views
        are the pairs' ``state["step"]``), states; a state dict the step rebuilt (new or removed
        keys) replaces the stored one."""
        b = p.bucket
        targets = [it.targets() for it in b.items]
        Bs = [t[0] for t in targets]
        As = [t[1] for t in targets]
        new_B, new_A = p.new.M, p.new.N.mT
        if b.shards is not None:  # a gathered side: this rank writes its shard
            new_B, new_A = b.shards.local_part(new_B, 0), b.shards.local_part(new_A, 1)
        stack_B, views_B = self._write_back_views(b, "M", new_B, Bs[0])
        stack_A, views_A = self._write_back_views(b, "A", new_A, As[0])
        torch._foreach_copy_(Bs, views_B)
        torch._foreach_copy_(As, views_A)
        if b.shards is None and stack_B.is_contiguous() and stack_A.is_contiguous():
            b.factors = (stack_B, stack_A)
            b.versions = b.factor_versions()
        else:
            b.factors = None
        p.given["step"] = p.steps
        p.work["step"] = p.steps.add_(1) if "step" in p.hits else p.steps + 1
        self._commit_state(b, p.work, p.given, p.hits)
        if "step" not in p.hits:  # the pairs' step counters are new views
            b.steps = [it.state["step"] for it in b.items]
        state = self.opt.state
        for it in b.items:
            if state[it.B] is not it.state:
                state[it.B] = it.state

    def _commit_state(
        self, b: _Bucket, work: dict[str, Tensor], given: dict[str, Tensor], hits: set[str]
    ) -> None:
        """Store the updated stacked state: each buffer becomes the bucket's persistent buffer
        and every pair's state tensor its view ``buffer[i]`` (see :meth:`_stacked_state`)."""
        states = [it.state for it in b.items]
        cache = self._prev_stacks.get(b.key, {})
        entry: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {}
        owners: set[int] = set()
        shards = b.shards
        # row-sharded: copy into the kept buffers, so that their DTensor views stay valid (a
        # DTensor wrapper per pair and key each step costs more than the copy)
        in_place = self._in_place(b.items[0].Bm) or (shards is not None and not shards.whole)
        for k, v in work.items():
            if k in hits and v is given[k]:  # untouched cached buffer: views still valid
                entry[k] = cache[k]
                owners.add(id(v))
                continue
            if in_place and k in hits and _same_layout(v, given[k]):
                given[k].copy_(v)  # the pairs' views see the new values: no new views
                entry[k] = cache[k]
                owners.add(id(given[k]))
                continue
            if id(v) in owners or not _owns_storage(v):
                v = _owning_copy(v)
            owners.add(id(v))
            views = v.unbind(0)
            if shards is not None and not shards.whole:  # row-sharded sides: DTensors
                side = self.opt._state_side(k, b.items[0].group) if k not in SCALAR_KEYS else None
                views = tuple(it.shards.wrap_state(side, t, k) for it, t in zip(b.items, views))
            for st, view in zip(states, views):
                st[k] = view
            entry[k] = (v, views)
        self._stacks[b.key] = entry

    # --- bucket keys --------------------------------------------------------------------------
    def hyperparameter_key(self, group: dict[str, Any]) -> tuple:
        """The hashable hyperparameters of a pair group (pairs are batched only with pairs of
        equal hyperparameters). Cached per group while its items are unchanged — the same keys
        and each value the same object or equal (an lr schedule assigning ``group["lr"]``
        invalidates the entry); groups holding mutable values (lists, dicts) are not cached.
        Building the key is a Python loop over the group's items, which with hundreds of pairs
        was a measurable part of the step."""
        cache = self._hp_cache
        items = tuple(group.items())
        hit = cache.get(id(group))
        if hit is not None:
            try:
                if hit[0] == items:
                    return hit[1]
            except RuntimeError:  # a multi-element tensor value: compare the slow way
                pass
        key = tuple((k, _freeze(v)) for k, v in sorted(items) if k not in GROUP_LABEL_KEYS)
        if not any(
            isinstance(v, (list, dict, set)) for k, v in items if k not in GROUP_LABEL_KEYS
        ):
            cache[id(group)] = (items, key)
        return key


def _work_state(
    opt: LoRAOptimizer,
    group: dict,
    Bm: Tensor,
    Am: Tensor,
    st: dict,
    staged: dict,
    shards: PairShards | None = None,
) -> dict:
    """The state dict a bucketed pair steps with: the stored one, or — when the step adds keys
    (``staged``, a first visit's zero state, a new ``step`` counter) or drops the robust start's
    — a new dict that replaces it only when the step is written. A fresh state of row-sharded
    factors is created from the local shards ``Bm``, ``Am`` and stored as ``DTensor`` s."""
    from geolora.optim.adamw import ROBUST_STATE_KEYS

    fresh = "pair" not in st
    drops = any(k in st for k in ROBUST_STATE_KEYS)
    if not (staged or fresh or drops or "step" not in st):
        return st
    work = {k: v for k, v in st.items() if k not in ROBUST_STATE_KEYS}
    work.update(staged)
    work.setdefault("step", torch.tensor(0.0))
    work.setdefault("robust_step", torch.tensor(0.0))
    if fresh:
        work["pair"] = True
        rows = shards is not None and not shards.whole
        if rows:
            # the entry of an optimizer that owns a point (a QR or SVD of the whole factors)
            # takes its sums over rows through the pair's reducer: one round per pair, once
            opt.shard_sum = shards.row_sum()
        try:
            init = opt._init_pair_state(group, Bm, Am)
        finally:
            opt.shard_sum = LOCAL
        if shards is None:  # N-side state column-major, like the stacked N (_stack_transposed)
            init = {
                k: _column_major_2d(v) if opt._state_side(k, group) == "N" else v
                for k, v in init.items()
            }
        if rows:
            init = {
                k: shards.wrap_state(opt._state_side(k, group), v, k) if isinstance(v, Tensor) else v
                for k, v in init.items()
            }
        work.update(init)
    return work


def _column_major_2d(v: Any) -> Any:
    """A 2-D tensor ``v`` stored column-major (its transpose contiguous); anything else as is."""
    if isinstance(v, Tensor) and v.dim() == 2 and not v.T.is_contiguous():
        return v.T.contiguous().T
    return v


def _is_overflow(exc: RuntimeError) -> bool:
    """``exc`` is torch's refusal to convert a Python scalar to the tensors' dtype."""
    return "without overflow" in str(exc)


def _count_skip(opt: Any, group: dict) -> None:
    st = opt.state[group["params"][0]]
    st["nonfinite_skips"] = st.get("nonfinite_skips", 0) + 1


def _nonfinite_error(
    opt: Any,
    bad_items: list[_Item],
    bad_singles: list[PendingAdamW],
    pending: list[_PendingBucket | None],
) -> FloatingPointError:
    names = [str(it.group.get("name", "<unnamed>")) for it in bad_items]
    names += [s.label for s in bad_singles]
    listed = ", ".join(names) or "<unknown>"
    cls = type(opt).__name__
    factors_ok = all(
        p is not None and all(_finite(t) for t in (p.new.M, p.new.N)) for p in pending
    ) and all(_finite(v) for s in bad_singles for v in s.values)
    if factors_ok:
        return FloatingPointError(
            f"{cls}: the optimizer state of {listed} would become non-finite (a gradient too "
            f"large for the state's dtype, or a too large learning rate?); nothing was updated. "
            f"Use nonfinite='skip' to skip such steps."
        )
    return FloatingPointError(
        f"{cls}: the update of {listed} is not finite (rank-deficient or ill-conditioned "
        f"factors, or a too large learning rate?); nothing was updated. Use robust_steps > 0 "
        f"or damping > 0, a smaller lr, or nonfinite='skip'."
    )


def _finite(t: Tensor) -> bool:
    """No NaN/inf in ``t`` (in this rank's shard of a ``DTensor``: the caller AND-s the flags
    over the ranks; a ``DTensor``'s own ``.all()`` would stay a per-rank partial result)."""
    return bool(torch.isfinite(local_tensor(t)).all())


def _finite_rows(tensors: list[Tensor], i: int) -> bool:
    """Row ``i`` (dim 0) of every stacked tensor is finite."""
    return all(bool(torch.isfinite(t[i]).all()) for t in tensors if t.dim() > 0)


def all_finite(tensors: list[Tensor]) -> bool:
    """``True`` if the sums of all ``tensors`` are finite (so no entry is NaN/inf: one of them
    would make its tensor's sum NaN/inf); ``False`` means "check one by one" (also for sums that
    overflow or cancel ``inf − inf``, and for non-plain tensors). A sum reads each tensor once,
    like a norm, without the squares; half-precision tensors are summed in float32."""
    if not tensors:
        return True
    if not all(type(t) is Tensor for t in tensors):  # e.g. DTensor gradients: exact path
        return False
    sums = [t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum() for t in tensors]
    try:  # one device (the usual case): one stack, one host sync (dtypes are promoted)
        return bool(torch.isfinite(torch.stack(sums)).all())
    except RuntimeError:  # tensors on several devices
        pass
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for n in sums:
        by_device[n.device].append(n.float())
    return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values())


def _view_or_none(g: Tensor | None) -> Tensor | None:
    return None if g is None else matrix_view(g)


def _column_major(t: Tensor) -> bool:
    """``t`` (3-D) is stored as contiguous ``(L, cols, rows)`` — the ``mm_t`` / QR layout."""
    return t.dim() == 3 and not t.is_contiguous() and t.mT.is_contiguous()


def _owns_storage(t: Tensor) -> bool:
    """``t`` is dense (row- or column-major) and spans its whole storage, so it can be kept as a
    state buffer without holding on to a larger tensor."""
    return (
        (t.is_contiguous() or _column_major(t))
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _owning_copy(t: Tensor) -> Tensor:
    """A copy of ``t`` that owns its storage, column-major if ``t`` is."""
    if t.dim() == 3 and t.mT.is_contiguous():
        return t.mT.clone(memory_format=torch.contiguous_format).mT
    return t.clone(memory_format=torch.contiguous_format)


def _stack_like(ts: list[Tensor]) -> Tensor:
    """``torch.stack(ts)``, column-major when the (2-D) tensors are: the per-pair views of a
    column-major buffer are re-stacked into the same layout, so a step after a cache miss (e.g.
    after ``load_state_dict``) computes exactly what the cached path computes."""
    t0 = ts[0]
    if t0.dim() == 2 and not t0.is_contiguous() and t0.T.is_contiguous():
        return torch.stack([t.T for t in ts]).mT
    return torch.stack(ts)


def _stack_transposed(ts: list[Tensor]) -> Tensor:
    """``torch.stack([t.T for t in ts])`` without a transposing copy: the ``(L, rows, cols)``
    stack of the ``ts`` seen as ``(L, cols, rows)`` (column-major ``N``; element-wise math and
    ``bmm`` take it as it is, and the new ``A`` it yields is written back without a transpose)."""
    return torch.stack(ts).mT


def _write_back_views(stack: Tensor, like: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``stack[i]`` as views with the parameters' dtype and (contiguous) layout: one conversion
    kernel for the bucket, after which ``torch._foreach_copy_`` can take its fused multi-tensor
    route on CUDA (same dtype, same strides) instead of one strided copy kernel per parameter."""
    stack = stack.to(like.dtype)
    if like.is_contiguous() and not stack.is_contiguous():
        # (``.to(memory_format=...)`` returns a same-dtype tensor unchanged, whatever its layout)
        stack = stack.contiguous()
    return stack, list(stack.unbind(0))


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """``a`` can be copied into ``b`` elementwise without aliasing it (same shape, dtype, device,
    strides, separate storage)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.stride() == b.stride()
        and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    )


def _grad(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, Tensor):
        return ("tensor", id(v))
    return v
