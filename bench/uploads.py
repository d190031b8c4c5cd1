"""1b. Large uploads (issue 11): a camera's JPEG decoded at reduced size (`preprocess.draft_gap`, 2 by default)
against at full size (`draft_gap: null`), in process; and what it changes in the answers of the demo's model."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from reloader.architectures import build_model
from reloader.checkpoints import load_checkpoint
from reloader.config import Preprocess, load_config
from reloader.images import Preprocessor, stack_images
from reloader.optimize import prepare_module
from reloader.precision import compare

from . import servers
from .inprocess import _model_config
from .precision import alternating
from .workload import reloader_config

SIZES = ((1920, 1080), (4032, 3024))  # a full-HD frame; a 12 MP phone photo
PHOTOS = 3
DEMO_SIDE = 1512  # the demo's 72-pixel held-out images as uploads 21x their size, decoded at 1/8
TARGET_SPEEDUP = 1.5  # for the 12 MP photo
TARGET_AGREEMENT = 0.995  # the bar bf16 is held to on the same images


def photo(width: int, height: int, seed: int) -> bytes:
    """A gradient with sharp-edged shapes, a lens's slight blur and sensor noise, as JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (0.6 * x / width + 0.4 * y / height) * 255.0
    img = Image.fromarray(np.stack([ramp, 255.0 - ramp, np.full_like(ramp, 90.0)], axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        side = int(rng.integers(width // 40, width // 6))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + side, y0 + side), fill=colour)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32) + rng.normal(0, 6.0, (height, width, 3))
    return _jpeg(pixels)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _levels(a: torch.Tensor, b: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """How far two preprocessed images are apart, in levels of 255 per value."""
    return ((a - b) * torch.tensor(spec.std).view(3, 1, 1) * 255.0).abs().flatten()


def decode_table(rounds: int) -> list[dict[str, Any]]:
    """Per size: ms per upload to decode and preprocess it both ways (in turns, median), and how far apart."""
    spec = Preprocess()
    drafted, full = Preprocessor(spec), Preprocessor(spec.model_copy(update={"draft_gap": None}))
    rows = []
    for width, height in SIZES:
        uploads = [photo(width, height, seed) for seed in range(PHOTOS)]
        seconds: dict[str, list[float]] = {"full": [], "drafted": []}
        for _ in range(max(rounds, 3)):
            for data in uploads:
                for name, pre in (("full", full), ("drafted", drafted)):
                    t0 = time.perf_counter()
                    pre.load(data)
                    seconds[name].append(time.perf_counter() - t0)
        levels = torch.cat([_levels(drafted.load(data), full.load(data), spec) for data in uploads])
        full_ms, drafted_ms = (statistics.median(seconds[k]) * 1000.0 for k in ("full", "drafted"))
        rows.append(
            {
                "size": f"{width}x{height}",
                "kib": round(statistics.mean(len(d) for d in uploads) / 1024),
                "decoded": "x".join(map(str, drafted.decode(uploads[0]).size)),
                "full_ms": full_ms,
                "drafted_ms": drafted_ms,
                "speedup": full_ms / drafted_ms,
                "max_levels": float(levels.max()),
                "mean_levels": float(levels.mean()),
                "over_2": float((levels > 2.5).float().mean()),
            }
        )
    return rows


def served(folder_for: Callable[[str], Path], logs: Path, rounds: int, duration: float, warmup: float) -> dict:
    """reloader with `precision: auto`, draft_gap null and 2, side by side at c=16 on five 12 MP photos."""
    photos = [photo(*SIZES[-1], seed) for seed in range(5)]
    both = {}
    with contextlib.ExitStack() as stack:
        for name, gap in (("full size", None), ("draft_gap 2", 2.0)):
            folder = folder_for(f"uploads-{gap}")
            config = reloader_config(folder.parent, folder, queue_size=32, precision="auto", draft_gap=gap)
            both[name] = stack.enter_context(servers.reloader(config, logs, f"reloader auto, {name}"))
        return {"photos": len(photos), **alternating(both, photos, rounds, duration, warmup)}


def demo_answers(checkpoint: Path) -> dict[str, Any]:
    """The demo's model (the checkpoint section 7 trained) on its held-out images uploaded DEMO_SIDE pixels
    square: its answers with the demo config's preprocessing, drafted (as served) against at full size."""
    from examples.shapes import train
    from examples.shapes.dataset import ShapesDataset

    spec = load_config(Path(__file__).parents[1] / "config" / "models.yaml").models["shapes"].preprocess
    drafted, full = Preprocessor(spec), Preprocessor(spec.model_copy(update={"draft_gap": None}))
    heldout = ShapesDataset(train.HELDOUT_SIZE, train.HELDOUT_SEED)
    rng = np.random.default_rng(7)
    tensors: dict[str, list[torch.Tensor]] = {"drafted": [], "full": []}
    labels = []
    for i in range(len(heldout)):
        image, label = heldout[i]
        big = np.asarray(image.resize((DEMO_SIDE, DEMO_SIDE), Image.Resampling.BICUBIC), np.float32)
        data = _jpeg(big + rng.normal(0, 4.0, big.shape))
        tensors["drafted"].append(drafted.load(data))
        tensors["full"].append(full.load(data))
        labels.append(label)
    model = build_model("resnet18", len(train.LABELS), load_checkpoint(checkpoint).state_dict)
    module = prepare_module(model, _model_config().model_copy(update={"arch": "resnet18"}))
    probs = {}
    with torch.inference_mode():
        for name, rows in tensors.items():
            probs[name] = torch.cat(
                [module(stack_images(rows[i : i + 50])).softmax(dim=1) for i in range(0, len(rows), 50)]
            )
    agreement, delta, moved = compare(probs["drafted"], probs["full"])
    truth = torch.tensor(labels)
    return {
        "images": len(labels),
        "side": DEMO_SIDE,
        "decoded": "x".join(map(str, drafted.decode(data).size)),
        "agreement": agreement,
        "max_prob_delta": delta,
        "moved": len(moved),
        "accuracy": {k: float((p.argmax(dim=1) == truth).float().mean()) for k, p in probs.items()},
        "max_levels": float(torch.cat([_levels(a, b, spec) for a, b in zip(*tensors.values(), strict=True)]).max()),
    }


def report_lines(d: dict[str, Any]) -> list[str]:
    out = [
        "Each upload decoded and preprocessed (resize 256, crop 224) with `preprocess.draft_gap` at its default, 2: a "
        "JPEG whose short side is at least 4x the resize is decoded at 1/2, 1/4 or 1/8 of its size in the DCT "
        "(Pillow's draft), keeping at least 2x; against `draft_gap: null`, every upload at full size. Photo-like "
        f"JPEGs (gradient, sharp-edged shapes, slight blur, noise; quality 90), {PHOTOS} per size, both ways in "
        "turns, median. The difference is per value of the 224x224x3 result, in levels of 255.",
        "",
        "| upload | size | decoded at | full size (ms) | draft_gap 2 (ms) | speedup | max | mean | over 2 levels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["decode"]:
        out.append(
            f"| {r['size']} | {r['kib']} KiB | {r['decoded']} | {r['full_ms']:.1f} | {r['drafted_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['max_levels']:.0f} | {r['mean_levels']:.2f} | {100 * r['over_2']:.2f} % |"
        )
    sv = d.get("served")
    if sv is not None:
        (full, full_s), (drafted, drafted_s) = sv["img_s"].items()
        out += [
            "",
            f"Served: two reloaders (`precision: auto`), {full} and {drafted}, at c=16 on {sv['photos']} photos of "
            f"12 MP each, in alternating turns, the other frozen: {drafted_s:.1f} against {full_s:.1f} img/s, "
            f"{sv['ratio']:.2f}x; p99 "
            + " against ".join(f"{statistics.median(t['p99_ms'] for t in sv['turns'][k]):.0f}" for k in (drafted, full))
            + f" ms; {sv['failed']} failed.",
        ]
    demo = d.get("demo")
    if demo is not None:
        acc = demo["accuracy"]
        out += [
            "",
            f"The demo's model (section 7's checkpoint, fp32) on its {demo['images']} held-out images, each scaled up "
            f"to {demo['side']}x{demo['side']} (bicubic, then noise) and sent as a JPEG, with the demo config's "
            f"preprocessing (resize 72): decoded at {demo['decoded']} against at full size, top-1 agreement "
            f"{100 * demo['agreement']:.2f} % ({demo['moved']} moved), largest probability difference "
            f"{demo['max_prob_delta']:.4f}, accuracy {100 * acc['drafted']:.1f} % against {100 * acc['full']:.1f} %, "
            f"pixels at most {demo['max_levels']:.0f} levels apart. Scaled-up shapes are smoother than photos: this "
            "shows the answers kept, the table above how far the pixels move.",
        ]
    return out


def targets(d: dict[str, Any]) -> list[str]:
    twelve = d["decode"][-1]
    rows = [
        "| target | measured | ratio | result |",
        "|---|---|---|---|",
        f"| a {twelve['size']} JPEG upload decoded+preprocessed with draft_gap 2 >= {TARGET_SPEEDUP}x faster than at "
        f"full size | {twelve['drafted_ms']:.1f} vs {twelve['full_ms']:.1f} ms | {twelve['speedup']:.2f}x | "
        f"{'PASS' if twelve['speedup'] >= TARGET_SPEEDUP else 'FAIL'} |",
    ]
    sv = d.get("served")
    if sv is not None:
        (full, full_s), (drafted, drafted_s) = sv["img_s"].items()
        rows.append(
            f"| 12 MP photos served at c=16 (auto), {drafted} vs {full}, reported | {drafted_s:.1f} vs {full_s:.1f} "
            f"img/s, {sv['failed']} failed | {sv['ratio']:.2f}x | reported |"
        )
    demo = d.get("demo")
    if demo is not None:
        ok = demo["agreement"] >= TARGET_AGREEMENT
        rows.append(
            f"| the demo's held-out images as {demo['side']}-pixel JPEGs: top-1 agreement drafted vs full size >= "
            f"{100 * TARGET_AGREEMENT:.1f} % | {100 * demo['agreement']:.2f} % | - | {'PASS' if ok else 'FAIL'} |"
        )
    return rows
