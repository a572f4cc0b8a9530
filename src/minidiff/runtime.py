"""Process-level speed settings: the allocator fix, precision choice, device description.

Measured on 2-core CPUs (benchmarks/bench_core.py): glibc malloc hands activation-sized blocks
back to the OS after every call and page-faults them in again; raising both the mmap and trim
thresholds removes that (≈ 1.6–1.9× on the forward pass). bf16 autocast doubles throughput on
CPUs with native bf16 (AVX-512-BF16 / AMX) but is ~10× *slower* on AVX2-only CPUs, where it is
emulated — so ``precision="auto"`` asks the CPU.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import nullcontext

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds (same effect as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_). Returns True if applied; a no-op off glibc or when disabled
    with MINIDIFF_NO_MALLOPT=1."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("MINIDIFF_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 2**31 - 1) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(ok)
    return _allocator_tuned


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` (NHWC: faster convolutions on CPU) or the default layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _torch_may_use(isa: str) -> bool:
    """Whether torch is allowed to use instructions of ``isa`` ("bf16" or "amx"): the CPU may have
    them and torch still be held below them, by ATEN_CPU_CAPABILITY (its own kernels, e.g.
    ``avx2``) or ONEDNN_MAX_CPU_ISA (the convolutions', e.g. ``AVX2``). Held below, bf16 is emulated
    as on an AVX2-only CPU, ~10× slower, so ``auto`` must not choose it."""
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    allowed = {"bf16": ("BF16", "AMX", "AVX10"), "amx": ("AMX",)}[isa]
    return cap in ("ALL", "DEFAULT", "") or any(a in cap for a in allowed)


def cpu_has_native_bf16() -> bool:
    """True if the CPU computes bf16 natively (AVX-512-BF16 or AMX) and torch may use it."""
    flags = _cpu_flags()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and _torch_may_use("bf16")


def cpu_has_amx() -> bool:
    """True if the CPU has AMX tile units for bf16 matrix products (Sapphire Rapids and later
    Xeons) and torch may use them. torch's oneDNN convolutions use them in bf16: measured on a
    2-core such Xeon, the baseline's 64–128-channel convolutions reach about 3,000 GFLOP/s in bf16
    against about 450 in fp32, while 16–44-channel ones fill the tiles badly (1,000–1,900;
    benchmarks/bench_widths.py)."""
    return "amx_bf16" in _cpu_flags() and _torch_may_use("amx")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to ``bf16`` where the hardware does bf16 natively, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (``fp32`` means none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


GPU_HOST_THREADS = 4


def limit_host_threads_for_gpu(device: torch.device) -> None:
    """On a GPU the host only draws t and ε and indexes batches; torch's default of one thread
    per core makes several training processes on one machine spin against each other. Measured
    on an H200 host with 16 cores (paper recipe, batch 128): 3 processes at the default took
    1,165–1,400 images/s each with the GPU 25–30 % busy; 2 processes with 4 threads each took
    4,450 images/s each with it 85 % busy. ``OMP_NUM_THREADS``, when set, is respected."""
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(GPU_HOST_THREADS, torch.get_num_threads()))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> dict[str, object]:
    """What a latency figure needs next to it: device name, threads, capability."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "type": "cuda"}
    return {"device": cpu_name(), "type": "cpu",
            "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "amx": cpu_has_amx(), "allocator_tuned": _allocator_tuned}
