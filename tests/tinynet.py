"""A tiny deterministic classifier for tests: it answers with the image's dominant colour channel."""

from __future__ import annotations

import os

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


STALL = 7.0  # a checkpoint whose fc.bias[0] is this hangs StallingNet's forward pass


class StallingNet(ColourNet):
    """ColourNet, whose loading hangs, as a read from a hung network mount would, when the checkpoint's
    fc.bias[0] is STALL: it opens the FIFO named by $TINYNET_STALL_FIFO, which blocks until a test opens the
    other end."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        bias = state_dict.get(f"{prefix}fc.bias")
        if bias is not None and float(bias[0]) == STALL:
            with open(os.environ["TINYNET_STALL_FIFO"], "rb") as fifo:
                fifo.read()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


def stalling_net(num_classes: int = 3) -> nn.Module:
    return StallingNet(num_classes)


class BranchingNet(ColourNet):
    """ColourNet with a branch on the batch's values, which torch.export refuses (data-dependent control
    flow) and torch.compile takes (a graph break)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = super().forward(x)
        if bool(x.mean() > 2.0):  # never, for images normalised as served
            scores = -scores
        return scores


class ScaledNet(ColourNet):
    """ColourNet whose scores are multiplied by `factor`, a Python number: compiled code holds it as written,
    in no tensor, so two checkpoints of one definition can answer differently with the same weights."""

    def __init__(self, num_classes: int = 3, factor: float = 1.0) -> None:
        super().__init__(num_classes)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.factor


class OffsetNet(ColourNet):
    """ColourNet whose forward adds a tensor it makes itself: a compiled constant that is none of its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.tensor([0.5, 0.0, 0.0])


class HeavyNet(nn.Module):
    """A few wide convolutions: quick to compile, about 0.1 s a forward of 4 small images on two cores."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 256, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.convs(x)).flatten(1))


class RegionNet(nn.Module):
    """A convolution, then torchvision's roi_align over a fixed region of each image: an op AOTInductor does not
    compile into a library, which calls it through torch's proxy executor instead."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Imported here: every server a test starts imports this file, and torchvision takes seconds to import.
        from torchvision.ops import roi_align

        features = self.conv(x)
        index = torch.arange(x.shape[0], dtype=x.dtype, device=x.device).unsqueeze(1)
        corners = torch.tensor([[2.0, 2.0, 12.0, 12.0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 4)
        regions = roi_align(features, torch.cat([index, corners], dim=1), output_size=(2, 2), sampling_ratio=2)
        return self.fc(regions.flatten(1))
