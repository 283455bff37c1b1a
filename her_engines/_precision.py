"""Which precision this machine runs fast: bf16 only where the hardware has native bf16 arithmetic.

On a CPU without AVX512_BF16 or AMX, bf16 matmuls are emulated and slower than fp32, so both the
trainers' autocast and vLLM's weights stay fp32 there. The choice is read from the CPU flags (or the
GPU), never from the box a config was written on; an explicit setting always wins.
"""

from __future__ import annotations

import functools
from pathlib import Path

# Either one gives the CPU real bf16 dot products (Intel Cooper Lake / Sapphire Rapids, AMD Zen 4+).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

__all__ = ["NATIVE_BF16_CPU_FLAGS", "cpu_flags", "native_bf16", "native_bf16_reason"]


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_reason(flags: frozenset[str] | None = None, *, cuda: bool | None = None) -> tuple[bool, str]:
    """(bf16 is native here, why) for the device that does the math: the GPU where one is visible,
    else the CPU's flags."""
    if cuda is None:
        cuda = _cuda_available()
    if cuda:
        import torch

        ok = bool(torch.cuda.is_bf16_supported())
        return ok, f"GPU {'supports' if ok else 'lacks'} bf16"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if have:
        return True, f"CPU has {'/'.join(have)}"
    return False, f"CPU has no {' or '.join(NATIVE_BF16_CPU_FLAGS)}: bf16 would be emulated"


@functools.cache
def native_bf16() -> bool:
    """True where bf16 arithmetic is native on this machine (callers log their choice with the reason)."""
    return native_bf16_reason()[0]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
