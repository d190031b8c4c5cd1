"""Static int8, calibrated on what the gate gives: two forms.

- "static": FX graph mode quantization with the x86 backend's default qconfig (oneDNN and FBGEMM kernels,
  which use VNNI and AMX-INT8), in the server's process: built in a second or two.
- "pt2e", as issue 11 asks: torchao's X86InductorQuantizer, then Inductor with freezing, built ahead of
  time (AOTInductor) in a child process, and loaded by the server.

Why a child process, and how the package is built and loaded: packages.py.

It costs a compile per checkpoint (22-43 s for resnet18 on 2 cores), so the gate offers it only under
`optimize: compile`, beside FX's form, and serves the faster of the two that keep the answers.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx, nn

from . import packages
from .compute import TRACE_LOCK, run_forward, turn
from .hardware import Hardware


def build(fp32: nn.Module, form: str, calibration: torch.Tensor, max_batch: int) -> nn.Module:
    """The int8 `form` of the eager fp32 module, its activation ranges observed on `calibration`. The fp32
    module is left as it is: the quantized one holds its own int8 weights."""
    if form == "static":
        return fx_int8(fp32, calibration, max_batch)
    if form == "pt2e":
        return pt2e_int8(fp32, calibration, max_batch)
    raise ValueError(f"unknown form {form!r} of int8")


def fx_int8(fp32: nn.Module, calibration: torch.Tensor, max_batch: int) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.utils import assert_and_get_unique_device
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"  # the default where it exists; it only concerns quantized ops
    bare = [m for m in fp32.modules() if "qconfig" not in vars(m)]
    try:
        # fx patches nn.Module.__call__ for every thread while it traces: nothing may run a module meanwhile.
        with turn(), TRACE_LOCK:
            prepared = prepare_fx(fp32, get_default_qconfig_mapping("x86"), (calibration[:1],))
        for part in calibration.split(max_batch):  # the observers record each activation's range, a batch
            run_forward(prepared, part)  # at a time: each pass waits at most one of serving's
        with turn(), TRACE_LOCK:
            return convert_fx(prepared)
    finally:
        # prepare_fx and convert_fx look up each module's device through a functools.cache keyed by the
        # module, which keeps every module it has seen: 24 MiB per resnet18 build, so per reload.
        assert_and_get_unique_device.cache_clear()
        for m in bare:  # prepare_fx gives fp32's own modules a qconfig (which cannot be pickled): fp32 is
            vars(m).pop("qconfig", None)  # left as it was, for the PT2E build's process and for serving


def pt2e_int8(fp32: nn.Module, calibration: torch.Tensor, max_batch: int) -> nn.Module:
    """The PT2E int8 form of `fp32` (on the CPU), built in a child process at the lowest priority."""
    return packages.compiled(fp32, calibration, max_batch, quantized, "PT2E int8 build")


def quantized(fp32: nn.Module, calibration: torch.Tensor, max_batch: int) -> fx.GraphModule:
    """fp32 exported for batches of 1 to max_batch, quantized by X86InductorQuantizer, calibrated and
    converted. Called without gradients."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    example, batch = packages.example_batch(calibration, max_batch)
    module = torch.export.export(fp32, (example,), dynamic_shapes=batch).module()
    one_partition_per_call(module)
    # 7-bit activations where the CPU has no VNNI, as torchao advises: 8-bit products saturate there.
    # (The gate offers int8 only with VNNI or AMX; this keeps the form right wherever it is built.)
    reduce_range = Hardware.detect().why_not("int8", "cpu") is not None
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    prepared = prepare_pt2e(module, x86.X86InductorQuantizer().set_global(config))
    for part in calibration.split(max_batch):  # the graph takes batches of max_batch at most
        prepared(part.contiguous(memory_format=torch.channels_last))
    return convert_pt2e(prepared)


def one_partition_per_call(graph_module: fx.GraphModule) -> None:
    """Nodes of one module that no data flows between are separate calls: each gets a source of its own.

    X86InductorQuantizer refuses torchvision's resnets otherwise ("Input partition has more than one output
    node"): non-strict torch.export records only the module a node came from, and BasicBlock calls its one
    ReLU twice, so both calls land in one source partition with two outputs."""
    by_module: dict[tuple[str, type], list[fx.Node]] = defaultdict(list)
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack and node.meta.get("source_fn_stack") is None:
            fqn, kind = list(stack.values())[-1]
            by_module[(fqn, kind)].append(node)
    for (fqn, kind), nodes in by_module.items():
        members, seen, calls = set(nodes), set[fx.Node](), []
        for start in nodes:
            if start in seen:
                continue
            call, todo = [], [start]
            while todo:
                node = todo.pop()
                if node not in seen:
                    seen.add(node)
                    call.append(node)
                    todo += [n for n in (*node.all_input_nodes, *node.users) if n in members]
            calls.append(call)
        for i, call in enumerate(calls if len(calls) > 1 else []):
            for node in call:
                node.meta["source_fn_stack"] = [(f"{fqn}#{i}", kind)]
