"""The few named exceptions; they are turned into log lines, HTTP errors and exit codes at the edges."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar


class ReloaderError(Exception):
    """Base class for every error reloader raises on purpose."""


class ConfigError(ReloaderError):
    """The config file is missing, unreadable, not YAML, or does not fit the schema."""


class UnsafeEnvironment(ReloaderError):
    """The process environment would make checkpoint loading unsafe."""


class CheckpointRejected(ReloaderError):
    """A checkpoint failed one check of the validation gate."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


SHORTAGES = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE)
# What torch raises as a plain RuntimeError when a GPU's memory runs out outside its caching allocator (which
# raises OutOfMemoryError): a CUDA context, or a cuBLAS or cuDNN handle, made on a GPU a trainer has filled.
# Not the CPU allocator's "can't allocate memory": with Linux's default overcommit, an allocation fails only
# where it exceeds the machine's RAM and swap, which no wait mends (the file is rejected, the batch a 500).
CUDA_MEMORY_MESSAGES = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says memory ran out where it may be there later: a GPU's, Python's own."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in CUDA_MEMORY_MESSAGES)


def short_of_resources(exc: BaseException) -> bool:
    """Whether `exc` says this machine lacked memory, disk or descriptors for the work (a trainer's GPU
    memory, a full /tmp), which says nothing of the checkpoint: it is judged again later, not rejected."""
    return out_of_memory(exc) or isinstance(exc, OSError) and exc.errno in SHORTAGES


class CheckpointIncomplete(CheckpointRejected):
    """The file changed while it was read: it is still being written, so it is retried, not rejected."""


class FetchFailed(ReloaderError):
    """A remote source could not bring a checkpoint's bytes here; the next listing tries again."""


# What a client caused or should retry. Each class says its HTTP status; the app registers one handler
# for ApiError that answers {"error": message} with that status and headers. Nothing else picks statuses.


class ApiError(ReloaderError):
    """Base of the errors with an HTTP answer; on its own, HTTP servers should return HTTP_500."""

    status: ClassVar[int] = 500
    headers: ClassVar[Mapping[str, str]] = MappingProxyType({})


class InvalidRequest(ApiError):
    """The request is malformed. HTTP servers should return HTTP_400."""

    status = 400


class InvalidImage(InvalidRequest):
    """A request body (or a warm-up file) is not an image that can be decoded. HTTP servers should return HTTP_400."""


class ModelNotFound(ApiError):
    """No such model, or (v2) no such version in service. HTTP servers should return HTTP_404."""

    status = 404


class PayloadTooLarge(ApiError):
    """The body exceeds max_body_bytes. HTTP servers should return HTTP_413."""

    status = 413


class UnsupportedMediaType(ApiError):
    """The body is encoded in a way the server does not read. HTTP servers should return HTTP_415."""

    status = 415


class InvalidParameter(ApiError):
    """A well-formed request with a query parameter out of range. HTTP servers should return HTTP_422."""

    status = 422


class ModelNotReady(ApiError):
    """The model has no live version yet. HTTP servers should return HTTP_503 with Retry-After: 5."""

    status = 503
    headers = MappingProxyType({"Retry-After": "5"})


class Overloaded(ApiError):
    """The model's bounded queue is full. HTTP servers should return HTTP_503 with Retry-After: 1."""

    status = 503
    headers = MappingProxyType({"Retry-After": "1"})


class OutOfDeviceMemory(ApiError):
    """The model's device had no memory for the batch now (a GPU a trainer fills). HTTP servers should return
    HTTP_503 with Retry-After: 1."""

    status = 503
    headers = MappingProxyType({"Retry-After": "1"})


class NoFiniteAnswer(ApiError):
    """The live version answered this image with NaN or inf. HTTP servers should return HTTP_422."""

    status = 422


class RequestTimedOut(ApiError):
    """The request waited longer than request_timeout_s. HTTP servers should return HTTP_503 with Retry-After: 1."""

    status = 503
    headers = MappingProxyType({"Retry-After": "1"})


class Unhealthy(ApiError):
    """Part of the process is dead, or a model has no live version. HTTP servers should return HTTP_503."""

    status = 503
