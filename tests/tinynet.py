"""A tiny deterministic classifier for tests: it answers with the image's dominant colour channel."""

from __future__ import annotations

import torch
from torch import nn

COLOURS = ("red", "green", "blue")


class ColourNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.pool(x).flatten(1)))


def colour_net(num_classes: int = 3) -> nn.Module:
    return ColourNet(num_classes)


def colour_state_dict(num_classes: int = 3, *, scale: float = 4.0, permute: tuple[int, ...] | None = None) -> dict:
    """Weights under which class i wins when channel i dominates; `permute` makes a deliberately wrong model."""
    model = ColourNet(num_classes)
    with torch.no_grad():
        weight = torch.zeros(num_classes, 3)
        for i in range(min(3, num_classes)):
            weight[i, i] = scale
        if permute is not None:
            weight = weight[list(permute)]
        model.fc.weight.copy_(weight)
        model.fc.bias.zero_()
    return {k: v.clone() for k, v in model.state_dict().items()}
