"""A tiny vision transformer built from ``nn.TransformerEncoder``: a user's model with attention weights."""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    """Patches of 7x7 -> 32-wide tokens -> two encoder layers (4 heads) -> mean -> classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, width, 7, stride=7)
        n_tokens = (image_size // 7) ** 2
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, width))
        layer = nn.TransformerEncoderLayer(width, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(tokens).mean(1))


def tiny_vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return TinyViT(num_classes, in_channels, image_size)
