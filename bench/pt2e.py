"""Why int8 serves through FX and not PT2E: `python -m bench.pt2e` (about 4 minutes; run it alone, like bench).

Issue 11 asks for int8 by PT2E (torchao's X86InductorQuantizer, then torch.compile with Inductor's
freezing). This probe builds that form of reloader's prepared resnet18 the way the gate would (dynamic
batch, calibrated, compiled for batches 1-8) and prints:
- its forward speed at batch 8 beside fp32 and the FX int8 form that serves (reloader.precision);
- its top-1 agreement with fp32 on random inputs;
- the process's RSS after each of several builds, each dropped before the next: the gate would build one
  per checkpoint, so RSS that grows with every build grows with every reload.

Two things in torch 2.14 + torchao 0.18 stand in the way, and the probe works around the first:
- X86InductorQuantizer refuses torchvision's resnets ("Input partition has more than one output node"):
  non-strict torch.export records only the module a node came from, and BasicBlock calls its ReLU twice.
  `one_partition_per_call` gives each call its own source partition.
- Inductor fails to lower oneDNN's weight prepacking (UnsupportedOperatorException:
  onednn.qconv_prepack) under torch.compile(dynamic=True) or options={"freezing": True}; it compiles
  with automatic dynamic shapes and freezing set in inductor's config for the whole process.

The builds are measured three times: as torch leaves them; with `release` undoing every process-wide
holder found so far (each named there); and with `release`, each built while the previous form still
serves, as a reload goes. What is left in the third is what still stands in the way.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import weakref
from collections import defaultdict

import torch
import torchvision
from torch import fx, nn

from reloader import memory
from reloader.hardware import Hardware
from reloader.optimize import prepare_module
from reloader.precision import build, compare

from .inprocess import _model_config
from .servers import status_kib

BUILDS = 6


def one_partition_per_call(graph_module: fx.GraphModule) -> None:
    """Nodes of one module that no data flows between are separate calls: each gets a source of its own."""
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


def pt2e_int8(fp32: nn.Module, calibration: torch.Tensor) -> nn.Module:
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    side = calibration.shape[1:]
    example = calibration[:1].expand(2, *side).contiguous(memory_format=torch.channels_last)
    exported = torch.export.export(fp32, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=1 << 16)},))
    module = exported.module()
    one_partition_per_call(module)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(module, quantizer)
    with torch.inference_mode():
        prepared(calibration.contiguous(memory_format=torch.channels_last))
    compiled = torch.compile(convert_pt2e(prepared))
    inductor_config.compile_threads = 1
    inductor_config.freezing = True  # for this process: within inductor_config.patch only, batch 8 ran at fp32's speed
    with torch.inference_mode():
        for size in (2, 3, 1):  # a static graph, the dynamic one larger batches reuse, and batch 1's
            compiled(torch.zeros(size, *side).contiguous(memory_format=torch.channels_last))
    return compiled


def release(form: nn.Module) -> None:
    """Undo what keeps a dropped PT2E form alive, process-wide, as far as it is known (torch 2.14, torchao 0.18).

    Measured on resnet18 here: 53 MiB per build before, 0 after. But a form built while the previous one
    serves still leaves about 4 MiB: two ShapeEnvs and some 14,000 Python objects per build (StackSummary,
    SymNode, FakeTensor, dispatch-cache keys), held from outside what gc can see."""
    import torch.fx.experimental.proxy_tensor as proxy_tensor
    import torchao.utils
    from torch._dynamo.eval_frame import reset_code
    from torch._inductor.codecache import PyCodeCache
    from torch.ao.quantization.fx.utils import assert_and_get_unique_device
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # Inductor loads each compiled graph's wrapper as a module, kept in sys.modules and PyCodeCache; with
    # freezing, its attributes are the prepacked int8 weights. A form needs only the module's functions.
    for name in [name for name in sys.modules if name.startswith("torch._inductor.runtime.compile_tasks.")]:
        del sys.modules[name]
    PyCodeCache.cache_clear()
    PyCodeCache.linemaps.clear()
    # Dynamo maps each compiled code to the code it came from, which holds the compiled one in its co_extra:
    # a cycle through a C pointer that gc cannot see. Clearing the form's code cache, once it is freed, cuts it.
    weakref.finalize(form, reset_code, form._orig_mod.forward.__code__)
    # functools.cache keyed by the module: each module ever quantized.
    torchao.utils._assert_and_get_unique_device.cache_clear()
    assert_and_get_unique_device.cache_clear()
    proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()  # the last export's graph
    for method in vars(ShapeEnv).values():  # ShapeEnv's class-level lru_caches, keyed by the ShapeEnv
        if callable(getattr(method, "cache_clear", None)):
            method.cache_clear()


def main() -> None:
    hw = Hardware.detect()
    print(f"CPU: {hw.cpu_model}; int8: {hw.why_not('int8', 'cpu') or 'native (VNNI or AMX-INT8)'}")
    print(f"torch {torch.__version__}, torchao {__import__('torchao').__version__}")
    net = torchvision.models.resnet18(num_classes=1000).eval().requires_grad_(False)
    fp32 = prepare_module(net, _model_config())  # as the gate prepares it: channels_last, BatchNorms folded
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randn(8, 3, 224, 224, generator=gen)
    x = torch.randn(8, 3, 224, 224, generator=gen).contiguous(memory_format=torch.channels_last)

    t0 = time.perf_counter()
    pt2e = pt2e_int8(fp32, calibration)
    print(f"PT2E int8 built and compiled for batches 1-8 in {time.perf_counter() - t0:.1f} s")
    forms = {"fp32": fp32, "int8 (FX, serves)": build(fp32, "int8", "static", "cpu", calibration), "int8 (PT2E)": pt2e}
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        reference = fp32(x).softmax(dim=1)
        for name, module in forms.items():
            agreement, delta, _ = compare(module(x).float().softmax(dim=1), reference)
            print(f"{name}: top-1 agreement with fp32 {agreement:.3f}, largest probability difference {delta:.4f}")
        for _ in range(5):  # interleaved rounds
            for name, module in forms.items():
                t = time.perf_counter()
                module(x)
                times[name].append(time.perf_counter() - t)
    base = len(x) / statistics.median(times["fp32"])
    for name, t in times.items():
        img_s = len(x) / statistics.median(t)
        print(f"forward, batch 8: {name} {img_s:.1f} img/s, {img_s / base:.2f}x fp32")

    del forms, pt2e
    for how in ("as torch leaves it", "with release()", "with release(), built while the last one serves"):
        rss, serving = [], None
        for _ in range(BUILDS):
            form = pt2e_int8(fp32, calibration)
            if how != "as torch leaves it":
                release(form)
            if how.endswith("serves"):  # as a reload goes: the new form answers, then the old one is dropped
                with torch.inference_mode():
                    form(x)
                serving = form
            del form
            memory.release()
            rss.append(status_kib(os.getpid(), "VmRSS") / 1024)
        del serving
        steps = [b - a for a, b in zip(rss, rss[1:], strict=False)]
        print(f"RSS after each build, {how} (MiB): " + ", ".join(f"{r:.0f}" for r in rss))
        print(f"growth per build, {how}: median {statistics.median(steps):.1f} MiB")


if __name__ == "__main__":
    main()
