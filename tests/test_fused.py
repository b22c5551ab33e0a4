"""oneDNN-fused linear (+ GELU) for bf16 CPU inference, against the plain nn.Linear path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import bf16_mmdit_case, max_rel_err
from torch import nn

import sd3.models.fused as fused
from sd3.models.fused import linear

needs_onednn = pytest.mark.skipif(not fused._ONEDNN, reason="torch without oneDNN")


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


@needs_onednn
def test_bf16_mmdit_with_fused_linears_matches_the_plain_path(monkeypatch):
    model, inputs = bf16_mmdit_case()
    with torch.no_grad():
        fast = model(*inputs)
        monkeypatch.setattr(fused, "_ONEDNN", False)
        plain = model(*inputs)
        x, t, context, pooled = inputs
        reference = model.float()(x.float(), t, context.float(), pooled.float())
    print(
        f"bf16 MMDiT vs fp32: fused {max_rel_err(fast, reference):.2e}, "
        f"plain {max_rel_err(plain, reference):.2e}"
    )
    assert max_rel_err(fast, plain) < 2e-2
    assert max_rel_err(fast, reference) <= 1.2 * max_rel_err(plain, reference)
