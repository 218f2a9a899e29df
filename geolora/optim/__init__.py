"""Optimizers: one template (preconditioner on T_X + lift/retraction), many instances."""

from geolora.optim.base import LoRAOptimizer
from geolora.optim.groups import lora_param_groups
from geolora.optim.lifted import AdamS, LiftedOptimizer
from geolora.optim.lora_rite import LoRARite
from geolora.optim.loraplus import LoRAPlus
from geolora.optim.scaled import RiemannianPreconditionedAdamW, ScaledGD

__all__ = [
    "AdamS",
    "LiftedOptimizer",
    "LoRAOptimizer",
    "LoRAPlus",
    "LoRARite",
    "RiemannianPreconditionedAdamW",
    "ScaledGD",
    "lora_param_groups",
]
