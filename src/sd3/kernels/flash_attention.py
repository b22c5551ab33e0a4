"""Scaled dot-product attention for the MMDiT's joint attention, softmax(Q Kᵀ / √d) V.

Attention is the part of an MMDiT step that torch's CPU kernels run furthest from the machine's
matmul peak: at 1024² it is most of a step. So bf16 attention with head dim 64 goes through a
small flash-attention kernel, `kernels/csrc/flash_attention_cpu.cpp`, with the online softmax
in fp32 and O(L · 64) scratch per thread, in one of two instruction sets:

- `amx`: Q Kᵀ and P V on AMX tiles (`tdpbf16ps`), faster than torch's SDPA (which uses AMX
  too). The tiles' work and the softmax's on the vector units run one after the other (the
  kernel's header says why they cannot overlap).
- `avx512`: the same with `vdpbf16ps` in zmm registers (AVX-512 BF16 without AMX), well ahead of
  SDPA there; on AMX CPUs it is slower than SDPA, so it is not chosen there.

Rates and ratios per machine: benchmarks/RESULTS.md.

`flash_attention_streams` takes the joint sequence as one or two streams, each with its own RMS
qk-norm that the kernel applies as it reads the rows (`fused.joint_attention` is the MMDiT's
entry point). `SD3_ATTENTION=auto|amx|avx512|sdpa` overrides the choice (`auto`: the fastest the
CPU has). The kernel is plain C++ loaded with ctypes (`build.py`). Everything else (other dtypes, head dims, gradients, GPUs), and any machine where
the kernel cannot be built, uses `F.scaled_dot_product_attention`, except short sequences with
gradients on a CPU (training the small models): there torch's SDPA backward runs several times
slower than the attention written out as two matmuls and a softmax (`matmul_attention`).
"""

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build import (
    Segment,
    bf16_cpu_eager,
    kernel_library,
    kernels_available,
    warn_once,
)
from .hardware import cpu_has_amx

HEAD_DIM = 64  # the only head dim the kernel handles; all SD3 / SD3.5 models use it
MATMUL_MAX_KEYS = 128  # up to this many keys, CPU attention with gradients is written out
CHOICES = ("auto", "amx", "avx512", "sdpa")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v for q, k, v of shape [B, heads, L, d]; returns [B, L, heads * d].

    bf16 CPU inputs with d = 64 that need no gradient take the kernel (see `kernel_choice`),
    short CPU sequences that need one `matmul_attention`, all others
    `F.scaled_dot_product_attention`."""
    _check_shapes(q, k, v)
    if kernel_applies(q, k, v):
        isa = kernel_choice()
        if isa != "sdpa":
            return flash_attention_cpu(q, k, v, isa)
    if matmul_applies(q, k, v):
        return matmul_attention(q, k, v)
    return sdpa_attention(q, k, v)


def matmul_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `attention` writes the attention out: CPU tensors, a gradient to take and at
    most `MATMUL_MAX_KEYS` keys (its [B, heads, L, L] weights are kept for the backward)."""
    return (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
        and k.shape[-2] <= MATMUL_MAX_KEYS
    )


def matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v as two matmuls: the scores and their softmax in fp32 (as the
    flash kernels keep them, also under bf16 autocast), the weights in v's dtype; [B, heads, L,
    d] -> [B, L, heads * d]. Its backward is plain matmuls, which the CPU runs far faster than
    SDPA's for short sequences."""
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        weights = scores.softmax(-1).to(v.dtype)
        return (weights @ v).transpose(1, 2).flatten(2)


def kernel_choice() -> str:
    """ "amx", "avx512" or "sdpa": `SD3_ATTENTION` if set, else the fastest this CPU runs (the
    AVX-512 kernel only where there is no AMX). A requested kernel this machine cannot run falls
    back to SDPA, with one warning."""
    choice = os.environ.get("SD3_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"SD3_ATTENTION={choice!r} is not one of {', '.join(CHOICES)}")
    available = kernels_available()
    if choice == "auto":
        if "amx" in available:
            return "amx"
        return "avx512" if "avx512" in available and not cpu_has_amx() else "sdpa"
    if choice != "sdpa" and choice not in available:
        warn_once(f"sd3: SD3_ATTENTION={choice} cannot run on this machine; using torch SDPA")
        return "sdpa"
    return choice


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference path: torch's SDPA, [B, heads, L, d] -> [B, L, heads * d]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def flash_attention_cpu(q: Tensor, k: Tensor, v: Tensor, isa: str | None = None) -> Tensor:
    """The kernel (`isa` "amx" or "avx512"; default: the fastest available) on bf16 CPU q, k, v of
    shape [B, heads, L, 64] with any strides (the MMDiT's views of its qkv projection need no
    copy) -> [B, L, heads * 64] bf16."""
    return flash_attention_streams([(q, k, v, None, None)], isa)


Stream = tuple[Tensor, Tensor, Tensor, nn.Module | None, nn.Module | None]


def flash_attention_streams(streams: Sequence[Stream], isa: str | None = None) -> Tensor:
    """The kernel over the joint sequence of one or two streams (q, k, v, q_norm, k_norm), each
    [B, heads, L_i, 64] with any strides: attention over the concatenated sequence, each stream's
    q and k rows RMS-normed by its own norms (RMSNorm modules with a bf16 weight [64], or None) as
    the kernel reads them, so neither the normed heads nor the concatenation is written out.
    Returns [B, sum L_i, heads * 64] bf16."""
    if not 1 <= len(streams) <= 2:
        raise ValueError(f"the kernel takes one or two streams, got {len(streams)}")
    for q, k, v, *_ in streams:
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
    q0 = streams[0][0]
    if any(s[0].shape[:2] != q0.shape[:2] for s in streams):
        raise ValueError(
            f"streams differ in batch or heads: {[tuple(s[0].shape) for s in streams]}"
        )
    for norm in (n for s in streams for n in s[3:]):
        if norm is not None and (
            norm.weight.dtype != torch.bfloat16 or norm.weight.shape != (HEAD_DIM,)
        ):
            raise ValueError(
                f"qk-norm weights must be bf16 of shape ({HEAD_DIM},), got "
                f"{norm.weight.dtype} {tuple(norm.weight.shape)}"
            )
    Lq = sum(s[0].shape[2] for s in streams)
    if Lq == 0 or sum(s[1].shape[2] for s in streams) == 0:
        raise ValueError(
            f"flash_attention_cpu needs at least one query and key, got q lengths "
            f"{[s[0].shape[2] for s in streams]}, k lengths {[s[1].shape[2] for s in streams]}"
        )
    if isa not in (None, "amx", "avx512"):
        raise ValueError(f"isa must be 'amx' or 'avx512', got {isa!r}")
    available = kernels_available()
    isa = isa or ("amx" if "amx" in available else "avx512")
    if isa not in available:
        raise RuntimeError(f"the {isa} attention kernel is not available on this machine")
    keep = []  # tensors the segments point into, alive until the call returns
    segments = ([], [], [])
    for q, k, v, q_norm, k_norm in streams:
        for i, (t, norm) in enumerate(((q, q_norm), (k, k_norm), (v, None))):
            t = t if t.stride(-1) == 1 else t.contiguous()
            weight = None if norm is None else norm.weight.detach().contiguous()
            keep += [t, weight]
            segments[i].append(
                Segment(
                    t.data_ptr(),
                    *t.stride()[:3],
                    t.shape[2],
                    None if weight is None else weight.data_ptr(),
                    0.0 if norm is None else norm.eps,
                )  # fmt: skip
            )
    B, H = q0.shape[:2]
    out = torch.empty(B, Lq, H * HEAD_DIM, dtype=torch.bfloat16)
    args = []
    for segs in segments:
        args += [(Segment * len(segs))(*segs), len(segs)]
    lib = kernel_library()
    fn = lib.sd3_attention_amx if isa == "amx" else lib.sd3_attention_bf16
    fn(*args, out.data_ptr(), B, H, HEAD_DIM**-0.5, torch.get_num_threads())
    return out


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(
            f"attention needs [B, heads, L, d] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention shapes do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def kernel_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the kernel may take these [B, heads, L, d] tensors (`attention`'s and
    `fused.joint_attention`'s test): bf16 on the CPU outside torch.compile, d = 64, at least one
    query and key, no gradient needed."""
    tensors = (q, k, v)
    return (
        bf16_cpu_eager(*tensors)
        and q.shape[-1] == HEAD_DIM
        and v.shape[-1] == HEAD_DIM
        and q.shape[2] > 0
        and k.shape[2] > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )
