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
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .compute import FORWARD_LOCK, run_forward
from .config import ModelConfig

logger = logging.getLogger("reloader.optimize")

BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
# Convolutions only: their output channels are the BatchNorm's channels whatever the input's shape, which
# a Linear's (features last) are only for 2-D inputs.
FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def prepare_module(module: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """Fold BatchNorms, switch to channels_last, and compile when the config opts in."""
    module = fold_batchnorms(module, config.arch)
    module = module.to(memory_format=torch.channels_last)
    if config.optimize == "compile":
        # Batch 1 is specialised, so a batch of 2 compiles the dynamic-batch graph that later batches reuse.
        module = torch.compile(module, dynamic=True)
        side = config.preprocess.crop
        run_forward(module, torch.zeros(2, 3, side, side))
    return module


def fold_batchnorms(module: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Fold, in place, each eval-mode BatchNorm that only ever normalises one convolution's output.

    torch.fx finds the pairs in a trace; torch's own fusion formulas fold them; the BatchNorm becomes an
    Identity. Done in place, layer by layer, so the swap's peak memory holds no second copy of the model
    (`torch.fx.experimental.optimization.fuse` copies every folded layer, and its GraphModule's generated
    code stays cached for good, once per reload). A module torch.fx cannot trace serves unfolded, which
    answers the same, only a little slower.
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
        stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, *stats)
        conv.requires_grad_(False)
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
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue  # a layer called from two places would be folded for both
        conv, bn = module.get_submodule(str(source.target)), module.get_submodule(str(node.target))
        if isinstance(bn, BATCHNORMS) and bn.track_running_stats and isinstance(conv, FOLDABLE):
            pairs.append((str(source.target), str(node.target)))
    return pairs
