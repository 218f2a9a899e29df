"""Optimizers: one template — ``PairOptimizer(preconditioner, geometry, move)`` — many instances.

The template and its contract: :mod:`geolora.optim.base`; geometries and moves:
:mod:`geolora.optim.geometry`, :mod:`geolora.optim.manifold_pair`; preconditioners:
:mod:`geolora.optim.preconditioners`; the step engine: :mod:`geolora.optim.engine`.
"""

from geolora.optim.base import LoRAOptimizer, PairOptimizer
from geolora.optim.checkpoint import load_optimizer_state, save_optimizer_state
from geolora.optim.dora import InvariantDoRA
from geolora.optim.groups import lora_param_groups
from geolora.optim.lifted import AdamS, LiftedOptimizer
from geolora.optim.lifted_sgd import LiftedSGD
from geolora.optim.lora_pro import LoRAPro
from geolora.optim.lora_rite import LoRARite
from geolora.optim.loram import LoRAMBoundedRank, LoRAMFixedRank
from geolora.optim.loraplus import LoRAPlus
from geolora.optim.lracs import LRACS
from geolora.optim.polar import PoLAR
from geolora.optim.reflora import RefLoRA
from geolora.optim.riemannian import ManifoldParameter, RiemannianAdam, RiemannianSGD
from geolora.optim.riemannion import Riemannion
from geolora.optim.scaled import RiemannianPreconditionedAdamW, ScaledGD
from geolora.optim.shampoo import LiftedShampoo
from geolora.optim.stella import StelLA, StelLAAdamW
from geolora.optim.stiefel_lora import StiefelLoRA
from geolora.optim.wrap import Lifted

__all__ = [
    "AdamS",
    "InvariantDoRA",
    "LRACS",
    "Lifted",
    "LiftedOptimizer",
    "LiftedSGD",
    "LiftedShampoo",
    "LoRAMBoundedRank",
    "LoRAMFixedRank",
    "LoRAOptimizer",
    "LoRAPro",
    "ManifoldParameter",
    "PairOptimizer",
    "RefLoRA",
    "PoLAR",
    "RiemannianAdam",
    "RiemannianSGD",
    "Riemannion",
    "StiefelLoRA",
    "LoRAPlus",
    "LoRARite",
    "RiemannianPreconditionedAdamW",
    "ScaledGD",
    "StelLA",
    "StelLAAdamW",
    "load_optimizer_state",
    "lora_param_groups",
    "save_optimizer_state",
]
