"""Static int8, calibrated on what the gate gives: two forms.

- "static": FX graph mode quantization with the x86 backend's default qconfig (oneDNN and FBGEMM kernels,
  which use VNNI and AMX-INT8), in the server's process: built in a second or two.
- "pt2e", as issue 11 asks: torchao's X86InductorQuantizer, then Inductor with freezing, built ahead of
  time (AOTInductor) in a child process, and loaded by the server.

Why a child process: built in the server, every PT2E form left memory behind once dropped: 53 MiB per
resnet18 build as torch leaves it, and still 3.8 MiB with every process-wide holder found undone when a
build overlaps the form that serves, as a reload does (bench/pt2e.py). The child exports, quantizes,
calibrates and compiles, writes a package, and exits with all of that. The server only loads the package,
whose weights are kept beside the compiled library, not inside it (AOTInductor's default would put them
inside, and map them with the library). A dropped package's library is unloaded: see `unpinned_interface`.

It costs a compile per checkpoint (22-43 s for resnet18 on 2 cores), so the gate offers it only under
`optimize: compile`, beside FX's form, and serves the faster of the two that keep the answers.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch import fx, nn

from .compute import FORWARD_LOCK, TRACE_LOCK, lower_thread_priority, run_forward
from .hardware import Hardware

# Exports and compiles for batches 1 to the model's max_size; the child gets this long to do it.
BUILD_TIMEOUT_S = 900.0


class Packaged(nn.Module):
    """A loaded AOTInductor package, as serving calls a module: the fp32 batch in, fp32 scores out.

    Its kernels are compiled for images of `image` (C, H, W) in batches of 1 to `max_batch`, and AOTInductor
    checks no input: a batch of other images would be read out of bounds. Such a batch raises instead (the
    live version, scored under a config with another crop, say)."""

    def __init__(self, path: Path, image: tuple[int, ...], max_batch: int) -> None:
        super().__init__()
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.image, self.max_batch = tuple(image), max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image or not 1 <= len(x) <= self.max_batch:
            raise ValueError(
                f"this int8 package takes batches of 1 to {self.max_batch} images of {self.image}, "
                f"not {tuple(x.shape)}"
            )
        return self.runner(x.contiguous(memory_format=torch.channels_last)).float()


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
        with FORWARD_LOCK, TRACE_LOCK:
            prepared = prepare_fx(fp32, get_default_qconfig_mapping("x86"), (calibration[:1],))
        for part in calibration.split(max_batch):  # the observers record each activation's range, a batch
            run_forward(prepared, part)  # at a time: each pass waits at most one of serving's
        with FORWARD_LOCK, TRACE_LOCK:
            return convert_fx(prepared)
    finally:
        # prepare_fx and convert_fx look up each module's device through a functools.cache keyed by the
        # module, which keeps every module it has seen: 24 MiB per resnet18 build, so per reload.
        assert_and_get_unique_device.cache_clear()
        for m in bare:  # prepare_fx gives fp32's own modules a qconfig (which cannot be pickled): fp32 is
            vars(m).pop("qconfig", None)  # left as it was, for the PT2E build's process and for serving


def pt2e_int8(fp32: nn.Module, calibration: torch.Tensor, max_batch: int) -> nn.Module:
    """The PT2E int8 form of `fp32` (on the CPU), built in a child process at the lowest priority."""
    with tempfile.TemporaryDirectory(prefix="reloader-int8-") as folder:  # this user's alone (mode 0700)
        built = package(fp32, calibration, max_batch, Path(folder))
        return Packaged(built, calibration.shape[1:], max_batch)  # read whole: the folder may go


def package(fp32: nn.Module, calibration: torch.Tensor, max_batch: int, folder: Path) -> Path:
    """The PT2E int8 package of `fp32`, built in a child process into `folder`. The child's output goes to a
    log file there, not the daemon's: a failure's reason is the log's last line."""
    path, log, given = folder / "int8.pt2", folder / "build.log", folder / "fp32.pt"
    # Handed over in a file: as multiprocessing arguments, the module's tensors would move into shared
    # memory, /dev/shm, which a container caps at 64 MB by default.
    torch.save({"fp32": fp32, "calibration": calibration}, given)
    child = multiprocessing.get_context("spawn").Process(
        target=_build, args=(given, max_batch, path, log), name="reloader-int8", daemon=True
    )
    child.start()
    child.join(BUILD_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        raise RuntimeError(f"the PT2E int8 build took over {BUILD_TIMEOUT_S:.0f} s")
    if child.exitcode != 0 or not path.exists():
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        last = lines[-1] if lines else "no output"
        raise RuntimeError(f"the PT2E int8 build failed (exit code {child.exitcode}): {last}")
    return path


def _build(given: Path, max_batch: int, path: Path, log: Path) -> None:
    """In the child: quantize, then compile and package."""
    import torch._inductor.config as inductor_config

    with log.open("ab") as out:  # the compiler's processes inherit these too
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    lower_thread_priority()  # the server's forward goes first, as for every reload (compute.py)
    # The module as a whole, not a state_dict: the file is the server's own, written a moment ago.
    handed = torch.load(given, weights_only=False)
    inductor_config.compile_threads = 1
    unpinned_interface()
    with torch.no_grad():
        graph = quantized(handed["fp32"], handed["calibration"], max_batch)
        compile_package(graph, handed["calibration"], max_batch, path)


# AOTInductor's options for the package: the weights beside the compiled library, not inside it.
PACKAGE_OPTIONS = {
    "freezing": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
}


def _batches(calibration: torch.Tensor, max_batch: int) -> tuple[torch.Tensor, tuple[dict[int, object]]]:
    """An example batch of 2, and the batch dimension the graph takes: 1 to max_batch."""
    example = calibration[:2].expand(2, *calibration.shape[1:]).contiguous(memory_format=torch.channels_last)
    return example, ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)


def quantized(fp32: nn.Module, calibration: torch.Tensor, max_batch: int) -> fx.GraphModule:
    """fp32 exported for batches of 1 to max_batch, quantized by X86InductorQuantizer, calibrated and
    converted. Called without gradients."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    example, batch = _batches(calibration, max_batch)
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


def compile_package(
    graph: fx.GraphModule, calibration: torch.Tensor, max_batch: int, path: Path, options: dict | None = None
) -> None:
    """The quantized graph exported again and compiled ahead of time into a package at `path`."""
    example, batch = _batches(calibration, max_batch)
    program = torch.export.export(graph, (example,), dynamic_shapes=batch)
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs=options or PACKAGE_OPTIONS
    )


# AOTInductor's runtime interface keeps each thread's last error in a `thread_local std::string`, cleared by
# every call into the library. The string's destructor is registered with each thread that calls, and glibc
# keeps a library loaded while one of its thread destructors is pending: the server's threads live as long as
# it does, so every package it loaded stayed mapped once dropped, with its deleted file's disk space (0.4 MiB
# of RSS and 1.7 MB of /tmp per resnet18 build). The same slot, trivially destructible, registers nothing.
# (The first package a process loads still stays: it defines symbols that glibc makes process-wide,
# STB_GNU_UNIQUE, and every later one binds to those.)
PINNING_SLOT = "static thread_local std::string g_aoti_last_error;"
FREE_SLOT = """namespace {
struct LastError {
  char text[1024];
  void clear() { text[0] = 0; }
  LastError& operator=(const char* what) { snprintf(text, sizeof text, "%s", what); return *this; }
  const char* c_str() const { return text; }
};
}  // namespace
static thread_local LastError g_aoti_last_error;"""


def unpinned_interface() -> None:
    """In the build's process: AOTInductor writes its interface with FREE_SLOT for PINNING_SLOT."""
    from torch._inductor import config
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    source = Path(inspect.getfile(CppWrapperCpu)).parent / "aoti_runtime" / "interface.cpp"
    text = source.read_text()
    if PINNING_SLOT not in text:  # as in the torch this project pins; a new one fails the build, and says so
        raise RuntimeError(f"AOTInductor's {source} no longer declares {PINNING_SLOT!r}")
    if not config.aot_inductor.dynamic_linkage:
        raise RuntimeError("AOTInductor's aot_inductor.dynamic_linkage is off: its interface is not inlined")

    def interface(wrapper: CppWrapperCpu) -> None:  # what the method does, with the slot replaced
        wrapper.header.splice_aot(text.replace(PINNING_SLOT, FREE_SLOT))
        wrapper.header.splice_aot("\n")

    CppWrapperCpu._write_aoti_interface_header = interface  # type: ignore[method-assign]


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
