"""What this CPU offers the scorer: x86 or not, and its int8 dot-product instructions."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# int8 classes, best first: AMX tiles, VNNI (AVX-512 or AVX) dot products, or none (AVX2 alone
# multiplies u8 x s8 through 16-bit sums, so int8 convolutions gain little or lose there)
INT8_CLASSES = {"amx": ("amx_tile", "amx_int8"), "vnni": ("avx512_vnni", "avx_vnni")}


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first CPU in ``cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_class(flags: frozenset[str] | None = None) -> str:
    """The int8 class, "amx", "vnni" or "none": instructions of this CPU (or ``flags``)."""
    flags = cpu_flags() if flags is None else flags
    for name, wanted in INT8_CLASSES.items():
        if flags & set(wanted):
            return name
    return "none"


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, e.g. "AMD EPYC 9B14" (the platform's word where cpuinfo lacks it)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in X86


def cpu_summary(flags: frozenset[str] | None = None) -> str:
    """The flags that matter for speed here, e.g. ``avx2 fma`` or ``avx512f avx512_vnni``."""
    flags = cpu_flags() if flags is None else flags
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/vnni/amx"
