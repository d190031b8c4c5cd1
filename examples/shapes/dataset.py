"""Synthetic shapes rendered with Pillow: a deterministic, index-seeded image dataset."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.transforms import v2

LABELS = ["circle", "square", "triangle", "star"]

SIZE = 72  # what the renderer draws; the daemon resizes to 72 and centre-crops 64
CROP = 64
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# Shapes stay inside the central crop with a small margin, so CenterCrop(64) never cuts them.
_LO, _HI = (SIZE - CROP) // 2 + 2, (SIZE + CROP) // 2 - 2
# Masks are drawn at this multiple and downsampled, which antialiases the edges.
_SUPER = 4


def preprocess() -> v2.Compose:
    """The daemon's pipeline for `preprocess: {resize: 72, crop: 64}` with ImageNet mean/std."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(SIZE, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(CROP),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=MEAN, std=STD),
        ]
    )


def _polygon(label: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    # Vertices on circles of radius r; r is the circumradius, so every shape fits in the same disc.
    if label == "square":
        radii, count = [r], 4
    elif label == "triangle":
        radii, count = [r], 3
    else:  # star: alternate outer and inner points; 0.4 keeps the arms distinct from a pentagon
        radii, count = [r, 0.4 * r], 10
    step = 2 * math.pi / count
    return [
        (
            cx + radii[i % len(radii)] * math.sin(angle + i * step),
            cy - radii[i % len(radii)] * math.cos(angle + i * step),
        )
        for i in range(count)
    ]


def _mask(label: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    size = SIZE * _SUPER
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * _SUPER, cy * _SUPER, r * _SUPER
    if label == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(label, cx, cy, r, angle), fill=255)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def compose(
    label_index: int,
    *,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    colour: np.ndarray,
    background: np.ndarray,
    noise: np.ndarray | None = None,
) -> Image.Image:
    """Paint one shape over a (SIZE, SIZE, 3) float background and return it as an RGB image."""
    mask = _mask(LABELS[label_index], centre[0], centre[1], radius, angle)
    pixels = background * (1.0 - mask) + colour * mask
    if noise is not None:
        pixels = pixels + noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _background(rng: np.random.Generator) -> np.ndarray:
    start = rng.uniform(0, 255, 3)
    if rng.random() < 0.4:
        return np.broadcast_to(start, (SIZE, SIZE, 3)).astype(np.float32)
    # A linear gradient in a random direction, towards a nearby colour so the mean stays predictable.
    end = np.clip(start + rng.uniform(-90, 90, 3), 0, 255)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    t = np.clip(xs * math.cos(theta) + ys * math.sin(theta) + 0.5, 0, 1)[..., None]
    return (start * (1 - t) + end * t).astype(np.float32)


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    # Rejection-sample until the shape stands out in brightness from the whole background,
    # not just from its mean: a gradient can cross the shape's luma otherwise.
    lumas = [_luma(background[y, x]) for y in (0, -1) for x in (0, -1)]
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if min(abs(_luma(colour) - luma) for luma in lumas) > 80:
            return colour
    # No colour is far enough from a mid-grey background in luma: take the farther extreme.
    return np.zeros(3) if np.mean(lumas) > 127 else np.full(3, 255.0)


def render(label_index: int, rng: np.random.Generator) -> Image.Image:
    """A random SIZE x SIZE RGB image of shape LABELS[label_index]."""
    background = _background(rng)
    # Large shapes and modest noise keep the task learnable in the first epoch's ~50 steps: after
    # resnet18's 4x stem a 15 px radius is still a few pixels across.
    radius = rng.uniform(15, 28)
    cx, cy = (rng.uniform(_LO + radius, _HI - radius) for _ in range(2))
    return compose(
        label_index,
        centre=(cx, cy),
        radius=radius,
        angle=rng.uniform(0, 2 * math.pi),
        colour=_contrasting(rng, background),
        background=background,
        noise=rng.normal(0, rng.uniform(0, 8), (SIZE, SIZE, 3)),
    )


class ShapesDataset(Dataset):
    """`length` images, item i is LABELS[i % 4] rendered from a generator seeded by (*seed, i)."""

    def __init__(self, length: int, seed: int | tuple[int, ...], transform=None):
        self.length = length
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset index {index} is outside 0..{self.length - 1}")
        # Seeding from (seed, index) makes each item independent of order and of worker count.
        rng = np.random.default_rng((*self.seed, index))
        label = index % len(LABELS)
        image = render(label, rng)
        return (self.transform(image) if self.transform else image), label


def golden(label_index: int) -> Image.Image:
    """The fixed, centred, high-contrast image of LABELS[label_index] used to warm up and gate a model."""
    background = np.broadcast_to(np.array([245.0, 245.0, 235.0]), (SIZE, SIZE, 3))
    return compose(
        label_index,
        centre=(SIZE / 2, SIZE / 2),
        # Near the top of the training range: small dark-on-light squares are what a young model
        # (epoch 2 at 94% held-out) still calls triangles, and a gate image should test the
        # model, not sit on its weakest edge.
        radius=26,
        # Angle 0 puts a vertex on top: stars and triangles stand upright, a square needs pi/4.
        angle=math.pi / 4 if LABELS[label_index] == "square" else 0.0,
        colour=np.array([25.0, 25.0, 112.0]),
        background=background,
    )
