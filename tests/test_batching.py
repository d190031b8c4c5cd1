"""The batcher on its own: batches form from what queued during a pass, and waiting requests follow a swap, even
once their pass waits for its turn at the forward lock."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from collections.abc import Callable

import pytest
import torch
from conftest import DEADLINE, Project, colours_yaml, png_bytes, threads_named, torch_threads, wait_until
from PIL import Image
from tinynet import COLOURS, colour_net, colour_state_dict
from torch import nn

from reloader.batching import Batcher
from reloader.canary import Canary, CanaryState, NoTraffic
from reloader.compute import FORWARD_LOCK, give_back, hand_over, name_thread, run_forward, turn
from reloader.config import CanaryConfig, Preprocess, load_config
from reloader.gate import Gate
from reloader.images import Preprocessor
from reloader.optimize import prepare_module
from reloader.registry import LiveModel
from reloader.threads import Stopping
from reloader.v2 import Requested, encode_output


class _Held(nn.Module):
    """Holds its first forward pass until released, so a test can queue requests behind it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []  # the size of each pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        self.entered.set()
        assert self.release.wait(DEADLINE), "the test never released the held forward pass"
        return self.inner(x)


def _live(project: Project, name: str, state_dict: dict) -> LiveModel:
    project.write_config(colours_yaml(expect=False))  # v2 below answers wrong on purpose
    config = load_config(project.config).models["colours"]
    path = project.save(name, state_dict)
    judged = Gate("colours", config, prepare_module).judge(path)
    report = judged.report
    assert judged.module is not None and report.sha256 is not None, report.reason
    return LiveModel("colours", config, report.version, report.sha256, path, judged.module, judged.preprocessor, report)


def _label(row: torch.Tensor) -> str:
    return COLOURS[int(row.argmax())]


def _run_behind_a_held_pass(
    first: LiveModel, swapped_in: LiveModel
) -> tuple[dict[str, tuple[torch.Tensor, LiveModel]], list[int]]:
    """Start a pass on `first` and hold it; queue two more requests; swap; release.

    Returns each request's answer, and the sizes of the passes `first` ran."""
    held = _Held(first.module)
    first = dataclasses.replace(first, module=held)
    current = {"colours": first}
    red = first.preprocessor.load(png_bytes("red"))

    async def main() -> dict[str, tuple[torch.Tensor, LiveModel]]:
        batcher = Batcher(current=current.get)
        try:
            in_flight = asyncio.ensure_future(batcher.submit(first, red, DEADLINE, follow=True))
            assert await asyncio.to_thread(held.entered.wait, DEADLINE)
            following = asyncio.ensure_future(batcher.submit(first, red, DEADLINE, follow=True))
            pinned = asyncio.ensure_future(batcher.submit(first, red, DEADLINE, follow=False))
            await asyncio.sleep(0)  # one turn of the loop: both tasks run up to their wait
            assert batcher.queue_depth("colours") == 2
            current["colours"] = swapped_in
            held.release.set()
            answers = await asyncio.gather(in_flight, following, pinned)
        finally:
            held.release.set()
            batcher.close()
        return dict(zip(("in_flight", "following", "pinned"), answers, strict=True))

    return asyncio.run(main()), held.batches


def test_under_load_a_pass_waits_for_a_request_still_decoding_once_the_inference_thread_is_free(project: Project):
    """max_wait_ms counts from the end of the last pass, not from the first queued request: that one waited a whole
    pass already, and without the wait the request still decoding would wait for another."""
    live = _live(project, "colours-v1.pt", colour_state_dict())
    batch = live.config.batch.model_copy(update={"max_wait_ms": 500.0})
    held = _Held(live.module)
    live = dataclasses.replace(live, module=held, config=live.config.model_copy(update={"batch": batch}))
    red = live.preprocessor.load(png_bytes("red"))

    async def main() -> None:
        batcher = Batcher(current={"colours": live}.get)
        try:
            first = asyncio.ensure_future(batcher.submit(live, red, DEADLINE))
            assert await asyncio.to_thread(held.entered.wait, DEADLINE)
            queued = asyncio.ensure_future(batcher.submit(live, red, DEADLINE))
            batcher.decoding("colours", 1)  # a third request, still being decoded
            await asyncio.sleep(0)  # one turn of the loop: the second request is queued
            since = time.perf_counter()
            # The queued request has waited longer than max_wait_ms when the pass it waits behind ends.
            await asyncio.to_thread(wait_until, lambda: time.perf_counter() - since > 0.6, what="max_wait_ms to pass")
            held.release.set()
            await first
            assert batcher.queue_depth("colours") == 1, "the next pass started without the request still decoding"
            batcher.decoding("colours", -1)
            await asyncio.gather(queued, batcher.submit(live, red, DEADLINE))
        finally:
            held.release.set()
            batcher.close()

    asyncio.run(main())
    assert held.batches == [1, 2]


def test_a_request_waiting_when_a_swap_lands_is_answered_by_the_new_version(project: Project):
    old = _live(project, "colours-v1.pt", colour_state_dict())
    # v2 answers green for a red image, so each answer shows which weights computed it.
    new = _live(project, "colours-v2.pt", colour_state_dict(permute=(1, 0, 2)))

    answers, old_passes = _run_behind_a_held_pass(old, new)

    row, served = answers["in_flight"]
    assert served.version == 1 and _label(row) == "red"  # a pass already running finishes on its version
    row, served = answers["following"]
    assert served is new and _label(row) == "green"
    row, served = answers["pinned"]
    assert served.version == 1 and _label(row) == "red"  # asked for its version, keeps it
    assert old_passes == [1, 1]  # the pinned request ran in a pass of its own, not with the one that moved


def test_a_waiting_request_stays_on_its_version_when_the_model_definition_changed(project: Project):
    old = _live(project, "colours-v1.pt", colour_state_dict())
    new = _live(project, "colours-v2.pt", colour_state_dict(permute=(1, 0, 2)))
    relabelled = dataclasses.replace(new, config=new.config.model_copy(update={"labels": ("r", "g", "b")}))

    answers, old_passes = _run_behind_a_held_pass(old, relabelled)

    for key in ("in_flight", "following", "pinned"):
        row, served = answers[key]
        assert served.version == 1 and _label(row) == "red", key
    assert old_passes == [1, 2]


def test_a_pass_waiting_for_its_turn_when_a_swap_lands_runs_on_the_new_version(project: Project):
    old = _live(project, "colours-v1.pt", colour_state_dict())
    new = _live(project, "colours-v2.pt", colour_state_dict(permute=(1, 0, 2)))
    current = {"colours": old}
    red = old.preprocessor.load(png_bytes("red"))

    async def main() -> list[tuple[torch.Tensor, LiveModel]]:
        batcher = Batcher(current=current.get)
        try:
            with turn():  # as a gate's last pass holds it until its swap (compute.hand_over)
                following = asyncio.ensure_future(batcher.submit(old, red, DEADLINE, follow=True))
                pinned = asyncio.ensure_future(batcher.submit(old, red, DEADLINE, follow=False))
                await asyncio.sleep(0)  # one turn of the loop: both tasks run up to their wait
                assert batcher.queue_depth("colours") == 1  # the first one's pass started, on v1
                current["colours"] = new
            return list(await asyncio.gather(following, pinned))
        finally:
            batcher.close()

    (row, served), (pinned_row, pinned_served) = asyncio.run(main())
    assert served is new and _label(row) == "green"
    assert pinned_served is old and _label(pinned_row) == "red"  # asked for its version, keeps it


def test_a_gates_last_pass_keeps_its_turn_only_inside_hand_over_and_only_until_given_back():
    net, x = colour_net().eval(), torch.rand(1, 3, 8, 8)
    run_forward(net, x, last=True)
    assert not FORWARD_LOCK.locked()  # `reloader validate` and tests judge outside hand_over: nothing is kept
    with hand_over():
        run_forward(net, x, last=True)
        assert FORWARD_LOCK.locked()
        run_forward(net, x)  # this thread's next pass gives the kept turn back, then takes its own
        assert not FORWARD_LOCK.locked()
        run_forward(net, x, last=True)
        give_back()  # the swap
        assert not FORWARD_LOCK.locked()
        run_forward(net, x, last=True)  # a rejection: the block's end gives it back
    assert not FORWARD_LOCK.locked()
    with pytest.raises(RuntimeError, match="verdict"), hand_over():
        run_forward(net, x, last=True)
        raise RuntimeError("acting on the verdict failed")
    assert not FORWARD_LOCK.locked()


class _Overflows(nn.Module):
    """A live version whose scores overflow to inf on a white image (as an fp16 form may): its colours, finite."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.inner(x)
        white = x.flatten(1).amin(dim=1) > 0.5 * x.flatten(1).amax(dim=1)
        return torch.where(white[:, None], scores * float("inf"), scores)


class _OutOfMemory(nn.Module):
    """What a CUDA forward raises when a trainer on the same GPU holds its memory (no GPU here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _NoCublasHandle(nn.Module):
    """A first forward on a thread, on a GPU a trainer has filled: torch raises cuBLAS's failure as a plain error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.AcceleratorError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def test_an_image_answered_with_nan_or_inf_gets_a_422_and_the_others_in_its_batch_their_answers(project: Project):
    from reloader.errors import NoFiniteAnswer

    live = _live(project, "colours-v1.pt", colour_state_dict())
    live = dataclasses.replace(live, module=_Overflows(live.module))
    images = {c: live.preprocessor.load(png_bytes(c)) for c in ("red", "green")}
    images["white"] = torch.ones_like(images["red"])

    async def main() -> list[object]:
        batcher = Batcher(current={"colours": live}.get)
        try:
            return await asyncio.gather(
                *(batcher.submit(live, t, DEADLINE, follow=False) for t in images.values()), return_exceptions=True
            )
        finally:
            batcher.close()

    red, green, white = asyncio.run(main())
    assert isinstance(white, NoFiniteAnswer) and white.status == 422
    assert str(white) == "version 1 of 'colours' answered this image with NaN or inf"
    assert [_label(red[0]), _label(green[0])] == ["red", "green"]


@pytest.mark.parametrize("module", [_OutOfMemory, _NoCublasHandle], ids=["cuda-allocator", "cublas-handle"])
def test_a_device_out_of_memory_is_a_503_to_retry_not_a_server_error(project: Project, module):
    from reloader.errors import OutOfDeviceMemory

    live = dataclasses.replace(_live(project, "colours-v1.pt", colour_state_dict()), module=module())

    async def main() -> object:
        batcher = Batcher(current={"colours": live}.get)
        try:
            red = live.preprocessor.load(png_bytes("red"))
            return (await asyncio.gather(batcher.submit(live, red, DEADLINE, follow=False), return_exceptions=True))[0]
        finally:
            batcher.close()

    refused = asyncio.run(main())
    assert isinstance(refused, OutOfDeviceMemory)
    assert (refused.status, dict(refused.headers)) == (503, {"Retry-After": "1"})
    assert str(refused) == "'colours' ran out of memory for a batch of 1; retry"
    assert refused.__cause__ is None and refused.__context__ is None  # nothing keeps the forward's tensors


def _threads_named_after(name: str, work: Callable[[], object]) -> int:
    """Run `work` on a thread named `name` (its OS name too); how many threads bear that name once it is done,
    the thread still alive: 1, or more where torch started an OpenMP team for it."""
    done, leave = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        name_thread()
        try:
            work()
        except BaseException as exc:
            raised.append(exc)
        done.set()
        leave.wait(DEADLINE)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    try:
        assert done.wait(DEADLINE), f"{name} never finished"
        count = len(threads_named(name))
    finally:
        leave.set()
        thread.join()
    if raised:
        raise raised[0]
    return count


def test_while_serving_only_the_inference_thread_runs_torch_across_the_cores(project: Project):
    """A second OpenMP team alive on any other thread makes every layer of serving's forward wake its team through
    the kernel (reloader/compute.py, "one team"): decoding, preprocessing and stacking a batch start none."""
    live = _live(project, "colours-v1.pt", colour_state_dict())
    photo = io.BytesIO()
    Image.effect_noise((640, 480), 64).convert("RGB").save(photo, "JPEG")
    # Laid out as preprocessing makes them; a batch of them is large enough for torch to stack across the cores.
    rows = [torch.rand(224, 224, 3).permute(2, 0, 1) for _ in range(8)]

    async def serve() -> list[tuple[torch.Tensor, LiveModel]]:
        batcher = Batcher(current={"colours": live}.get)
        try:
            return list(await asyncio.gather(*(batcher.submit(live, row, DEADLINE, follow=True) for row in rows)))
        finally:
            batcher.close()

    # What else runs on the loop: a v2 answer's top classes, and a canary's copy of the live answers, for a request
    # of 64 images (as many as a queue holds by default) over 1000 classes.
    labels = tuple(f"class {i}" for i in range(1000))
    wide = dataclasses.replace(live, config=live.config.model_copy(update={"num_classes": 1000, "labels": labels}))
    probs = torch.rand(64, 1000).softmax(dim=1)
    canary = Canary(wide, CanaryConfig(), NoTraffic(), lambda: None)
    encoded: list[tuple[dict, bytes | None]] = []

    def on_the_loop() -> None:
        answers.extend(asyncio.run(serve()))
        encoded.append(encode_output(wide, probs, Requested(binary=False, classes=5)))
        canary.offer(wide, torch.zeros(64, 3, 8, 8), probs)

    with torch_threads(2):
        assert _threads_named_after("team-control", lambda: torch.ones(1 << 20).mul_(2)) == 2  # a team, seen so
        loaded: list[torch.Tensor] = []
        decode = lambda: loaded.append(Preprocessor(Preprocess()).load(photo.getvalue()))  # noqa: E731
        assert _threads_named_after("decode-test", decode) == 1
        answers: list[tuple[torch.Tensor, LiveModel]] = []
        assert _threads_named_after("loop-test", on_the_loop) == 1
    assert loaded[0].shape == (3, 224, 224)
    assert [served for _, served in answers] == [live] * 8
    values, indices = probs.topk(5, dim=1)
    assert encoded[0][0]["data"][5] == f"{values[1, 0]:.6f}:{indices[1, 0]}:class {indices[1, 0]}"
    assert [top1 for _, top1 in canary._pending] == [probs.argmax(dim=1).tolist()]  # queued for the candidate


def test_a_canarys_passes_run_on_the_inference_thread_and_leave_its_own_thread_without_a_team(project: Project):
    """A canary shadows on serving's OpenMP team: one of its own would slow every live pass while it runs
    (reloader/compute.py, "one team")."""
    live = _live(project, "colours-v1.pt", colour_state_dict())
    candidate = _live(project, "colours-v2.pt", colour_state_dict(scale=5.0))
    ran_on: list[str] = []
    candidate.module.register_forward_hook(lambda *_: ran_on.append(threading.current_thread().name))
    batch = torch.rand(8, 3, 224, 224)  # large enough for torch to spread the candidate's pass over the cores
    probs = run_forward(live.module, batch).softmax(dim=1)
    with torch_threads(2):
        batcher = Batcher()
        canary = Canary(candidate, CanaryConfig(requests=16), batcher, lambda: None)
        canary.start()
        try:
            canary.offer(live, batch, probs)
            wait_until(lambda: canary.compared == 8, what="the canary's pass")
            alone = len(threads_named("canary-colours"))  # counted while the canary's thread waits for more
        finally:
            canary.stop()
            batcher.close()
    assert alone == 1, f"the canary's thread started an OpenMP team: {alone} threads bear its name"
    assert ran_on == ["inference_0"]
    assert canary.agreed == 8 and canary.state is CanaryState.SHADOWING  # 8 of its 16 comparisons


def test_once_serving_stops_a_canary_ends_without_a_verdict(project: Project):
    """A pass the closed batcher never ran is no failure of the candidate's: its canary neither rejects nor
    promotes it."""
    live = _live(project, "colours-v1.pt", colour_state_dict())
    batcher = Batcher()
    batcher.close()
    with pytest.raises(Stopping):
        batcher.on_inference_thread(lambda: 1)
    decided: list[bool] = []
    canary = Canary(live, CanaryConfig(requests=1), batcher, lambda: decided.append(True))
    canary.start()
    batch = torch.rand(1, 3, 8, 8)
    canary.offer(live, batch, run_forward(live.module, batch).softmax(dim=1))
    canary._thread.join(DEADLINE)
    assert not canary._thread.is_alive(), "the canary's thread did not end"
    assert decided == [] and canary.state is CanaryState.SHADOWING and canary.compared == 0


def test_a_canary_counts_requests_still_decoding_as_waiting(project: Project):
    """With full batches the queue is empty for most of each pass while the next batch decodes: a canary that saw
    only the queue shadowed as if serving were idle (one that never decided cost c=16 a quarter of its throughput,
    against its max_overhead of 0.1)."""
    live = _live(project, "colours-v1.pt", colour_state_dict())
    batcher = Batcher(current={"colours": live}.get)
    try:
        assert batcher.pressure("colours") == (0, 0.0)
        batcher.decoding("colours", 1)
        assert batcher.pressure("colours")[0] == 1
        batcher.decoding("colours", -1)
        assert batcher.pressure("colours")[0] == 0
    finally:
        batcher.close()
