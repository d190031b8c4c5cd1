"""The validation gate: a checkpoint may serve only after it loads safely, fits, is finite and answers right
(and, where the model requires it, is signed with its key: the `signature` check runs first).

The gate only judges. It returns what it found (the prepared module, the preprocessor, the report with the
sha256 of the bytes that loaded); the worker decides what to do with a verdict and builds the live record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .architectures import build_model
from .checkpoints import LoadedCheckpoint, OpenCheckpoint, load_checkpoint, open_checkpoint, parse_version
from .compute import give_back, run_forward
from .config import ModelConfig
from .errors import CheckpointIncomplete, CheckpointRejected, ConfigError, InvalidImage, short_of_resources
from .evaluation import EvaluationSet
from .files import shown
from .hardware import Hardware
from .images import Preprocessor, stack_images
from .libraries import tensors_of
from .memory import release
from .optimize import compile_missing
from .precision import Evidence, Form, Unfaithful, choose, served
from .report import CheckResult, EvaluationResult, ValidationReport, VariantResult, ms_since
from .signing import SignatureCheck

logger = logging.getLogger("reloader.gate")
# A file that failed for want of memory or disk (a trainer holding the GPU, a full /tmp) is judged again after
# this long: not at once, which would only fail again, and not never, which would lose a good checkpoint.
SHORTAGE_RETRY_S = 30.0

Prepare = Callable[[torch.nn.Module, ModelConfig], torch.nn.Module]
# Evaluation images the fidelity check uses (half calibrate int8, half prove every form), spread over the set.
FIDELITY_EVAL_IMAGES = 128


@dataclass(frozen=True)
class WarmupImage:
    source: str
    tensor: torch.Tensor
    expect: str | None


@dataclass(frozen=True, eq=False)
class Judgement:
    """The verdict on one file; `module` is set only when every check passed."""

    report: ValidationReport
    module: torch.nn.Module | None
    preprocessor: Preprocessor

    @property
    def passed(self) -> bool:
        return self.module is not None


class _Failed(Exception):
    """A check failed; its result is recorded, and no later check runs."""


class _Checks:
    """Times each check and records its result; a check that raises fails, and the judging stops."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []
        self.incomplete = False
        self.short = False

    @contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """`with checks.check("load") as detail:` ... `detail.append("what was found")`."""
        started, detail = time.perf_counter(), list[str]()
        try:
            yield detail
        except CheckpointRejected as exc:
            self.incomplete = isinstance(exc, CheckpointIncomplete)
            self.results.append(CheckResult(name, False, exc.reason, ms_since(started)))
            raise _Failed from exc
        except Exception as exc:  # a user's factory or a forward pass can fail in any way
            why = f"{type(exc).__name__}: {exc}"
            self.short = short_of_resources(exc)
            if self.short:
                why += f" (this machine was short of memory or disk: judged again in {SHORTAGE_RETRY_S:.0f} s)"
            self.results.append(CheckResult(name, False, why, ms_since(started)))
            raise _Failed from exc
        self.results.append(CheckResult(name, True, "".join(detail), ms_since(started)))


class Gate:
    """The checks in order, for one model definition; built once per config, reused for every file."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        prepare: Prepare,
        hardware: Hardware | None = None,
        speeds: dict[Form, float] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.preprocessor = Preprocessor(config.preprocess)
        self._prepare = prepare
        self.hardware = hardware or Hardware.detect()
        try:
            self.device = self.hardware.device(config.device)
        except ValueError as exc:
            raise ConfigError(f"models.{name}.device: {exc}") from exc
        why = self.hardware.why_not(config.precision, self.device) if config.precision != "auto" else None
        if why is not None and config.device == "auto" and self.hardware.why_not(config.precision, "cpu") is None:
            self.device, why = "cpu", None  # auto: the GPU where it runs the precision asked, else the CPU
        if why is not None:
            raise ConfigError(f"models.{name}.precision: {why}; use fp32, or auto to take it only where it runs")
        missing = compile_missing(self.device) if config.optimize == "compile" else None
        if missing is not None:  # else every file would fail its warm-up with Inductor's error
            raise ConfigError(f"models.{name}.optimize: compile needs {missing}; or use optimize: none")
        self.warmup = self._warmup_images()
        self.signature = None if config.signature is None else SignatureCheck(name, config.signature)
        spec = config.evaluation
        self.evaluation = None if spec is None else EvaluationSet(name, spec, config.labels, self.preprocessor)
        # img/s of each precision form, measured once per definition (a new pin keeps them: same definition)
        self.speeds: dict[Form, float] = {} if speeds is None else speeds

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

    def judge(self, path: Path, name: str | None = None, live: EvaluationResult | None = None) -> Judgement:
        """Judge the checkpoint file at `path`; `name` is how reports name it (the object it came from), and
        `live` the live version's evaluation score, which a candidate may trail by `max_regression` at most."""
        started, t0 = time.time(), time.perf_counter()
        checks = _Checks()
        loaded: LoadedCheckpoint | None = None
        module: torch.nn.Module | None = None
        fp32: torch.nn.Module | None = None
        precision, form = "fp32", "eager"
        variants: tuple[VariantResult, ...] = ()
        evaluation: EvaluationResult | None = None
        opened: OpenCheckpoint | None = None
        try:
            if self.signature is not None:
                with checks.check("signature") as detail:
                    # Before a byte of the file is parsed: the .sig verified, then the file hashed through the
                    # descriptor the load parses from, and that hash compared with the signed one.
                    signed = self.signature.verify(path)
                    opened = open_checkpoint(path, self.config.max_checkpoint_bytes)
                    detail.append(self.signature.match(signed, path, opened.sha256, opened.changing))
            with checks.check("load") as detail:
                loaded = load_checkpoint(path, self.config.max_checkpoint_bytes, opened)
                detail.append(f"{len(loaded.state_dict)} tensors, {loaded.size} bytes, sha256 {loaded.sha256[:12]}")
            with checks.check("structure") as detail:
                module = build_model(self.config.arch, self.config.num_classes, loaded.state_dict)
                # From here the module owns the tensors. Dropping the state_dict lets `prepare` (folding,
                # channels_last) free each original as it copies it, instead of holding a second model.
                loaded = replace(loaded, state_dict={})
                detail.append(f"strict load into {self.config.arch}(num_classes={self.config.num_classes})")
            with checks.check("finite") as detail:
                detail.append(_finite(module))
            with checks.check("warmup") as detail:
                # Prepared after the finite check, which so names the checkpoint's own tensors, and before
                # the warm-up, which so exercises exactly the module that will serve.
                # On the device first, so what `prepare` compiles and warms is what will run there.
                fp32 = self._prepare(module.to(self.device), self.config)
                module = served(fp32, self.device)
                detail.append(self._warmup(module, last=self.evaluation is None and self.config.precision == "fp32"))
            if self.config.precision != "fp32":
                with checks.check("fidelity") as detail:
                    try:
                        choice = choose(fp32, self.device, self._evidence(), self.config, self.hardware, self.speeds)
                    except Unfaithful as exc:
                        variants = exc.tried  # the report keeps every form's numbers, rejected too
                        raise
                    module, precision, form, variants = choice.module, choice.precision, choice.form, choice.tried
                    if self.evaluation is None:  # the form that will serve makes the last pass, which keeps its turn
                        run_forward(module, self.warmup[-1].tensor.unsqueeze(0), last=True)
                    detail.append(choice.summary())
                fp32 = None  # a faster form serves alone: the fp32 reference is released here
            if self.evaluation is not None:
                with checks.check("evaluation") as detail:
                    # The form that will serve is what is scored: it is what users will get.
                    evaluation, failure = self.evaluation.judge(self.score(module, last=True), live)
                    if failure is not None:
                        raise CheckpointRejected("evaluation", failure)
                    detail.append(evaluation.summary())
        except _Failed:
            module = fp32 = None
        finally:
            if opened is not None:
                opened.close()  # the load closes it; not when a check before the load failed
        report = ValidationReport(
            model=self.name,
            path=shown(path) if name is None else name,
            version=parse_version(path.name),
            sha256=loaded.sha256 if loaded else opened.sha256 if opened else None,  # hashed by the signature check
            size=loaded.size if loaded else None,
            mtime_ns=loaded.mtime_ns if loaded else None,
            checks=tuple(checks.results),
            passed=module is not None,
            incomplete=checks.incomplete,
            short=checks.short,
            started_at=started,
            total_ms=ms_since(t0),
            precision=precision,
            form=form,
            device=self.device,
            variants=variants,
            evaluation=evaluation,
        )
        if module is None and loaded is not None:
            give_back()  # the turn kept by the last pass (compute.hand_over): no swap follows
            release()  # what the failed file built goes back now (a GPU's memory too), not at the next swap
        return Judgement(report, module, self.preprocessor)

    def _evidence(self) -> Evidence:
        """The golden images, then every other evaluation image (held out); int8 calibrates on the golden
        images and the rest of the evaluation images, never on what proves it."""
        golden = stack_images([image.tensor for image in self.warmup])
        sources = [image.source for image in self.warmup]
        if self.evaluation is None:
            return Evidence(golden, sources, len(golden), golden)
        images, names = self.evaluation.tensors(FIDELITY_EVAL_IMAGES)
        held_out = torch.cat([golden, images[1::2]])
        return Evidence(held_out, sources + names[1::2], len(golden), torch.cat([golden, images[0::2]]))

    def score(self, module: torch.nn.Module, *, last: bool = False) -> EvaluationResult:
        """`module`'s accuracy on this definition's evaluation set (the live version's, for the regression bar);
        `last`: the judging's last passes (compute.run_forward)."""
        assert self.evaluation is not None
        return self.evaluation.score(module, self.config.batch.max_size, last=last)

    def live_score(self, module: torch.nn.Module) -> EvaluationResult | None:
        """The live version's score, the bar a candidate may trail by `max_regression`; None, with a warning,
        where the live module cannot run this definition's images (another crop, say): candidates are then
        judged on the set alone, and the pass goes on."""
        try:
            return self.score(module)
        except Exception as exc:  # a forward pass can fail in any way
            logger.warning(
                "model %s: the live version cannot be scored on this definition's evaluation set (%s: %s); "
                "candidates are judged on the set alone",
                self.name,
                type(exc).__name__,
                exc,
            )
            return None

    def _warmup(self, module: torch.nn.Module, *, last: bool) -> str:
        expected_shape = (1, self.config.num_classes)
        for i, image in enumerate(self.warmup):
            out = run_forward(module, image.tensor.unsqueeze(0), last=last and i == len(self.warmup) - 1)
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


def _finite(module: torch.nn.Module) -> str:
    bad = [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for name, t in tensors_of(module).items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointRejected("finite", f"non-finite (NaN/inf) values in {', '.join(bad[:5])}")
    return "every parameter and buffer is finite"
