"""Request bytes to an RGB image to a normalised tensor, the same way for serving and for the gate."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import memory
from .config import Preprocess
from .errors import InvalidImage, PayloadTooLarge

# After decoding an image this large, free heap pages go back to the OS (memory.trim).
TRIM_PIXELS = 16_000_000
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # PIL's own I;16 -> RGB conversion clips at 255 and turns most 16-bit images white.
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        img = Image.fromarray(np.clip(arr * 255.0 if arr.max(initial=0) <= 1 else arr, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels carry arbitrary colour; show them over white, as a viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def pixels(images: list[bytes], limit: int) -> None:
    """Refuse a request whose images hold more than `limit` pixels together, from their headers alone.

    A header Pillow cannot read counts as nothing here: decoding the image says what is wrong with it."""
    total = 0
    for data in images:
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError):
            continue
        total += width * height
    if total > limit:
        raise PayloadTooLarge(
            f"the request's {len(images)} image(s) hold {total} pixels together, over the limit of {limit} "
            "(preprocess.max_request_pixels)"
        )


def stack_images(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Images (C, H, W) as one batch in the channels-last layout every forward runs in (compute.run_forward).

    torch.stack lays a batch out channels first whatever its rows' layout, and the forward then transposes it
    again; stacking the rows' (H, W, C) views writes the batch channels last at once (one copy, not three).
    Made in inference mode, as an inference tensor: what the forward is given, and compiled for (compute.as_served)."""
    with torch.inference_mode():
        return torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)


def decode_image(data: bytes, max_pixels: int | None = None, short_side: float | None = None) -> Image.Image:
    """Decode any mode Pillow reads, apply EXIF orientation, return RGB; InvalidImage otherwise.

    With `short_side`, a JPEG whose short side is at least twice that is decoded at the smallest of 1/2,
    1/4 or 1/8 of its size that keeps it (Pillow's `draft`: libjpeg scales in the DCT, so a 12 MP photo
    costs a fraction of its full decode). Other formats decode at full size."""
    if not data:
        raise InvalidImage("empty body: send the image bytes")
    try:
        # Not closed by a `with`: closing would free the pixels this returns (a BytesIO holds no descriptor).
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        # The lower of the configured limit and Pillow's own; either may be unset (None).
        limit = min((n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n), default=None)
        if limit is not None and width * height > limit:
            raise InvalidImage(
                f"decompression bomb refused: {width}x{height} pixels exceeds the limit of {limit} pixels "
                "(preprocess.max_pixels)"
            )
        if short_side is not None and short_side * 2 <= min(width, height):
            # Each side at least `short_side / short` of itself; Pillow picks the largest scale that keeps it.
            ratio = short_side / min(width, height)
            img.draft(None, (math.ceil(width * ratio), math.ceil(height * ratio)))
        img.load()
        # In place: exif_transpose otherwise returns a copy even when there is nothing to turn, and every
        # decode would hold the image twice.
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img)
    except InvalidImage:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImage("body is not an image format Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise InvalidImage(f"image could not be decoded: {' '.join(str(exc).split())}") from exc


class Preprocessor:
    """Resize the short side, centre-crop, scale to [0, 1] and normalise (torchvision's classic recipe).

    Only the part the crop keeps is resampled: Pillow's `resize(box=...)` computes the crop's pixels from
    the whole image, as resize-then-crop would, without the pixels the crop then throws away. On a
    640x480 photo at 256/224 that is 224x224 pixels instead of 341x256, and 40 % less time (the resize
    was as costly as the JPEG decode); and a 177-byte PNG of 100000x1 pixels costs a 224x224 resample,
    not 25,600,000x256. The box's corners are fractions, so one value in about 7,000 of the bench's
    photos (a few in 1,000 of random noise) comes out one level of 255 off torchvision's Resize +
    CenterCrop (tests/test_images.py). A JPEG at least twice `draft_gap` x `resize` on its short side is
    decoded smaller first (decode_image), as Pillow's thumbnail() does."""

    def __init__(self, spec: Preprocess) -> None:
        self.spec = spec
        # (x / 255 - mean) / std as one multiply and one add, over each crop row's R, G, B, R, G, B, ... values:
        # a vector as long as the row broadcasts over the rows as fast as a flat loop, where the three values
        # of the channel axis (a (3,) or (3, 1, 1) vector) take a strided loop twice as slow, and the
        # channels-last layout the forward wants costs a transpose per batch (stack_images).
        # In numpy, not torch: torch would spread these over an OpenMP team of this (decoding) thread's own, and a
        # second team slows serving's forward (compute.py, "one team").
        mean, std = np.array(spec.mean, dtype=np.float64), np.array(spec.std, dtype=np.float64)
        self._scale = np.tile((1.0 / (255.0 * std)).astype(np.float32), spec.crop)
        self._shift = np.tile((-mean / std).astype(np.float32), spec.crop)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # Pillow does what torchvision's Resize/CenterCrop do on PIL images without the seconds
        # torchvision's import costs every start (tests/test_images.py compares the two).
        width, height = img.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.spec.resize, int(self.spec.resize * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        crop = self.spec.crop
        left = int(round((size[0] - crop) / 2.0))
        top = int(round((size[1] - crop) / 2.0))
        if size == img.size:
            img = img.crop((left, top, left + crop, top + crop))
        else:
            sx, sy = width / size[0], height / size[1]
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            img = img.resize((crop, crop), resample=Image.Resampling.BILINEAR, box=box)
        rows = np.asarray(img, dtype=np.uint8).reshape(crop, crop * 3).astype(np.float32)
        rows *= self._scale
        rows += self._shift
        # Channels first in shape, channels last in memory (H, W, C), as the forward takes them.
        return torch.from_numpy(rows).view(crop, crop, 3).permute(2, 0, 1)

    def synthetic(self) -> torch.Tensor:
        """A fixed, image-like input for models that have no warm-up images configured."""
        side = self.spec.resize
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))])
        return self(Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8), mode="RGB"))

    def decode(self, data: bytes) -> Image.Image:
        """The upload as this spec decodes it: under its pixel limits, a large JPEG at reduced size."""
        gap = self.spec.draft_gap
        return decode_image(
            data,
            min(self.spec.max_pixels, self.spec.max_request_pixels),
            None if gap is None else gap * self.spec.resize,
        )

    def load(self, data: bytes) -> torch.Tensor:
        img = self.decode(data)
        large = img.width * img.height >= TRIM_PIXELS
        tensor = self(img)
        if large:  # its pages back to the OS now, not at the next swap (a few ms, against its decode's 100+)
            del img
            memory.trim()
        return tensor
