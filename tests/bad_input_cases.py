"""The bad-input table: one row per invalid input, its exception type and message excerpt.

Single source for ``tests/test_reliability.py`` (one parametrized test per row) and
``docs/bad_input.md`` (the test checks that the document's table is exactly
:func:`markdown_rows`). Every row builds its optimizer through ``make(groups, **kwargs)``, the
zoo factory of the optimizer under test.

* ``excerpt`` is the documented text for :class:`geolora.optim.AdamS` (checked verbatim);
* ``names`` is the parameter / option the message must name — rows with ``scope="all"`` are
  run on every zoo optimizer and only the exception type and ``names`` are checked there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Make = Callable[..., torch.optim.Optimizer]

M, N, R = 12, 10, 3


def _p(*shape: int, dtype: torch.dtype = torch.float32, device: str | None = None) -> nn.Parameter:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    t = torch.randn(*shape, generator=g, dtype=dtype)
    return nn.Parameter(t.to(device) if device is not None else t)


def _pair(B: Any, A: Any, name: str = "l0", **extra: Any) -> dict[str, Any]:
    return {"params": [B, A], "lora_pair": True, "scaling": 1.0, "name": name, **extra}


def _good(name: str = "l0") -> dict[str, Any]:
    return _pair(_p(M, R), _p(R, N), name)


def _dup_across_groups(make: Make) -> Any:
    B0, A0, B1 = _p(M, R), _p(R, N), _p(M, R)
    return make([_pair(B0, A0, "l0"), _pair(B1, A0, "l1")])


@dataclass(frozen=True)
class BadInput:
    """One row of the table.

    Attributes:
        id: pytest id and first column.
        input: what is wrong, in words (second column).
        exc: expected exception type.
        excerpt: substring of AdamS's message (documented).
        names: the parameter / option the message names (checked for every optimizer in scope).
        scope: ``"all"`` (every zoo optimizer) or ``"adams"`` (AdamS options).
        build: ``build(make)`` constructs the optimizer (and raises).
    """

    id: str
    input: str
    exc: type[Exception]
    excerpt: str
    names: str
    scope: str
    build: Callable[[Make], Any]

    def row(self) -> str:
        """The Markdown table row of this case."""
        where = "every optimizer" if self.scope == "all" else "AdamS"
        return (
            f"| `{self.id}` | {self.input} | `{self.exc.__name__}` | `{self.excerpt}` | {where} |"
        )


CASES: list[BadInput] = [
    BadInput(
        "rank_mismatch",
        "lora_B (12, 3) with lora_A (2, 10)",
        ValueError,
        "lora_pair 'l0': rank mismatch",
        "l0",
        "all",
        lambda make: make([_pair(_p(M, R), _p(2, N))]),
    ),
    BadInput(
        "a_transposed",
        "lora_A given as (in, r) = (10, 3) instead of (r, in)",
        ValueError,
        "lora_pair 'l0': rank mismatch",
        "l0",
        "all",
        lambda make: make([_pair(_p(M, R), _p(N, R))]),
    ),
    BadInput(
        "rank_zero",
        "rank 0: lora_B (12, 0), lora_A (0, 10)",
        ValueError,
        "lora_pair 'l0': rank r=0 must be in [1, min(out, in)=10]",
        "l0",
        "all",
        lambda make: make([_pair(_p(M, 0), _p(0, N))]),
    ),
    BadInput(
        "rank_too_large",
        "rank 6 > min(out, in) = 4: lora_B (4, 6), lora_A (6, 5)",
        ValueError,
        "lora_pair 'l0': rank r=6 must be in [1, min(out, in)=4]",
        "l0",
        "all",
        lambda make: make([_pair(_p(4, 6), _p(6, 5))]),
    ),
    BadInput(
        "b_1d",
        "1-D lora_B of shape (12,)",
        ValueError,
        "l0.lora_B must be 2-D, got shape (12,)",
        "l0.lora_B",
        "all",
        lambda make: make([_pair(_p(M), _p(R, N))]),
    ),
    BadInput(
        "conv_rank_mismatch",
        "3-D (convolution) lora_A of shape (2, 3, 10) with lora_B (12, 3)",
        ValueError,
        "lora_pair 'l0': rank mismatch, lora_B is (12, 3) (out, r) but lora_A is (2, 3, 10)",
        "l0",
        "all",
        lambda make: make([_pair(_p(M, R), _p(2, R, N))]),
    ),
    BadInput(
        "conv_b_kernel",
        "convolution lora_B of shape (12, 3, 3, 3) (its kernel must be 1 x 1)",
        ValueError,
        "l0.lora_B has shape (12, 3, 3, 3): a convolution lora_B must be (out, r, 1, ..., 1)",
        "l0.lora_B",
        "all",
        lambda make: make([_pair(_p(M, R, 3, 3), _p(R, N))]),
    ),
    BadInput(
        "swapped_pair",
        "pair of a square layer given as [A, B]: lora_A (3, 10) first, lora_B (10, 3) second",
        ValueError,
        "lora_pair 'l0': rank r=10 must be in [1, min(out, in)=3] (lora_B (3, 10), lora_A "
        "(10, 3)); the factors look swapped: pass [lora_B, lora_A]",
        "l0",
        "all",
        lambda make: make([_pair(_p(R, N), _p(N, R))]),
    ),
    BadInput(
        "same_tensor_twice",
        "the same tensor as lora_B and lora_A",
        ValueError,
        "lora_pair 'l0': lora_B and lora_A are the same tensor",
        "l0",
        "all",
        lambda make: (lambda t: make([_pair(t, t)]))(_p(R, R)),
    ),
    BadInput(
        "not_a_tensor",
        "lora_B is a Python list",
        TypeError,
        "l0.lora_B must be a tensor, got list",
        "l0.lora_B",
        "all",
        lambda make: make([_pair([[0.0] * R] * M, _p(R, N))]),
    ),
    BadInput(
        "integer_dtype",
        "lora_B of dtype int64",
        TypeError,
        "l0.lora_B must be floating point, got torch.int64",
        "l0.lora_B",
        "all",
        lambda make: make([_pair(torch.zeros(M, R, dtype=torch.int64), _p(R, N))]),
    ),
    BadInput(
        "three_tensors",
        "a lora_pair group with three tensors",
        ValueError,
        "lora_pair group 'l0' must hold exactly two tensors [B, A], got 3",
        "l0",
        "all",
        lambda make: make(
            [{"params": [_p(M, R), _p(R, N), _p(N)], "lora_pair": True, "name": "l0"}]
        ),
    ),
    BadInput(
        "dtype_mix",
        "lora_B float32 with lora_A float64",
        TypeError,
        "lora_pair 'l0': dtype mix, lora_B torch.float32 vs lora_A torch.float64",
        "l0",
        "all",
        lambda make: make([_pair(_p(M, R), _p(R, N, dtype=torch.float64))]),
    ),
    BadInput(
        "meta_device",
        "lora_A on the meta device (no data)",
        ValueError,
        "l0.lora_A is on the meta device (shape (3, 10), no data)",
        "l0.lora_A",
        "all",
        lambda make: make([_pair(_p(M, R), _p(R, N, device="meta"))]),
    ),
    BadInput(
        "scaling_zero",
        'pair group with `"scaling": 0.0`',
        ValueError,
        "lora_pair 'l0': scaling must be a finite number > 0, got 0.0",
        "scaling",
        "all",
        lambda make: make([_pair(_p(M, R), _p(R, N), scaling=0.0)]),
    ),
    BadInput(
        "duplicate_across_groups",
        "the same lora_A tensor in pairs 'l0' and 'l1'",
        ValueError,
        "l1.lora_A",
        "l1.lora_A",
        "all",
        _dup_across_groups,
    ),
    BadInput(
        "unknown_group_option",
        'pair group with an unknown key `"betaz"`',
        ValueError,
        "unknown option(s) ['betaz'] in 'l0'",
        "betaz",
        "all",
        lambda make: make([_good() | {"betaz": (0.9, 0.99)}]),
    ),
    BadInput(
        "unknown_kwarg",
        "constructor keyword `betaz=(0.9, 0.99)`",
        TypeError,
        "AdamS got unknown option(s) ['betaz']",
        "betaz",
        "all",
        lambda make: make([_good()], betaz=(0.9, 0.99)),
    ),
    BadInput(
        "negative_lr",
        "`lr=-0.001`",
        ValueError,
        "invalid lr: -0.001 in 'l0' (expected a finite number >= 0)",
        "lr",
        "all",
        lambda make: make([_good()], lr=-1e-3),
    ),
    BadInput(
        "nan_lr",
        "`lr=nan`",
        ValueError,
        "invalid lr: nan in 'l0' (expected a finite number >= 0)",
        "lr",
        "all",
        lambda make: make([_good()], lr=float("nan")),
    ),
    BadInput(
        "inf_lr",
        "`lr=inf`",
        ValueError,
        "invalid lr: inf in 'l0' (expected a finite number >= 0)",
        "lr",
        "all",
        lambda make: make([_good()], lr=float("inf")),
    ),
    BadInput(
        "bool_lr",
        "`lr=True` (a bool is not a learning rate)",
        ValueError,
        "invalid lr: True in 'l0'",
        "lr",
        "all",
        lambda make: make([_good()], lr=True),
    ),
    BadInput(
        "negative_group_lr",
        'pair group with `"lr": -1.0`',
        ValueError,
        "invalid lr: -1.0",
        "lr",
        "all",
        lambda make: make([_good() | {"lr": -1.0}]),
    ),
    BadInput(
        "nonfinite_mode",
        '`nonfinite="ignore"`',
        ValueError,
        "nonfinite must be one of ('raise', 'skip'), got 'ignore'",
        "nonfinite",
        "all",
        lambda make: make([_good()], nonfinite="ignore"),
    ),
    BadInput(
        "betas_one",
        "`betas=(1.0, 0.999)`",
        ValueError,
        "invalid betas[0]: 1.0 (expected a number in [0.0, 1.0))",
        "betas[0]",
        "adams",
        lambda make: make([_good()], betas=(1.0, 0.999)),
    ),
    BadInput(
        "betas_negative",
        "`betas=(0.9, -0.1)`",
        ValueError,
        "invalid betas[1]: -0.1",
        "betas[1]",
        "adams",
        lambda make: make([_good()], betas=(0.9, -0.1)),
    ),
    BadInput(
        "betas_length",
        "`betas=(0.9,)`",
        ValueError,
        "invalid betas: (0.9,) (expected 2 numbers in [0, 1))",
        "betas",
        "adams",
        lambda make: make([_good()], betas=(0.9,)),
    ),
    BadInput(
        "group_betas",
        'pair group with `"betas": (0.9, 1.5)`',
        ValueError,
        "invalid betas[1]: 1.5",
        "betas[1]",
        "adams",
        lambda make: make([_good() | {"betas": (0.9, 1.5)}]),
    ),
    BadInput(
        "negative_eps",
        "`eps=-1e-08`",
        ValueError,
        "invalid eps: -1e-08",
        "eps",
        "adams",
        lambda make: make([_good()], eps=-1e-8),
    ),
    BadInput(
        "negative_weight_decay",
        "`weight_decay=-0.1`",
        ValueError,
        "invalid weight_decay: -0.1",
        "weight_decay",
        "adams",
        lambda make: make([_good()], weight_decay=-0.1),
    ),
    BadInput(
        "other_betas",
        "`other_betas=(0.9, 1.0)` (AdamW of ordinary groups)",
        ValueError,
        "invalid other_betas[1]: 1.0",
        "other_betas[1]",
        "adams",
        lambda make: make([_good()], other_betas=(0.9, 1.0)),
    ),
    BadInput(
        "negative_robust_steps",
        "`robust_steps=-1`",
        ValueError,
        "robust_steps must be an integer >= 0, got -1",
        "robust_steps",
        "adams",
        lambda make: make([_good()], robust_steps=-1),
    ),
    BadInput(
        "bool_robust_steps",
        "`robust_steps=True`",
        ValueError,
        "robust_steps must be an integer >= 0, got True",
        "robust_steps",
        "adams",
        lambda make: make([_good()], robust_steps=True),
    ),
    BadInput(
        "bool_eps",
        "`eps=True`",
        ValueError,
        "invalid eps: True",
        "eps",
        "adams",
        lambda make: make([_good()], eps=True),
    ),
    BadInput(
        "unknown_metric",
        '`metric="hyperbolic"`',
        ValueError,
        "unknown metric 'hyperbolic'",
        "metric",
        "adams",
        lambda make: make([_good()], metric="hyperbolic"),
    ),
]

HEADER = (
    "| case | input | exception | message excerpt (AdamS) | checked on |",
    "| --- | --- | --- | --- | --- |",
)


def markdown_rows() -> list[str]:
    """The table rows of :data:`CASES`, in order (what ``docs/bad_input.md`` must contain)."""
    return [c.row() for c in CASES]
