"""LoRA pairs whose factors are sharded ``DTensor`` s (FSDP2): layouts, row sums, global checks.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter along dim 0 by default.
For a LoRA pair ``B: (m, r)``, ``A: (r, n)`` (``M = B``, ``N = Aᵀ``, ``X = M Nᵀ``):

* ``B`` sharded along dim 0 holds *rows* of ``M`` on each rank — the layout the pair math wants;
* ``A`` sharded along dim 1 (FSDP2's ``shard_placement_fn``, :func:`fsdp2_shard_placement`)
  holds rows of ``N``; sharded along dim 0 (the default) it splits the *rank* dimension.

With ``M`` and ``N`` row-sharded every ``r x r`` quantity of a step that is a sum over the rows
of a factor — Grams ``MᵀM``, ``NᵀN``, cross products ``Mᵀ∇_M``, ``MᵀM_old`` — is the sum over
ranks of the same product of the local rows, and every ``m x r`` result is a row-local product
with an ``r x r`` matrix. So an optimizer step runs on the local shards with one all-reduce of
``O(r²)`` numbers per round of reductions, for all pairs of a bucket together
(:class:`RowSum`), and no factor is ever gathered.

A factor sharded along its rank dimension is gathered (``full_tensor``: ``m·r`` or ``r·n``
numbers per pair and step, its gradient likewise) and the math treats that side as replicated;
an optimizer without a row-sharded step (:attr:`~geolora.optim.base.LoRAOptimizer.
supports_row_shards`) refuses sharded pairs unless asked to gather them whole
(``sharded="gather"``). The layout of one pair is a :class:`PairShards`.

Optimizer state of a row-sharded side (keys of side ``"M"``/``"N"``,
:meth:`~geolora.optim.base.LoRAOptimizer._state_side`) is stored as ``DTensor`` with the
factor's placements (``state_dict()`` and ``torch.distributed.checkpoint`` see ``DTensor`` s);
``r x r`` statistics, counters and the state of gathered sides are ordinary tensors, equal on
every rank. The math always runs on local ``torch.Tensor`` s.

Finiteness checks are global (:class:`StepComm`): a NaN on one rank's shard stops the step on
every rank, so that the ranks never diverge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import transpose

try:  # torch built without distributed support: no DTensor can exist
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - every supported build has torch.distributed
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "LOCAL",
    "CommStats",
    "PairShards",
    "RowSum",
    "SHARDED_MODES",
    "StepComm",
    "dtensor_gram",
    "fsdp2_shard_placement",
    "gram_polar",
    "gram_qr",
    "gram_qr_blocks",
    "gram_qr_pair",
    "gram_qr_sides",
    "is_dtensor",
    "local_amax",
    "load_optimizer_state_dcp",
    "local_tensor",
    "optimizer_state_dcp",
    "pair_shards",
]

#: Values of the ``sharded`` option of a LoRA optimizer (see :func:`pair_shards`).
SHARDED_MODES = ("auto", "rows", "gather")

#: Reasons why an optimizer's step does not run on row-sharded factors yet (shown in the error;
#: the r×r reductions each would need are listed in docs/distributed.md).
ROW_SHARD_REFUSALS: dict[str, str] = {
    "AdamS": "its Adam moments are dense m×n matrices: a row-sharded step needs V and Vp whole "
    "on every rank and a reduce-scatter of Ẋᵀ U (n×r), not only r×r sums",
    "LiftedShampoo": "its exact statistics (sketch_rank=None, the default) are m×m and n×n "
    "matrices, which have no row-sharded form; pass a finite sketch_rank=k (Frequent-Directions "
    "sketches (m + n)×k, stored with the factors' rows) for the row-sharded step",
    "LoRAPro": "its Adam moments are dense m×n matrices (as AdamS)",
    "InvariantDoRA": "its pair step is AdamS's (dense m×n Adam moments)",
}


def local_amax(t: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """``t.amax(dim)`` of a local shard of nonnegative values that may be empty (FSDP2 gives the
    last ranks no rows when a factor has fewer rows than ``world · ⌈rows / world⌉``): an empty
    reduction gives 0, the identity of a max over the ranks of nonnegative values. Every rank
    must reach the same collectives, so a shard-local error is not an option."""
    if t.numel() == 0:
        if dim is None:
            return t.new_zeros(())
        shape = list(t.shape)
        if keepdim:
            shape[dim] = 1
        else:
            del shape[dim]
        return t.new_zeros(shape)
    return t.amax() if dim is None else t.amax(dim=dim, keepdim=keepdim)


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view sharing its storage), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


# --- communication -------------------------------------------------------------------------------
@dataclass
class CommStats:
    """What an optimizer's steps communicated (for benchmarks): calls and bytes of the ``r x r``
    all-reduces, of the gathers of rank-split factors and of the global finiteness flags."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    gather_calls: int = 0
    gather_bytes: int = 0
    flag_calls: int = 0

    def reset(self) -> None:
        self.all_reduce_calls = self.all_reduce_bytes = 0
        self.gather_calls = self.gather_bytes = self.flag_calls = 0


class RowSum:
    """Sums over the row shards of ``M`` and ``N`` of the pairs of one bucket.

    ``row_sum(M=[...], N=[...])`` takes the local pieces of quantities that are sums over the
    rows of ``M`` (e.g. ``MᵀM``, ``Mᵀ∇_M``: ``(..., r, r)``) and of ``N``, and returns
    ``(sums over M's shards, sums over N's shards)`` — the pieces of a side that is not
    row-sharded unchanged. All pieces of one call go through *one* ``all_reduce`` (concatenated
    into one buffer per dtype, then split): call it once per round of reductions with everything
    that round needs. For an unsharded bucket (:data:`LOCAL`) it returns its inputs.
    """

    def __init__(
        self,
        group: Any = None,
        m_rows: bool = False,
        n_rows: bool = False,
        stats: CommStats | None = None,
        shape: tuple[int, int] | None = None,
    ) -> None:
        self.group = group
        self.m_rows = m_rows
        self.n_rows = n_rows
        self.stats = stats
        self.shape = shape  # the global (m, n) of the bucket's pairs, where known

    def rows(self, side: str, local: int) -> int:
        """The global row count of side ``"M"`` (``m``) or ``"N"`` (``n``) whose local part
        has ``local`` rows (the same number on every rank, e.g. for a normalisation)."""
        sharded = self.m_rows if side == "M" else self.n_rows
        if not sharded:
            return local
        if self.shape is None:
            raise ValueError("RowSum: the global shape of a row-sharded bucket is not known")
        return self.shape[0] if side == "M" else self.shape[1]

    @property
    def sharded(self) -> bool:
        """``True`` if some side's pieces are partial sums (a collective is needed)."""
        return self.m_rows or self.n_rows

    def local_rows(self, side: str, whole: Tensor) -> Tensor:
        """This rank's rows (dim ``-2``) of ``whole``, a tensor with all ``m`` (side ``"M"``) or
        ``n`` (``"N"``) rows that every rank computed alike (e.g. a seeded initialisation): the
        rows of its shard, cut as ``DTensor``'s ``Shard`` cuts (``torch.chunk``); ``whole``
        itself for a side that is not row-sharded."""
        if not (self.m_rows if side == "M" else self.n_rows):
            return whole
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        chunks = whole.chunk(world, dim=-2)
        return chunks[rank] if rank < len(chunks) else whole.narrow(-2, 0, 0)

    def __call__(
        self, M: Sequence[Tensor] = (), N: Sequence[Tensor] = (), *, op: str = "sum"
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``op="max"``: the maxima over the shards instead of the sums (e.g. of a per-shard
        ``amax``)."""
        M, N = list(M), list(N)
        todo = (M if self.m_rows else []) + (N if self.n_rows else [])
        if not todo:
            return M, N
        summed = iter(self._all_reduce(todo, op))
        if self.m_rows:
            M = [next(summed) for _ in M]
        if self.n_rows:
            N = [next(summed) for _ in N]
        return M, N

    def _all_reduce(self, pieces: list[Tensor], op: str = "sum") -> list[Tensor]:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        out: list[Tensor | None] = [None] * len(pieces)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(pieces):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            buf = torch.cat([pieces[i].reshape(-1) for i in idx])
            dist.all_reduce(buf, op=red, group=self.group)
            if self.stats is not None:
                self.stats.all_reduce_calls += 1
                self.stats.all_reduce_bytes += buf.numel() * buf.element_size()
            for i, part in zip(idx, buf.split([pieces[i].numel() for i in idx])):
                out[i] = part.view(pieces[i].shape)
        return out  # type: ignore[return-value]


#: The identity reducer of unsharded buckets.
LOCAL = RowSum()


class StepComm:
    """The ranks an optimizer step must agree with: every dimension of every device mesh of the
    optimizer's ``DTensor`` parameters (none: no collective at all, e.g. DDP or one process).

    :meth:`all_true` turns per-rank flags into global ones (a logical AND over the ranks, one
    ``all_reduce`` per mesh dimension), so that a non-finite value on one rank's shard makes
    every rank raise or skip the same groups."""

    def __init__(self, params: Sequence[Tensor], stats: CommStats | None = None) -> None:
        self.groups: list[Any] = []
        self.device: torch.device | None = None
        self.stats = stats
        seen_meshes: set[int] = set()
        seen_groups: set[int] = set()
        for p in params:
            if not is_dtensor(p):
                continue
            mesh = p.device_mesh
            if id(mesh) in seen_meshes:
                continue
            seen_meshes.add(id(mesh))
            if self.device is None:
                self.device = p._local_tensor.device
            for d in range(mesh.ndim):
                g = mesh.get_group(d)
                if id(g) not in seen_groups:
                    seen_groups.add(id(g))
                    self.groups.append(g)

    @property
    def active(self) -> bool:
        return bool(self.groups)

    def all_true(self, flags: list[bool]) -> list[bool]:
        """``flags`` AND-ed over all ranks (the input when there is nothing to agree with)."""
        if not self.groups or not flags:
            return flags
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        for g in self.groups:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
            if self.stats is not None:
                self.stats.flag_calls += 1
        return [bool(v) for v in (t > 0.5).tolist()]


# --- the layout of a pair ------------------------------------------------------------------------
def _shards_of(t: Tensor) -> list[tuple[int, int]]:
    """``(mesh dim, tensor dim)`` of every ``Shard`` placement of a ``DTensor``."""
    return [(d, p.dim) for d, p in enumerate(t.placements) if isinstance(p, Shard)]


@dataclass
class PairShards:
    """How the factors of one LoRA pair are distributed, and what the step does with them.

    ``sides = (side of M, side of N)``, each ``"full"`` (not sharded: every rank holds the whole
    factor), ``"rows"`` (row-sharded: the math runs on the local rows, sums over rows through
    :class:`RowSum`) or ``"gather"`` (sharded but gathered every step: the math sees the whole
    factor, every rank computes the same update and writes its own shard of it).
    """

    B: Tensor
    A: Tensor
    sides: tuple[str, str]
    mesh_dim: int | None  # the mesh dimension of the row shards
    stats: CommStats | None = None
    _offsets: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """No side is row-sharded: the optimizer sees the whole pair (gathered) as plain
        tensors, in every phase (robust start, entry, state initialisation, update)."""
        return "rows" not in self.sides

    @property
    def key(self) -> tuple:
        """What a bucket must share besides the local shapes (global shapes and placements)."""
        return (
            self.sides,
            id(self.B.device_mesh),
            tuple(self.B.shape),
            tuple(self.A.shape),
            tuple(self.B.placements),
            tuple(self.A.placements),
        )

    def row_sum(self) -> RowSum:
        """The reducer of a bucket of pairs with this layout."""
        m_rows, n_rows = (s == "rows" for s in self.sides)
        if not (m_rows or n_rows):
            return LOCAL
        group = self.B.device_mesh.get_group(self.mesh_dim)
        return RowSum(group, m_rows, n_rows, self.stats, (self.B.shape[0], self.A.shape[1]))

    # factors and gradients as the math sees them
    def local_factors(self) -> tuple[Tensor, Tensor]:
        """The local shards of ``B`` and ``A`` (views: writing them writes the parameters)."""
        return self.B._local_tensor, self.A._local_tensor

    def math_factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` as the step sees them: local rows for ``"rows"``/``"full"`` sides, the
        gathered whole factor (a new tensor) for ``"gather"`` sides."""
        return self._math(self.B, 0), self._math(self.A, 1)

    def math_grads(self) -> tuple[Tensor, Tensor]:
        """The factor gradients, like :meth:`math_factors` (zeros for a missing gradient)."""
        gB, gA = self._grads()
        return self._math(gB, 0), self._math(gA, 1)

    def local_grads(self) -> tuple[Tensor, Tensor]:
        """The local shards of the factor gradients (zeros for a missing gradient)."""
        gB, gA = self._grads()
        return gB._local_tensor, gA._local_tensor

    def _grads(self) -> tuple[Tensor, Tensor]:
        out = []
        for p in (self.B, self.A):
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            elif not is_dtensor(g):
                raise TypeError(
                    f"the gradient of a sharded LoRA factor {tuple(p.shape)} is not a DTensor"
                )
            elif tuple(g.placements) != tuple(p.placements):
                g = g.redistribute(p.device_mesh, p.placements)
            out.append(g)
        return out[0], out[1]

    def math_stack(self, local: list[Tensor], i: int) -> Tensor:
        """The stacked math views of factor ``i`` (0: ``B``, 1: ``A``, or their gradients) of a
        bucket from the pairs' local shards: stacked as they are for ``"rows"``/``"full"``
        sides, gathered whole in *one* collective for the bucket for ``"gather"`` sides."""
        stack = torch.stack(local)
        if self.sides[i] != "gather":
            return stack
        p = (self.B, self.A)[i]
        ((mesh_dim, dim),) = _shards_of(p)
        mesh = p.device_mesh
        world = mesh.size(mesh_dim)
        # DTensor's (and FSDP2's) shards are torch.chunk's: equal chunks, the last ones shorter
        sizes = [len(c) for c in torch.arange(p.shape[dim]).chunk(world)]
        sizes += [0] * (world - len(sizes))
        d = dim + 1  # the stack's leading dim
        pad = max(sizes) - stack.shape[d]
        if pad:
            shape = list(stack.shape)
            shape[d] = pad
            stack = torch.cat([stack, stack.new_zeros(shape)], dim=d)
        parts = [torch.empty_like(stack) for _ in range(world)]
        dist.all_gather(parts, stack.contiguous(), group=mesh.get_group(mesh_dim))
        full = torch.cat([t.narrow(d, 0, n) for t, n in zip(parts, sizes)], dim=d)
        if self.stats is not None:
            self.stats.gather_calls += 1
            self.stats.gather_bytes += full.numel() * full.element_size()
        return full

    def _math(self, t: Tensor, i: int) -> Tensor:
        if self.sides[i] != "gather":
            return t._local_tensor
        full = t.full_tensor()
        if self.stats is not None:
            self.stats.gather_calls += 1
            self.stats.gather_bytes += full.numel() * full.element_size()
        return full

    def local_part(self, stack: Tensor, i: int) -> Tensor:
        """This rank's shard of a stack ``(L, *factor i's shape)`` of whole factors (``i = 0``:
        ``B``, ``1``: ``A``); a stack of local shards is returned as it is."""
        if self.sides[i] != "gather":
            return stack
        p = (self.B, self.A)[i]
        shape, offset = self._local_box(p, "BA"[i])
        for d, (n, o) in enumerate(zip(shape, offset)):
            if n != p.shape[d]:
                stack = stack.narrow(d + stack.dim() - p.dim(), o, n)
        return stack

    def retarget(self, pending: Any, Bm: Tensor, Am: Tensor) -> Any:
        """A pending update computed on the whole (gathered) factors ``Bm``, ``Am`` rewritten
        to write this rank's shards (:class:`~geolora.optim.adamw.PendingAdamW`)."""
        local = self.local_factors()
        for j, t in enumerate(pending.targets):
            for i, whole in enumerate((Bm, Am)):
                if t is whole:
                    pending.targets[j] = local[i]
                    pending.values[j] = self.local_part(pending.values[j], i)
        return pending

    def _local_box(self, p: Tensor, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        box = self._offsets.get(name)
        if box is None:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(
                p.shape, p.device_mesh, p.placements
            )
            box = self._offsets[name] = (tuple(shape), tuple(offset))
        return box

    # optimizer state
    def _row_spec(self, side: str) -> tuple[list[Any], int] | None:
        """``(placements, global rows)`` of a state tensor of a row-sharded ``side``."""
        i = "MN".index(side)
        if self.sides[i] != "rows":
            return None
        p = (self.B, self.A)[i]
        placements = [Shard(0) if isinstance(q, Shard) else q for q in p.placements]
        return placements, (p.shape[0] if i == 0 else p.shape[1])

    def wrap_state(self, side: str | None, t: Tensor, key: str = "") -> Tensor:
        """A state tensor of one pair as stored: a ``DTensor`` with the factor's placements
        (rows along dim 0) for a row-sharded side, else ``t``."""
        spec = None if side is None else self._row_spec(side)
        if spec is None:
            return t
        placements, rows = spec
        local_rows = (self.B, self.A)[0 if side == "M" else 1]._local_tensor.shape[
            0 if side == "M" else 1
        ]
        if t.dim() == 0 or t.shape[0] != local_rows:
            raise ValueError(
                f"optimizer state {key!r} of side {side} must hold the factor's local rows along "
                f"dim 0 ({local_rows}), got shape {tuple(t.shape)}"
            )
        shape = (rows, *t.shape[1:])
        if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
            stride = (1, rows)  # column-major, as the local tensor
        else:
            stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
        mesh = self.B.device_mesh
        return DTensor.from_local(
            t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def local_state(self, side: str | None, v: Tensor) -> Tensor:
        """The local tensor the math uses for a stored state tensor (redistributed first when
        it was stored with other placements, e.g. loaded from another layout; a plain whole
        tensor of a row-sharded side, e.g. from a single-process checkpoint, is cut)."""
        spec = None if side is None else self._row_spec(side)
        if spec is None:
            return v.full_tensor() if is_dtensor(v) else v
        placements, _ = spec
        mesh = self.B.device_mesh
        if is_dtensor(v):
            if tuple(v.placements) != tuple(placements):
                v = v.redistribute(mesh, placements)
            return v._local_tensor
        full = DTensor.from_local(v, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return full.redistribute(mesh, placements)._local_tensor


def pair_shards(
    opt: Any, group: dict, B: Tensor, A: Tensor, stats: CommStats | None = None
) -> PairShards | None:
    """The layout of a pair (``None`` for ordinary tensors), decided by the optimizer's
    ``sharded`` mode and whether its step runs on row shards
    (``opt.supports_row_shards``):

    * ``"auto"``: row-sharded sides stay sharded, a factor sharded along its rank dimension
      (``A`` along dim 0, FSDP2's default; ``B`` along dim 1) is gathered every step; an
      optimizer without a row-sharded step refuses sharded pairs.
    * ``"rows"``: like ``"auto"`` but a rank-split factor is refused (no gather ever).
    * ``"gather"``: every sharded factor is gathered; any optimizer runs (its state is then
      replicated on every rank, like a pair left out of sharding).

    Raises ``ValueError`` for layouts no mode supports (one factor a ``DTensor``, the other
    not; different meshes; ``Partial`` placements; a factor sharded twice; sharded
    convolution factors) and ``NotImplementedError`` naming the optimizer for a refusal.
    """
    bd, ad = is_dtensor(B), is_dtensor(A)
    if not (bd or ad):
        return None
    label = str(group.get("name", "<unnamed lora pair>"))
    cls = type(opt).__name__
    if bd != ad:
        raise ValueError(
            f"lora_pair {label!r}: lora_{'B' if bd else 'A'} is a DTensor (sharded) but "
            f"lora_{'A' if bd else 'B'} is not; shard both factors (fully_shard the module that "
            f"holds them) or neither (ignored_params)"
        )
    if B.device_mesh is not A.device_mesh and B.device_mesh != A.device_mesh:
        raise ValueError(f"lora_pair {label!r}: lora_B and lora_A live on different device meshes")
    for nm, t in (("lora_B", B), ("lora_A", A)):
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError(f"lora_pair {label!r}: {nm} has a Partial placement {t.placements}")
        if len(_shards_of(t)) > 1:
            raise ValueError(
                f"lora_pair {label!r}: {nm} is sharded along several mesh dimensions "
                f"({t.placements}); geolora supports one sharded mesh dimension per factor"
            )
        if t.dim() != 2 and _shards_of(t):
            raise ValueError(
                f"lora_pair {label!r}: sharded convolution LoRA factors ({nm} of shape "
                f"{tuple(t.shape)}) are not supported; keep them replicated (ignored_params)"
            )
    # side of M = B: rows when B is sharded along dim 0; of N = Aᵀ: rows when A along dim 1
    kinds: list[str] = []
    dims: set[int] = set()
    for t, row_dim in ((B, 0), (A, 1)):
        sh = _shards_of(t)
        if not sh:
            kinds.append("full")
        elif sh[0][1] == row_dim:
            kinds.append("rows")
            dims.add(sh[0][0])
        else:
            kinds.append("split")
    mode = getattr(opt, "sharded", "auto")
    capable = bool(getattr(opt, "supports_row_shards", False))
    if mode == "gather":
        sides = tuple("gather" if k != "full" else "full" for k in kinds)
    elif not capable:
        if kinds == ["full", "full"]:
            sides = ("full", "full")
        else:
            why = ROW_SHARD_REFUSALS.get(cls) or (
                "it runs the wrapped torch optimizer on a dense m×n shadow of X"
                if hasattr(opt, "wrapped")
                else "its step has no row-sharded form yet"
            )
            raise NotImplementedError(
                f"{cls} does not run on sharded LoRA factors ({label!r}: lora_B {B.placements}, "
                f"lora_A {A.placements}): {why}. Pass sharded='gather' to gather each pair "
                f"every step (2·(m+n)·r numbers per pair and step, optimizer state replicated), "
                f"or keep the LoRA factors out of sharding (fully_shard(..., ignored_params=...)"
                f", see docs/distributed.md)."
            )
    else:
        if "split" in kinds and mode == "rows":
            nm = "lora_B" if kinds[0] == "split" else "lora_A"
            raise ValueError(
                f"{cls}(sharded='rows'): {label!r}.{nm} is sharded along its rank dimension "
                f"({(B if kinds[0] == 'split' else A).placements}); shard lora_B along dim 0 and "
                f"lora_A along dim 1: fully_shard(..., shard_placement_fn="
                f"geolora.optim.sharding.fsdp2_shard_placement(model)), or use sharded='auto' "
                f"(gathers it every step)"
            )
        sides = tuple("gather" if k == "split" else k for k in kinds)
    if len(dims) > 1:
        raise ValueError(
            f"lora_pair {label!r}: lora_B and lora_A are sharded along different mesh dimensions "
            f"({B.placements}, {A.placements})"
        )
    mesh_dim = dims.pop() if dims else None
    return PairShards(B, A, sides, mesh_dim, stats)  # type: ignore[arg-type]


# --- r×r algebra on row shards -------------------------------------------------------------------
def dtensor_gram(F: Tensor, rows: int) -> Tensor:
    """The float64 Gram ``FᵀF`` (``rows=0``) or ``F Fᵀ`` (``rows=1``) of a 2-D factor, whole on
    every rank (a ``DTensor`` is reduced or gathered as its placements require)."""
    F64 = F.detach().to(torch.float64)
    G = F64.T @ F64 if rows == 0 else F64 @ F64.T
    return G.full_tensor() if is_dtensor(G) else G


def gram_sqrt(G: Tensor) -> Tensor:
    """A square root ``S`` with ``SᵀS = G`` of a symmetric positive semidefinite ``G`` (``S =
    diag(√λ⁺) Vᵀ`` from ``G = V diag(λ) Vᵀ``, negative round-off eigenvalues clamped to 0);
    ``(..., r, r)``. For ``G = FᵀF`` the singular values of ``X = M Nᵀ`` are those of
    ``S_M S_Nᵀ``, whatever the factor gauge."""
    lam, V = torch.linalg.eigh(G)
    return lam.clamp_min(0).sqrt().unsqueeze(-1) * transpose(V)


def gram_qr(F: Tensor, row_sum: Callable[..., tuple[list[Tensor], list[Tensor]]], side: str = "M",
            rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Thin QR ``F = Q R`` of a row-sharded tall factor from all-reduced Grams (CholeskyQR2).

    ``F: (..., k, r)`` the local rows of a factor of ``rows`` global rows (``None``: ``k``),
    ``row_sum`` the bucket's :class:`RowSum`, ``side`` ``"M"`` or ``"N"`` (which of its sums
    applies). Two rounds: ``G₁ = Σ FᵀF = R₁ᵀR₁`` (Cholesky), ``Q₁ = F R₁⁻¹``, ``G₂ = Σ Q₁ᵀQ₁ =
    R₂ᵀR₂``, ``Q = Q₁ R₂⁻¹``, ``R = R₂ R₁`` (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto,
    "CholeskyQR2: a simple and communication-avoiding algorithm for computing a tall-skinny QR
    factorization", ScalA 2014, Alg. 2), all in float64; ``diag(R) > 0`` (the sign-fixed QR).
    Where ``G₁`` is not numerically positive definite (condition of ``F`` ≳ 1e8) a third round
    first shifts it by ``s = 11 (k r + r (r + 1)) u ‖F‖²_F`` (shifted CholeskyQR3, Fukaya, Kannan,
    Nakatsukasa, Yamamoto & Yanagisawa, "Shifted Cholesky QR for computing the QR factorization
    of ill-conditioned matrices", SIAM J. Sci. Comput. 2020, arXiv:1809.11085, Alg. 4.2); an
    exactly rank-deficient ``F`` gives NaN (a non-finite step, which the optimizer refuses).
    Every rank takes the same branch: the decision is made on the reduced Grams.
    Returns ``(Q: (..., k, r) local rows in float64, R: (..., r, r))``.
    """
    return gram_qr_sides([(F, side, rows)], row_sum)[0]


def _reduced_grams(
    xs: Sequence[Tensor], sides: Sequence[str], row_sum: Callable[..., tuple[list[Tensor], list[Tensor]]]
) -> list[Tensor]:
    """The symmetrised Grams ``Σ xᵀx`` of local row blocks ``xs`` (side ``"M"`` or ``"N"``
    each), all reduced in one :class:`RowSum` round, in the order of ``xs``."""
    gs = [transpose(x) @ x for x in xs]
    got_M, got_N = row_sum(
        M=[g for g, s in zip(gs, sides) if s == "M"], N=[g for g, s in zip(gs, sides) if s != "M"]
    )
    it_M, it_N = iter(got_M), iter(got_N)
    out = [next(it_M) if s == "M" else next(it_N) for s in sides]
    return [0.5 * (g + transpose(g)) for g in out]


def gram_qr_sides(
    factors: Sequence[tuple[Tensor, str, int | None]],
    row_sum: Callable[..., tuple[list[Tensor], list[Tensor]]],
) -> list[tuple[Tensor, Tensor]]:
    """:func:`gram_qr` of several factors ``(F, side, rows)`` at once (e.g. ``M`` and ``N`` of a
    bucket): each round reduces the Grams of all of them in one :class:`RowSum` call, so the
    QR of a pair costs two all-reduces (three where a Gram needs the shift), not four. The
    shifted branch is taken for all factors when any Gram needs it (decided on reduced Grams:
    the same on every rank)."""
    wd = torch.float64
    sides = [side for _, side, _ in factors]

    def reduced(xs: list[Tensor]) -> list[Tensor]:
        return _reduced_grams(xs, sides, row_sum)

    def chol_step(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L, info = torch.linalg.cholesky_ex(g)
        R = transpose(L)
        return torch.linalg.solve_triangular(R, x, upper=True, left=False), R, info != 0

    xs = [F.to(wd) for F, _, _ in factors]
    g1 = reduced(xs)
    first = [chol_step(x, g) for x, g in zip(xs, g1)]
    if any(bool(info.any()) for _, _, info in first):
        u = torch.finfo(wd).eps / 2
        shifted = []
        for (_, _, rows), x, g in zip(factors, xs, g1):
            k = x.shape[-2] if rows is None else rows
            r = x.shape[-1]
            fro2 = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1).clamp_min(0)
            shift = 11.0 * (k * r + r * (r + 1)) * u * fro2
            eye = torch.eye(r, dtype=wd, device=x.device)
            shifted.append(chol_step(x, g + shift[..., None, None] * eye))
        g1b = reduced([q0 for q0, _, _ in shifted])
        first = []
        for (q0, r0, info0), g in zip(shifted, g1b):
            q1, r1b, info1 = chol_step(q0, g)
            first.append((q1, r1b @ r0, info0 | info1))
    g2 = reduced([q1 for q1, _, _ in first])
    out = []
    for (q1, r1, info), g in zip(first, g2):
        q, r2, info2 = chol_step(q1, g)
        bad = (info | info2)[..., None, None]
        out.append((torch.where(bad, float("nan"), q), torch.where(bad, float("nan"), r2 @ r1)))
    return out


def gram_qr_blocks(
    blocks: Sequence[tuple[Tensor, str]], row_sum: RowSum
) -> list[tuple[Tensor, Tensor]]:
    """Thin ``F = Q R`` of row-sharded tall blocks ``(F, side)`` that may be rank deficient (a
    retraction's ``[U Up]`` with a zero direction ``Up``, LoRA's ``B = 0``), float64.

    :func:`gram_qr_sides` (CholeskyQR2, ``R`` upper triangular with a positive diagonal, the
    sign-fixed QR) where it succeeds; a block where it fails (NaN: the reduced Gram is singular)
    and whose Gram is finite gets, from one more round, the eigen-decomposition ``Σ FᵀF = W Λ
    Wᵀ``: ``R = Λ^{1/2} Wᵀ`` and ``Q = F W Λ^{-1/2}`` on the eigenvalues above ``r·eps·λ_max``
    (zero columns elsewhere), so ``Q R = F`` still holds and ``Q`` has orthonormal nonzero
    columns. ``R`` is then not triangular: callers use only ``F = Q R`` (a core ``R C Rᵀ`` whose
    SVD follows). Every rank takes the same branch (reduced quantities only)."""
    out = gram_qr_sides([(F, side, row_sum.rows(side, F.shape[-2])) for F, side in blocks], row_sum)
    bad = [bool(torch.isnan(r).any()) for _, r in out]
    if not any(bad):
        return out
    wd = torch.float64
    xs = [F.to(wd) for F, _ in blocks]
    grams = _reduced_grams(xs, [side for _, side in blocks], row_sum)
    fixed = []
    for (q, r), x, g, b in zip(out, xs, grams, bad):
        if not b or not bool(torch.isfinite(g).all()):
            fixed.append((q, r))
            continue
        lam, w = torch.linalg.eigh(g)
        lam = lam.clamp_min(0)
        keep = lam > g.shape[-1] * torch.finfo(wd).eps * lam.amax(-1, keepdim=True)
        root = lam.sqrt()
        inv = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        r_eig = root.unsqueeze(-1) * transpose(w)
        q_eig = (x @ w) * inv.unsqueeze(-2)
        nan = torch.isnan(r).flatten(-2).any(-1)[..., None, None]
        fixed.append((torch.where(nan, q_eig, q), torch.where(nan, r_eig, r)))
    return fixed


def gram_polar(
    F: Tensor, row_sum: Callable[..., tuple[list[Tensor], list[Tensor]]], side: str = "M"
) -> Tensor:
    """Orthonormal polar factor ``F (FᵀF)^{-1/2}`` of a row-sharded tall factor from its
    all-reduced float64 Gram: ``G = Σ FᵀF = W diag(λ) Wᵀ`` (``eigh``), ``P = F W diag(λ^{-1/2})
    Wᵀ``, the local rows in float64 (one :class:`RowSum` round; ``side`` as :func:`gram_qr`).
    Its error is ``O(u cond(F)²)``: meant for well-conditioned ``F`` such as the Stiefel polar
    retraction's ``X + U`` (``(X + U)ᵀ(X + U) = I + UᵀU`` for a tangent ``U``: ``cond ≤ sqrt(1 +
    ‖U‖²)``); a singular ``F`` gives inf/NaN (a non-finite step, which the optimizer refuses)."""
    x = F.to(torch.float64)
    (g,) = _reduced_grams([x], [side], row_sum)
    lam, W = torch.linalg.eigh(g)
    return x @ ((W * lam.rsqrt().unsqueeze(-2)) @ transpose(W))
def gram_qr_pair(
    M: Tensor, N: Tensor, reduce: RowSum
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`gram_qr_sides` of a bucket's ``M: (..., m_local, r)`` and ``N: (..., n_local, r)``
    with their global row counts: ``((U, R_M), (V, R_N))``, ``U``, ``V`` the local rows, all
    float64 (two reductions for both factors, three where a Gram needs the shift)."""
    (U, RM), (V, RN) = gram_qr_sides(
        [(M, "M", reduce.rows("M", M.shape[-2])), (N, "N", reduce.rows("N", N.shape[-2]))],
        reduce,
    )
    return (U, RM), (V, RN)


# --- FSDP2 placement -----------------------------------------------------------------------------
def fsdp2_shard_placement(
    model: torch.nn.Module, shard_size: int | None = None
) -> Callable[[torch.nn.Parameter], Any]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every ``lora_A`` along dim 1
    (``Aᵀ`` row-sharded like ``B``), so that a row-shardable optimizer never gathers a factor.

    Every other parameter keeps FSDP2's default (``Shard(0)``, ``None`` returned). FSDP2 in torch
    2.13 supports uneven shards only along dim 0, so an ``A`` whose ``in`` is not a multiple of
    ``shard_size`` (the size of the sharding mesh dimension; default: the world size) keeps
    ``Shard(0)`` and is gathered every step (``r·in`` numbers). The ``lora_A`` s are found with
    :func:`~geolora.optim.groups.lora_param_groups` (geolora and peft LoRA layers); call this
    before ``fully_shard``.
    """
    from geolora.optim.groups import lora_param_groups

    if shard_size is None:
        shard_size = dist.get_world_size()
    lora_a = {id(g["params"][1]) for g in lora_param_groups(model) if g.get("lora_pair")}

    def placement(param: torch.nn.Parameter) -> Any:
        if id(param) in lora_a and param.dim() == 2 and param.shape[1] % shard_size == 0:
            return Shard(1)
        return None

    return placement


# --- torch.distributed.checkpoint ----------------------------------------------------------------
def optimizer_state_dcp(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """``opt.state_dict()`` keyed by parameter names (the model's FQNs) instead of indices, for
    ``torch.distributed.checkpoint.save`` (sharded state tensors are ``DTensor`` s, so each rank
    writes its shard; replicated ones are written once). Load with
    :func:`load_optimizer_state_dcp` on any world size."""
    sd = opt.state_dict()
    names = _param_names(opt, model)
    return {
        "state": {names[i]: dict(v) for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
        **{k: v for k, v in sd.items() if k not in ("state", "param_groups")},
    }


def _param_names(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    fqn = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in fqn:
                raise ValueError(
                    f"{type(opt).__name__}: a parameter of group {g.get('name', '?')!r} is not "
                    f"a parameter of the model (build the optimizer from this model)"
                )
            out.append(fqn[id(p)])
    return out


def load_optimizer_state_dcp(
    opt: torch.optim.Optimizer,
    model: torch.nn.Module,
    checkpoint_id: Any,
    key: str = "optimizer",
    storage_reader: Any = None,
) -> None:
    """Load an optimizer state saved as ``dcp.save({key: optimizer_state_dcp(opt, model),
    ...}, checkpoint_id=...)``, on any world size and sharding.

    The keys of each parameter's state depend on its phase (robust start or not), so the load
    template is built from the checkpoint's metadata: every saved state tensor is read into a
    tensor laid out as this optimizer will use it (``DTensor`` with the factor's placements for
    row-sharded sides and sharded ordinary parameters, a whole tensor otherwise), then handed to
    ``opt.load_state_dict`` (its validation included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = storage_reader or dcp.FileSystemReader(checkpoint_id)
    md = reader.read_metadata()
    paths = md.planner_data or {}
    names = _param_names(opt, model)
    by_name: dict[str, tuple[dict, int, Tensor]] = {}
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            by_name[names[len(by_name)]] = (g, i, p)
    from torch.distributed.checkpoint._traverse import set_element

    root: dict[str, Any] = {}
    for flat, path in paths.items():
        if not path or path[0] != key:
            continue
        meta = md.state_dict_metadata[flat]
        value: Any = None  # non-tensor values: read as they were saved
        if isinstance(meta, TensorStorageMetadata):
            value = _empty_state(opt, by_name, path[1:], meta)
        set_element(root, path, value)  # (lists where the saved path has list indices)
    if key not in root or "param_groups" not in root[key]:
        raise ValueError(f"checkpoint {checkpoint_id!r} holds no optimizer state {key!r}")
    dcp.load(root, storage_reader=reader, checkpoint_id=checkpoint_id)
    saved = root[key]
    order = {n: i for i, n in enumerate(names)}
    unknown = [n for n in saved.get("state", {}) if n not in order]
    if unknown:
        raise ValueError(
            f"checkpoint {checkpoint_id!r}: optimizer state of {unknown[:3]}, which are not "
            f"parameters of this optimizer"
        )
    sd = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    sd["state"] = {order[n]: v for n, v in saved.get("state", {}).items()}
    sd["param_groups"] = [
        {**g, "params": [order.get(n, -1) for n in g["params"]]} for g in saved["param_groups"]
    ]
    opt.load_state_dict(sd)


def _empty_state(opt: Any, by_name: dict, path: tuple, meta: Any) -> Tensor:
    """An empty tensor to load the saved state tensor at ``path`` (``("state", fqn, key)``)
    into, laid out as the optimizer uses it now."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    plain = torch.empty(size, dtype=dtype)
    if len(path) != 3 or path[0] != "state" or path[1] not in by_name:
        return plain
    g, i, p = by_name[path[1]]
    if not is_dtensor(p):
        return plain.to(p.device)
    k = path[2]
    dev = p._local_tensor.device
    if not g.get("lora_pair"):
        if size == tuple(p.shape):
            return torch.empty_like(p, dtype=dtype)
        return plain.to(dev)
    B, A = g["params"]
    try:
        lay = pair_shards(opt, g, B, A)
    except (NotImplementedError, ValueError):
        lay = None
    if lay is None or lay.whole:
        return plain.to(dev)
    if k.startswith("robust_exp_avg") and k[-2:] in ("_B", "_A"):
        f = B if k.endswith("_B") else A  # the robust start runs on the DTensor factors
        return torch.empty_like(f, dtype=dtype) if size == tuple(f.shape) else plain.to(dev)
    side = opt._state_side(k, g)
    rows = None if side is None else lay._row_spec(side)
    if rows is None or not size or size[0] != rows[1]:
        return plain.to(dev)
    f = B if side == "M" else A
    local_rows = f._local_tensor.shape[0 if side == "M" else 1]
    local = torch.empty((local_rows, *size[1:]), dtype=dtype, device=dev)
    return lay.wrap_state(side, local, k)
