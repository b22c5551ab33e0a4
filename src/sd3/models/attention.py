"""Scaled dot-product attention for the MMDiT's joint attention, softmax(Q Kᵀ / √d) V.

With torch's CPU SDPA, attention is about a quarter of a bf16 MMDiT step at 512² and half at
1024², and SDPA runs bf16 at a third of what bf16 GEMMs reach on the same cores. So on CPUs with AVX-512 BF16 (Zen 4,
Cooper Lake, Sapphire Rapids and later) bf16 attention with head dim 64 goes through a small
flash-attention kernel, `sd3/csrc/attention_avx512bf16.cpp`: it computes Q Kᵀ and P V with
`vdpbf16ps` (bf16 products, fp32 sums), keeps the online softmax in fp32 and needs only
O(L · 64) scratch per thread. The kernel is plain C++ loaded with ctypes; it is compiled with the
system C++ compiler on first use (about a second) and cached under `~/.cache/sd3`. Everything
else, and any machine where the kernel cannot be built, uses `F.scaled_dot_product_attention`.

On CPUs with AMX (Sapphire Rapids and later) the balance turns: torch's SDPA runs its GEMMs on AMX
tiles and is the faster path (2 cores: SDPA 770 GFLOP/s, the kernel 210), so there the kernel is
not used. `SD3_ATTENTION=kernel|sdpa` overrides the choice (`auto`, the default, decides by CPU).
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
import torch.nn.functional as F
from torch import Tensor

from ..hardware import cpu_flags, cpu_has_amx

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "attention_avx512bf16.cpp"
CXX_FLAGS = (
    "-O3 -std=c++17 -shared -fPIC -fopenmp "
    "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma"
).split()
HEAD_DIM = 64  # the only head dim the kernel handles; all SD3 / SD3.5 models use it


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v for q, k, v of shape [B, heads, L, d]; returns [B, L, heads * d].

    Uses the AVX-512 BF16 kernel for bf16 CPU inputs with d = 64 that need no gradient, on CPUs
    where it beats SDPA (`kernel_preferred`), and `F.scaled_dot_product_attention` otherwise."""
    _check_shapes(q, k, v)
    if _kernel_applies(q, k, v) and kernel_preferred() and _kernel() is not None:
        return flash_attention_cpu(q, k, v)
    return sdpa_attention(q, k, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference path: torch's SDPA, [B, heads, L, d] -> [B, L, heads * d]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def flash_attention_cpu(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The AVX-512 BF16 kernel: bf16 CPU q, k, v of shape [B, heads, L, 64] with any strides
    (the MMDiT's permuted views of its qkv projection need no copy) -> [B, L, heads * 64] bf16."""
    _check_shapes(q, k, v)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in (q, k, v)):
        raise ValueError(
            f"flash_attention_cpu needs bf16 CPU tensors, got q {q.dtype} on {q.device}, "
            f"k {k.dtype} on {k.device}, v {v.dtype} on {v.device}"
        )
    if q.shape[-1] != HEAD_DIM or v.shape[-1] != HEAD_DIM:
        raise ValueError(
            f"flash_attention_cpu needs head dim {HEAD_DIM}, got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(
            f"flash_attention_cpu needs at least one query and key, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    lib = _kernel()
    if lib is None:
        raise RuntimeError("the AVX-512 BF16 attention kernel is not available on this machine")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    out = torch.empty(B, L, H * D, dtype=torch.bfloat16)
    args = []
    for t in (q, k, v):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    lib.sd3_attention_bf16(
        *args, out.data_ptr(), B, H, L, k.shape[2], D**-0.5, torch.get_num_threads()
    )
    return out


def kernel_available() -> bool:
    """Whether `flash_attention_cpu` can run here (CPU support plus a built or buildable kernel)."""
    return _kernel() is not None


ATTENTION_CHOICES = ("auto", "kernel", "sdpa")


def kernel_preferred() -> bool:
    """Whether bf16 CPU attention should take the kernel: `SD3_ATTENTION` if set, else yes unless
    the CPU has AMX (where torch's SDPA is faster)."""
    choice = os.environ.get("SD3_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"SD3_ATTENTION={choice!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        return not cpu_has_amx()
    return choice == "kernel"


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(
            f"attention needs [B, heads, L, d] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention shapes do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _kernel_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    tensors = (q, k, v)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and q.shape[-1] == HEAD_DIM
        and v.shape[-1] == HEAD_DIM
        and q.shape[2] > 0
        and k.shape[2] > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """Loads the kernel, compiling it into the cache first if needed; None where it cannot run."""
    if not _cpu_has_avx512_bf16():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(
            f"sd3: using torch SDPA for attention, the bf16 kernel is unavailable: {e}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    tensor = [ptr, i64, i64, i64]  # data, strides of batch, head and token
    shapes = [i64, i64, i64, i64]  # B, H, Lq, Lk
    lib.sd3_attention_bf16.argtypes = [*tensor * 3, ptr, *shapes, ctypes.c_float, ctypes.c_int]
    lib.sd3_attention_bf16.restype = None
    return lib


def _cpu_has_avx512_bf16() -> bool:
    return {"avx512_bf16", "avx512bw", "avx512vl"} <= cpu_flags()


def _build() -> Path:
    """Path of the compiled kernel, keyed by source, compiler and flags; builds it when missing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}) to build it")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *CXX_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3"
    lib = cache / f"attention_avx512bf16-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run(
            [cxx, *CXX_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True
        )
        if result.returncode != 0:
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
