"""What this machine can run fast: the CPU's instruction sets and the CUDA devices, read once.

bf16 on a CPU without native bf16 instructions is far slower than fp32 (pytorch#183815: seconds per
convolution on AVX2), so it is offered only where the CPU has it. int8 is offered only with VNNI or
AMX-INT8, as issue 11 asks (on an AVX2 EPYC without either, FX int8 still ran resnet18 at 1.76x fp32:
bench/README.md), and fp16 only on CUDA, from Volta's tensor cores on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    cpu_flags: frozenset[str]
    cuda_devices: int
    cuda_capabilities: tuple[tuple[int, int], ...] = ()  # (major, minor) of each CUDA device, in order

    @staticmethod
    @cache
    def detect() -> Hardware:
        model, flags = "unknown CPU", frozenset[str]()
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Hardware(model, flags, count, tuple(torch.cuda.get_device_capability(i) for i in range(count)))

    def device(self, wanted: str) -> str:
        """The torch device a config's `device` names here; ValueError with the reason when there is none."""
        if wanted == "auto":
            return "cuda" if self.cuda_devices else "cpu"
        if wanted == "cpu":
            return wanted
        index = int(wanted.partition(":")[2] or 0)
        if index >= self.cuda_devices:
            have = f"{self.cuda_devices} CUDA device(s)" if self.cuda_devices else "no CUDA device"
            raise ValueError(f"device {wanted!r}: this machine has {have}")
        return wanted

    def why_not(self, precision: str, device: str) -> str | None:
        """None when `precision` runs natively on `device` here, else why it does not."""
        if precision == "fp32":
            return None
        if precision == "int8":
            if device.startswith("cuda"):
                return "int8 is quantized for x86 CPUs (oneDNN and FBGEMM kernels), not for CUDA"
            if set(INT8_FLAGS) & self.cpu_flags:
                return None
            return f"int8 needs a CPU with VNNI or AMX-INT8, and this {self.cpu_model} has neither"
        if device.startswith("cuda"):
            # Native bf16 from Ampere (8.0) on, older GPUs only emulate it; fp16 tensor cores from Volta (7.0).
            major, minor = self.cuda_capabilities[int(device.partition(":")[2] or 0)]
            needs, what = {"bf16": (8, "native bf16"), "fp16": (7, "fp16 tensor cores")}[precision]
            return None if major >= needs else f"{device} (compute capability {major}.{minor}) has no {what}"
        if precision == "fp16":
            return "fp16 is offered on CUDA only: on a CPU, bf16 is the half precision with native instructions"
        if set(BF16_FLAGS) & self.cpu_flags:
            return None
        return (
            f"bf16 needs a CPU with AMX-BF16 or AVX512-BF16, and this {self.cpu_model} has neither "
            "(without them bf16 is far slower than fp32)"
        )
