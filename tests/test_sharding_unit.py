"""Single-process checks of :mod:`geolora.optim.sharding` (the multi-process behaviour is in
tests/test_sharded.py): the Gram-based QR against Householder QR in float64, its shifted
fallback, the Gram-based polar factor and the row-sharded Stiefel manifold against their
single-process forms, the identity reducer, the ``sharded`` option, the FSDP2 placement
function and the row-sharded Shampoo update (one round) against the unsharded one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geolora.linalg import polar, qr_pos
from geolora.lora import inject_lora
from geolora.manifolds.stiefel import Stiefel
from geolora.optim import AdamS, ScaledGD
from geolora.optim.groups import lora_param_groups
from geolora.optim.manifold_pair import RowShardedStiefel
from geolora.optim.sharding import (
    LOCAL,
    RowSum,
    fsdp2_shard_placement,
    gram_polar,
    gram_qr,
    gram_sqrt,
    pair_shards,
)


def _matrix(m: int, r: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(3, m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(3, r, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
    return U * s @ V.mT


def test_gram_qr_equals_householder_qr() -> None:
    F = _matrix(40, 5, 1e4)
    Q, R = gram_qr(F, LOCAL)
    Qh, Rh = qr_pos(F, "householder")
    assert (Q - Qh).abs().max() < 1e-10
    assert (R - Rh).abs().max() < 1e-10
    assert torch.all(torch.diagonal(R, dim1=-2, dim2=-1) > 0)


def test_gram_qr_shifted_fallback_on_ill_conditioned_factor() -> None:
    F = _matrix(40, 5, 1e11)  # the plain Gram is not numerically positive definite
    assert bool((torch.linalg.cholesky_ex(F.mT @ F)[1] != 0).any())
    calls = []

    def counting(**kw):
        calls.append(kw)
        return LOCAL(**kw)

    Q, R = gram_qr(F, counting)
    assert len(calls) == 3  # shifted CholeskyQR3: three rounds of reductions
    eye = torch.eye(5, dtype=torch.float64)
    assert (Q.mT @ Q - eye).abs().max() < 1e-10
    assert ((Q @ R - F).abs().max() / F.abs().max()) < 1e-12


def test_gram_qr_rank_deficient_is_nan() -> None:
    F = _matrix(20, 4, 10.0)
    F[..., 3] = 0.0
    Q, R = gram_qr(F, LOCAL)
    assert torch.isnan(Q).all() and torch.isnan(R).all()


def test_gram_sqrt_gives_singular_values_of_the_product() -> None:
    M, N = _matrix(30, 4, 1e3, 1), _matrix(20, 4, 1e2, 2)
    s = torch.linalg.svdvals(gram_sqrt(M.mT @ M) @ gram_sqrt(N.mT @ N).mT)
    assert (s - torch.linalg.svdvals(M @ N.mT)[..., :4]).abs().max() < 1e-12


def _stiefel_point_and_tangent(m: int = 17, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    man = Stiefel(m, r)
    g = torch.Generator().manual_seed(5)
    X = man.random_point(2, generator=g)
    U = man.proj(X, 0.3 * torch.randn(2, m, r, generator=g, dtype=torch.float64))
    return X, U


def test_gram_polar_equals_svd_polar() -> None:
    X, U = _stiefel_point_and_tangent()
    P = gram_polar(X + U, LOCAL)
    assert (P - polar(X + U)).abs().max() < 1e-14
    assert (P.mT @ P - torch.eye(4, dtype=P.dtype)).abs().max() < 1e-14


def test_row_sharded_stiefel_with_the_identity_reducer_is_stiefel() -> None:
    """One shard holding every row: the same projection and norm; the QR, polar and Cayley
    retractions from reduced ``r x r`` quantities within rounding of Householder QR, the SVD and
    the dense ``m x m`` Cayley solve."""
    X, U = _stiefel_point_and_tangent()
    Z = torch.randn_like(X)
    for name in ("qr", "polar", "cayley"):
        one, rows = Stiefel(17, 4, retraction=name), RowShardedStiefel(17, 4, name, RowSum())
        assert torch.equal(rows.proj(X, Z), one.proj(X, Z))
        assert torch.equal(rows.inner(X, U), one.inner(X, U))
        assert (rows.retr(X, U) - one.retr(X, U)).abs().max() < 1e-14
        assert (rows.transp(X, rows.retr(X, U), U) - one.transp(X, one.retr(X, U), U)).abs().max() < 1e-14
    with pytest.raises(ValueError, match="retraction"):
        RowShardedStiefel(17, 4, "exp", RowSum())
    assert RowSum().local_rows("M", X) is X  # nothing sharded: the whole tensor


def test_local_row_sum_is_identity() -> None:
    a, b = torch.randn(2, 3, 3), torch.randn(3, 3)
    M, N = LOCAL(M=[a], N=[b])
    assert M[0] is a and N[0] is b
    assert not LOCAL.sharded and RowSum(None, m_rows=True).sharded


def test_plain_tensors_have_no_layout_and_option_is_validated() -> None:
    model = nn.Sequential(nn.Linear(6, 8))
    inject_lora(model, "all-linear", r=2, init="gaussian", seed=0)
    groups = lora_param_groups(model)
    opt = ScaledGD(groups, lr=1e-2)
    assert opt.sharded == "auto" and opt.supports_row_shards
    assert not AdamS(lora_param_groups(model), lr=1e-2).supports_row_shards
    B, A = groups[0]["params"]
    assert pair_shards(opt, groups[0], B, A) is None
    with pytest.raises(ValueError, match="sharded must be one of"):
        ScaledGD(lora_param_groups(model), lr=1e-2, sharded="yes")


def test_fsdp2_placement_shards_lora_a_along_dim_1_when_even() -> None:
    from torch.distributed.tensor import Shard

    model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 13), nn.Linear(13, 4))
    inject_lora(model, "all-linear", r=2, init="gaussian", seed=0)
    fn = fsdp2_shard_placement(model, shard_size=4)
    assert fn(model[0].lora_A) == Shard(1)  # in = 12
    assert fn(model[1].lora_A) == Shard(1)  # in = 8
    assert fn(model[2].lora_A) is None  # in = 13: uneven along dim 1, FSDP2's default
    assert fn(model[0].lora_B) is None
    assert fn(model[0].base.weight) is None


def test_trainer_class_builds_the_geolora_optimizer() -> None:
    from geolora.integrations.hf import trainer_class

    class FakeTrainer:  # the two attributes create_optimizer reads
        def __init__(self, model: nn.Module) -> None:
            self.model, self.optimizer = model, None

    model = nn.Sequential(nn.Linear(6, 8))
    inject_lora(model, "all-linear", r=2, init="gaussian", seed=0)
    cls = trainer_class(FakeTrainer, "scaled_gd", lr=1e-2, momentum=0.9)
    assert issubclass(cls, FakeTrainer) and cls.__name__ == "GeoloraFakeTrainer"
    trainer = cls(model)
    opt = trainer.create_optimizer()
    assert isinstance(opt, ScaledGD) and opt.param_groups[0]["momentum"] == 0.9
    assert trainer.create_optimizer() is opt  # created once
    with pytest.raises(ValueError, match="nope"):
        trainer_class(FakeTrainer, "nope")
    with pytest.raises(TypeError, match="Trainer class"):
        trainer_class("transformers.Trainer")  # type: ignore[arg-type]


class _AllRows(RowSum):
    """A reducer that declares both sides row-sharded but holds every row (one process): the
    row-sharded code paths with identity sums, counting the rounds."""

    def __init__(self) -> None:
        super().__init__(None, m_rows=True, n_rows=True)
        self.calls = 0

    def rows(self, side: str, local: int) -> int:
        return local

    def _all_reduce(self, pieces: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
        self.calls += 1
        return pieces


@pytest.mark.parametrize("k", [2, 4, 20])
def test_sharded_shampoo_update_equals_unsharded(k: int) -> None:
    """The row-sharded Shampoo update (one round of reduced products: the FD Gram, the inverse
    fourth roots and the projection assembled from them) against the unsharded update and its
    projection, on one frame, over 4 steps (sketch rank 2 and 4 < m, n; 20: k = m, n)."""
    from geolora.manifolds.frame import make_frame
    from geolora.manifolds.types import FactorPoint, FixedRankTangent
    from geolora.optim.base import StepContext
    from geolora.optim.geometry import QuotientGeometry, QuotientPoint, to_tangent
    from geolora.optim.preconditioners.shampoo import ShampooPreconditioner

    g = torch.Generator().manual_seed(5)
    L, m, n, r = 2, 13, 12, 3
    x = FactorPoint(*(torch.randn(L, d, r, generator=g, dtype=torch.float64) for d in (m, n)))
    geo, pre, red = QuotientGeometry(), ShampooPreconditioner(k), _AllRows()
    hp = {"beta2": 0.9, "eps": 1e-6}
    frame = make_frame(x.M, x.N)
    like = x.M.new_empty(())
    st_local = {k_: v.expand(L, *v.shape).clone() for k_, v in pre.init_state(m, n, r, like).items()}
    st_rows = {key: v.clone() for key, v in st_local.items()}
    assert pre.init_state(m, n, r, like, red)["shampoo_L"].shape == (m, min(k, m))
    for step in range(1, 5):
        xi = to_tangent(frame, torch.randn(L, m, n, generator=g, dtype=torch.float64))
        ctx = StepContext(geo, QuotientPoint(x, frame, geo), hp, m, n, r)
        want = to_tangent(frame, pre.update(st_local, xi, ctx, hp, step))
        before = red.calls
        ctx = StepContext(geo, QuotientPoint(x, frame, geo, red), hp, m, n, r)
        got = pre.update(st_rows, xi, ctx, hp, step)
        assert red.calls == before + 1  # one round for everything
        assert isinstance(got, FixedRankTangent)
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    for key, v in st_local.items():
        if key.endswith("rho"):
            assert torch.allclose(st_rows[key], v, rtol=1e-12, atol=1e-14), key
        else:  # the sketches agree as Z Zᵀ (their columns are eigenvectors: signs are free)
            a, b = st_rows[key], v
            assert (a @ a.mT - b @ b.mT).abs().max() <= 1e-12 * (b @ b.mT).abs().max(), key
