"""The servers reloader is measured against, each runnable as `python -m bench.peers.<name>`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision

from reloader.architectures import imagenet_labels
from reloader.config import Preprocess
from reloader.images import Preprocessor

# Every server decodes and preprocesses with the same code (resize 256, crop 224), so only serving differs.
PREPROCESSOR = Preprocessor(Preprocess(resize=256, crop=224))
LABELS = imagenet_labels()


def load_resnet18(checkpoint: Path) -> tuple[torch.nn.Module, str]:
    """The bench's random resnet18 weights, loaded the way a blog post does, and the file's sha256."""
    data = checkpoint.read_bytes()
    model = torchvision.models.resnet18(num_classes=len(LABELS))
    model.load_state_dict(torch.load(checkpoint, weights_only=True, map_location="cpu"))
    return model.eval(), hashlib.sha256(data).hexdigest()


def top_k(probs: torch.Tensor, sha256: str, k: int = 5) -> dict:
    """The same answer shape as reloader's, so the client parses the same JSON from everyone."""
    values, indices = probs.topk(k)
    return {
        "sha256": sha256,
        "predictions": [
            {"label": LABELS[i], "index": i, "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ],
    }
