"""Making a validated module fast to serve: the speedups that change no answer, and opt-in compilation.

`prepare_module` runs inside the gate, so the warm-up exercises exactly what will serve, and on the
reload thread, so the previous version keeps serving while it works. Measured on resnet18 at batch 8
(bench/RESULTS.md): channels_last pays about 1.1x, folding each BatchNorm into the convolution before
it a few percent more; inference_mode is applied per forward in `compute.run_forward`.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import fx

from .compute import FORWARD_LOCK, run_forward
from .config import ModelConfig

logger = logging.getLogger("reloader.optimize")

BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
# Convolutions only: their output channels are the BatchNorm's channels whatever the input's shape, which
# a Linear's (features last) are only for 2-D inputs.
FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def prepare_module(module: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """Fold BatchNorms, switch to channels_last, and compile when the config opts in."""
    # channels_last first: it copies every weight once, and folding then scales them where they are.
    module = module.to(memory_format=torch.channels_last)
    module = fold_batchnorms(module, config.arch)
    if config.optimize == "compile":
        # Batch 1 is specialised, so a batch of 2 compiles the dynamic-batch graph that later batches reuse.
        module = torch.compile(module, dynamic=True)
        side = config.preprocess.crop
        run_forward(module, torch.zeros(2, 3, side, side))
    return module


def fold_batchnorms(module: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Fold, in place, each eval-mode BatchNorm that only ever normalises one convolution's output.

    torch.fx finds the pairs in a trace; each conv's weight is scaled in place and gets the folded bias;
    the BatchNorm becomes an Identity. In place because every weight copied is memory the swap's peak
    holds on to: `torch.fx.experimental.optimization.fuse` (and `torch.nn.utils.fusion`) allocate a
    new weight per layer, which took the bench's peak from 1.95x to 2.2x the model, and fuse's
    GraphModule caches its generated code for good, once per reload. A module torch.fx cannot trace
    serves unfolded, which answers the same, only a little slower.
    """
    if module.training or not any(isinstance(m, BATCHNORMS) for m in module.modules()):
        return module
    try:
        pairs = _conv_batchnorm_pairs(module)
    except Exception as exc:  # tracing runs user code: a factory's forward can fail in any way
        logger.info("%s: BatchNorms not folded, torch.fx cannot trace it: %s: %s", arch, type(exc).__name__, exc)
        return module
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        _fold_into(conv, bn)
        parent, _, name = bn_name.rpartition(".")
        setattr(module.get_submodule(parent), name, torch.nn.Identity())
    return module


def _conv_batchnorm_pairs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) submodule names where the BatchNorm only ever normalises that conv's output."""
    # fx patches torch.nn.Module.__call__ for every thread while it traces: a forward pass running
    # meanwhile (serving, another model's warm-up) would be traced too, and fail. So trace in turn with them.
    with FORWARD_LOCK:
        graph = fx.Tracer().trace(module)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    # Folding scales the weight in place: a weight two layers share (tied weights) would be scaled for both.
    owners = Counter(id(p) for m in module.modules() for p in m.parameters(recurse=False))
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue  # a layer called from two places would be folded for both
        conv, bn = module.get_submodule(str(source.target)), module.get_submodule(str(node.target))
        if owners[id(getattr(conv, "weight", None))] > 1:
            continue
        if isinstance(bn, BATCHNORMS) and bn.track_running_stats and isinstance(conv, FOLDABLE):
            pairs.append((str(source.target), str(node.target)))
    return pairs


@torch.no_grad()
def _fold_into(conv: torch.nn.Module, bn: torch.nn.Module) -> None:
    """bn(conv(x)) == conv'(x) with w' = w * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    assert isinstance(conv, FOLDABLE) and isinstance(bn, BATCHNORMS)
    assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats, checked by the caller
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    bias = -bn.running_mean.float() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.float() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.float()
    conv.weight.mul_(scale.to(conv.weight.dtype).reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = torch.nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
