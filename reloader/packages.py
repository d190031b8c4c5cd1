"""Compiled forms built ahead of time (AOTInductor) in a child process, and loaded by the server.

Two kinds: the PT2E int8 form (int8.py); and under `optimize: compile`, once the server serves, a CPU form
of a definition the server's process has not compiled yet (optimize.compile_module): fp32's, bf16's.

Why a child process:
- Compiling in the server's process held its GIL for most of the compile's Python work (dynamo, AOTAutograd,
  Inductor's lowering: 17 s of CPU for resnet18 cold here, 10-14 s with Inductor's caches warm), whatever the
  compiling thread's nice value: serving's p99 was about 3x steady for the whole compile (bench/compiling.py).
  A child at nice 19 competes for the cores only, where the kernel's priorities do apply.
- Built in the server, every PT2E form left memory behind once dropped: 53 MiB per resnet18 build as torch
  leaves it (bench/pt2e.py). The child exits with all of that.

The server only loads the package, whose weights are kept beside the compiled library, not inside it
(AOTInductor's default would put them inside, and map them with the library), and runs it through
AOTInductor's C interface, which lets go of the GIL for the forward (libraries.Container). A dropped
package's library is unloaded: see `unpinned_interface`.

fp32's package under `optimize: compile` is built without freezing, so its weights are inputs: a later
checkpoint of the same definition runs the library kept from the first with its own weights (libraries.py:
0.1 s with the check of its answers, against a 17 s build for resnet18 here). Freezing bought fp32 nothing
measured here (resnet18, batch 8, interleaved rounds: 49.4 img/s frozen, 48.9 not, 48.1 eager; batch 1:
36.8, 36.7, 35.0). The half-precision forms stay frozen: freezing folds their casts and lays their weights
out for oneDNN once (bf16 weights compiled measured 1.17x eager on the Xeon), and without that CPU nothing
here can measure them otherwise. A frozen package cannot take another checkpoint's weights: its
convolutions' are packed constants, which `load_constants` leaves as they were, silently.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import libraries
from .compute import as_build_child, kill_group, lower_thread_priority, run_forward
from .scratch import Scratch
from .threads import stop_asked, stop_if_asked

# Exports and compiles for batches 1 to the model's max_size; the child gets this long to do it.
BUILD_TIMEOUT_S = 900.0
# How often a build looks whether its thread is asked to stop (a daemon's SIGTERM, a model taken out of the
# config): it then kills its child, and the stop does not wait for a compile of a minute or more.
STOP_POLL_S = 0.1

# AOTInductor's options for the package: the weights beside the compiled library, not inside it.
PACKAGE_OPTIONS = {
    "freezing": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
}
# fp32's: its weights stay inputs (the module docstring says why). What only they determine (a Linear's weight
# transposed) is computed when the library starts: without this, it would be built in, and the library
# would print a warning to stderr each time it started with other weights.
SWAPPABLE_OPTIONS = {**PACKAGE_OPTIONS, "freezing": False, "aot_inductor.use_runtime_constant_folding": True}


class BuildFailed(RuntimeError):
    """The child did not write a package: the module could not be exported or compiled, or it ran too long."""


class WeightsRefused(RuntimeError):
    """A library built without freezing cannot run on a module's tensors, or answers otherwise than it."""


class Packaged(nn.Module):
    """A compiled package's model (`runner`: a batch in, scores out), as serving calls a module: the fp32 batch
    in, fp32 scores out.

    Its kernels are compiled for images of `image` (C, H, W) in batches of 1 to `max_batch`, and AOTInductor
    checks no input: a batch of other images would be read out of bounds. Such a batch raises instead (the
    live version, scored under a config with another crop, say). `eager`, where given, is the module it was
    compiled from, kept as torch.compile keeps it (`_orig_mod`): the other precisions are built from it."""

    def __init__(
        self,
        runner: Callable[[torch.Tensor], torch.Tensor],
        image: tuple[int, ...],
        max_batch: int,
        eager: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.runner = runner
        self.image, self.max_batch = tuple(image), max_batch
        if eager is not None:
            self._orig_mod = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image or not 1 <= len(x) <= self.max_batch:
            raise ValueError(
                f"this compiled package takes batches of 1 to {self.max_batch} images of {self.image}, "
                f"not {tuple(x.shape)}"
            )
        return self.runner(x.contiguous(memory_format=torch.channels_last)).float()


# Run by the child on the module before it compiles it (int8.quantized): module, images, max_batch -> module.
Transform = Callable[[nn.Module, torch.Tensor, int], nn.Module]


def loaded(path: Path, image: tuple[int, ...], max_batch: int, eager: nn.Module | None = None) -> Packaged:
    """The package at `path`, read whole (its file may go), with its own weights, run through AOTInductor's C
    interface (libraries.Container: the GIL let go for the forward). A package that calls ops outside its
    library (libraries.calls_out) runs through torch's loader instead, which holds the GIL for the forward."""
    with Scratch("package") as folder:  # the library stays mapped once it goes
        try:
            library, blob = libraries.unpack(path, folder)
        except libraries.Unfit as exc:
            raise BuildFailed(str(exc)) from exc
        if libraries.calls_out(library):
            from torch._inductor import aoti_load_package

            return Packaged(aoti_load_package(str(path)), image, max_batch, eager)
        return Packaged(libraries.Container(library, blob=blob), image, max_batch, eager)


def compiled(
    module: nn.Module,
    images: torch.Tensor,
    max_batch: int,
    transform: Transform | None = None,
    what: str = "ahead-of-time compile",
    keep: Callable[[libraries.Library], object] | None = None,
) -> Packaged:
    """`module` (on the CPU) compiled for batches of 1 to max_batch images like `images`, in a child process
    at the lowest priority; `transform` (a module-level function: the child imports it) runs there first.
    With `keep`: built without freezing, its library run with `module`'s tensors (`on_weights`), and handed
    to `keep` (which moves it out of the build's folder)."""
    with Scratch("compile") as folder:
        built = package(module, images, max_batch, folder, transform, what, swappable=keep is not None)
        library = libraries.Library(built.parent / "library")
        if keep is None or not library.exists():  # not the eager module of a transformed form: its own
            return loaded(built, images.shape[1:], max_batch, None if transform else module)
        try:
            packaged = on_weights(library, module, images, max_batch)
        except WeightsRefused as exc:
            raise BuildFailed(f"the {what}'s library {exc}") from exc
        keep(library)
        return packaged


def on_weights(library: libraries.Library, module: nn.Module, images: torch.Tensor, max_batch: int) -> Packaged:
    """`library`, built without freezing from a module of `module`'s definition (optimize.py) for images like
    `images`, run with a copy of `module`'s tensors, and checked against `module` on images like those served
    (0.1 s in all for resnet18 here): its answers must be `module`'s."""
    try:
        packaged = Packaged(library.runner(libraries.tensors_of(module)), images.shape[1:], max_batch, module)
    except libraries.Unfit as exc:
        raise WeightsRefused(str(exc)) from exc
    # Normalized images are about zero-mean with unit variance; the same ones every time.
    batch = torch.randn((2, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
    expected, answered = run_forward(module, batch).float(), run_forward(packaged, batch)
    scale = max(1.0, float(expected.abs().max()))
    if not torch.allclose(answered, expected, rtol=1e-3, atol=1e-3 * scale):
        worst = float((answered - expected).abs().max())
        raise WeightsRefused(f"answers otherwise than the module it runs on, by up to {worst:.3g}")
    return packaged


def package(
    module: nn.Module,
    images: torch.Tensor,
    max_batch: int,
    folder: Path,
    transform: Transform | None = None,
    what: str = "ahead-of-time compile",
    swappable: bool = False,
) -> Path:
    """The package of `module`, built in a child process into `folder`; `swappable`: without freezing, and its
    library written to `folder`/library (libraries.write). The child's output goes to a log file there, not
    the daemon's: a failure's reason is the log's last line. Where the thread that builds is asked to stop
    (threads.stop_asked), the child is killed at once and threads.Stopping raised: no verdict."""
    path, log, given = folder / "compiled.pt2", folder / "build.log", folder / "module.pt"
    stop_if_asked(f"the {what} is not started")
    # Handed over in a file: as multiprocessing arguments, the module's tensors would move into shared
    # memory, /dev/shm, which a container caps at 64 MB by default.
    torch.save({"module": module, "images": images}, given)
    child = multiprocessing.get_context("spawn").Process(
        target=_build,
        args=(os.getpid(), given, max_batch, path, log, transform, swappable),
        name="reloader-compile",
        daemon=True,
    )
    child.start()
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while child.is_alive() and time.monotonic() < deadline and not stop_asked():
        child.join(STOP_POLL_S)
    if child.is_alive():
        kill_group(child)
        stop_if_asked(f"the {what} was ended unfinished, its child process killed")
        raise BuildFailed(f"the {what} took over {BUILD_TIMEOUT_S:.0f} s")
    if child.exitcode != 0 or not path.exists():
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        last = lines[-1] if lines else "no output"
        raise BuildFailed(f"the {what} failed (exit code {child.exitcode}): {last}")
    return path


def _build(
    parent: int, given: Path, max_batch: int, path: Path, log: Path, transform: Transform | None, swappable: bool
) -> None:
    """In the child: transform where asked, then compile and package."""
    import torch._inductor.config as inductor_config

    as_build_child(parent)
    with log.open("ab") as out:  # the compiler's processes inherit these too
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    lower_thread_priority()  # the server's forward goes first, as for every reload (compute.py)
    # The module as a whole, not a state_dict: the file is the server's own, written a moment ago.
    handed = torch.load(given, weights_only=False)
    inductor_config.compile_threads = 1
    unpinned_interface()
    inlined_quantized_max_pool()
    with torch.no_grad():
        module, images = handed["module"], handed["images"]
        if transform is not None:
            module = transform(module, images, max_batch)
        if swappable:
            libraries.compacted(module)
        compile_package(module, images, max_batch, path, SWAPPABLE_OPTIONS if swappable else None)
        if swappable:
            (path.parent / "library").mkdir()
            unfit = libraries.write(path, module, path.parent / "library")
            if unfit is not None:
                print(f"no library to run other weights on: {unfit}", flush=True)


def example_batch(images: torch.Tensor, max_batch: int) -> tuple[torch.Tensor, tuple[dict[int, object]]]:
    """An example batch of 2, and the batch dimension the graph takes: 1 to max_batch."""
    example = images[:2].expand(2, *images.shape[1:]).contiguous(memory_format=torch.channels_last)
    return example, ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)


def compile_package(
    module: nn.Module, images: torch.Tensor, max_batch: int, path: Path, options: dict | None = None
) -> None:
    """`module` exported for batches of 1 to max_batch and compiled ahead of time into a package at `path`."""
    example, batch = example_batch(images, max_batch)
    program = torch.export.export(module, (example,), dynamic_shapes=batch)
    # AOTInductor writes the package's files (library, source, weights) into Inductor's cache before it zips
    # them, and nothing deletes them: the cache grew 183 MB in 6 resnet18 builds here, so a server building
    # each new checkpoint would fill its /tmp (an emptyDir of 1 GiB in deploy/). Written into the build's
    # folder, they go with it. The cache keeps only what every build shares and reuses (its probes of the
    # CPU: 8-10 s of a build in a cold cache here; the precompiled headers).
    output = path.parent / "aoti"
    output.mkdir(exist_ok=True)
    with torch._inductor.config.patch({"aot_inductor.output_path": str(output)}):
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


def inlined_quantized_max_pool() -> None:
    """In the build's process, before its first compile: an int8 max pool (dequantize, max pool, quantize) is
    compiled into the library, as Inductor compiles any other pool, instead of being matched to
    quantized::max_pool2d. Inductor has no kernel of its own for that op: a library calls it through torch's
    proxy executor (libraries.calls_out), so every resnet's PT2E form needed torch's loader, which holds the
    GIL for the whole forward, where the gate offers int8 (seen on a Zen 5 EPYC, with VNNI). Measured there
    on resnet18 at 224 px, batch 8: the same answers (largest difference from fp32 0.0060 either way), 0.98x
    the speed in process, and the GIL let go for the forward (another thread ran 2455 steps during three
    forwards, against 3)."""
    from torch._inductor.fx_passes import quantization

    if not hasattr(quantization, "_register_quantization_maxpool2d"):  # as in the torch this project pins
        raise RuntimeError("Inductor's fx_passes.quantization no longer registers its int8 max pool lowering")
    quantization._register_quantization_maxpool2d = lambda: None
