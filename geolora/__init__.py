"""geolora: Riemannian optimization of low-rank adapters (LoRA) in PyTorch.

Subpackages: :mod:`geolora.manifolds` (geometry), :mod:`geolora.retractions`,
:mod:`geolora.optim` (optimizers), :mod:`geolora.lora` (adapters), :mod:`geolora.checks`,
:mod:`geolora.bench` (the ``geolora bench`` harness).
"""

# The manifolds package is imported first: the retraction modules import its point types, and
# the manifolds import the retractions, so this fixes one import order for every entry point.
from geolora import manifolds as manifolds  # noqa: F401

__version__ = "0.1.0"
