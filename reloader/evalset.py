"""An evaluation set: labelled images in one subfolder per label name, read and checked when the config loads."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from .files import open_regular, shown
from .locations import resolve_path

# What torchvision's ImageFolder reads; other files in an evaluation set's folders are ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class Evaluation(BaseModel):
    """A labelled image set, one subfolder per label name (torchvision's ImageFolder layout).

    `files` and `digest` are read from the folder when the config loads, never written in YAML: an image
    that cannot be decoded is a config error then, and new content in the set is a new model definition."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: Path
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    max_regression: float | None = Field(default=None, ge=0, le=1)  # at most this much below the live version
    files: tuple[tuple[Path, str], ...]  # (image, label), sorted
    digest: str

    @model_validator(mode="before")
    @classmethod
    def _read_folder(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or "images" not in data:
            return data
        if "files" in data or "digest" in data:
            raise ValueError("files and digest are read from the images folder, not given")
        folder = resolve_path(data["images"], info)
        if not isinstance(folder, Path):
            raise ValueError(f"images must name a folder, got {type(folder).__name__}")
        return {**data, "images": folder, **_scan_image_folder(folder)}


def _scan_image_folder(folder: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise ValueError(f"evaluation images {str(folder)!r} is not a folder")
    files: list[tuple[Path, str]] = []
    digest = hashlib.sha256()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            try:
                with open_regular(path, follow_links=True) as fh:
                    data = fh.read()
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                raise ValueError(f"evaluation image {shown(path)!r} cannot be read: {exc}") from exc
            digest.update(f"{sub.name}/{path.name}\0{len(data)}\0".encode("utf-8", "surrogateescape"))
            digest.update(data)
            files.append((path, sub.name))
    if not files:
        raise ValueError(f"evaluation images {str(folder)!r} holds no images in label subfolders")
    return {"files": tuple(files), "digest": digest.hexdigest()}
