"""Integrations of geolora optimizers with training frameworks (Hugging Face ``transformers``)."""

from geolora.integrations.hf import create_optimizer

__all__ = ["create_optimizer"]
