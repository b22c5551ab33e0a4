"""Keep freed CPU memory for reuse during a pass of many large temporaries (glibc's malloc).

torch's CPU tensors come from malloc, and glibc serves every block over 32 MB with a fresh mmap
and unmaps it on free. A VAE decode at 1024² makes several gigabytes of such temporaries (each
convolution's and norm's output, 128-512 MB apiece), so most of them are page-faulted and zeroed
by the kernel page by page on first touch, a noticeable share of the decode's time. The MMDiT at
1024² does the same with its 50 MB MLP activation in each of its blocks.
`reuse_freed_memory()` tells malloc to serve large blocks from its heap and not to give freed
memory back, so a freed activation's pages are reused by the next one; on exit it returns the
free memory to the system (`malloc_trim`) and restores the limits glibc's own adaptive settings
reach in a long-running process (a 32 MB mmap threshold, trimming above 64 MB). A no-op where the
C library is not glibc.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import threading

import torch
from torch import Tensor

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
STEADY = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_MAX: 65536}
REUSE = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}

_lock = threading.Lock()
_depth = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError, TypeError):  # not glibc: no mallopt / malloc_trim
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory():
    """Within the block, large freed blocks stay with malloc for the next allocation (see the
    module docstring); nested and concurrent uses share one setting."""
    global _depth
    libc = _libc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            for parameter, value in REUSE.items():
                libc.mallopt(parameter, value)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for parameter, value in STEADY.items():
                    libc.mallopt(parameter, value)
                libc.malloc_trim(0)


def for_inference(
    x: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
) -> contextlib.AbstractContextManager:
    """Where an inference pass on `x` runs: on a CPU, in one of `dtypes` and without gradients,
    with freed activations kept for reuse; elsewhere as it is. The MMDiT uses it in bf16 and fp32,
    the VAE in bf16 only: in fp32 it saved the VAE no time and its heap fragments cost memory
    (benchmarks/RESULTS.md and docs/performance.md have the figures)."""
    if x.device.type != "cpu" or x.dtype not in dtypes or torch.is_grad_enabled():
        return contextlib.nullcontext()
    return reuse_freed_memory()
