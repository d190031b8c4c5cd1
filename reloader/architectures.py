"""Turn an `arch` string into a model whose weights come from a state_dict, without paying for random init."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import cache

import torch
from torch import nn

from .compute import TRACE_LOCK
from .errors import CheckpointRejected

Factory = Callable[..., nn.Module]
_MAX_LISTED = 8


def resolve_factory(arch: str) -> Factory:
    """A torchvision.models name, or "package.module:factory" returning an nn.Module."""
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, TypeError) as exc:  # TypeError: a relative name, ".module"
            raise ValueError(f"cannot import factory {arch!r}: {exc}") from exc
        if not callable(factory):
            raise ValueError(f"{arch!r} is not callable")
        return factory
    import torchvision.models

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"{arch!r} is not a torchvision classification model nor a 'module:factory' path")
    return torchvision.models.get_model_builder(arch)


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet category names that torchvision bundles (no download)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def structure_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the missing, unexpected and mis-shaped keys, or None when the state_dict fits exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listing(misshaped)}")
    return "; ".join(problems) or None


def build_model(arch: str, num_classes: int, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build `arch` on the meta device and adopt the state_dict's tensors as its parameters."""
    factory = resolve_factory(arch)
    try:
        with TRACE_LOCK, torch.device("meta"):
            model = factory(num_classes=num_classes)
    except Exception as exc:  # a user factory can fail in any way; the gate reports it
        raise CheckpointRejected("structure", f"building {arch}(num_classes={num_classes}) failed: {exc}") from exc
    problem = structure_mismatch(model, state_dict)
    if problem:
        raise CheckpointRejected("structure", f"does not fit {arch} with num_classes={num_classes}: {problem}")
    expected = model.state_dict()
    # assign=True keeps the checkpoint's dtype; serve in the dtype the architecture was built for.
    cast = {k: v.to(dtype=expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # Non-persistent buffers are not in any state_dict, so only a real (costly) init can fill them.
        with TRACE_LOCK:
            model = factory(num_classes=num_classes)
        model.load_state_dict(cast, strict=True)
    return model.eval().requires_grad_(False)
