"""Making a validated module fast to serve: the speedups that change no answer, and opt-in compilation.

`prepare_module` runs inside the gate, so the warm-up exercises exactly what will serve, and on the
reload thread, so the previous version keeps serving while it works. Measured on resnet18 at batch 8
(bench/RESULTS.md): channels_last pays about 1.1x, folding each BatchNorm into the convolution before
it a few percent more; inference_mode is applied per forward in `compute.run_forward`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections import Counter
from typing import cast

import torch
from torch import fx
from torch.nn.utils.parametrize import is_parametrized

from . import libraries, packages
from .compute import FORWARD_LOCK, TRACE_LOCK, compile_forward
from .config import ModelConfig
from .errors import short_of_resources

logger = logging.getLogger("reloader.optimize")

BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
# Convolutions only: their output channels are the BatchNorm's channels whatever the input's shape, which
# a Linear's (features last) are only for 2-D inputs. Exact types: a subclass may compute differently.
FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def prepare_module(module: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """Fold BatchNorms, switch to channels_last, and compile when the config opts in."""
    # channels_last first: it copies every weight once, and folding then scales them where they are.
    module = module.to(memory_format=torch.channels_last)
    module = fold_batchnorms(module, config.arch)
    if config.optimize == "compile":
        module = compile_module(module, config.preprocess.crop, config.batch.max_size, swappable=True)
    return module


def compile_missing(device: str) -> str | None:
    """What torch.compile lacks for `device` on this machine, or None: Inductor builds C++ for the CPU (at
    run time: the container image has no compiler) and Triton kernels for CUDA, whose launcher Triton builds
    with a C compiler at its first kernel (triton/runtime/build.py: $CC, else gcc, else clang)."""
    if device != "cpu":
        if not importlib.util.find_spec("triton"):
            return "Triton for Inductor's CUDA kernels, not installed"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "a C compiler for Triton's kernel launcher ($CC, gcc or clang), and none was found (install gcc)"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler where none answers --version
        return f"a C++ compiler for Inductor, and none was found ({type(exc).__name__}; install g++)"
    return None


# Set by the server once its initial load is done and it serves: from then on, a compile this process has
# not done yet runs in a child process. The definitions compiled in this process (`_definition`) are reused
# by its later compiles: resnet18 with a checkpoint's new weights took 0.3 s here, against 36 s cold.
SERVING = threading.Event()
_compiled_here: set[tuple[object, ...]] = set()
_compiled_lock = threading.Lock()
# fp32's libraries, built by a child without freezing: a later checkpoint of the definition runs one with its
# own weights (libraries.py).
KEPT = libraries.Kept()


def compile_module(module: torch.nn.Module, side: int, max_batch: int, swappable: bool = False) -> torch.nn.Module:
    """`module` compiled by Inductor, for batches of 1 to max_batch images of side x side: with freezing, but
    for fp32's form (`swappable`) when a child builds it.

    Where it compiles (measured on resnet18, Zen 3, alone):
    - in this process, before the server serves (nothing to slow down: 36 s cold, 19 s of it this process's
      CPU), and for a definition this process has compiled before (new weights: 0.3 s);
    - otherwise, on the CPU while the server serves (a config edit turning compile on, say), ahead of time in
      a child process (packages.py: 19 s, 0.3 s of it this process's), which this process only loads.
      Compiled here instead, the compile held this process's GIL for most of its Python work, whatever its
      thread's priority, and serving's p99 was about 3x steady for all of it (bench/compiling.py).
      `swappable` (fp32's form) builds it without freezing and keeps its library (libraries.Kept): a later
      checkpoint of the definition runs that with its own weights (0.1 s, the check against eager included),
      instead of building another.
    A module torch.export cannot take, or a child that fails, compiles here, with a warning saying why.

    Freezing treats the weights as constants: Inductor folds what depends only on them (a bf16 form's
    casts) and lays them out for oneDNN once, instead of at every call. Measured on resnet18, batch 8, by
    the gate here: bf16 weights 1.17x eager, fp32 about 1x (oneDNN's eager convolutions are what Inductor calls)."""
    device = next(module.parameters(), torch.empty(0)).device
    key = _definition(module, side, max_batch, device)
    with _compiled_lock:
        here = key in _compiled_here or not SERVING.is_set() or device.type != "cpu"
    if not here:
        started = time.monotonic()
        try:
            built, how = _ahead_of_time(module, key, torch.zeros(2, 3, side, side), max_batch, swappable)
            logger.info("%s %s in %.1f s", type(module).__name__, how, time.monotonic() - started)
            return built
        except Exception as exc:  # export and compile run user code: a factory's forward can fail in any way
            if short_of_resources(exc):
                raise  # the machine's state, not the module's: the gate judges the file again later
            logger.warning(
                "compiling ahead of time in a child process failed, so this process compiles (serving slows "
                "meanwhile): %s: %s",
                type(exc).__name__,
                exc,
            )
    compiled = compile_in_process(module, side, max_batch)
    with _compiled_lock:
        _compiled_here.add(key)
    return compiled


def _ahead_of_time(
    module: torch.nn.Module, key: tuple[object, ...], images: torch.Tensor, max_batch: int, swappable: bool
) -> tuple[torch.nn.Module, str]:
    """`module` compiled by a child process or, where swappable and its definition's library is kept, that
    library with `module`'s weights; and which of the two, for the log."""
    if not swappable:
        return packages.compiled(module, images, max_batch), "compiled ahead of time by a child process"
    library = KEPT.get(key)
    if library is not None:
        try:
            built = packages.on_weights(library, module, images, max_batch)
            return built, "took the library kept for its definition, with its own weights,"
        except packages.WeightsRefused as exc:  # a module attribute the key misses that its forward reads, say
            logger.warning("%s: the library kept for its definition %s; built again", type(module).__name__, exc)
            KEPT.drop(key, library)
    built = packages.compiled(module, images, max_batch, keep=functools.partial(KEPT.put, key))
    return built, "compiled ahead of time by a child process"


def _definition(module: torch.nn.Module, side: int, max_batch: int, device: torch.device) -> tuple[object, ...]:
    """What a compile's generated code depends on: the module's class, its tensors' names, shapes, strides
    and dtypes (resnet18 and resnet50 are one class), and the images it takes. Not the weights' values."""
    tensors = tuple((n, tuple(t.shape), t.stride(), t.dtype) for n, t in libraries.tensors_of(module).items())
    return (type(module), tensors, side, max_batch, str(device))


def compile_in_process(module: torch.nn.Module, side: int, max_batch: int) -> torch.nn.Module:
    """torch.compile with Inductor's freezing, compiled now, on the calling (reload) thread, while serving
    goes on (compute.compile_forward: resnet18's cold compile here took 64 s, 3.4 s of it in turns with
    serving). Freezing needs the inference-mode call `compile_forward` makes. One compile worker, not one per
    core: the compile runs at the reload thread's low priority, and a pool of workers would not."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    # A module in, an OptimizedModule (a Module subclass) out: torch's annotations only say "a callable".
    compiled = cast(torch.nn.Module, torch.compile(module, dynamic=True, options={"freezing": True}))
    # On the module's own device: compiled for the CPU, a module moved to CUDA would compile again.
    device = next(module.parameters(), torch.empty(0)).device
    # Every graph serving will call, compiled here and not at its first request: a batch of 2 compiles the
    # dynamic-batch graph; batch 1 is specialised (4.5 s more for resnet18 here), and that graph guarded on
    # 2 to 15 images there, so a max_size of 16 or more compiles one more (16 s). Serving goes on meanwhile.
    for size in dict.fromkeys((2, 1, max_batch)):
        compile_forward(compiled, torch.zeros(size, 3, side, side, device=device))
    return compiled


def fold_batchnorms(module: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Fold, in place, each eval-mode BatchNorm that only ever normalises one plain convolution's output.

    In place because every weight copied is memory the swap's peak holds on to (torch's own fusion
    helpers allocate a new weight per layer: the bench's peak went from 1.95x to 2.2x the model).
    Anything that could make the folded module answer differently leaves the pair alone; a module
    torch.fx cannot trace serves unfolded, which answers the same, only a little slower.
    """
    if module.training or not any(isinstance(m, BATCHNORMS) for m in module.modules()):
        return module
    try:
        pairs = _foldable_pairs(module)
    except Exception as exc:  # tracing runs user code: a factory's forward can fail in any way
        logger.info("%s: BatchNorms not folded, torch.fx cannot trace it: %s: %s", arch, type(exc).__name__, exc)
        return module
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        _fold_into(conv, bn)
        parent, _, name = bn_name.rpartition(".")
        setattr(module.get_submodule(parent), name, torch.nn.Identity())
    return module


def _foldable_pairs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) names where the BatchNorm is the only use of that conv's output, and folding
    changes nothing else the forward does."""
    tracer = fx.Tracer()
    tracer.proxy_buffer_attributes = True  # a buffer the forward reads shows up by name, like a parameter
    # A module called in another thread while fx traces would be traced too, and fail: see compute.py.
    with FORWARD_LOCK, TRACE_LOCK:
        graph = tracer.trace(module)
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    # Attributes the forward reads itself (`self.conv.weight`, `self.bn.running_mean`) must keep their values.
    read = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    names = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    # Tied weights stay tied through a checkpoint as tensors sharing storage: scaling one scales both.
    storages = Counter(
        t.untyped_storage().data_ptr()
        for m in module.modules()
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    )
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv_name, bn_name = str(source.target), str(node.target)
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        # Exact types, as FOLDABLE says; the isinstance only tells the type checker what `conv` is.
        exact = type(conv) in FOLDABLE and type(bn) in BATCHNORMS
        if not (exact and isinstance(conv, FOLDABLE) and bn.track_running_stats):
            continue
        if calls[conv_name] != 1 or calls[bn_name] != 1 or names[id(conv)] != 1 or names[id(bn)] != 1:
            continue  # called, or reachable, from two places: folded for one, wrong for the other
        if any(r == n or r.startswith(n + ".") for r in read for n in (conv_name, bn_name)):
            continue
        if _has_hooks(conv) or _has_hooks(bn) or is_parametrized(conv):
            continue  # hooks and parametrizations (weight_norm, say) act on what folding changes
        if storages[conv.weight.untyped_storage().data_ptr()] != 1:
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs)


@torch.no_grad()
def _fold_into(conv: torch.nn.Module, bn: torch.nn.Module) -> None:
    """bn(conv(x)) == conv'(x) with w' = w * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    assert isinstance(conv, FOLDABLE) and isinstance(bn, BATCHNORMS)
    assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats, checked by the caller
    exact = torch.promote_types(conv.weight.dtype, torch.float32)  # fp16/bf16 in fp32, fp64 stays fp64
    scale = torch.rsqrt(bn.running_var.to(exact) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(exact)
    bias = -bn.running_mean.to(exact) * scale
    if conv.bias is not None:
        bias = bias + conv.bias.to(exact) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(exact)
    conv.weight.mul_(scale.to(conv.weight.dtype).reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = torch.nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
