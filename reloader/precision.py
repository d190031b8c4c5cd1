"""Faster forms of a validated fp32 module, each proven against it before one of them may serve.

The gate calls `choose` after the warm-up. Each form the config allows and this machine runs natively
is built from the fp32 module, answers the golden images and the held-out half of the evaluation set
(`Evidence`), and is kept only if every golden image keeps its top-1, the top-1 agreement is at least
`fidelity.min_agreement` and no class probability moves by more than `fidelity.max_prob_delta`. Kept
forms are timed at the model's batch size, in turns with serving. An explicit precision serves its
fastest kept form, or the file is rejected with the numbers; `auto` serves the fastest kept form when
it is at least AUTO_MIN_SPEEDUP times fp32, and fp32 otherwise.

Every form is an nn.Module that takes the fp32 batch and answers fp32 scores, so serving runs them all
alike (`compute.run_forward`).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import int8
from .compute import run_forward, timed_forward
from .config import ModelConfig
from .errors import CheckpointRejected, short_of_resources
from .hardware import Hardware
from .optimize import compile_module
from .report import VariantResult, ms_since

AUTO_MIN_SPEEDUP = 1.1
# int8 is calibrated on the golden images (and half the evaluation set), so those cannot also prove it: on
# the demo, calibrated on its 4 golden images, it kept all 4 and moved the top-1 of 5 of 400 held-out images
# (bench/RESULTS.md). `auto` takes int8 only when this many held-out evaluation images prove it.
MIN_HELD_OUT = 32
AUTO_NO_INT8 = (
    f"auto does not take int8 without at least {MIN_HELD_OUT} held-out evaluation images to prove it (it is "
    "calibrated on the golden images, which therefore cannot); precision: int8 asks for it"
)
TIMED_ROUNDS = 5
Form = tuple[str, str]  # (precision, form): ("bf16", "autocast")
FP32: Form = ("fp32", "eager")
# bf16 and fp16 have two forms each; which one is faster depends on the model and the machine, so both
# are measured. int8 is static quantization, calibrated on the golden images: by FX, and under
# `optimize: compile` also by PT2E (int8.py).
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FORMS: dict[str, tuple[str, ...]] = {**{half: ("autocast", "weights") for half in HALF}, "int8": ("static",)}
COMPILED_FORMS = {"int8": ("pt2e",)}


@dataclass(frozen=True)
class Evidence:
    """What faster forms are proven on: the golden images first (each must keep its top-1), then held-out
    evaluation images (counted in the agreement); and what int8 is calibrated on (never the held-out ones)."""

    images: torch.Tensor
    sources: Sequence[str]  # a name per image, for the reasons
    golden: int  # the first `golden` images are the golden ones
    calibration: torch.Tensor

    @property
    def held_out(self) -> int:
        return len(self.images) - self.golden


class _Around(nn.Module):
    """A module that calls `inner` in some particular way."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


class Autocast(_Around):
    """fp32 weights, half-precision (`dtype`) compute wherever autocast deems it safe; fp32 scores out."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__(inner)
        self.dtype, self.device_type = dtype, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x).float()


class CastInput(_Around):
    """Half-precision weights: the batch goes in cast to their `dtype`, the scores come out as fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(inner)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


class OnDevice(_Around):
    """Weights on a CUDA device: the batch is copied there from pinned memory, the scores come back."""

    def __init__(self, inner: nn.Module, device: str) -> None:
        super().__init__(inner)
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.pin_memory().to(self.device, non_blocking=True)
        return self.inner(x).float().cpu()


def served(module: nn.Module, device: str) -> nn.Module:
    """`module` (already on `device`) as serving calls it: with CPU tensors in and out."""
    return module if device == "cpu" else OnDevice(module, device)


def half_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy whose floating-point weights and buffers are `dtype`, made one tensor at a time (no fp32 copy)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and id(t) not in memo:
            half = t.detach().to(dtype)
            memo[id(t)] = nn.Parameter(half, requires_grad=False) if isinstance(t, nn.Parameter) else half
    return copy.deepcopy(module, memo)


def build(
    fp32: nn.Module,
    precision: str,
    form: str,
    device: str,
    calibration: torch.Tensor,
    compile_side: int | None = None,
    max_batch: int = 64,
) -> nn.Module:
    """One form of `fp32` (the prepared module, on `device`), as serving calls it, for batches up to `max_batch`.

    With `compile_side` (optimize: compile), the bf16 and fp16 forms are compiled like fp32
    (optimize.compile_module) from the eager module under it, so what is proven and timed is what serves;
    int8's forms are what int8.py builds."""
    eager = getattr(fp32, "_orig_mod", fp32)
    if precision == "int8":
        return int8.build(eager, form, calibration, max_batch)
    dtype = HALF.get(precision)
    if dtype is not None and form == "autocast":
        inner: nn.Module = Autocast(eager, dtype, device.split(":")[0])
    elif dtype is not None and form == "weights":
        inner = CastInput(half_copy(eager, dtype), dtype)
    else:
        raise ValueError(f"unknown form {form!r} of {precision}")
    return served(inner if compile_side is None else compile_module(inner, compile_side, max_batch), device)


@dataclass(frozen=True, eq=False)
class Choice:
    module: nn.Module
    precision: str
    form: str
    tried: tuple[VariantResult, ...]

    def summary(self) -> str:
        tried = ", ".join(f"{t.precision} ({t.form}) {t.detail}" for t in self.tried)
        return f"{self.precision} ({self.form}) serves; tried: {tried}"


def compare(probs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, list[int]]:
    """Top-1 agreement, the largest probability difference, and the rows whose top-1 moved."""
    moved = (probs.argmax(dim=1) != reference.argmax(dim=1)).nonzero().flatten().tolist()
    return 1.0 - len(moved) / len(reference), float((probs - reference).abs().max()), moved


def measure(modules: dict[Form, nn.Module], batch: torch.Tensor, speeds: dict[Form, float]) -> dict[Form, str]:
    """img/s of each form, into `speeds`: the best of TIMED_ROUNDS passes, the forms taking turns round by
    round (so a burst of load hits them alike), each pass timed once it holds the forward lock. Returns
    the forms that failed to run at this batch size, with why.

    Speed depends on the architecture and the batch, not on the weights: the gate keeps `speeds` for its
    model definition, so only its first file pays for timing. A form new to it is timed with all the others
    again, so the numbers compared were taken side by side."""
    if all(f in speeds for f in modules):
        return {}
    failed: dict[Form, str] = {}
    times: dict[Form, list[float]] = {}
    for f, module in modules.items():
        try:
            timed_forward(module, batch)  # first-call allocations and oneDNN primitive creation
            times[f] = []
        except Exception as exc:  # a form that cannot run the full batch is not offered
            if short_of_resources(exc):
                raise  # the machine, not the form: the file is judged again later
            failed[f] = f"failed at batch {len(batch)}: {type(exc).__name__}: {exc}"
    for _ in range(TIMED_ROUNDS):
        for f in times:
            times[f].append(timed_forward(modules[f], batch))
    speeds.update({f: len(batch) / min(t) for f, t in times.items()})
    return failed


def pick(fp32_img_s: float | None, kept: Sequence[VariantResult], auto: bool) -> VariantResult | None:
    """The form to serve among those that kept the answers: the fastest; under auto only if it is at
    least AUTO_MIN_SPEEDUP times fp32. None: fp32 serves."""
    best = max(kept, key=lambda v: v.img_s or 0.0, default=None)
    if best is None or not auto:
        return best
    assert fp32_img_s is not None and best.img_s is not None
    return best if best.img_s >= AUTO_MIN_SPEEDUP * fp32_img_s else None


class Unfaithful(CheckpointRejected):
    """No form of the asked precision kept the answers; `tried` has the numbers of each."""

    def __init__(self, tried: Sequence[VariantResult]) -> None:
        super().__init__("fidelity", "; ".join(f"{t.precision} ({t.form}): {t.detail}" for t in tried))
        self.tried = tuple(tried)


def choose(
    fp32: nn.Module, device: str, evidence: Evidence, config: ModelConfig, hw: Hardware, speeds: dict[Form, float]
) -> Choice:
    """Prove each allowed form against fp32 on the evidence; pick one.

    `speeds` holds what earlier files of this model definition measured, and gets what this one measures."""
    auto = config.precision == "auto"
    chunk = config.batch.max_size
    images = evidence.images
    reference_module = served(fp32, device)
    reference = answers(reference_module, images, chunk)
    if not bool(torch.isfinite(reference).all()):
        raise CheckpointRejected("fidelity", "fp32 answers the golden images with NaN or inf in a batch")
    proven: list[VariantResult] = []
    modules: dict[Form, nn.Module] = {}
    # fp16 only where it may run (CUDA): on a CPU it would be one more row saying so in every report.
    for precision in (("bf16", "int8") if device == "cpu" else tuple(FORMS)) if auto else (config.precision,):
        unproven = auto and precision == "int8" and evidence.held_out < MIN_HELD_OUT
        why = hw.why_not(precision, device) or (AUTO_NO_INT8 if unproven else None)
        if why is not None:
            proven.append(VariantResult(precision, "-", device, False, f"skipped: {why}"))
            continue
        for form in FORMS[precision] + (COMPILED_FORMS.get(precision, ()) if config.optimize == "compile" else ()):
            result, module = _prove(fp32, precision, form, device, evidence, reference, config)
            proven.append(result)
            if module is not None:
                modules[(precision, form)] = module
    if modules and auto:
        modules = {FP32: reference_module, **modules}
    started = time.perf_counter()
    failed = measure(modules, images[torch.arange(chunk) % len(images)], speeds)
    each_ms = ms_since(started) / max(len(modules), 1)
    tried = [_timed_result(t, speeds, failed, each_ms) for t in proven]
    if FP32 in modules and FP32 not in failed:
        tried.insert(0, VariantResult(*FP32, device, True, "the reference", 1.0, 0.0, speeds[FP32], each_ms))
    if FP32 in failed:  # what serves when nothing else does cannot take a full batch: every one would fail
        raise CheckpointRejected("fidelity", f"fp32 {failed[FP32]} (batch.max_size)")
    kept = [t for t in tried if t.passed and t.precision != "fp32"]
    if not auto and not kept:
        raise Unfaithful(tried)
    chosen = pick(speeds.get(FP32), kept, auto)
    if chosen is None:
        return Choice(reference_module, *FP32, tuple(tried))
    return Choice(modules[(chosen.precision, chosen.form)], chosen.precision, chosen.form, tuple(tried))


def answers(module: nn.Module, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """Probabilities for `images`, in batches no larger than serving's."""
    return torch.cat([run_forward(module, part).float().softmax(dim=1) for part in images.split(chunk)])


def _timed_result(
    result: VariantResult, speeds: dict[Form, float], failed: dict[Form, str], ms: float
) -> VariantResult:
    form = (result.precision, result.form)
    if form in failed:
        return replace(result, passed=False, detail=failed[form], ms=result.ms + ms)
    speed = speeds.get(form)
    if not result.passed or speed is None:
        return result
    return replace(result, detail=f"{result.detail}, {speed:.1f} img/s", img_s=speed, ms=result.ms + ms)


def _prove(
    fp32: nn.Module,
    precision: str,
    form: str,
    device: str,
    evidence: Evidence,
    reference: torch.Tensor,
    config: ModelConfig,
) -> tuple[VariantResult, nn.Module | None]:
    started = time.perf_counter()
    try:
        side = config.preprocess.crop if config.optimize == "compile" else None
        module = build(fp32, precision, form, device, evidence.calibration, side, config.batch.max_size)
        probs = answers(module, evidence.images, config.batch.max_size)
    except Exception as exc:  # a form torch cannot build or run for this model is not offered
        if short_of_resources(exc):
            raise  # the machine, not the form: the file is judged again later, every form with it
        detail = f"failed: {type(exc).__name__}: {exc}"
        return VariantResult(precision, form, device, False, detail, ms=ms_since(started)), None
    if not bool(torch.isfinite(probs).all()):
        return VariantResult(precision, form, device, False, "output has NaN or inf", ms=ms_since(started)), None
    agreement, delta, moved = compare(probs, reference)
    limits = config.fidelity
    problems = [f"{evidence.sources[i]} changed its top-1" for i in moved if i < evidence.golden][:3]
    if agreement < limits.min_agreement:
        problems.append(f"agreement {agreement:.3f} < {limits.min_agreement}")
    if delta > limits.max_prob_delta:
        problems.append(f"largest probability difference {delta:.4f} > {limits.max_prob_delta}")
    detail = "; ".join(problems) or f"agreement {agreement:.3f}, largest probability difference {delta:.4f}"
    kept = None if problems else module
    return VariantResult(precision, form, device, not problems, detail, agreement, delta, None, ms_since(started)), kept
