"""The config file: YAML parsed with safe_load, validated into frozen pydantic objects."""

from __future__ import annotations

import errno
import hashlib
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from .errors import ConfigError
from .evalset import Evaluation
from .files import open_regular
from .locations import S3Location, default_cache_dir, resolve_path
from .signing import SignatureConfig
from .yamlfile import load_yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PositiveInt = Annotated[int, Field(gt=0)]
MAX_CONFIG_BYTES = 1_000_000
MAX_PROBLEMS = 10  # a config error names this many problems, and counts the rest
MAX_LABELS_BYTES = 10_000_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=20_000_000, gt=0, le=1_000_000_000)
    default_model: str | None = None
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)  # decoding plus the wait for a forward pass
    # A request must arrive whole (head and body) this long after its first byte, or it is answered 408.
    read_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # A reload pass running longer than this (a read from a hung mount, say) makes /healthz answer 503.
    stuck_reload_s: float = Field(default=900.0, gt=0, le=86400)
    # Connections past this many are answered 503 with Retry-After and closed.
    max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    # On SIGTERM, requests in flight get this long to finish before the process exits anyway.
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    access_log: bool = True


class WatchConfig(_Frozen):
    # inotify misses changes made by other hosts on NFS/SMB and on some container volumes: poll there.
    poll: bool = False
    poll_interval: float = Field(default=1.0, gt=0, le=86_400)  # a day: in effect, reload on SIGHUP only
    # An in-place write is loaded once the file has been closed (or, when polling, unchanged) this long.
    settle_ms: float = Field(default=200.0, ge=0, le=60_000)
    # Editors and ConfigMaps touch the config folder several times per save.
    config_debounce_ms: float = Field(default=100.0, ge=0, le=10_000)


class Preprocess(_Frozen):
    resize: int = Field(default=256, gt=0, le=4096)
    crop: int = Field(default=224, gt=0, le=4096)
    # Images with more pixels are refused before they are decoded (Pillow's own limit is 89,478,485).
    max_pixels: int = Field(default=40_000_000, gt=0, le=89_478_485)
    # All the images of one request together (a v2 batch): over this, 413 before any is decoded.
    max_request_pixels: int = Field(default=100_000_000, gt=0, le=10_000_000_000)
    # A JPEG whose short side is at least twice `draft_gap` x `resize` is decoded at 1/2, 1/4 or 1/8 of its
    # size (Pillow's draft: libjpeg scales in the DCT), its short side kept at `draft_gap` x `resize` or more,
    # 2 as in Pillow's thumbnail(); null decodes every image at full size.
    draft_gap: float | None = Field(default=2.0, ge=1.0, le=64.0)
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
            return tuple(resolve_path(v, info) for v in value)
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
    max_size: int = Field(default=8, gt=0, le=1024)
    # How long a pass whose batch is not full waits for requests still being decoded (never for a request not yet
    # sent). Decoding runs at background priority, so it mostly waits out each forward pass: when a bf16 pass of
    # resnet18 ended, half of the next batch was still decoding, and 2 ms gave batches of 4 at c=16 where 20 ms
    # gave full ones (AMX Xeon: 164 -> 188 img/s, p99 156 -> 119 ms; c=4 112 -> 162 img/s; fp32 c=16 p99 308 -> 240).
    max_wait_ms: float = Field(default=20.0, ge=0, le=1000)
    # Requests waiting beyond this answer 503 with Retry-After instead of queueing without bound.
    queue_size: int = Field(default=64, gt=0, le=100_000)


class Fidelity(_Frozen):
    """How far a faster precision may stray from fp32 on the golden images before it may serve."""

    min_agreement: float = Field(default=0.99, ge=0, le=1)  # share of images whose top-1 stays the same
    max_prob_delta: float = Field(default=0.02, ge=0, le=1)  # largest change of any class probability


class CanaryConfig(_Frozen):
    """A candidate that passed the gate shadows live traffic before it serves (see canary.py)."""

    requests: int = Field(default=200, ge=1, le=1_000_000)  # comparisons (images) before deciding
    min_agreement: float = Field(default=0.97, ge=0, le=1)  # top-1 agreement with the live version
    max_wait_s: float = Field(default=900.0, gt=0, le=604_800)
    on_timeout: Literal["reject", "promote"] = "reject"
    max_overhead: float = Field(default=0.1, gt=0, le=1)  # share of serving forward time under saturation


class ModelConfig(_Frozen):
    arch: str
    num_classes: PositiveInt
    labels: tuple[str, ...]
    checkpoints: S3Location | Path  # a folder, or s3://bucket/prefix/ (any S3 API; see README "Object storage")
    version: Literal["latest"] | Annotated[int, Field(ge=0)] = "latest"
    preprocess: Preprocess = Preprocess()
    warmup: Warmup = Warmup()
    batch: BatchConfig = BatchConfig()
    optimize: Literal["none", "compile"] = "none"
    # fp32 serves as trained; bf16, fp16 (CUDA) and int8 only where the hardware runs them natively; auto: the
    # fastest form the gate proves keeps the answers (see `fidelity`), and fp32 when none is 1.1x as fast.
    precision: Literal["fp32", "bf16", "fp16", "int8", "auto"] = "fp32"
    # cpu by default: a GPU is opted into (a trainer on the same machine may be using it); auto: cuda if any.
    device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$")  # as torch.device reads it
    fidelity: Fidelity = Fidelity()
    evaluation: Evaluation | None = None  # scored after warm-up; see README "Evaluation and regression"
    canary: CanaryConfig | None = None  # none: a candidate that passes the gate goes live at once
    # A bigger file is rejected unread (and an object is never downloaded): a dropped 50 GB file must not
    # fill memory. 10 GiB is far above any image classifier's weights.
    max_checkpoint_bytes: int = Field(default=10 << 30, gt=0, le=1 << 40)
    # Only files signed with this key (a `<file>.sig` beside each) may serve; see README "Signed checkpoints".
    signature: SignatureConfig | None = None

    @field_validator("arch")
    @classmethod
    def _arch_resolves(cls, value: str) -> str:
        from .architectures import resolve_factory  # torchvision import is only paid when a config is read

        resolve_factory(value)
        return value

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _resolve_checkpoints(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and value.startswith("s3://"):
            return S3Location.parse(value)
        return resolve_path(value, info)

    @field_validator("labels", mode="before")
    @classmethod
    def _load_labels(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "imagenet":
            from .architectures import imagenet_labels

            return imagenet_labels()
        if isinstance(value, (str, Path)):
            path = resolve_path(value, info)
            try:
                lines = _read_small(path, MAX_LABELS_BYTES).splitlines()
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
        if self.evaluation is not None:
            unknown = sorted({label for _, label in self.evaluation.files} - set(self.labels))
            if unknown:
                raise ValueError(f"evaluation.images has folders that are not labels: {', '.join(unknown)}")
        return self


class Config(_Frozen):
    server: ServerConfig = ServerConfig()
    watch: WatchConfig = WatchConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
    # Where s3:// checkpoints are downloaded to, one folder per model, and how many files each keeps there
    # (the live version's file is never evicted, so the cache may briefly hold one more).
    cache_dir: Path = Field(default_factory=default_cache_dir)
    cache_keep: int = Field(default=3, ge=1, le=1000)
    path: Path | None = None
    digest: str = ""

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _resolve_cache_dir(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info)

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


_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 4
_SHOWN.maxlevel = 2


def _describe(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    ctx = error.get("ctx") or {}
    kind = error["type"]
    # A bounded repr: a YAML alias bomb nests lists a billion leaves deep, and a plain repr walks them all.
    value = _SHOWN.repr(error.get("input"))
    value = value if len(value) <= 200 else f"{value[:200]}... (cut at 200 of {len(value)} characters)"
    comparisons = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in comparisons:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {comparisons[kind]} {bound}, got {value}"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "extra_forbidden":
        return f"{where}: is not a known key"
    if kind == "value_error":
        return f"{where}: {ctx.get('error', error['msg'])}"
    return f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}, got {value}"


def _read_small(path: Path, limit: int) -> str:
    """A regular text file of at most `limit` bytes (/dev/zero or a FIFO named by mistake would never end)."""
    with open_regular(path, follow_links=True) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")


def parse_config(data: Any, *, base_dir: Path, source: str) -> Config:
    """Validate already-parsed YAML; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'models' key, got {type(data).__name__}")
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = "; ".join(_describe(e) for e in errors[:MAX_PROBLEMS])
        if len(errors) > MAX_PROBLEMS:
            problems += f"; and {len(errors) - MAX_PROBLEMS} more"
        raise ConfigError(f"{source}: {problems}") from exc


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file; every failure is one ConfigError naming the file."""
    path = Path(path).expanduser().absolute()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {len(raw)} bytes; a config is at most {MAX_CONFIG_BYTES}")
        data = load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    config = parse_config(data, base_dir=path.parent, source=str(path))
    return config.model_copy(update={"path": path, "digest": hashlib.sha256(raw).hexdigest()})
