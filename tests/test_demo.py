"""The offline demo behind the default config: its trainer writes checkpoints the daemon accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env

from reloader.architectures import build_model
from reloader.checkpoints import load_checkpoint
from reloader.config import load_config


def train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.shapes.train", *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_trainer_writes_numbered_checkpoints_atomically_and_resumes(tmp_path: Path):
    out, golden = tmp_path / "ck", tmp_path / "golden"
    small = ("--out", str(out), "--golden", str(golden), "--train-size", "64", "--batch-size", "32")

    first = train("--epochs", "1", *small)
    refused = train("--epochs", "1", *small)
    resumed = train("--epochs", "1", "--resume", *small)

    assert first.returncode == 0, first.stderr
    assert "heldout_acc=" in first.stdout
    assert refused.returncode == 1
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["shapes-epoch001.pt", "shapes-epoch002.pt"]
    assert sorted(p.name for p in golden.iterdir()) == ["circle.png", "square.png", "star.png", "triangle.png"]
    # What the daemon's gate does with it: a strict load into the configured architecture.
    model = load_config(ROOT / "config" / "models.yaml").models["shapes"]
    loaded = load_checkpoint(out / "shapes-epoch002.pt")
    build_model(model.arch, model.num_classes, loaded.state_dict)


def test_the_committed_golden_images_are_what_the_trainer_renders(tmp_path: Path):
    result = train("--golden-only", "--golden", str(tmp_path))

    assert result.returncode == 0, result.stderr
    committed = ROOT / "config" / "golden" / "shapes"
    for image in committed.iterdir():
        assert (tmp_path / image.name).read_bytes() == image.read_bytes(), image.name
