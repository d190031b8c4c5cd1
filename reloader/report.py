"""What the gate found: one result per check, and the report kept with the version it judged.

A leaf module: the gate writes these, the worker, the registry, the status listing and the metrics read them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

# Then "fidelity", for a precision other than fp32, and "evaluation", for a model with an evaluation set.
CHECKS = ("load", "structure", "finite", "warmup")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str
    ms: float


@dataclass(frozen=True)
class VariantResult:
    """One precision and form the fidelity check tried, against fp32 on the golden images."""

    precision: str
    form: str
    device: str
    passed: bool
    detail: str
    agreement: float | None = None
    max_prob_delta: float | None = None
    img_s: float | None = None  # at the model's batch.max_size, in process; measured only when it passed
    ms: float = 0.0  # time spent building, checking and measuring it


@dataclass(frozen=True)
class EvaluationResult:
    """Top-1 accuracy and per-class recall on the evaluation set; with the live version's, where compared."""

    images: int
    accuracy: float
    recall: dict[str, float]
    live_accuracy: float | None = None
    live_recall: dict[str, float] | None = None

    def against(self, live: EvaluationResult) -> EvaluationResult:
        return replace(self, live_accuracy=live.accuracy, live_recall=live.recall)

    def summary(self) -> str:
        live = "" if self.live_accuracy is None else f" (live {self.live_accuracy:.3f})"
        return f"accuracy {self.accuracy:.3f} on {self.images} images{live}"


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
    precision: str = "fp32"  # what serves, when it passed
    form: str = "eager"  # how that precision runs (bf16, fp16: "autocast" or "weights")
    device: str = "cpu"
    variants: tuple[VariantResult, ...] = ()
    evaluation: EvaluationResult | None = None
    short: bool = False  # a check failed for want of memory or disk: judged again later, not rejected

    @property
    def reason(self) -> str | None:
        failed = self.failed_check
        return None if failed is None else f"{failed.name}: {failed.detail}"

    @property
    def failed_check(self) -> CheckResult | None:
        return next((c for c in self.checks if not c.passed), None)

    def timings_ms(self) -> dict[str, float]:
        """Each check's time, then the total."""
        return {c.name: c.ms for c in self.checks} | {"total": self.total_ms}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reason"] = self.reason
        return out


def ms_since(started: float) -> float:
    """Milliseconds since a time.perf_counter() reading, as reports give them."""
    return round((time.perf_counter() - started) * 1000.0, 3)
