"""Integrations of geolora optimizers with training frameworks (Hugging Face ``transformers``)."""

from geolora.integrations.hf import create_optimizer, trainer_class

__all__ = ["create_optimizer", "trainer_class"]
