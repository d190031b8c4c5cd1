"""fp32's compiled libraries under `optimize: compile`, kept per definition and run on each checkpoint's weights.

A package built without freezing (packages.SWAPPABLE_OPTIONS) takes its weights as inputs, so its library
serves any checkpoint of the definition it was built for (optimize.py): a later checkpoint runs the library
kept on disk (`Kept`) with a copy of its own weights in 0.1 s (its check included), instead of a 17 s build
(resnet18 here). The library runs through AOTInductor's C interface, which lets go of the GIL (`Container`).

AOTInductor reads every constant it was built with, unchecked: one not given is read through a null
pointer. So the library's constants are told apart when it is built, in the child (`write`): the module's
tensors, by name, with their layouts; and those computed from them when the container starts
(`_FOLDED_CONST_`: a Linear's weight transposed, 2 MB for resnet18's). A module with any other constant (a
tensor its forward makes, whose value AOTInductor does not hand back) gets no library: its package serves
with its own weights, and each of its checkpoints is built again, as the frozen forms' are.
"""

from __future__ import annotations

import _ctypes
import ctypes
import json
import mmap
import shutil
import threading
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .scratch import Scratch

FOLDED = "_FOLDED_CONST_"  # Inductor's prefix for a constant computed from others (compile_fx.py)


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by name: what a package built without freezing takes."""
    return dict((*module.named_parameters(), *module.named_buffers()))


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it alone where it is a view into a larger storage (a tied weight, a checkpoint's
    flat buffer): AOTInductor copies a constant's whole storage from the tensor's first element, into a slot
    as large as the storage the library was built with, and would write past it."""
    if tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.preserve_format)


def compacted(module: nn.Module) -> None:
    """In the child, before the build: each of the module's tensors `compact`, so the library's slots fit them."""
    with torch.no_grad():
        for tensor in tensors_of(module).values():
            alone = compact(tensor)
            if alone is not tensor:
                tensor.data = alone  # the same Parameter or buffer, on storage of its own


@dataclass(frozen=True)
class Library:
    """A compiled library in `folder`: `model.so`, and `constants.json`: the module tensor each of its
    constants is, and its layout, by their names in the library."""

    folder: Path

    def exists(self) -> bool:
        return (self.folder / "model.so").exists()

    def constants(self) -> dict[str, tuple[str, list[object]]]:
        """By its name in the library: the module tensor each constant is, and its layout (`_layout`)."""
        written = json.loads((self.folder / "constants.json").read_text())
        return {name: (fqn, layout) for name, (fqn, layout) in written.items()}

    def runner(self, tensors: Mapping[str, torch.Tensor]) -> Container:
        """The library's model on a copy of `tensors`. Refused (Unfit) where one is missing, or is not laid out
        as the one it was built with: the library would read out of bounds."""
        try:
            given = {}
            for name, (fqn, layout) in self.constants().items():
                if fqn not in tensors:
                    raise Unfit(f"takes {fqn!r}, which this module lacks")
                given[name] = compact(tensors[fqn])
                if layout != _layout(given[name]):
                    raise Unfit(f"takes {fqn!r} as {layout}, not {_layout(given[name])}")
            return Container(self.folder / "model.so", given)
        except OSError as exc:  # its files dropped by Kept meanwhile, for a newer definition
            raise Unfit(f"is gone: {exc}") from exc


class Unfit(ValueError):
    """A library cannot run on these tensors."""


def _layout(tensor: torch.Tensor) -> list[object]:
    return [list(tensor.shape), list(tensor.stride()), str(tensor.dtype), tensor.device.type]


class _Entry(ctypes.Structure):  # AOTInductorConstantMapEntry (aoti_runtime/interface.h)
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


# Prototypes of their own: ctypes.pythonapi's functions are shared with every other user in the process.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
_capsule = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi)
)


_P, _SIZE, _FLAG = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_bool
# The functions of AOTInductor's C interface called here, with their arguments' C types (interface.h): without
# them, ctypes passes a Python int as a 32-bit int where the function reads a 64-bit size_t or pointer.
_PROTOTYPES = {
    "AOTInductorModelContainerCreateWithDevice": [ctypes.POINTER(_P), _SIZE, ctypes.c_char_p, ctypes.c_char_p],
    "AOTInductorModelContainerDelete": [_P],
    "AOTInductorModelContainerUpdateConstantBufferPairs": [_P, ctypes.POINTER(_Entry), _SIZE, _FLAG, _FLAG],
    "AOTInductorModelUpdateConstantsFromBlob": [_P, ctypes.POINTER(ctypes.c_char)],
    "AOTInductorModelContainerRun": [_P, ctypes.POINTER(_P), _SIZE, ctypes.POINTER(_P), _SIZE, _P, _P],
    "AOTInductorModelContainerGetNumInputs": [_P, ctypes.POINTER(_SIZE)],
    "AOTInductorModelContainerGetNumOutputs": [_P, ctypes.POINTER(_SIZE)],
    "AOTInductorModelContainerGetConstantsBlobSize": [_P, ctypes.POINTER(ctypes.c_uint64)],
    "AOTInductorGetLastError": [ctypes.POINTER(ctypes.c_char_p)],
}


def _opened(library: Path) -> ctypes.CDLL:
    """The library, its functions declared (each CDLL has functions of its own)."""
    lib = ctypes.CDLL(str(library))
    for name, arguments in _PROTOTYPES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, ctypes.c_int  # AOTIRuntimeError: 0 for success
    return lib


def _handle(tensor: torch.Tensor) -> tuple[Any, int]:
    """A new AtenTensorHandle on `tensor`'s storage: the capsule torch wraps it in, and its address."""
    capsule = torch._C._aoti.unsafe_alloc_void_ptr_from_tensor(tensor)
    return capsule, int(_capsule_pointer(capsule, None))


class Container:
    """An AOTInductor library's model, called as a module is: one batch in, its scores out. Its weights are a
    copy of `constants` (tensors by their names in it), or read from `blob` (a package's weights file).

    Run through AOTInductor's C interface (aoti_runtime/interface.h) by ctypes, which lets go of the GIL for
    the forward. torch's own runners (AOTIModelContainerRunnerCpu, and the package loader's) hold it
    throughout: a Python thread beside one ran at 0.6 million steps a second, against 7.7 million beside
    this one and 9-10 million beside eager's forward (resnet18, batch 8, here). Served at c=16
    (bench/compiling.py), a compiled resnet18 answered 33.9-34.5 img/s through torch's runners against 41
    eager, and 40.8 through this one.

    A copy, not the tensors themselves: AOTInductor's user-managed constants (the container started on the
    caller's tensors, or `load_constants(user_managed=True)`) each take a new reference to their tensor that
    nothing ever drops (MaybeOwningAtenTensorHandle, torch 2.14.1): every checkpoint's weights stayed in
    memory after it was gone, 45 MB per resnet18 checkpoint here."""

    def __init__(
        self, library: Path, constants: Mapping[str, torch.Tensor] | None = None, blob: Path | None = None
    ) -> None:
        self._lib = lib = _opened(library)
        container = ctypes.c_void_p()
        try:
            self._check(
                lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(container), 1, b"cpu", None), "start"
            )
        except RuntimeError:
            _ctypes.dlclose(lib._handle)
            raise
        self._container = container
        # As the last reference goes; not at exit, where a thread given up on may still be running it.
        weakref.finalize(self, _close, lib, container).atexit = False
        if constants is not None:
            self._take(constants)
        if blob is not None:
            self._read(blob)
        for what in ("Inputs", "Outputs"):
            count = ctypes.c_size_t()
            self._check(getattr(lib, f"AOTInductorModelContainerGetNum{what}")(container, ctypes.byref(count)), what)
            if count.value != 1:
                raise Unfit(f"takes {count.value} {what.lower()}, not one batch to one batch of scores")

    def _read(self, blob: Path) -> None:
        """The weights from a package's weights file, copied into the container's own memory."""
        size = ctypes.c_uint64()
        self._check(
            self._lib.AOTInductorModelContainerGetConstantsBlobSize(self._container, ctypes.byref(size)), "size"
        )
        if blob.stat().st_size < max(size.value, 1):  # AOTInductor reads as much as it expects, unchecked
            raise Unfit(f"its weights file holds {blob.stat().st_size} bytes, not {size.value}")
        with blob.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            weights = (ctypes.c_char * len(mapped)).from_buffer(mapped)
            try:
                self._check(self._lib.AOTInductorModelUpdateConstantsFromBlob(self._container, weights), "read weights")
            finally:
                del weights  # the mapping closes only once nothing points into it

    def _take(self, constants: Mapping[str, torch.Tensor]) -> None:
        handles = [_handle(t) for t in constants.values()]
        names = [name.encode() for name in constants]
        entries = (_Entry * len(handles))(*(_Entry(n, a) for n, (_, a) in zip(names, handles, strict=True)))
        try:  # copied into the container's own memory, every constant checked given
            update = self._lib.AOTInductorModelContainerUpdateConstantBufferPairs
            self._check(update(self._container, entries, len(handles), False, True), "take weights")
        finally:
            torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([c for c, _ in handles])  # ours: dropped

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        _, address = _handle(batch)  # the run takes it over
        inputs, outputs = (ctypes.c_void_p * 1)(address), (ctypes.c_void_p * 1)()
        run = self._lib.AOTInductorModelContainerRun
        self._check(run(self._container, inputs, 1, outputs, 1, None, None), "run")
        return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(_capsule(outputs[0], None, None))

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            message = ctypes.c_char_p()
            self._lib.AOTInductorGetLastError(ctypes.byref(message))
            raise RuntimeError(f"AOTInductor could not {what}: {(message.value or b'').decode(errors='replace')}")


def _close(lib: ctypes.CDLL, container: ctypes.c_void_p) -> None:
    """The container deleted, then the library closed: ctypes never closes one itself, and a dropped
    package's library would stay mapped for the process's life (packages.unpinned_interface)."""
    if lib.AOTInductorModelContainerDelete(container) == 0:  # else the library stays: its code may yet run
        _ctypes.dlclose(lib._handle)


def unpack(package: Path, folder: Path) -> tuple[Path, Path | None]:
    """`package` extracted into `folder`: its one library, and its weights file where it has one."""
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    found, blobs = list(folder.rglob("*.so")), list(folder.rglob("*_weights.blob"))
    if len(found) != 1 or len(blobs) > 1:
        raise Unfit(f"the package holds {len(found)} libraries and {len(blobs)} weights files, not 1")
    return found[0], blobs[0] if blobs else None


def calls_out(library: Path) -> list[str]:
    """The ops `library` runs outside its own code: those AOTInductor could not compile in, which it calls
    through torch's proxy executor (listed in a JSON file beside it; torchvision's roi_align, say, and before
    packages.inlined_quantized_max_pool a resnet's int8 max pool). Only torch's own loader makes that
    executor; `Container` passes none."""
    listed = library.with_suffix(".json")
    if not listed.exists():
        return []
    nodes = json.loads(listed.read_text()).get("nodes", [])  # [{"name": "buf2", "node": {"target": ...}}]
    return [str(entry.get("node", {}).get("target", "?")) for entry in nodes]


def write(package: Path, module: nn.Module, folder: Path) -> str | None:
    """In the child that built `package` from `module`: its library, and what each constant of it is, in
    `folder`; or, where it cannot run on a module's tensors alone, nothing, and why."""
    unpacked = folder / "package"
    so, _ = unpack(package, unpacked)
    if outside := calls_out(so):
        shutil.rmtree(unpacked)
        return f"it runs {', '.join(outside[:3])} through torch's proxy executor"
    # Started from the package's own weights (beside the library), only to read its constants' names.
    container = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
    names = container.get_constant_names_to_original_fqns()
    own = tensors_of(module)
    constants = {name: (fqn, _layout(own[fqn])) for name, fqn in names.items() if fqn in own}
    unknown = [name for name in names if name not in constants and not name.startswith(FOLDED)]
    if not unknown:
        (folder / "constants.json").write_text(json.dumps(constants))
        shutil.move(so, folder / "model.so")
    shutil.rmtree(unpacked)
    return f"constants that are none of the module's tensors: {', '.join(unknown[:3])}" if unknown else None


class Kept:
    """Libraries kept for later checkpoints, one per definition, for the newest `limit` definitions: in a
    folder of this process's (resnet18's library: 1.7 MB; scratch.py), removed when the process exits."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._folders: OrderedDict[Hashable, Path] = OrderedDict()
        self._lock = threading.Lock()
        self._root: Scratch | None = None
        self._count = 0

    def get(self, key: Hashable) -> Library | None:
        with self._lock:
            if key not in self._folders:
                return None
            self._folders.move_to_end(key)
            return Library(self._folders[key])

    def put(self, key: Hashable, library: Library) -> Library:
        """`library`, moved into the kept folder as `key`'s (replacing any before). The oldest beyond `limit` go."""
        with self._lock:
            if self._root is None:
                self._root = Scratch("libraries")  # removed with this object, or at exit
            self._count += 1
            folder = Path(shutil.move(library.folder, self._root.path / str(self._count)))
            if key in self._folders:
                shutil.rmtree(self._folders.pop(key), ignore_errors=True)
            self._folders[key] = folder
            while len(self._folders) > self.limit:
                shutil.rmtree(self._folders.popitem(last=False)[1], ignore_errors=True)
            return Library(folder)

    def drop(self, key: Hashable, library: Library) -> None:
        """`library` no longer kept as `key`'s, unless a newer one took its place meanwhile."""
        with self._lock:
            if self._folders.get(key) != library.folder:
                return
            del self._folders[key]
        shutil.rmtree(library.folder, ignore_errors=True)
