"""Decoding: every Pillow mode becomes RGB, EXIF orientation applies, and bad bytes are InvalidImage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from reloader.config import Preprocess
from reloader.errors import InvalidImage
from reloader.images import Preprocessor, decode_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG")],
)
def test_every_mode_decodes_to_rgb(mode, fmt):
    img = Image.new("RGB", (16, 12), (200, 40, 40)).convert(mode)

    decoded = decode_image(encode(img, fmt))

    assert decoded.mode == "RGB"
    assert decoded.size == (16, 12)


def test_sixteen_bit_images_keep_their_brightness():
    img = Image.new("I;16", (8, 8), 40000)

    pixel = decode_image(encode(img)).getpixel((0, 0))

    assert pixel == (155, 155, 155)  # 40000 / 65535 * 255, not clipped to white


def test_transparent_pixels_are_shown_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))

    assert decode_image(encode(img)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display

    decoded = decode_image(encode(img, "JPEG", exif=exif))

    assert decoded.size == (10, 30)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty body"),
        (b"\x00\x01garbage" * 10, "not an image format"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "could not be decoded"),
    ],
)
def test_bad_bytes_are_invalid_images(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_preprocessing_resizes_crops_and_normalises():
    pre = Preprocessor(Preprocess(resize=40, crop=32))
    white = Image.new("RGB", (80, 40), (255, 255, 255))

    tensor = pre(white)

    assert tuple(tensor.shape) == (3, 32, 32)
    expected = [(1 - m) / s for m, s in zip(pre.spec.mean, pre.spec.std, strict=True)]
    assert tensor[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert tuple(pre.synthetic().shape) == (3, 32, 32)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (257, 101), (72, 90)])
def test_preprocessing_matches_torchvision_within_one_level_in_a_few_values(size):
    from torchvision.transforms import v2

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    spec = Preprocess(resize=72, crop=64)
    reference = v2.Compose(
        [
            v2.Resize(72, antialias=True),
            v2.CenterCrop(64),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )

    ours, theirs = Preprocessor(spec)(img), reference(img)

    # Back to levels of 255: resampling only the crop's box (fractional corners) moves a rare value by one.
    std = torch.tensor(spec.std).view(3, 1, 1)
    levels = ((ours - theirs) * std * 255).abs()
    assert float(levels.max()) < 1 + 1e-3
    assert float((levels > 0.5).float().mean()) < 0.01  # random noise, the worst case: 0.35 % at most here


def test_a_large_image_gives_its_pages_back_to_the_os_after_it_is_decoded(monkeypatch):
    from reloader import images, memory

    trims: list[None] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(None))
    pre = Preprocessor(Preprocess(resize=32, crop=32))
    side = int(images.TRIM_PIXELS**0.5) + 1

    for size in (40, side - 2, side):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (0, 90, 0)).save(buf, format="PNG")
        pre.load(buf.getvalue())

    assert len(trims) == 1  # the one at or over TRIM_PIXELS
