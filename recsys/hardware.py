"""What this machine runs natively: the facts every hardware-aware default is decided from.

Defaults that depend on speed (dense precision, threads per process, how many processes a CPU box should run) are
decided from these detected capabilities, never from timings taken on one machine: a bf16 matmul is 2-5x faster
than fp32 on a CPU with AVX512-BF16 or AMX and ~100x slower on an AVX2 CPU, so a default tuned on one is a trap on
the other. `describe()` is what benchmarks and run logs print to say which machine a figure came from."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import FrozenSet, Iterator, Optional

import torch


@dataclass(frozen=True)
class CpuInfo:
    model: str  # lscpu "Model name" (or /proc/cpuinfo, or platform.processor())
    capability: str  # torch.backends.cpu.get_cpu_capability(): the ATen kernel set (AVX2, AVX512, ...)
    flags: FrozenSet[str]  # ISA flags relevant to bf16 (avx512_bf16, amx_bf16, bf16 on aarch64)
    cores: int  # CPUs this process may run on (sched_getaffinity), what thread counts are sized from

    @property
    def bf16_native(self) -> bool:
        """Whether a bf16 GEMM runs in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm. Without
        them oneDNN emulates bf16 through fp32 conversions, far slower than plain fp32."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _lscpu_model() -> Optional[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.strip().lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _proc_cpuinfo() -> tuple:
    """(model name, flags) from /proc/cpuinfo's first processor; empty where the file does not exist."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:  # x86 "flags", aarch64 "Features"
                    flags = set(value.split())
                elif not line.strip() and flags:
                    break
    except OSError:
        pass
    return model, flags


def _torch_cpu_flag(name: str) -> bool:
    """torch's own cpuinfo-based probes (torch.cpu._is_avx512_bf16_supported, ...); False where this torch lacks
    them (the /proc/cpuinfo flags then decide)."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    proc_model, proc_flags = _proc_cpuinfo()
    flags = {f for f in proc_flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")}
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in proc_flags:
        flags.add("bf16")
    if _torch_cpu_flag("_is_avx512_bf16_supported"):
        flags.add("avx512_bf16")
    if _torch_cpu_flag("_is_amx_tile_supported"):
        flags.update({"amx_tile", "amx_bf16"})  # AMX-TILE ships with AMX-BF16 on every CPU that has it
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(model=_lscpu_model() or proc_model or platform.processor() or "unknown CPU",
                   capability=str(torch.backends.cpu.get_cpu_capability()), flags=frozenset(flags),
                   cores=max(1, cores))


def describe() -> str:
    """One line naming the machine: CPU model, torch capability, bf16 support, cores, and the GPU if any."""
    cpu = cpu_info()
    text = (f"{cpu.model}, torch capability {cpu.capability}, "
            f"bf16 {'native (' + '/'.join(sorted(cpu.flags)) + ')' if cpu.bf16_native else 'not native'}, "
            f"{cpu.cores} cores")
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """Every ISA flag /proc/cpuinfo lists (x86 `flags`, aarch64 `Features`); empty where it does not exist. The
    int8 text encoder's speed depends on avx2 / avx512bw / avx512_vnni / avx_vnni / amx_int8."""
    return frozenset(_proc_cpuinfo()[1])


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Let glibc reuse freed heap memory for large tensors instead of returning it to the OS.

    glibc serves allocations above its mmap threshold (at most 32 MB) with fresh pages from the kernel and unmaps
    them on free, so every large activation of every model call is page-faulted in again: on a 3,200-row scoring
    batch (the embedding lookup's [rows, 2,800] output alone is 36 MB) zero-filling fresh pages took a fifth of the
    forward time. Raising the mmap and trim thresholds to 1 GB keeps that memory in the heap for the next call. A
    process keeps up to that much freed memory; returns False (and changes nothing) where the C library is not
    glibc."""
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the process's count (setting it costs well under a
    microsecond).

    For small tensor work between large steps: some ATen kernels split even a few thousand elements over every
    thread (the VML-backed unary ops, e.g. log2, log, exp, use a grain of 2,048), and a parallel region ends only when
    its slowest thread does. When another process holds a core, that thread waits for the scheduler: on 2 cores
    under load the training-window metrics' update (3 x 4,096 predictions) took 30-80 ms on 2 threads and 1-3 ms on
    one."""
    previous = torch.get_num_threads()
    if previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
