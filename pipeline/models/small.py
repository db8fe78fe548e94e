"""Small models for small inputs (digits 8x8 and alike)."""

from __future__ import annotations

import math

from torch import nn

from pipeline.models import register_model


@register_model
def mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: list[int] | tuple[int, ...] = (128,),
    dropout: float = 0.0,
) -> nn.Module:
    """Flatten → [Linear → ReLU → Dropout] per hidden size → Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model
def cnn(
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: list[int] | tuple[int, ...] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.25,
) -> nn.Module:
    """Two 3x3 conv blocks (the second pooled), global average pool, MLP head.

    Sized for 8x8 inputs but any spatial size works: the pool is adaptive.
    """
    in_ch = input_shape[0]
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_ch, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c2 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
