"""One forward on every core, or one forward per core, when decoding weighs as on a Xeon with AMX:
`python -m bench.percore` (about 2 minutes; run it alone, like bench).

On the Xeon, a bf16 image takes about 5.5 ms of one core to decode and 9 ms of core time to forward;
served `auto` stayed near 2x fp32, short of issue 11's 2.5x, and bench/lockstep.py found a forward's
two threads stalling each other. This probe runs, in process, 16 closed-loop clients whose uploads a
low-priority pool of 2 decodes, with batches of up to 8 formed from whatever is decoded, and fp32
resnet18 as the gate prepares it at a small crop, so that an image's decode and forward weigh about as
much as the Xeon's bf16 ones:
- one forward at a time on both cores (how reloader serves), against
- two forwards at once, one thread each, each taking its own batch.
Each setting is given as (upload width, crop): the bench's 640x480 uploads, and 960x720 photos.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision

from reloader.compute import lower_thread_priority
from reloader.config import Preprocess
from reloader.images import Preprocessor, stack_images
from reloader.optimize import prepare_module

from .inprocess import _model_config
from .uploads import photo
from .workload import jpeg_images

CLIENTS, BATCH, SECONDS, ROUNDS = 16, 8, 6.0, 3
SETTINGS = ((640, 80), (640, 112), (640, 56), (960, 56))


def served_img_s(module: torch.nn.Module, pre: Preprocessor, uploads: list[bytes], forwards: int) -> float:
    """img/s over SECONDS of CLIENTS closed-loop clients, with `forwards` forwards at once (2 threads
    each when there is one, 1 thread each when there are more)."""
    decoded: queue.Queue[torch.Tensor] = queue.Queue()
    stop, lock, done = threading.Event(), threading.Lock(), [0]
    decoders = ThreadPoolExecutor(2, initializer=lower_thread_priority)

    def client(i: int) -> None:
        if not stop.is_set():
            decoded.put(pre.load(uploads[i % len(uploads)]))

    def forward() -> None:
        torch.set_num_threads(2 if forwards == 1 else 1)  # this thread's OpenMP team only
        while not stop.is_set():
            try:
                batch = [decoded.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < BATCH and not decoded.empty():
                batch.append(decoded.get_nowait())
            with torch.inference_mode():
                module(stack_images(batch).contiguous(memory_format=torch.channels_last))
            with lock:
                done[0] += len(batch)
            for i in range(len(batch)):
                decoders.submit(client, i)

    threads = [threading.Thread(target=forward) for _ in range(forwards)]
    for t in threads:
        t.start()
    for i in range(CLIENTS):
        decoders.submit(client, i)
    time.sleep(1.5)  # warm-up, unmeasured
    first, started = done[0], time.perf_counter()
    time.sleep(SECONDS)
    img_s = (done[0] - first) / (time.perf_counter() - started)
    stop.set()
    for t in threads:
        t.join()
    decoders.shutdown(wait=True)
    return img_s


def main() -> None:
    net = torchvision.models.resnet18(num_classes=1000).eval().requires_grad_(False)
    fp32 = prepare_module(net, _model_config())
    for width, crop in SETTINGS:
        uploads = jpeg_images() if width == 640 else [photo(width, width * 3 // 4, seed) for seed in range(5)]
        pre = Preprocessor(Preprocess(resize=crop * 8 // 7, crop=crop, draft_gap=None))  # decoded at full size
        started = time.perf_counter()
        for upload in uploads * 10:
            pre.load(upload)
        decode_ms = (time.perf_counter() - started) / (10 * len(uploads)) * 1000
        x = torch.randn(BATCH, 3, crop, crop).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            fp32(x)
            started = time.perf_counter()
            for _ in range(5):
                fp32(x)
        forward_core_ms = 2 * (time.perf_counter() - started) / (5 * BATCH) * 1000
        one, two = [], []
        for _ in range(ROUNDS):  # interleaved
            one.append(served_img_s(fp32, pre, uploads, 1))
            two.append(served_img_s(fp32, pre, uploads, 2))
        a, b = statistics.median(one), statistics.median(two)
        print(
            f"{width}x{width * 3 // 4} uploads, crop {crop}: decode {decode_ms:.1f} core-ms, forward "
            f"{forward_core_ms:.1f} core-ms per image; one forward on 2 threads {a:.1f} img/s, two on 1 thread "
            f"each {b:.1f} ({b / a:.2f}x)"
        )


if __name__ == "__main__":
    main()
