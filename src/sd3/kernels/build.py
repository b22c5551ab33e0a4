"""Builds and loads sd3's C++ CPU kernels (`csrc/`): compiled with the system C++ compiler on
first use, cached under `~/.cache/sd3` keyed by source, compiler and flags, and loaded with ctypes.

A compiler without AMX support builds the library without the AMX path; a machine without
AVX-512 BF16 or without a compiler gets None from `kernel_library`, and every caller falls back
to plain PyTorch.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .hardware import cpu_flags, cpu_has_amx

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(
    CSRC / f
    for f in ("flash_attention_cpu.cpp", "qk_norm_cpu.cpp", "group_norm_cpu.cpp", "int4_cpu.cpp")
)
HEADERS = (CSRC / "bf16_rows.h",)
CXX_FLAGS = (
    "-O3 -std=c++17 -shared -fPIC -fopenmp "
    "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma"
).split()
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16"]


class Segment(ctypes.Structure):
    """csrc/flash_attention_cpu.cpp's `Segment`: one stream's rows and its optional qk-norm."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("sb", ctypes.c_int64),
        ("sh", ctypes.c_int64),
        ("sl", ctypes.c_int64),
        ("len", ctypes.c_int64),
        ("weight", ctypes.c_void_p),
        ("eps", ctypes.c_float),
    ]


def kernels_available() -> tuple[str, ...]:
    """The kernels that can run here: ("amx", "avx512"), ("avx512",) or ()."""
    lib = kernel_library()
    if lib is None:
        return ()
    return ("amx", "avx512") if _amx_ready(lib) else ("avx512",)


def kernel_available() -> bool:
    """Whether the attention kernel can run here (CPU support plus a built or buildable kernel)."""
    return bool(kernels_available())


def bf16_cpu_eager(*tensors: Tensor) -> bool:
    """Whether sd3's hand-written kernels  may take these tensors:
    bf16 on the CPU, and not while torch.compile traces, which cannot see into a ctypes call
    (there the plain ops run, and inductor generates its own code for them)."""
    return not torch.compiler.is_compiling() and all(
        t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors
    )


@functools.cache
def kernel_library() -> ctypes.CDLL | None:
    """Loads the kernels (attention, the qk-norm and GroupNorm of `fused.py`, the int4 weights of
    `quantization.py`), compiling it into the cache first if needed; None where it cannot run."""
    if not _cpu_has_avx512_bf16():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        warn_once(f"sd3: using torch SDPA for attention, the bf16 kernel is unavailable: {e}")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    tensor = [ptr, i64, i64, i64]  # data, strides of batch, head and token
    shapes = [i64, i64, i64, i64]  # B, H, Lq, Lk
    segments = [ctypes.POINTER(Segment), ctypes.c_int]  # array, count
    for fn in (lib.sd3_attention_bf16, lib.sd3_attention_amx):
        fn.argtypes = [*segments * 3, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        fn.restype = None
    norm = lib.sd3_rms_norm_heads  # csrc/qk_norm_cpu.cpp, used by fused.py
    norm.argtypes = [*tensor, ptr, ctypes.c_float, *tensor, i64, i64, i64, ctypes.c_int]
    norm.restype = None
    group_norm = lib.sd3_group_norm_silu  # csrc/group_norm_cpu.cpp, used by fused.py
    group_norm.argtypes = [ptr, ptr, *shapes, ptr, ptr, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    group_norm.restype = None
    int4 = lib.sd3_q4_0_to_bf16  # csrc/int4_cpu.cpp, used by quantization.py
    int4.argtypes, int4.restype = [ptr, ptr, ptr, i64, ctypes.c_int], None
    lib.sd3_amx_init.argtypes, lib.sd3_amx_init.restype = [], ctypes.c_int
    return lib


@functools.cache
def _amx_ready(lib: ctypes.CDLL) -> bool:
    """The CPU has AMX, the kernel was built with it, and Linux grants this process the tiles."""
    return cpu_has_amx() and lib.sd3_amx_init() == 1


@functools.cache
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _cpu_has_avx512_bf16() -> bool:
    return {"avx512_bf16", "avx512bw", "avx512vl"} <= cpu_flags()


def _build() -> Path:
    """Path of the compiled kernel, keyed by source, compiler and flags; builds it when missing,
    with the AMX path if the compiler supports it."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}) to build it")
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join([cxx, *CXX_FLAGS, *AMX_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3"
    lib = cache / f"sd3_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        for flags in ([*CXX_FLAGS, *AMX_FLAGS], CXX_FLAGS):
            result = subprocess.run(
                [cxx, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True
            )
            if result.returncode == 0:
                break
        else:
            first_error = next(
                (line for line in result.stderr.splitlines() if "error" in line),
                result.stderr.strip(),
            )
            raise RuntimeError(f"{cxx} failed: {first_error}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib
