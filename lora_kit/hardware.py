"""What is this machine, and what does that imply for training?

The one rule that trips most learners: decide bf16 from the GPU's compute capability
(>= 8.0, Ampere and newer), never from ``torch.cuda.is_bf16_supported()``, which answers
yes on a T4 (sm_75) because bf16 can be emulated there, slowly and without the fused
kernels training needs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .errors import LoraKitError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    compute_capability: tuple[int, int] | None  # None on CPU
    vram_gib: float | None  # of GPU 0; None on CPU
    gpu_count: int

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (8, 0)

    @property
    def supports_flash_attention_2(self) -> bool:
        # FlashAttention-2 kernels exist for Ampere (sm_80) and newer only.
        return self.supports_bf16

    @property
    def precision(self) -> str:
        """The training precision this machine should use: bf16, fp16 or fp32."""
        if self.device == "cpu":
            return "fp32"  # CPU half-precision matmuls are slow and fp16 autocast is unsupported
        return "bf16" if self.supports_bf16 else "fp16"


def detect_hardware() -> Hardware:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(
            device="cuda",
            name=props.name,
            compute_capability=(props.major, props.minor),
            vram_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    return Hardware(device="cpu", name="CPU", compute_capability=None, vram_gib=None, gpu_count=0)


def resolve_precision(precision: str = "auto", hardware: Hardware | None = None) -> str:
    """Turn "auto" into bf16/fp16/fp32 and refuse what the hardware cannot do."""
    hardware = hardware or detect_hardware()
    if precision not in PRECISIONS:
        raise LoraKitError(f"precision={precision!r} is not one of {PRECISIONS}. Use 'auto' to let lora_kit choose.")
    if precision == "auto":
        return hardware.precision
    if precision == "bf16" and hardware.device == "cuda" and not hardware.supports_bf16:
        cc = ".".join(map(str, hardware.compute_capability))
        raise LoraKitError(
            f"precision='bf16' was asked for, but {hardware.name} has compute capability {cc}; bf16 training needs "
            "8.0 or newer (A100, L4, H100...). On this GPU use precision='fp16' or 'auto'."
        )
    if precision in ("bf16", "fp16") and hardware.device == "cpu":
        raise LoraKitError(
            f"precision={precision!r} was asked for, but there is no GPU: mixed-precision training needs CUDA. "
            "Use precision='fp32' or 'auto' on CPU."
        )
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def describe(hardware: Hardware | None = None) -> str:
    """A few lines a learner can read: what the machine is and what lora_kit will do on it."""
    hw = hardware or detect_hardware()
    if hw.device == "cpu":
        return (
            "No GPU: training runs on the CPU in fp32. Fine for the embedded 135M model and the demo task;\n"
            "a 7B model needs a GPU (in Colab: Runtime > Change runtime type > T4 GPU)."
        )
    cc = ".".join(map(str, hw.compute_capability))
    lines = [f"GPU: {hw.name} x{hw.gpu_count}, {hw.vram_gib} GiB, compute capability {cc}"]
    if hw.supports_bf16:
        lines.append("Precision: bf16 (compute capability >= 8.0). FlashAttention-2 kernels are available.")
    else:
        lines.append(
            "Precision: fp16 (compute capability < 8.0, e.g. a T4: no bf16, no FlashAttention-2).\n"
            "lora_kit keeps the trainable adapter weights in fp32 so the fp16 gradient scaler works."
        )
    return "\n".join(lines)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(before: tuple[int, int], after: tuple[int, int], cores: int) -> float:
    """How many of ``cores`` were busy between two ``(busy, total)`` samples of /proc/stat."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return cores * busy / total if total > 0 else 0.0


def share_cpu(sample_s: float = 0.5) -> str:
    """Give torch only the cores other programs leave free, and say so.

    torch starts one thread per core. When another program keeps cores busy, those threads wait on each other at
    every operation and a step can take several times longer than on fewer threads. Sampled once, while this process
    is idle; call ``torch.set_num_threads(n)`` to choose otherwise.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = _cpu_times()
    if before is None:
        return f"torch uses {torch.get_num_threads()} CPU threads."
    time.sleep(sample_s)
    busy = busy_cores(before, _cpu_times(), cores)
    free = max(1, min(cores, round(cores - busy)))
    if free < torch.get_num_threads():
        torch.set_num_threads(free)
        return (
            f"Other programs keep about {busy:.1f} of this machine's {cores} cores busy: torch uses {free} thread(s), "
            "as more would wait on each other (torch.set_num_threads(n) to choose otherwise)."
        )
    return f"torch uses {torch.get_num_threads()} CPU threads ({cores} cores, about {busy:.1f} busy elsewhere)."
