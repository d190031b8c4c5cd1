"""The validation gate: a checkpoint serves only after it loads safely, fits, is finite and answers right."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .architectures import build_model
from .checkpoints import load_checkpoint, parse_version
from .compute import run_forward
from .config import ModelConfig
from .errors import CheckpointIncomplete, CheckpointRejected, ConfigError, InvalidImage
from .images import Preprocessor
from .registry import LiveModel

CHECKS = ("load", "structure", "finite", "warmup")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str
    ms: float


@dataclass(frozen=True)
class ValidationReport:
    model: str
    path: str
    version: int
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    checks: tuple[CheckResult, ...]
    passed: bool
    incomplete: bool
    started_at: float
    total_ms: float

    @property
    def reason(self) -> str | None:
        failed = next((c for c in self.checks if not c.passed), None)
        return None if failed is None else f"{failed.name}: {failed.detail}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class WarmupImage:
    source: str
    tensor: torch.Tensor
    expect: str | None


class Gate:
    """Runs the four checks in order for one model definition; built once per config, reused per file."""

    def __init__(
        self, name: str, config: ModelConfig, prepare: Callable[[torch.nn.Module, ModelConfig], torch.nn.Module]
    ) -> None:
        self.name = name
        self.config = config
        self.preprocessor = Preprocessor(config.preprocess)
        self._prepare = prepare
        self.warmup = self._warmup_images()

    def _warmup_images(self) -> list[WarmupImage]:
        spec = self.config.warmup
        if not spec.images:
            return [WarmupImage("built-in synthetic image", self.preprocessor.synthetic(), None)]
        images = []
        for i, path in enumerate(spec.images):
            try:
                tensor = self.preprocessor.load(path.read_bytes())
            except (OSError, InvalidImage) as exc:
                raise ConfigError(f"models.{self.name}.warmup.images[{i}]: {path}: {exc}") from exc
            images.append(WarmupImage(path.name, tensor, spec.expect[i] if spec.expect else None))
        return images

    def run(self, path: Path) -> tuple[LiveModel | None, ValidationReport]:
        """Validate one file; return the record ready to swap in (or None) and the report."""
        started, t0 = time.time(), time.perf_counter()
        checks: list[CheckResult] = []
        loaded = None
        live = None
        incomplete = False
        state: dict[str, Any] = {}
        steps: list[tuple[str, Callable[[], str]]] = [
            ("load", lambda: self._load(path, state)),
            ("structure", lambda: self._structure(state)),
            ("finite", lambda: self._finite(state)),
            ("warmup", lambda: self._warmup(state)),
        ]
        for name, step in steps:
            t = time.perf_counter()
            try:
                detail = step()
            except CheckpointRejected as exc:
                incomplete = isinstance(exc, CheckpointIncomplete)
                checks.append(CheckResult(name, False, exc.reason, _ms(t)))
                break
            except Exception as exc:  # a user factory or a forward pass can fail in any way
                checks.append(CheckResult(name, False, f"{type(exc).__name__}: {exc}", _ms(t)))
                break
            checks.append(CheckResult(name, True, detail, _ms(t)))
        loaded = state.get("loaded")
        passed = len(checks) == len(steps) and all(c.passed for c in checks)
        report = ValidationReport(
            model=self.name,
            path=str(path),
            version=parse_version(path.name),
            sha256=loaded.sha256 if loaded else None,
            size=loaded.size if loaded else None,
            mtime_ns=loaded.mtime_ns if loaded else None,
            checks=tuple(checks),
            passed=passed,
            incomplete=incomplete,
            started_at=started,
            total_ms=_ms(t0),
        )
        if passed:
            live = LiveModel(
                name=self.name,
                config=self.config,
                version=report.version,
                sha256=loaded.sha256,
                path=path,
                module=state["module"],
                preprocessor=self.preprocessor,
                report=report,
            )
        return live, report

    def _load(self, path: Path, state: dict[str, Any]) -> str:
        state["loaded"] = loaded = load_checkpoint(path)
        return f"{len(loaded.state_dict)} tensors, {loaded.size} bytes, sha256 {loaded.sha256[:12]}"

    def _structure(self, state: dict[str, Any]) -> str:
        loaded = state["loaded"]
        module = build_model(self.config.arch, self.config.num_classes, loaded.state_dict)
        # From here the module owns the tensors. Dropping the state_dict lets `prepare` (folding,
        # channels_last) free each original as it copies it, instead of holding a second model.
        state["loaded"] = replace(loaded, state_dict={})
        state["module"] = module
        return f"strict load into {self.config.arch}(num_classes={self.config.num_classes})"

    def _finite(self, state: dict[str, Any]) -> str:
        module = state["module"]
        bad = [
            f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for name, t in (*module.named_parameters(), *module.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise CheckpointRejected("finite", f"non-finite (NaN/inf) values in {', '.join(bad[:5])}")
        return "every parameter and buffer is finite"

    def _warmup(self, state: dict[str, Any]) -> str:
        # Prepared after the finite check, which so names the checkpoint's own tensors, and before
        # the warm-up, which so exercises exactly the module that will serve.
        state["module"] = module = self._prepare(state.pop("module"), self.config)
        expected_shape = (1, self.config.num_classes)
        for image in self.warmup:
            out = run_forward(module, image.tensor.unsqueeze(0))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected_shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CheckpointRejected("warmup", f"{image.source}: output {shape}, expected {expected_shape}")
            if not bool(torch.isfinite(out).all()):
                raise CheckpointRejected("warmup", f"{image.source}: output has NaN or inf")
            if image.expect is not None:
                probs = out.softmax(dim=1)[0]
                top = int(probs.argmax())
                got = self.config.labels[top]
                if got != image.expect:
                    raise CheckpointRejected(
                        "warmup",
                        f"{image.source}: expected {image.expect!r}, got {got!r} (p={float(probs[top]):.3f})",
                    )
        return f"{len(self.warmup)} warm-up image(s) answered as expected"


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
