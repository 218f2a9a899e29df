"""geolora optimizers for Hugging Face ``transformers.Trainer`` and ``peft`` models.

:func:`create_optimizer` builds an optimizer by its registry name from the LoRA pairs of a model
(:func:`~geolora.optim.groups.lora_param_groups`: geolora ``LoRALinear`` and peft LoRA layers
alike) and hands it to the Trainer::

    opt = create_optimizer(peft_model, "adams", lr=1e-3)
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=ds,
                                   optimizers=(opt, None))

With ``optimizers=(opt, None)`` the Trainer creates its learning-rate scheduler
(``args.lr_scheduler_type``, warm-up included) on ``opt``: a ``torch.optim.lr_scheduler.LambdaLR``
that rescales every param group's ``"lr"`` from its ``"initial_lr"`` at each step. geolora
optimizers read ``group["lr"]`` at every step (LoRA pairs, the robust start and the ordinary
group), so the schedule applies to all of them; an explicit ``other_lr`` is a fixed number and is
not scheduled. ``args.learning_rate`` is not used: the optimizer's own ``lr`` is the peak.

With FSDP (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``) the Trainer refuses
``optimizers=(opt, None)`` and creates the optimizer itself: :func:`trainer_class` makes a
Trainer subclass whose ``create_optimizer`` is :func:`create_optimizer` (docs/distributed.md).

This module does not import ``transformers``: the optimizer is a plain ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from geolora.optim.groups import lora_param_groups

if TYPE_CHECKING:
    from geolora.bench.registry import OptimizerRegistry

__all__ = ["create_optimizer", "trainer_class"]


def _registry() -> OptimizerRegistry:
    """The bench registry with every built-in optimizer registered."""
    import geolora.bench.catalog  # noqa: F401  (registers the geolora optimizers)
    from geolora.bench.registry import REGISTRY

    return REGISTRY


def create_optimizer(
    model: nn.Module,
    name: str = "adams",
    lr: float | None = None,
    *,
    adapter: str | Iterable[str] | None = None,
    unsupported: str = "raise",
    **kw: Any,
) -> torch.optim.Optimizer:
    """The optimizer registered as ``name`` over ``lora_param_groups(model)``.

    Every trainable LoRA pair ``(B, A)`` of ``model`` (``ΔW = s · B A``, ``B: (out, r)``,
    ``A: (r, in)``) becomes one ``lora_pair`` group with its scaling ``s``; the other trainable
    parameters (e.g. a classifier head in peft's ``modules_to_save``) form one ordinary group,
    updated with AdamW (``other_lr``, ``other_weight_decay`` options of geolora optimizers).

    Args:
        model: a model with geolora ``LoRALinear`` layers (:func:`geolora.lora.inject_lora`) or a
            peft LoRA model (``peft.get_peft_model``).
        name: a name of ``geolora bench --list`` (the registry :mod:`geolora.optim.registry`
            plus ``adamw`` and the ``grid_*`` entries). ``invariant_dora`` needs a peft DoRA
            model (its magnitudes are linked to their pairs); ``polar`` and ``stella`` need
            three-factor adapters (:func:`geolora.lora.inject_adapter`).
        lr: peak learning rate; ``None`` takes the registry's default for ``name``.
        adapter: with several peft adapters, train only this one (or these).
        unsupported: peft LoRA parameters that are not a supported pair (Conv LoRA, other
            variants and tuners): ``"raise"`` or train them as ``"ordinary"`` AdamW parameters
            with a warning (see ``lora_param_groups``).
        **kw: further options of the optimizer class (e.g. ``robust_steps``, ``betas``,
            ``weight_decay``, ``other_lr``).

    Returns:
        the optimizer; pass it as ``transformers.Trainer(..., optimizers=(opt, None))``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``name`` (the message lists the known names), ``lr <= 0``, a model
            without trainable parameters, or a bad LoRA layout (see ``lora_param_groups``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number or None, got lr={lr!r}")
    spec = _registry().get(name)  # ValueError listing the known names
    dora = "linked" if spec.adapter == "dora" else "ordinary"
    groups = lora_param_groups(model, adapter=adapter, unsupported=unsupported, dora=dora)
    if not groups:
        raise ValueError(
            "model has no trainable parameters: attach LoRA (geolora.lora.inject_lora or "
            "peft.get_peft_model) or unfreeze some parameters"
        )
    return spec.build(groups, lr, **kw)


def trainer_class(base: type, name: str = "adams", lr: float | None = None, **kw: Any) -> type:
    """A subclass of the ``transformers.Trainer`` class ``base`` whose ``create_optimizer``
    builds the geolora optimizer ``name`` (:func:`create_optimizer` with ``lr`` and ``kw``).

    Needed with FSDP (``TrainingArguments(fsdp=..., fsdp_config={"version": 2})``), where the
    Trainer refuses ``optimizers=(opt, None)``: it creates the optimizer itself, from the
    unwrapped model, and ``accelerate`` then swaps its parameters for the sharded ``DTensor`` s
    (see docs/distributed.md)::

        Trainer = trainer_class(transformers.Trainer, "scaled_gd", lr=1e-2, momentum=0.9)
        Trainer(model=peft_model, args=args, train_dataset=ds).train()
    """
    if not isinstance(base, type):
        raise TypeError(f"base must be a Trainer class, got {type(base).__name__}")
    _registry().get(name)  # ValueError listing the known names, before any training starts

    def create_optimizer_(self: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            target = self.model if model is None else model
            self.optimizer = create_optimizer(target, name, lr, **kw)
        return self.optimizer

    return type(
        f"Geolora{base.__name__}",
        (base,),
        {"create_optimizer": create_optimizer_, "__doc__": f"{base.__name__} with {name}."},
    )
