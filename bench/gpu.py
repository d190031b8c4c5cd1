"""The CUDA path measured on a GPU, in one command: `python3 -m bench.gpu --out GPU.md` (about 4 minutes).

No GPU was lent to this project while the CUDA path was written, and a session that draws one has 15 minutes
of it, all tries together. bench/gpu.sh is that session's one command: it installs what the GPU machine's
image lacks (from the wheels `make gpu-kit` downloads here), runs the CUDA tests, then this:
1. every form the GPU runs, as serving calls it (a CPU batch in through pinned memory, CPU scores out): the
   forward's img/s at a few batch sizes (resnet18 at 224 px, random weights), and each form's top-1 agreement
   and largest probability difference with fp32 on the demo's 400 held-out images (trained on the CPU here);
2. the in-process limit with this machine's CPUs decoding the uploads (inprocess.Limit on the GPU);
3. the gate on the GPU: `reloader validate` on the demo's checkpoint with its config set to `device: cuda`;
4. served: reloader on the GPU at fp32 and at `auto`, c=16 and c=64, against section 2's limits, then swaps
   under c=16 load with `auto`.
On a machine without CUDA it runs on the CPU instead (`--device cpu`), which is how it was tried here.
Ratios within one file only; the GPU's own clocks and what else shares the machine move the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reloader.architectures import build_model
from reloader.hardware import Hardware
from reloader.optimize import prepare_module

from . import inprocess, precision, reloads, servers, workload
from .client import failed, measure
from .run import _chosen

LEVELS = (16, 64)
QUEUE_SIZE = 256  # above c=64: a 503 here would be a defect, not a full queue


def _log(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def forward_speeds(device: str, batches: tuple[int, ...], rounds: int) -> dict[tuple[str, str], dict[int, float]]:
    """img/s of each form's forward as serving calls it (the copies to and from the GPU included), the forms
    taking turns round by round; the median of `rounds`."""
    sd = workload.state_dict(0)
    fp32 = prepare_module(build_model(workload.MODEL, workload.NUM_CLASSES, sd).to(device), inprocess._model_config())
    with torch.inference_mode():
        x = torch.randn(max(batches), 3, 224, 224, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
    modules = {f: precision.module_for(fp32, *f, x[:8], device) for f in precision.forms(device)}
    by_batch = {b: precision.interleaved_img_s(modules, x[:b], rounds) for b in batches}
    return {f: {b: img_s[f] for b, img_s in by_batch.items()} for f in modules}


def validate(checkpoint: Path, device: str) -> dict[str, Any]:
    """`reloader validate` on `checkpoint` with the demo's config, moved to `device` (its precision is auto)."""
    demo = Path(__file__).resolve().parent.parent / "config" / "models.yaml"
    config = demo.with_name(".gpu-models.yaml")  # beside it: its paths are relative to the config's folder
    config.write_text(demo.read_text().replace("precision: auto", f"precision: auto\n    device: {device}", 1))
    argv = [sys.executable, "-m", "reloader.cli", "validate", "--config", str(config), "--model", "shapes"]
    t0 = time.perf_counter()
    try:
        run = subprocess.run([*argv, str(checkpoint)], capture_output=True, text=True, timeout=600)
    finally:
        config.unlink()
    return {"rc": run.returncode, "output": run.stdout + run.stderr, "s": time.perf_counter() - t0}


def limits(
    images: list[bytes], base: dict[str, torch.Tensor], form: tuple[str, str], device: str, batches: tuple[int, ...]
) -> dict[str, Any]:
    """Decode+preprocess per upload on one core, and img/s with a decode pool as large as reloader's feeding
    the forward (inprocess.Limit.pipelined), at each batch size: the median of 3."""
    limit = inprocess.Limit(images, base, form, device=device, max_batch=max(batches))
    piped = {b: statistics.median(limit.pipelined(b, max(4, 256 // b)) for _ in range(3)) for b in batches}
    return {"decode_ms": statistics.median(limit.decode() for _ in range(3)) * 1000.0, "pipelined_img_s": piped}


def served(tmp: Path, logs: Path, device: str, max_batch: int, duration: float) -> dict[str, Any]:
    """reloader at fp32 and at auto on `device`, one after the other, each level bracketed by limit probes."""
    images = workload.jpeg_images()
    base = workload.state_dict(0)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {}
    initial = workload.to_bytes(base)
    for precision_ in ("fp32", "auto"):
        folder = workload.checkpoints_folder(tmp, f"serve-{precision_}", initial)
        config = workload.reloader_config(
            folder.parent, folder, queue_size=QUEUE_SIZE, precision=precision_, device=device, max_batch=max_batch
        )
        with servers.reloader(config, logs, f"reloader {precision_}") as server:
            chosen[precision_] = _chosen(server)
            limit = inprocess.Limit(images, base, chosen[precision_]["form"], device=device, max_batch=max_batch)
            for c in LEVELS:
                with server.paused():
                    before = limit.probe(max_batch, 3)["img_s"]
                result = measure(f"{server.base}/models/{workload.MODEL}/predict", images, c, duration, 2.0)
                with server.paused():
                    after = limit.probe(max_batch, 3)["img_s"]
                rows.append({"server": server.name, **result.summary(), "limit": (before + after) / 2})
                _log(f"{server.name} c={c}: {rows[-1]['img_s']:.1f} img/s, limit {rows[-1]['limit']:.1f}")
    folder = workload.checkpoints_folder(tmp, "swaps", initial)
    blocks, _, per_block = reloads.swap_plan(duration, 2.0)
    staged = reloads.stage_swaps(folder, 2, blocks * per_block, seed=100)
    config = workload.reloader_config(
        folder.parent, folder, queue_size=QUEUE_SIZE, precision="auto", device=device, max_batch=max_batch
    )
    with servers.reloader(config, logs, "reloader auto, swaps") as server:
        swaps = reloads.swaps_under_load(server, folder, images, staged, duration, 2.0)
    return {"rows": rows, "chosen": chosen, "swaps": swaps}


def _machine(device: str) -> list[str]:
    hw = Hardware.detect()
    lines = [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; device `{device}`.",
        f"- CPU: {hw.cpu_model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}).",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}.",
    ]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.append(
            f"- GPU: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB; TF32 in cuDNN convolutions: {torch.backends.cudnn.allow_tf32}."
        )
    return lines


def write(path: Path, device: str, d: dict[str, Any]) -> None:
    """The sections measured so far: written after each, so a run stopped by its time limit keeps them."""
    lines = ["# reloader on a GPU: the CUDA path measured", "", *_machine(device), ""]
    if "agreement" in d:
        lines += _forms(d)
    if "limits" in d:
        lines += _limits(d)
    if "validate" in d:
        lines += _validated(d)
    if "served" in d:
        lines += _served(d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _forms(d: dict[str, Any]) -> list[str]:
    speeds, batches = d["forward"], sorted(next(iter(d["forward"].values())))
    agreement = d["agreement"]["rows"]
    lines = [
        "## 1. Each form's forward, as serving calls it (copies to and from the GPU included)",
        "",
        "img/s of resnet18 at 224 px by batch size; agreement and largest probability difference with fp32 on the "
        f"demo's {d['agreement']['images']} held-out images (resnet18 trained {d['agreement']['epochs']} epoch(s) "
        "on the CPU).",
        "",
        "| form | " + " | ".join(f"batch {b}" for b in batches) + " | top-1 agreement | max prob diff | accuracy |",
        "|---|" + "---|" * (len(batches) + 3),
    ]
    fp32 = speeds[precision.FP32]
    for f, by_batch in speeds.items():
        cells = [f"{by_batch[b]:.0f} ({by_batch[b] / fp32[b]:.2f}x)" for b in batches]
        a = agreement[f]
        lines.append(
            f"| {f[0]} ({f[1]}) | " + " | ".join(cells) + f" | {a['agreement']:.2%} | {a['max_prob_delta']:.4f} | "
            f"{a['accuracy']:.1%} |"
        )
    return lines


def _limits(d: dict[str, Any]) -> list[str]:
    lines = ["", "## 2. The in-process limit: decoding on this machine's CPUs, the forward on the device", ""]
    for name, t in d["limits"].items():
        piped = ", ".join(f"batch {b}: {v:.0f}" for b, v in t["pipelined_img_s"].items())
        lines.append(
            f"- {name}: decode+preprocess {t['decode_ms']:.1f} ms per upload on one core; pipelined img/s {piped}."
        )
    return lines


def _validated(d: dict[str, Any]) -> list[str]:
    v = d["validate"]
    return [
        "",
        f"## 3. The gate: `reloader validate` (exit {v['rc']}, {v['s']:.1f} s)",
        "",
        "```",
        v["output"].strip(),
        "```",
    ]


def _served(d: dict[str, Any]) -> list[str]:
    s = d["served"]
    lines = [
        "",
        "## 4. Served (c closed-loop clients; the limit is section 2's, read next to the level with the server frozen)",
        "",
        "chosen by auto: " + s["chosen"]["auto"]["fidelity"],
        "",
        "| server | c | img/s | vs its limit | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['server']} | {r['c']} | {r['img_s']:.1f} | {r['img_s'] / r['limit']:.2f}x | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {failed(r)} |"
        )
    swaps = s["swaps"]
    ok, text = swaps.outcome()
    lost = failed(swaps.extra["all"].summary())
    lines += [
        "",
        f"Swaps under c=16 load with auto: {'as asked' if ok else 'NOT as asked'}: {text}; {lost} failed requests; "
        f"p99 {swaps.swapping.latency_ms(99):.0f} ms during swaps against {swaps.steady.latency_ms(99):.0f} steady.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu.md"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per served level")
    parser.add_argument("--batch", type=int, default=32, help="the served model's batch.max_size")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    batches = (8, 32, 128) if on_gpu else (8,)
    d: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="reloader-gpu-") as name:
        tmp = Path(name)
        logs = tmp / "logs"
        logs.mkdir()
        _log("1. forms")
        d["forward"] = forward_speeds(args.device, batches, args.rounds)
        d["agreement"] = precision.demo_agreement(tmp, epochs=1, device=args.device)
        write(args.out, args.device, d)
        _log("2. limits")
        images, base = workload.jpeg_images(), workload.state_dict(0)
        fastest = max(d["forward"], key=lambda f: d["forward"][f][batches[-1]])
        sizes = tuple(sorted({8, args.batch}))
        d["limits"] = {
            f"{f[0]} ({f[1]})": limits(images, base, f, args.device, sizes)
            for f in dict.fromkeys([precision.FP32, fastest])
        }
        write(args.out, args.device, d)
        _log("3. validate")
        d["validate"] = validate(Path(d["agreement"]["checkpoint"]), args.device)
        write(args.out, args.device, d)
        _log("4. served")
        d["served"] = served(tmp, logs, args.device, args.batch, args.duration)
        write(args.out, args.device, d)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
