"""Fused ops for bf16 inference on CPUs: linear layers (through oneDNN) and the MMDiT's qk-norm
with the joint concatenation (through our kernel).

`nn.Linear` on a CPU runs as addmm: it first fills the output with the broadcast bias, then
multiplies, and a following GELU reads and writes the whole activation once more. oneDNN's
fused linear (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU backend emits) adds
the bias and applies GELU inside the GEMM: faster, most of all for linear + GELU, and exact: the
GEMM's output is the same, and GELU sees the fp32 accumulator instead of its bf16 rounding.

`linear(x, layer, "gelu_tanh")` takes the fused path for bf16 CPU tensors that need no gradient
and a plain `nn.Linear` or an `Int8Linear` (its weight converted to bf16 first; a LoRA-wrapped
layer keeps its own forward); everything else runs the layer and the activation as usual.

`joint_attention(streams)` is the MM-DiT's joint attention over [context, x] with each stream's
RMS qk-norm: where the attention kernel runs, one call to it, which normalises q and k rows as it
reads them (`flash_attention.flash_attention_streams`); elsewhere `joint_heads` and then `attention`.

`joint_heads(parts)` is `torch.cat([norm(x) for x, norm in parts], dim=2)` over [B, H, L, 64]
head views: SD3.5's RMS qk-norm of each stream, then the joint sequence. The plain module runs
six elementwise ops over a strided view and the concatenation copies once more; the kernel
(`csrc/qk_norm_cpu.cpp`) reads each row once and writes it normalised into its slice of the
joint buffer, with the plain module's arithmetic (fp32 statistics, bf16 rounding, then the
weight).

`group_norm_silu(x, norm)` is `F.silu(norm(x))` for the VAE's GroupNorm on a channels-last bf16
tensor: the kernel (`csrc/group_norm_cpu.cpp`) gathers the statistics in one pass and writes the
normalised, activated tensor in a second, where torch's GroupNorm and SiLU read and write it
three times and round it to bf16 twice.
"""

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build import bf16_cpu_eager, kernel_library
from .flash_attention import (
    HEAD_DIM,
    Stream,
    attention,
    flash_attention_streams,
    kernel_applies,
    kernel_choice,
)
from .quantization import Int8Linear

ACTIVATIONS = {
    None: ("none", ""),
    "gelu_tanh": ("gelu", "tanh"),  # the MMDiT's and T5's GELU
    "gelu": ("gelu", "none"),  # exact (erf) GELU: OpenCLIP bigG
}


@functools.cache
def onednn_bf16() -> bool:
    """oneDNN's fused bf16 linear runs on this CPU: torch has it, and oneDNN can build the
    primitive (it cannot on CPUs without AVX-512, e.g. AVX2-only ones, where bf16 is not the
    default dtype either)."""
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    try:
        torch.ops.mkldnn._linear_pointwise(
            x, torch.zeros(16, 16, dtype=torch.bfloat16), None, "none", [], ""
        )
    except RuntimeError:
        return False
    return True


def linear(x: Tensor, layer: nn.Module, activation: str | None = None) -> Tensor:
    """`activation(layer(x))` with `activation` one of None, "gelu_tanh", "gelu"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")
    if _fusable(x, layer):
        attr, algorithm = ACTIVATIONS[activation]
        weight = layer.dequantized(x.dtype) if type(layer) is Int8Linear else layer.weight
        return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, attr, [], algorithm)
    y = layer(x)
    if activation is None:
        return y
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    if torch.is_grad_enabled() and y.requires_grad:
        return F.gelu(y, approximate=approximate)
    # y is the layer's own new output: GELU in place saves allocating (and page-faulting) another
    # activation-sized tensor
    return torch.ops.aten.gelu_(y, approximate=approximate)


def _fusable(x: Tensor, layer: nn.Module) -> bool:
    return (
        bf16_cpu_eager(x)
        and (
            (type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16)
            or (
                type(layer) is Int8Linear
                and layer.packed is None
                and getattr(layer.bias, "dtype", x.dtype) == x.dtype
            )
        )
        and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
        and onednn_bf16()
    )


def joint_heads(parts: Sequence[tuple[Tensor, nn.Module | None]]) -> Tensor:
    """`torch.cat([norm(x) if norm else x for x, norm in parts], dim=2)` for [B, H, L, 64] views
    and RMS norms (modules with `weight` [64] and `eps`) or None."""
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    if not _norm_fusable(parts):
        normed = [norm(x) if norm is not None else x for x, norm in parts]
        return normed[0] if len(normed) == 1 else torch.cat(normed, dim=2)
    x0 = parts[0][0]
    B, H, _, D = x0.shape
    out = torch.empty(B, H, sum(x.shape[2] for x, _ in parts), D, dtype=torch.bfloat16)
    lib, start = kernel_library(), 0
    for x, norm in parts:
        L = x.shape[2]
        y = out[:, :, start : start + L]
        lib.sd3_rms_norm_heads(
            x.data_ptr(), *x.stride()[:3],
            None if norm is None else norm.weight.data_ptr(), 0.0 if norm is None else norm.eps,
            y.data_ptr(), *y.stride()[:3], B, H, L, torch.get_num_threads(),
        )  # fmt: skip
        start += L
    return out


def joint_attention(streams: Sequence[Stream]) -> Tensor:
    """The MM-DiT's joint attention over one or two streams (q, k, v, q_norm, k_norm), each
    [B, heads, L_i, 64]: `attention(*(joint_heads(...) for q, k and v))`, each stream's q and k
    RMS-normed by its own norms (or None), one attention over the concatenated sequence, output
    [B, sum L_i, heads * 64]. Where the attention kernel runs, the kernel normalises the rows as
    it reads them, bit for bit as `joint_heads` would, so the normed, concatenated q, k and v are
    never written out. Elsewhere the norms, the concatenation and the attention run apart."""
    if _streams_kernel_applies(streams):
        isa = kernel_choice()
        if isa != "sdpa":
            return flash_attention_streams(streams, isa)
    q, k, v = (
        joint_heads([(s[i], s[3 + i] if i < 2 else None) for s in streams]) for i in range(3)
    )
    return attention(q, k, v)


def joint_attention_fusable(streams: Sequence[Stream]) -> bool:
    """Whether `joint_attention` runs a kernel on these streams (the attention kernel reading
    them in place, or the fused qk-norm and concatenation); else plain torch ops serve."""
    return _streams_kernel_applies(streams) or _norm_fusable(
        [(t, norm) for q, k, v, q_norm, k_norm in streams for t, norm in ((q, q_norm), (k, k_norm))]
    )


def _streams_kernel_applies(streams: Sequence[Stream]) -> bool:
    parts = [
        (t, norm) for q, k, v, q_norm, k_norm in streams for t, norm in ((q, q_norm), (k, k_norm))
    ]
    return (
        len(streams) <= 2
        and all(kernel_applies(q, k, v) for q, k, v, *_ in streams)
        and _norm_fusable(parts)
        and all(q.shape[:2] == streams[0][0].shape[:2] for q, *_ in streams)
        and all(s[1].shape[2] == s[2].shape[2] for s in streams)
    )


def _norm_fusable(parts: Sequence[tuple[Tensor, nn.Module | None]]) -> bool:
    xs = [x for x, _ in parts]
    weights = [norm.weight for _, norm in parts if norm is not None]
    return (
        bf16_cpu_eager(*xs)
        and all(x.ndim == 4 and x.shape[-1] == HEAD_DIM and x.stride(-1) == 1 for x in xs)
        and all(x.shape[:2] == xs[0].shape[:2] for x in xs)
        and all(w.dtype == torch.bfloat16 and w.shape == (HEAD_DIM,) for w in weights)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (*xs, *weights)))
        and kernel_library() is not None
    )


def group_norm_silu(
    x: Tensor, norm: nn.GroupNorm, silu: bool = True, inplace: bool = False
) -> Tensor:
    """`F.silu(norm(x))` (or `norm(x)` without `silu`) for x [B, C, H, W]; through the kernel for
    bf16 channels-last CPU tensors that need no gradient (written over `x` if `inplace`), else
    through torch."""
    if not _group_norm_fusable(x, norm):
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y) if silu else y
    B, C, H, W = x.shape
    y = x if inplace else torch.empty_like(x)  # channels-last like x
    weight, bias = (p.detach().float().contiguous() for p in (norm.weight, norm.bias))
    kernel_library().sd3_group_norm_silu(
        x.data_ptr(), y.data_ptr(), B, H * W, C, norm.num_groups, weight.data_ptr(),
        bias.data_ptr(), norm.eps, int(silu), torch.get_num_threads(),
    )  # fmt: skip
    return y


def _group_norm_fusable(x: Tensor, norm: nn.GroupNorm) -> bool:
    C = x.shape[1] if x.ndim == 4 else 0
    return (
        bf16_cpu_eager(x)
        and x.ndim == 4
        and x.numel() > 0
        and C % 16 == 0
        and C % norm.num_groups == 0
        and norm.affine
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
        and kernel_library() is not None
    )
