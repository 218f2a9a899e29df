"""A tiny randomly initialised BERT, shared by the LoRA tests that need a real transformer
(injection, param groups, safetensors round trips). No weights are downloaded."""

from __future__ import annotations

import torch

__all__ = ["tiny_bert"]


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
