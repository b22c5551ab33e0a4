"""What this CPU computes natively, read once from /proc/cpuinfo (x86 Linux; empty elsewhere)."""

import functools
import platform
import warnings
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
    """AMX bf16 tiles, which torch's GEMMs and SDPA use."""
    return "amx_bf16" in cpu_flags()


def cpu_int8_beats_bf16() -> bool:
    """AVX-512 VNNI (vpdpbusd: 64 int8 products per instruction, twice vdpbf16ps's bf16 ones) and
    no AMX: fbgemm's int8 GEMM outruns a bf16 GEMM at the MMDiT's shapes. With AMX, torch's bf16
    GEMMs use its tiles and fbgemm's int8 does not."""
    return "avx512_vnni" in cpu_flags() and not cpu_has_amx()


def cpu_int8_full_range() -> bool:
    """fbgemm can quantize activations to 8 bits, not 7 (`reduce_range`): AVX-512 VNNI
    accumulates u8 x s8 products straight into int32, while AVX2's pairwise int16 sums saturate."""
    return "avx512_vnni" in cpu_flags()


def warn_if_bf16_is_emulated(what: str) -> None:
    """Warn that `what`, bf16 compute on this CPU, runs emulated: on an x86 CPU without AVX-512
    BF16 or AMX a bf16 matmul is about two orders of magnitude slower than fp32.
    Silent where the flags are unknown (not x86 Linux)."""
    if cpu_flags() and not cpu_has_bf16():
        warnings.warn(
            f"{what}: this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 runs emulated,"
            " far slower than fp32, which is the default here",
            RuntimeWarning,
            stacklevel=3,
        )
