"""Where served bf16 loses against its forward alone: `python -m bench.lockstep` (about 2 minutes; run it alone).

Served at c=16, the forward runs 99 % of the time yet its two OpenMP threads only 66-77 % each
(bench/README.md). This probe measures, in process, resnet18 at batch 8 as reloader prepares it:
- one forward on two threads (how reloader serves) against two forwards at once, one thread each, each
  with its own batch; alone, and beside a Python thread busy 0.6 ms in every 5 ms (as the decode
  threads are);
- the eager bf16 forward against a TorchScript-frozen one beside the same busy thread: the TorchScript
  forward runs without the GIL between ops, so if it loses as much, the GIL is not the cause;
- a batch of 1 on two threads and on one (the latency that one thread per forward costs at c=1).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torchvision
from torch import nn

from reloader.hardware import Hardware
from reloader.optimize import prepare_module
from reloader.precision import build

from .inprocess import _model_config

SECONDS = 5.0


@contextmanager
def busy_python(on: bool) -> Iterator[None]:
    """A thread that holds the GIL 0.6 ms in every 5 ms, while the block runs."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.0006:
                pass
            time.sleep(0.0044)

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


def img_s(pool: ThreadPoolExecutor, at_once: int, module: nn.Module, x: torch.Tensor) -> float:
    """Batches of `x` through `module` for SECONDS, `at_once` of them in flight on `pool`."""

    def forward() -> None:
        with torch.inference_mode():
            module(x)

    started, done = time.perf_counter(), 0
    flying = [pool.submit(forward) for _ in range(at_once)]
    while time.perf_counter() - started < SECONDS:
        flying.pop(0).result()
        done += 1
        flying.append(pool.submit(forward))
    for f in flying:
        f.result()
        done += 1
    return len(x) * done / (time.perf_counter() - started)


def batch1_ms(pool: ThreadPoolExecutor, module: nn.Module) -> float:
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def timed() -> float:
        times = []
        with torch.inference_mode():
            module(x)
            for _ in range(20):
                started = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    return pool.submit(timed).result()


def main() -> None:
    hw = Hardware.detect()
    bf16_here = hw.why_not("bf16", "cpu") or "native"
    print(f"CPU: {hw.cpu_model}; bf16: {bf16_here}; torch threads {torch.get_num_threads()}")
    net = torchvision.models.resnet18(num_classes=1000).eval().requires_grad_(False)
    fp32 = prepare_module(net, _model_config())  # as the gate prepares it: channels_last, BatchNorms folded
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    bf16 = build(fp32, "bf16", "weights", "cpu", x[:2])
    with torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(bf16.eval(), x[:2], check_trace=False))
    one_thread: Callable[[], None] = lambda: torch.set_num_threads(1)  # noqa: E731 - this thread's OpenMP only
    shared = ThreadPoolExecutor(1)
    split = ThreadPoolExecutor(2, initializer=one_thread)
    single = ThreadPoolExecutor(1, initializer=one_thread)
    for module in (fp32, bf16, scripted):  # first calls: allocations and oneDNN primitives, on every thread
        img_s(shared, 1, module, x[:2])
        img_s(split, 2, module, x[:2])
    for name, module in (("fp32", fp32), ("bf16 (weights)", bf16)):
        for busy in (False, True):
            with busy_python(busy):
                # Interleaved: one forward on two threads, two on one thread each, then both again.
                a1, b1 = img_s(shared, 1, module, x), img_s(split, 2, module, x)
                a2, b2 = img_s(shared, 1, module, x), img_s(split, 2, module, x)
            one, two = statistics.mean((a1, a2)), statistics.mean((b1, b2))
            beside = "beside a busy Python thread" if busy else "alone"
            print(
                f"{name}, batch 8, {beside}: one forward on 2 threads {one:.1f} img/s ({a1:.1f}, {a2:.1f}); "
                f"two forwards on 1 thread each {two:.1f} ({b1:.1f}, {b2:.1f}): {two / one:.2f}x"
            )
    for busy in (False, True):
        with busy_python(busy):
            eager, frozen = img_s(shared, 1, bf16, x), img_s(shared, 1, scripted, x)
        beside = "beside a busy Python thread" if busy else "alone"
        print(f"bf16 (weights), batch 8, {beside}: eager {eager:.1f}, TorchScript {frozen:.1f} img/s")
    for name, module in (("fp32", fp32), ("bf16 (weights)", bf16)):
        on_two, on_one = batch1_ms(shared, module), batch1_ms(single, module)
        print(f"{name}, batch 1: {on_two:.1f} ms on 2 threads, {on_one:.1f} ms on 1 ({on_one / on_two:.2f}x)")


if __name__ == "__main__":
    main()
