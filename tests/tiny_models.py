"""Small models and data shared by the tests: a tiny randomly initialised BERT (injection,
param groups, safetensors round trips; no weights are downloaded), the seeded regression
batches and the whole-parameter snapshots of the distributed tests."""

from __future__ import annotations

import torch

__all__ = ["regression_batch", "tiny_bert", "trainable_parameters"]


def tiny_bert() -> torch.nn.Module:
    """``transformers.BertModel`` with 2 layers, hidden size 16, 2 heads, intermediate size 32,
    vocabulary 40 and 16 positions, its weights drawn after ``torch.manual_seed(0)``."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return BertModel(cfg)


def regression_batch(
    step: int, size: int, d_in: int, d_out: int, seed: int = 100, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch ``(x, y)`` of step ``step``, drawn from ``seed + step``: the same on
    every rank, so each rank takes its slice and a single process the whole."""
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(size, d_in, generator=g, dtype=dtype)
    return x, torch.randn(size, d_out, generator=g, dtype=dtype)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter, whole (``full_tensor`` of a sharded DTensor: a
    collective, so every rank calls it)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p = p.detach()
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out
