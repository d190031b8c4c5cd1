"""int8 by PT2E, in the server's process and as the gate builds it: `python -m bench.pt2e` (about 10
minutes; run it alone, like bench; `--served` runs only the last part, about 5 minutes).

Issue 11 asks for int8 by PT2E (torchao's X86InductorQuantizer, then Inductor with freezing). First, this
probe builds that form of reloader's prepared resnet18 in this process, with torch.compile (dynamic
batch, calibrated, compiled for batches 1-8), and prints:
- its forward speed at batch 8 beside fp32 and the FX int8 form;
- its top-1 agreement with fp32 on random inputs;
- the process's RSS after each of several builds, each dropped before the next: the gate builds one per
  checkpoint, so RSS that grows with every build grows with every reload.

Two things in torch 2.14 + torchao 0.18 stand in the way, and both are worked around:
- X86InductorQuantizer refuses torchvision's resnets ("Input partition has more than one output node"):
  non-strict torch.export records only the module a node came from, and BasicBlock calls its ReLU twice.
  `int8.one_partition_per_call` gives each call its own source partition.
- Inductor fails to lower oneDNN's weight prepacking (UnsupportedOperatorException:
  onednn.qconv_prepack) under torch.compile(dynamic=True) or options={"freezing": True}; it compiles
  with automatic dynamic shapes and freezing set in inductor's config for the whole process.

The builds in this process are measured three times: as torch leaves them; with `release` undoing every
process-wide holder found (each named there); and with `release`, each built while the previous form still
serves, as a reload goes. What is left in the third is why the gate does not build it in its own process.

Last (`served_path`), the form the gate builds: int8.pt2e_int8 exports, quantizes and compiles ahead of
time (AOTInductor) in a child process, which exits with all of that, and this process loads the package.
Its build time, answers, speed beside FX, and this process's RSS and Inductor's cache over builds made
while the last one serves; and what a package costs per load with its weights inside the compiled library
or beside it, as AOTInductor writes its interface and as packages.py has it written
(`packages.unpinned_interface`).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir

from reloader import int8, memory, packages
from reloader.hardware import Hardware
from reloader.optimize import prepare_module
from reloader.precision import build, compare

from .inprocess import _model_config
from .servers import status_kib

BUILDS = 6


def pt2e_int8(fp32: nn.Module, calibration: torch.Tensor) -> nn.Module:
    import torch._inductor.config as inductor_config

    side = calibration.shape[1:]
    with torch.no_grad():  # quantized as the gate's child quantizes it, then compiled here
        compiled = torch.compile(int8.quantized(fp32, calibration, len(calibration)))
    inductor_config.compile_threads = 1
    inductor_config.freezing = True  # for this process: within inductor_config.patch only, batch 8 ran at fp32's speed
    with torch.inference_mode():
        for size in (2, 3, 1):  # a static graph, the dynamic one larger batches reuse, and batch 1's
            compiled(torch.zeros(size, *side).contiguous(memory_format=torch.channels_last))
    return compiled


def aoti_loads(
    fp32: nn.Module, calibration: torch.Tensor, x: torch.Tensor, weights_inside: bool, unpinned: bool
) -> list[float]:
    """RSS (MiB) after each of several loads of one AOTInductor package of the PT2E form, each dropped before
    the next, with its weights inside the compiled library (AOTInductor's default) or beside it (packages.py),
    and its interface as AOTInductor writes it or `unpinned` (packages.py: for this process from then on)."""
    # AOTInductor's default keeps the weights inside the library; packages.py's options keep them beside it.
    options = {"freezing": True} if weights_inside else packages.PACKAGE_OPTIONS
    if unpinned:
        packages.unpinned_interface()
    rss = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        path = str(Path(folder) / "int8.pt2")
        graph = int8.quantized(fp32, calibration, len(x))
        packages.compile_package(graph, calibration, len(x), Path(path), options)
        for _ in range(BUILDS):
            package = torch._inductor.aoti_load_package(path)
            package(x)
            del package
            memory.release()
            rss.append(status_kib(os.getpid(), "VmRSS") / 1024)
    return rss


def served_path(fp32: nn.Module, calibration: torch.Tensor, x: torch.Tensor) -> None:
    """int8.pt2e_int8, the form the gate builds under `optimize: compile` (in a child process, loaded here):
    its build time, its answers and speed beside FX int8's, and this process's RSS over several builds,
    each built while the previous one serves, as reloads go; then what a package's weights cost per load
    inside the compiled library and beside it."""
    fx_form = build(fp32, "int8", "static", "cpu", calibration)
    started = time.perf_counter()
    pt2e = int8.pt2e_int8(fp32, calibration, len(x))
    print(f"PT2E int8 (int8.pt2e_int8, a child process): built in {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {"FX int8": [], "PT2E int8": []}
    with torch.inference_mode():
        agreement, delta, _ = compare(pt2e(x).softmax(dim=1), fp32(x).softmax(dim=1))
        fx_form(x)
        for _ in range(5):
            for name, module in (("FX int8", fx_form), ("PT2E int8", pt2e)):
                t = time.perf_counter()
                module(x)
                times[name].append(time.perf_counter() - t)
    print(f"  top-1 agreement with fp32 {agreement:.3f}, largest probability difference {delta:.4f}")
    ratio = statistics.median(times["FX int8"]) / statistics.median(times["PT2E int8"])
    print(f"  forward, batch {len(x)}: {ratio:.2f}x FX int8")
    rss, cache = [], Path(cache_dir())
    cached = tree_mib(cache)
    for _ in range(BUILDS):
        serving, pt2e = pt2e, int8.pt2e_int8(fp32, calibration, len(x))
        with torch.inference_mode():
            serving(x), pt2e(x)
        del serving
        memory.release()
        rss.append(status_kib(os.getpid(), "VmRSS") / 1024)
    steps = [b - a for a, b in zip(rss, rss[1:], strict=False)]
    print("  RSS here after each build, each while the last one serves (MiB): " + ", ".join(f"{r:.0f}" for r in rss))
    print(f"  growth per build: median {statistics.median(steps):.1f} MiB")
    print(f"  Inductor's cache ({cache}): {cached:.1f} -> {tree_mib(cache):.1f} MiB over the {BUILDS} builds")
    for inside, unpinned in ((True, False), (False, False), (True, True), (False, True)):
        loads = aoti_loads(fp32, calibration, x, inside, unpinned)
        where = "inside the library" if inside else "beside it"
        how = "packages.py's interface" if unpinned else "AOTInductor's interface"
        readings = ", ".join(f"{r:.0f}" for r in loads)
        print(f"RSS after each load of one package, weights {where}, {how} (MiB): {readings}")


def tree_mib(folder: Path) -> float:
    """The size of the files under `folder`, in MiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


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

    if "--served" in sys.argv[1:]:  # only the path that serves
        served_path(fp32, calibration, x)
        return
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
    served_path(fp32, calibration, x)


if __name__ == "__main__":
    main()
