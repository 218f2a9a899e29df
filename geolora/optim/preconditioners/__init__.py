"""Preconditioners: step 2 of the template (:mod:`geolora.optim.base`), one transform per file.

=====================================  ======================================================
:mod:`~.base`                          protocol, forms of a direction, ``chain``, identity, clip
:mod:`~.momentum`                      factored heavy-ball / EMA momentum on ``T_X``
:mod:`~.adam`                          Adam on ``ξ`` (AdamS), on the equivalent gradient (LoRA-Pro)
:mod:`~.racs`                          row/column scaling (LRACS)
:mod:`~.shampoo`                       Shampoo with Frequent-Directions sketches
:mod:`~.torch_wrapped`                 any element-wise torch optimizer on a dense shadow of ``X``
:mod:`~.rite`                          LoRA-RITE's ``r x r`` matrix moments with basis transport
:mod:`~.factor`                        AdamW and heavy ball in factor coordinates
=====================================  ======================================================

The preconditioners of optimizers that own a manifold point (LoRAM, Stiefel-LoRA, Riemannion)
are in :mod:`geolora.optim.manifold_pair`.
"""

from geolora.optim.base import StepContext
from geolora.optim.preconditioners.adam import (
    DENSE_BLOCK_BYTES,
    AdamPreconditioner,
    EquivalentGradientAdam,
)
from geolora.optim.preconditioners.base import (
    ClipByNorm,
    Descent,
    FactorDirection,
    IdentityPreconditioner,
    LowRank,
    OneSided,
    Preconditioner,
    Products,
    chain,
)
from geolora.optim.preconditioners.factor import FactorAdamW, FactorHeavyBall
from geolora.optim.preconditioners.momentum import FactoredMomentum, HeavyBall, transport_factored
from geolora.optim.preconditioners.racs import RACSPreconditioner, inv_sqrt_floored, racs_scalings
from geolora.optim.preconditioners.rite import RITEPreconditioner
from geolora.optim.preconditioners.shampoo import ShampooPreconditioner
from geolora.optim.preconditioners.torch_wrapped import TorchOptimizerPreconditioner

__all__ = [
    "DENSE_BLOCK_BYTES",
    "AdamPreconditioner",
    "ClipByNorm",
    "Descent",
    "EquivalentGradientAdam",
    "FactorAdamW",
    "FactorDirection",
    "FactorHeavyBall",
    "FactoredMomentum",
    "HeavyBall",
    "IdentityPreconditioner",
    "LowRank",
    "OneSided",
    "Preconditioner",
    "Products",
    "RACSPreconditioner",
    "RITEPreconditioner",
    "ShampooPreconditioner",
    "StepContext",
    "TorchOptimizerPreconditioner",
    "chain",
    "inv_sqrt_floored",
    "racs_scalings",
    "transport_factored",
]
