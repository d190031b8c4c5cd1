"""The config file: YAML parsed with safe_load, validated into frozen pydantic objects."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PositiveInt = Annotated[int, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _resolve(value: Any, info: ValidationInfo) -> Any:
    """Relative paths resolve against the config file's folder, not the working directory."""
    if value is None or not isinstance(value, (str, Path)):
        return value
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    # Normalised without following links, so watcher events (reported under this path) compare equal.
    return Path(os.path.abspath(path))


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: PositiveInt = 20_000_000
    default_model: str | None = None
    request_timeout_s: float = Field(default=30.0, gt=0)
    # On SIGTERM, requests in flight get this long to finish before the process exits anyway.
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    access_log: bool = True


class WatchConfig(_Frozen):
    # inotify misses changes made by other hosts on NFS/SMB and on some container volumes: poll there.
    poll: bool = False
    poll_interval: float = Field(default=1.0, gt=0)
    # An in-place write is loaded once the file has been closed (or, when polling, unchanged) this long.
    settle_ms: float = Field(default=200.0, ge=0)
    # Editors and ConfigMaps touch the config folder several times per save.
    config_debounce_ms: float = Field(default=100.0, ge=0)


class Preprocess(_Frozen):
    resize: PositiveInt = 256
    crop: PositiveInt = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (
        IMAGENET_STD
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocess:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class Warmup(_Frozen):
    images: tuple[Path, ...] = ()
    expect: tuple[str, ...] | None = None

    @field_validator("images", mode="before")
    @classmethod
    def _resolve_images(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(_resolve(v, info) for v in value)
        return value

    @field_validator("images")
    @classmethod
    def _images_exist(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            if not path.is_file():
                raise ValueError(f"warm-up image {str(path)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _one_label_per_image(self) -> Warmup:
        if self.expect is not None and len(self.expect) != len(self.images):
            raise ValueError(f"expect has {len(self.expect)} labels for {len(self.images)} images")
        return self


class BatchConfig(_Frozen):
    max_size: PositiveInt = 8
    max_wait_ms: float = Field(default=2.0, ge=0)
    # Requests waiting beyond this answer 503 with Retry-After instead of queueing without bound.
    queue_size: PositiveInt = 64


class Fidelity(_Frozen):
    """How far a faster precision may stray from fp32 on the golden images before it may serve."""

    min_agreement: float = Field(default=0.99, ge=0, le=1)  # share of images whose top-1 stays the same
    max_prob_delta: float = Field(default=0.02, ge=0, le=1)  # largest change of any class probability


class ModelConfig(_Frozen):
    arch: str
    num_classes: PositiveInt
    labels: tuple[str, ...]
    checkpoints: Path
    version: Literal["latest"] | Annotated[int, Field(ge=0)] = "latest"
    preprocess: Preprocess = Preprocess()
    warmup: Warmup = Warmup()
    batch: BatchConfig = BatchConfig()
    optimize: Literal["none", "compile"] = "none"
    # fp32 serves as trained; bf16 and int8 only where the hardware runs them natively; auto: the fastest
    # form the gate proves keeps the answers (see `fidelity`), and fp32 when none is at least 1.1x as fast.
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"
    # cpu by default: a GPU is opted into (a trainer on the same machine may be using it); auto: cuda if any.
    device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    fidelity: Fidelity = Fidelity()

    @field_validator("arch")
    @classmethod
    def _arch_resolves(cls, value: str) -> str:
        from .architectures import resolve_factory  # torchvision import is only paid when a config is read

        resolve_factory(value)
        return value

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _resolve_checkpoints(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info)

    @field_validator("labels", mode="before")
    @classmethod
    def _load_labels(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "imagenet":
            from .architectures import imagenet_labels

            return imagenet_labels()
        if isinstance(value, (str, Path)):
            path = _resolve(value, info)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read labels file {str(path)!r}: {exc.strerror}") from exc
            return tuple(line.strip() for line in lines if line.strip())
        return value

    @model_validator(mode="after")
    def _labels_match(self) -> ModelConfig:
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for num_classes={self.num_classes}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        for label in self.warmup.expect or ():
            if label not in self.labels:
                raise ValueError(f"warmup.expect names {label!r}, which is not one of the labels")
        return self


class Config(_Frozen):
    server: ServerConfig = ServerConfig()
    watch: WatchConfig = WatchConfig()
    models: dict[str, ModelConfig]
    path: Path | None = None
    digest: str = ""

    @model_validator(mode="after")
    def _default_model(self) -> Config:
        default = self.server.default_model
        if default is not None and default not in self.models:
            raise ValueError(f"server.default_model {default!r} is not one of the models {sorted(self.models)}")
        return self

    @property
    def default_model(self) -> str | None:
        if self.server.default_model is not None:
            return self.server.default_model
        return next(iter(self.models)) if len(self.models) == 1 else None


def _describe(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    ctx = error.get("ctx") or {}
    kind = error["type"]
    value = error.get("input")
    comparisons = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in comparisons:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {comparisons[kind]} {bound}, got {value!r}"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "extra_forbidden":
        return f"{where}: is not a known key"
    if kind == "value_error":
        return f"{where}: {ctx.get('error', error['msg'])}"
    return f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}, got {value!r}"


def parse_config(data: Any, *, base_dir: Path, source: str) -> Config:
    """Validate already-parsed YAML; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'models' key, got {type(data).__name__}")
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False))
        raise ConfigError(f"{source}: {problems}") from exc


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file; every failure is one ConfigError naming the file."""
    path = Path(path).expanduser().absolute()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    config = parse_config(data, base_dir=path.parent, source=str(path))
    return config.model_copy(update={"path": path, "digest": hashlib.sha256(raw).hexdigest()})
