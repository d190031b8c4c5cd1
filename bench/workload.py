"""What every server is fed: the same JPEG uploads and resnet18 weights, and the checkpoints dropped in reloads."""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

MODEL = "resnet18"
NUM_CLASSES = 1000
WIDTH, HEIGHT = 640, 480
JPEG_QUALITY = 90
# Every server answers the same 5 uploads in the same order; decode cost depends on the content.
N_IMAGES = 5


def jpeg_images(n: int = N_IMAGES) -> list[bytes]:
    """Gradients, shapes and mild noise, 640x480, quality 90: deterministic, photo-like decode cost."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        angle = i * np.pi / n
        ramp = (np.cos(angle) * x / WIDTH + np.sin(angle) * y / HEIGHT) * 255.0
        rgb = np.stack([ramp, 255.0 - ramp, np.full_like(ramp, 40.0 * i)], axis=-1)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, WIDTH - 120)), int(rng.integers(0, HEIGHT - 120))
            size = int(rng.integers(40, 120))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
            else:
                draw.rectangle((x0, y0, x0 + size, y0 + size), fill=colour)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, (HEIGHT, WIDTH, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


def state_dict(seed: int, num_classes: int = NUM_CLASSES) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision resnet18 (its own init), seeded."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def variant(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A distinct valid checkpoint without paying for a full init: the classifier bias moves by a seeded amount."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(base)
    out["fc.bias"] = base["fc.bias"] + 0.01 * torch.randn(base["fc.bias"].shape, generator=gen)
    return out


def with_nan(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(base)
    weight = base["layer2.0.conv1.weight"].clone()
    weight.view(-1)[:3] = float("nan")
    out["layer2.0.conv1.weight"] = weight
    return out


def to_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def state_dict_bytes(sd: dict[str, torch.Tensor]) -> int:
    """The model's size in memory: the bytes of every tensor in its state_dict."""
    return sum(t.numel() * t.element_size() for t in sd.values())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Staged:
    """A checkpoint written under a hidden name in the watched folder, ready to be renamed into place."""

    kind: str  # "valid", "truncated", "nan", "wrong_classes"
    tmp: Path
    final: Path
    sha256: str

    def land(self) -> None:
        os.replace(self.tmp, self.final)


def stage(folder: Path, name: str, data: bytes, kind: str) -> Staged:
    """Hidden names are never candidates, so the daemon ignores the file until the rename."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    return Staged(kind, tmp, folder / name, sha256(data))


def drop(folder: Path, name: str, data: bytes) -> float:
    """Write to a temp name, then os.replace into place (a careful trainer); returns when it landed."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    landed = time.time()
    os.replace(tmp, folder / name)
    return landed


def write_in_place(path: Path, data: bytes, chunk: int = 1 << 20, pause_s: float = 0.005) -> float:
    """Write the final name directly, slowly in chunks (a naive trainer or `cp`); returns when it closed.

    The time is taken just before close(), as `drop` takes it just before the rename: taken after,
    it could come later than the daemon's own reaction to the close (this thread shares the GIL)."""
    with open(path, "wb") as fh:
        for i in range(0, len(data), chunk):
            fh.write(data[i : i + chunk])
            fh.flush()
            time.sleep(pause_s)
        closing = time.time()
    return closing


def checkpoints_folder(root: Path, name: str, initial: bytes) -> Path:
    """A fresh `root`/`name`/checkpoints holding `initial` as version 1: what each server of a run watches."""
    folder = root / name / "checkpoints"
    folder.mkdir(parents=True)
    (folder / f"{MODEL}-v1.pt").write_bytes(initial)
    return folder


def reloader_config(
    root: Path,
    checkpoints: Path,
    *,
    queue_size: int,
    precision: str = "fp32",
    optimize: str = "none",
    draft_gap: float | None = 2.0,
    device: str = "cpu",
    max_batch: int = 8,
) -> Path:
    """The reloader defaults for resnet18, plus a bounded queue small enough for c=64 to reach it."""
    path = root / "models.yaml"
    path.write_text(
        "server:\n"
        "  host: 127.0.0.1\n"
        "  port: 0\n"
        f"  default_model: {MODEL}\n"
        "  access_log: false\n"
        "  request_timeout_s: 60\n"
        "models:\n"
        f"  {MODEL}:\n"
        f"    arch: {MODEL}\n"
        f"    num_classes: {NUM_CLASSES}\n"
        "    labels: imagenet\n"
        f"    checkpoints: {checkpoints}\n"
        f"    preprocess: {{resize: 256, crop: 224, draft_gap: {'null' if draft_gap is None else draft_gap}}}\n"
        f"    batch: {{max_size: {max_batch}, queue_size: {queue_size}}}\n"
        f"    precision: {precision}\n"
        f"    device: {device}\n"
        f"    optimize: {optimize}\n"
    )
    return path
