"""What this CPU computes natively, read once from /proc/cpuinfo (x86 Linux; empty elsewhere)."""

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        next((line.split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    )


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX), where bf16 pays off over fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """AMX bf16 tiles (Sapphire Rapids and later), which torch's GEMMs and SDPA use."""
    return "amx_bf16" in cpu_flags()
