"""What the gate found: one result per check, and the report kept with the version it judged.

A leaf module: the gate writes these, the worker, the registry, the status listing and the metrics read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
