"""Optimizers: one template (preconditioner on T_X + lift/retraction), many instances."""

from geolora.optim.base import LoRAOptimizer
from geolora.optim.groups import lora_param_groups
from geolora.optim.lifted import AdamS, LiftedOptimizer

__all__ = ["AdamS", "LiftedOptimizer", "LoRAOptimizer", "lora_param_groups"]
