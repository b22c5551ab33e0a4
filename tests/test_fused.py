"""Fused ops for bf16 CPU inference against the plain path: oneDNN's linear (+ GELU), and the
qk RMS-norm kernel writing into the joint sequence."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import bf16_mmdit_case, max_rel_err
from torch import nn

import sd3.kernels.fused as fused
from sd3.kernels.flash_attention import kernel_library
from sd3.kernels.fused import joint_heads, linear
from sd3.models.mmdit import RMSNorm

needs_onednn = pytest.mark.skipif(
    not fused.onednn_bf16(), reason="no oneDNN bf16 linear on this CPU"
)
needs_kernel = pytest.mark.skipif(kernel_library() is None, reason="no AVX-512 BF16 kernel here")


def layer_and_input(n_in=96, n_out=160, tokens=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * n_in**-0.5)
        layer.bias.copy_(torch.randn(n_out, generator=g) * 0.5)
    x = torch.randn(2, tokens, n_in, generator=g).bfloat16()
    return layer, x


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu"])
def test_fused_linear_matches_linear_then_activation(activation):
    layer, x = layer_and_input()
    with torch.no_grad():
        ours = linear(x, layer, activation)
        y32 = F.linear(x.float(), layer.weight.float(), layer.bias.float())  # the fp32 accumulator
        if activation is not None:
            y32 = F.gelu(y32, approximate="tanh" if activation == "gelu_tanh" else "none")
        plain = layer(x)
        if activation is not None:
            plain = F.gelu(plain, approximate="tanh" if activation == "gelu_tanh" else "none")
    assert ours.dtype == torch.bfloat16 and ours.shape == (2, 37, 160)
    # One bf16 rounding of the fp32 result (2^-8 relative); the unfused path rounds twice.
    err = ((ours.float() - y32).abs() / (y32.abs() + 1e-2)).max().item()
    print(
        f"fused linear {activation}: max rel err vs fp32 {err:.1e}, plain path {max_rel_err(plain, y32):.1e}"
    )
    assert err <= 2**-8
    if activation is None:
        assert torch.equal(ours, plain)  # the same GEMM and bias: bit for bit


def test_other_cases_take_the_plain_layer():
    layer, x = layer_and_input()
    layer32 = copy.deepcopy(layer).float()
    assert torch.equal(linear(x.float(), layer32), layer32(x.float()))
    # gradients: the plain path, so autograd works
    x32 = x.float().requires_grad_(True)
    linear(x32, layer32, "gelu_tanh").sum().backward()
    assert x32.grad is not None
    xb = x.clone().requires_grad_(True)
    out = linear(xb, layer, "gelu_tanh")
    assert torch.equal(out, F.gelu(layer(xb), approximate="tanh"))

    class Wrapped(nn.Linear):  # a LoRA-style subclass keeps its own forward
        def forward(self, x):
            return super().forward(x) + 1

    wrapped = Wrapped(96, 160).bfloat16()
    with torch.no_grad():
        assert torch.equal(linear(x, wrapped), wrapped(x))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        linear(x, layer, "relu")


def head_views(tokens: int, seed: int, heads: int = 3) -> tuple[torch.Tensor, ...]:
    """q, k, v [2, heads, tokens, 64] as the MMDiT has them: strided views of one qkv buffer."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(2, tokens, 3, heads, 64, generator=g) * 3).bfloat16()
    return tuple(qkv.permute(2, 0, 3, 1, 4))


def rms_norm(seed: int) -> RMSNorm:
    norm = RMSNorm(64).bfloat16()
    norm.weight.data = (
        torch.rand(64, generator=torch.Generator().manual_seed(seed)) + 0.5
    ).bfloat16()
    return norm


@needs_kernel
def test_joint_heads_kernel_matches_norm_then_cat():
    (qa, _, va), (qb, _, vb) = head_views(77, seed=1), head_views(301, seed=2)
    na, nb = rms_norm(3), rms_norm(4)
    with torch.no_grad():
        ours = joint_heads([(qa, na), (qb, nb)])
        plain = torch.cat([na(qa), nb(qb)], dim=2)
        # hand-derived in float64: x / sqrt(mean(x^2) + eps), rounded to bf16, times the weight
        exact = torch.cat(
            [
                (x.double() * (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt())
                .bfloat16()
                .double()
                * n.weight.double()
                for x, n in ((qa, na), (qb, nb))
            ],
            dim=2,
        )
    assert ours.shape == (2, 3, 378, 64) and ours.dtype == torch.bfloat16 and ours.is_contiguous()
    identical = (ours == plain).float().mean().item()
    rel = ((ours.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    print(f"qk-norm kernel: {identical:.6f} of values bit-identical to the plain path; "
          f"max rel err vs float64 {rel:.1e}")  # fmt: skip
    assert identical > 0.999
    assert rel <= 2**-7  # at most the plain path's two bf16 roundings (2^-8 each)
    assert torch.equal(joint_heads([(va, None), (vb, None)]), torch.cat([va, vb], dim=2))


def test_joint_heads_plain_cases():
    (qa, _, _), (qb, _, _) = head_views(5, seed=1), head_views(7, seed=2)
    na, nb = rms_norm(3).float(), rms_norm(4).float()
    qa32, qb32 = qa.float().requires_grad_(True), qb.float()
    out = joint_heads([(qa32, na), (qb32, nb)])  # fp32 with autograd: the plain modules
    assert torch.equal(out, torch.cat([na(qa32), nb(qb32)], dim=2))
    out.sum().backward()
    assert qa32.grad is not None and na.weight.grad is not None
    assert joint_heads([(qb, None)]) is qb  # a lone part without a norm is returned as it is


@needs_onednn
def test_bf16_mmdit_with_fused_ops_matches_the_plain_path(monkeypatch):
    model, inputs = bf16_mmdit_case()
    with torch.no_grad():
        fast = model(*inputs)
        monkeypatch.setattr(fused, "onednn_bf16", lambda: False)
        monkeypatch.setattr(fused, "kernel_library", lambda: None)
        plain = model(*inputs)
        x, t, context, pooled = inputs
        reference = model.float()(x.float(), t, context.float(), pooled.float())
    print(
        f"bf16 MMDiT vs fp32: fused {max_rel_err(fast, reference):.2e}, "
        f"plain {max_rel_err(plain, reference):.2e}"
    )
    assert max_rel_err(fast, plain) < 2e-2
    assert max_rel_err(fast, reference) <= 1.2 * max_rel_err(plain, reference)
