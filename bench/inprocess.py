"""The limit with no server at all: reloader's own decode+preprocess and forward, in this process.

Repetitions are interleaved in rounds (every variant once per round, median over rounds), so a burst of
load from other processes on the machine hits every variant alike instead of one of them.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from reloader.architectures import build_model
from reloader.compute import lower_thread_priority
from reloader.config import ModelConfig, Preprocess
from reloader.images import Preprocessor, stack_images
from reloader.optimize import prepare_module

from .workload import MODEL, NUM_CLASSES

BATCH_SIZES = (1, 4, 8)
SPEEDUP_BATCH = 8
RELOADER_FORWARD = "BatchNorms folded + channels_last + inference_mode (reloader)"
# reloader's decode pool: as many threads, at the same low priority (reloader/app.py, Service.decode_pool).
DECODE_THREADS = max(2, os.cpu_count() or 2)


def _model_config(optimize: str = "none") -> ModelConfig:
    from reloader.architectures import imagenet_labels

    return ModelConfig(
        arch=MODEL, num_classes=NUM_CLASSES, labels=imagenet_labels(), checkpoints="/nonexistent", optimize=optimize
    )


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Limit:
    """reloader's module (prepare_module: BatchNorms folded, channels_last) and forward (inference_mode), fed by
    its Preprocessor.

    Two ways to feed it: serial (decode the batch, then forward it) and pipelined (a decode pool as large as
    reloader's keeps the next batch decoding while the forward runs). The limit is the better of the two.
    """

    def __init__(
        self,
        images: list[bytes],
        sd: dict[str, torch.Tensor],
        form: tuple[str, str] = ("fp32", "eager"),
        optimize: str = "none",
        device: str = "cpu",
        max_batch: int = max(BATCH_SIZES),
    ):
        from reloader.precision import build, served

        self.images = images
        self.pre = Preprocessor(Preprocess(resize=256, crop=224))
        # As the gate does: on the device before it is prepared, then called with CPU batches (precision.served).
        fp32 = prepare_module(build_model(MODEL, NUM_CLASSES, sd).to(device), _model_config(optimize))
        self.module = served(fp32, device)
        if form != ("fp32", "eager"):  # the form reloader serves at another precision (section 7)
            calibration = torch.stack([self.pre.load(image) for image in images])  # for int8
            side = 224 if optimize == "compile" else None
            self.module = build(fp32, *form, device, calibration, side, max_batch)
        self._offset = 0
        self.serve(max_batch)  # first-call allocations and oneDNN primitive creation

    def _next_image(self) -> bytes:
        self._offset += 1
        return self.images[self._offset % len(self.images)]

    def _forward(self, tensors: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            self.module(stack_images(tensors)).float().softmax(dim=1)

    def serve(self, batch: int) -> float:
        """Seconds to decode+preprocess `batch` uploads one after another and answer them in one forward."""
        t0 = time.perf_counter()
        self._forward([self.pre.load(self._next_image()) for _ in range(batch)])
        return time.perf_counter() - t0

    def pipelined(self, batch: int, batches: int) -> float:
        """img/s in steady state with decoding overlapped with the forward, on reloader's number of threads."""
        with ThreadPoolExecutor(DECODE_THREADS, initializer=lower_thread_priority) as pool:
            ahead = deque(pool.submit(self.pre.load, self._next_image()) for _ in range(batch))
            ahead[-1].result()
            t0 = time.perf_counter()
            for _ in range(batches):
                tensors = [ahead.popleft().result() for _ in range(batch)]
                ahead.extend(pool.submit(self.pre.load, self._next_image()) for _ in range(batch))
                self._forward(tensors)
            elapsed = time.perf_counter() - t0
            for future in ahead:
                future.result()
        return batch * batches / elapsed

    def decode(self) -> float:
        """Seconds per upload for decode+preprocess alone."""
        t0 = time.perf_counter()
        for data in self.images:
            self.pre.load(data)
        return (time.perf_counter() - t0) / len(self.images)

    def table(self, rounds: int) -> dict[str, Any]:
        """img/s per batch size, serial and pipelined, and the batch-1 latency (what c=1 is compared with)."""
        serial: dict[int, list[float]] = {b: [] for b in BATCH_SIZES}
        piped: dict[int, list[float]] = {b: [] for b in BATCH_SIZES}
        decode: list[float] = []
        for _ in range(rounds):
            decode.append(self.decode())
            for b in BATCH_SIZES:
                serial[b].append(self.serve(b))
                piped[b].append(self.pipelined(b, max(1, 8 // b)))
            serial[1].append(self.serve(1))  # more samples for the c=1 latency comparison
        seconds = {b: statistics.median(v) for b, v in serial.items()}
        serial_img_s = {b: b / s for b, s in seconds.items()}
        piped_img_s = {b: statistics.median(v) for b, v in piped.items()}
        best = max(BATCH_SIZES, key=lambda b: max(serial_img_s[b], piped_img_s[b]))
        return {
            "decode_ms": statistics.median(decode) * 1000.0,
            "batch_ms": {b: s * 1000.0 for b, s in seconds.items()},
            "img_s": serial_img_s,
            "pipelined_img_s": piped_img_s,
            "best_batch": best,
            "latency_b1_ms": seconds[1] * 1000.0,
            "rounds": rounds,
        }

    def probe(self, batch: int, repeat: int) -> dict[str, float]:
        """A short reading taken next to a server's run (that server frozen), to follow the machine's drift."""
        b1 = statistics.median([self.serve(1) for _ in range(2 * repeat + 1)])
        serial = batch / statistics.median([self.serve(batch) for _ in range(repeat)])
        piped = self.pipelined(batch, repeat)
        return {
            "img_s": max(serial, piped),
            "serial_img_s": serial,
            "pipelined_img_s": piped,
            "latency_b1_ms": b1 * 1000.0,
        }


def speedups(sd: dict[str, torch.Tensor], rounds: int) -> dict[str, dict[str, object]]:
    """Forward-only img/s at batch 8 for the usual free speedups, each as a ratio to the plain eager model."""
    import torchvision

    def fresh() -> torch.nn.Module:
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        model.load_state_dict(sd)
        return model.eval()

    x = torch.randn(SPEEDUP_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    plain, cl = fresh(), fresh().to(memory_format=torch.channels_last)
    served = prepare_module(fresh(), _model_config())
    variants: dict[str, Callable[[], object] | str] = {
        "plain (eval + no_grad)": lambda: _no_grad(plain, x),
        "channels_last": lambda: _no_grad(cl, x_cl),
        "inference_mode": lambda: _inference(plain, x),
        "channels_last + inference_mode": lambda: _inference(cl, x_cl),
        RELOADER_FORWARD: lambda: _inference(served, x_cl),
    }
    jits = (("torch.jit.script + freeze", _jit_freeze), ("torch.jit.optimize_for_inference", _jit_optimize))
    for name, build in jits:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = build(fresh())
                scripted(x)
            variants[name] = lambda scripted=scripted: _no_grad(scripted, x)
        except Exception as exc:  # torch.jit is deprecated and may refuse; the table says so
            variants[name] = f"did not run: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    runnable = {n: v for n, v in variants.items() if callable(v)}
    for fn in runnable.values():
        fn()  # warm
    times: dict[str, list[float]] = {n: [] for n in runnable}
    for _ in range(rounds):
        for name, fn in runnable.items():
            times[name].append(_timed(fn))
    base = SPEEDUP_BATCH / statistics.median(times["plain (eval + no_grad)"])
    out: dict[str, dict[str, object]] = {}
    for name, fn in variants.items():
        if callable(fn):
            img_s = SPEEDUP_BATCH / statistics.median(times[name])
            out[name] = {"img_s": img_s, "ratio": img_s / base}
        else:
            out[name] = {"img_s": None, "ratio": None, "note": fn}
    return out


def _no_grad(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _inference(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


def _jit_freeze(model: torch.nn.Module) -> torch.nn.Module:
    return torch.jit.freeze(torch.jit.script(model))


def _jit_optimize(model: torch.nn.Module) -> torch.nn.Module:
    return torch.jit.optimize_for_inference(torch.jit.script(model))
