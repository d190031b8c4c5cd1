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
    real_trim = memory.trim
    monkeypatch.setattr(memory, "trim", lambda: (trims.append(None), real_trim())[1])  # counted, and still run
    pre = Preprocessor(Preprocess(resize=32, crop=32))
    side = int(images.TRIM_PIXELS**0.5) + 1

    for size in (40, side - 2, side):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (0, 90, 0)).save(buf, format="PNG")
        pre.load(buf.getvalue())

    assert len(trims) == 1  # the one at or over TRIM_PIXELS


def photo(width: int, height: int, fmt: str = "JPEG", **kw) -> bytes:
    """A smooth scene with sharp-edged shapes and sensor-like noise: what a camera uploads, deterministically."""
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (0.6 * x / width + 0.4 * y / height) * 255.0
    pixels = np.stack([ramp, 255.0 - ramp, np.full_like(ramp, 90.0)], axis=-1)
    for _ in range(12):
        side = int(rng.integers(width // 20, width // 5))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        pixels[y0 : y0 + side, x0 : x0 + side] = rng.integers(0, 256, 3)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    return encode(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), fmt, **kw)


@pytest.mark.parametrize(
    ("size", "orientation", "short_side", "decoded"),
    [
        ((2000, 1500), None, 512, (1000, 750)),  # 1/2: 1/4 would leave 375 of the 512 asked for
        ((4000, 3000), None, 300, (500, 375)),  # 1/8, the smallest libjpeg offers
        ((2000, 1000), 6, 256, (500, 1000)),  # turned upright after the smaller decode
        ((1000, 800), None, 512, (1000, 800)),  # under twice the short side asked for: full size
        ((2000, 1500), None, None, (2000, 1500)),
    ],
)
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_short_side(
    size, orientation, short_side, decoded
):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation

    assert decode_image(photo(*size, exif=exif), short_side=short_side).size == decoded


def test_other_formats_are_decoded_at_full_size_whatever_short_side_is_asked():
    assert decode_image(photo(2000, 1500, "PNG"), short_side=256).size == (2000, 1500)


def test_a_photo_decoded_at_reduced_size_keeps_its_pixels_within_a_few_levels():
    spec = Preprocess()  # draft_gap 2: a 3024x2268 photo is decoded at 756x567, then resampled to 256
    data = photo(3024, 2268)
    drafted, full = Preprocessor(spec).load(data), Preprocessor(spec.model_copy(update={"draft_gap": None})).load(data)

    # In levels of 255: the two decodes part only along sharp edges (here: max 7, mean 0.21, 0.33 % over 2;
    # at 1920x1080, decoded at 1/2 and left 2.1x to shrink, max 10, mean 0.28, 1.2 % over 2).
    levels = ((drafted - full) * torch.tensor(spec.std).view(3, 1, 1) * 255).abs()
    assert 0 < float(levels.max()) <= 12
    assert float(levels.mean()) < 0.5
    assert float((levels > 2.5).float().mean()) < 0.02


def test_an_upload_too_small_to_draft_is_preprocessed_exactly_as_at_full_size():
    spec = Preprocess()  # 640x480 at resize 256: half of it would be under 512
    data = photo(640, 480)

    drafted, full = Preprocessor(spec).load(data), Preprocessor(spec.model_copy(update={"draft_gap": None})).load(data)

    assert torch.equal(drafted, full)


@pytest.mark.parametrize("gap", [0.5, 0, -1, 100])
def test_a_draft_gap_under_one_or_absurdly_large_is_a_config_error(gap):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="draft_gap"):
        Preprocess(draft_gap=gap)
