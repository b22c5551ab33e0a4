"""int8 weight-only mode: the rounding by hand, the int8 networks against the plain path on the
dequantized weights (same numbers), and against transformers / diffusers on the original weights
(the error int8 costs)."""

import shutil

import numpy as np
import pytest
import torch
from helpers import diffusers_mmdit, max_rel_err, save_single_file, tiny_models, transformers_t5
from PIL import Image
from test_t5 import SMALL, build, random_state

from sd3.checkpoints import find_components, load_component
from sd3.cli import main
from sd3.kernels.hardware import cpu_int8_beats_bf16, cpu_int8_full_range
from sd3.kernels.quantization import (
    Int8Linear,
    int8_gemm_available,
    linear_layers,
    pack_for_int8_gemm,
    quantize_weight,
)
from sd3.pipeline import Pipeline


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=6)


@pytest.fixture(scope="module")
def model_file(models, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", models)


def test_quantize_weight_by_hand():
    # scale 1/127; 63.5 rounds to even (64), 31.75 to 32
    q, scale = quantize_weight(torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8 and q.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0]]
    assert scale[0].item() == pytest.approx(1 / 127, rel=1e-7)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of all scales
    q, scale = quantize_weight(w.bfloat16())
    w = w.bfloat16().float()
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] * (0.5 + 1e-5)).all()  # off by at most half a step
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses the full range


def dequantized_state(module: torch.nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The int8 module's state as plain weights in `dtype` (each int8 layer's own dequantization)."""
    state = {k: v.to(dtype) for k, v in module.state_dict().items() if v.dtype != torch.int8}
    for name, layer in module.named_modules():
        if type(layer) is Int8Linear:
            state[f"{name}.weight"] = layer.dequantized(dtype)
            del state[f"{name}.weight_scale"]
    return state


def test_int8_t5_equals_plain_path_on_its_weights_and_is_close_to_transformers(tmp_path):
    """At T5's own init scales (the tiny family's random T5 amplifies any weight change ~13x)."""
    state = random_state(SMALL, seed=2)
    path = save_single_file(tmp_path / "t5.safetensors", {"t5xxl": build(SMALL, state)})
    int8 = load_component(find_components(t5xxl=path)["t5xxl"], torch.float32, int8=True)
    scope = linear_layers(build(SMALL, state), "t5xxl")
    assert len(scope) == 2 * 7  # q, k, v, o, wi_0, wi_1, wo in each of the 2 blocks
    assert all(type(int8.get_submodule(n)) is Int8Linear for n in scope)
    assert int8.get_submodule(scope[0]).weight.dtype == torch.int8

    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    plain = build(SMALL, dequantized_state(int8))
    ref = transformers_t5(SMALL, state)
    with torch.no_grad():
        ours = int8(ids)
        same = max_rel_err(ours, plain(ids))
        err = max_rel_err(ours, ref(input_ids=ids).last_hidden_state)
    print(f"int8 T5: vs plain path on dequantized weights {same:.1e}, vs transformers {err:.2e}")
    assert same < 1e-6
    assert err < 3e-2  # measured 1.25e-2; weights off by up to 1/254 of their row's max


def test_int8_mmdit_bf16_equals_plain_path_and_is_close_to_diffusers(models, model_file):
    """bf16 weight-only: the fused oneDNN path with the int8 weight converted to bf16 (where int8
    GEMMs pay in bf16, `load_component` packs the layers for them: unpacked here)."""
    component = find_components(model_file)["mmdit"]
    int8 = load_component(component, torch.bfloat16, int8=True)
    layers = [m for m in int8.modules() if type(m) is Int8Linear]
    assert all((m.packed is not None) == cpu_int8_beats_bf16() for m in layers)
    for m in layers:
        m.unpack()
    n = len(linear_layers(models["mmdit"], "mmdit"))
    assert sum(type(m) is Int8Linear for m in int8.modules()) == n > 0
    plain = type(models["mmdit"])(models["mmdit"].config).to(torch.bfloat16)
    plain.load_state_dict(dequantized_state(int8, torch.bfloat16))
    ref = diffusers_mmdit(models["mmdit"])

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, 32, 24, generator=g), torch.randn(2, 40, 256, generator=g)
    pooled, t = torch.randn(2, 192, generator=g), torch.tensor([900.0, 30.0])
    with torch.no_grad():
        ours = int8(x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
        same = max_rel_err(
            ours, plain.eval()(x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
        )
        expected = ref(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        bf16 = load_component(component, torch.bfloat16)(
            x.bfloat16(), t, context.bfloat16(), pooled.bfloat16()
        )
    err, bf16_err = max_rel_err(ours, expected), max_rel_err(bf16, expected)
    print(f"int8 MMDiT (bf16): vs plain path {same:.1e}; vs diffusers fp32 {err:.2e} "
          f"(bf16 without int8: {bf16_err:.2e})")  # fmt: skip
    assert same == 0  # the same bf16 weights, the same kernels
    assert err < 3 * bf16_err + 1e-2  # measured 1.70e-2 vs 1.01e-2


needs_int8_gemm = pytest.mark.skipif(not int8_gemm_available(), reason="no fbgemm int8 GEMM")


@needs_int8_gemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_scales_each_token(dtype):
    """Tokens from 1e-3 to 1e3 each keep ~1% accuracy (one activation scale for the tensor would
    round the small ones to nothing), against the layer in fp64 by hand; packing keeps the weight
    exactly; a bf16 input gives a bf16 output."""
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(256, 96, bias=True, dtype=dtype)
    q, scale = quantize_weight(torch.randn(96, 256, generator=g))
    layer.weight.copy_(q), layer.weight_scale.copy_(scale), layer.bias.data.normal_(generator=g)
    x = (torch.randn(3, 7, 256, generator=g) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
    w = q.double() * scale.double()[:, None]
    expected = x.double() @ w.T + layer.bias.double()
    plain = torch.nn.functional.linear(x, w.to(dtype), layer.bias.detach())  # rounds as dtype does
    layer.pack()
    with torch.no_grad():
        ours = layer(x)
    assert layer.weight is None and ours.shape == (3, 7, 96) and ours.dtype == dtype
    assert torch.equal(layer.state_dict()["weight"], q)
    assert torch.equal(layer.state_dict()["weight_scale"], scale)

    def error(y):  # per token, relative to the product (bf16 rounds the bias, not to scale)
        return (y - expected).norm(dim=-1) / (expected - layer.bias.double()).norm(dim=-1)

    err, plain_err = error(ours), error(plain)
    print(f"int8 GEMM ({dtype}): relative error per token {err.min():.2e} .. {err.max():.2e} "
          f"(plain {dtype} layer {plain_err.min():.2e} .. {plain_err.max():.2e})")  # fmt: skip
    assert (err - plain_err).max() < 3e-2  # measured fp32 0.96e-2 .. 2.1e-2 (7-bit activations,
    # AVX2), 0.50e-2 .. 0.99e-2 (8-bit, AVX-512 VNNI); bf16 adds the plain bf16 layer's rounding


@needs_int8_gemm
def test_int8_gemm_does_not_saturate():
    """Every activation and weight at full scale: 8-bit activations (AVX-512 VNNI) would make
    AVX2's pairwise int16 sums saturate (255 * 127 * 2 > 32767), halving the output; the 7 bits
    fbgemm keeps without VNNI fit. So this checks `cpu_int8_full_range` against the CPU."""
    layer = Int8Linear(512, 8, bias=False, dtype=torch.float32)
    layer.weight.fill_(127)
    layer.weight_scale.fill_(1 / 127)  # every weight is 1
    layer.pack()
    x = torch.ones(4, 512)
    x[1] = -1
    x[2, ::2] = -1
    with torch.no_grad():
        y = layer(x)
    expected = torch.tensor([512.0, -512.0, 0.0, 512.0])[:, None].expand(4, 8)
    print(f"int8 GEMM at full scale ({'8' if cpu_int8_full_range() else '7'}-bit): {y[:, 0]}")
    assert torch.allclose(y, expected, atol=512 * 2e-2)  # 8-bit: 2.0 off; 7-bit (AVX2): 4.0 off,
    # by the asymmetric zero point; saturated int16 sums would be ~256 off


@needs_int8_gemm
def test_int8_mmdit_fp32_multiplies_in_int8_and_is_close_to_diffusers(models, model_file):
    component = find_components(model_file)["mmdit"]
    int8 = load_component(component, torch.float32, int8=True)
    layers = [m for m in int8.modules() if type(m) is Int8Linear]
    assert layers and all(m.packed is not None for m in layers)
    ref = diffusers_mmdit(models["mmdit"])
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, 32, 24, generator=g), torch.randn(2, 40, 256, generator=g)
    pooled, t = torch.randn(2, 192, generator=g), torch.tensor([900.0, 30.0])
    with torch.no_grad():
        ours = int8(x, t, context, pooled)
        expected = ref(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        for m in layers:  # the same layers, weight-only
            m.unpack()
        weight_only = int8(x, t, context, pooled)
    err, weight_only_err = max_rel_err(ours, expected), max_rel_err(weight_only, expected)
    print(f"int8 MMDiT (fp32, int8 GEMMs): vs diffusers fp32 {err:.2e} "
          f"(int8 weight-only: {weight_only_err:.2e})")  # fmt: skip
    assert weight_only_err < 2e-2 and err < 4 * weight_only_err  # measured 2.58e-2, 0.99e-2


@needs_int8_gemm
def test_int8_mmdit_bf16_int8_gemms_are_close_to_diffusers(models, model_file):
    """bf16 compute with int8 GEMMs (what `load_component` picks where `cpu_int8_beats_bf16`,
    packed by hand elsewhere so every CPU checks the path)."""
    component = find_components(model_file)["mmdit"]
    int8 = load_component(component, torch.bfloat16, int8=True)
    layers = [m for m in int8.modules() if type(m) is Int8Linear]
    for m in layers:
        if m.packed is None:
            m.pack()
    ref = diffusers_mmdit(models["mmdit"])
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, 32, 24, generator=g), torch.randn(2, 40, 256, generator=g)
    pooled, t = torch.randn(2, 192, generator=g), torch.tensor([900.0, 30.0])
    inputs = (x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
    with torch.no_grad():
        ours = int8(*inputs)
        expected = ref(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        for m in layers:
            m.unpack()
        weight_only = int8(*inputs)
    err, weight_only_err = max_rel_err(ours, expected), max_rel_err(weight_only, expected)
    print(f"int8 MMDiT (bf16, int8 GEMMs): vs diffusers fp32 {err:.2e} "
          f"(bf16 int8 weight-only: {weight_only_err:.2e})")  # fmt: skip
    assert ours.dtype == torch.bfloat16 and err < 4 * weight_only_err


def test_pack_for_int8_gemm_follows_the_cpu():
    """Packed for int8 GEMMs: fp32 on a CPU with fbgemm; bf16 only where int8 beats bf16."""
    module = torch.nn.Sequential()
    module.add_module("a", Int8Linear(16, 4, bias=False, dtype=torch.float32))
    module[0].weight.fill_(1), module[0].weight_scale.fill_(1 / 127)
    assert pack_for_int8_gemm(module, "t5xxl", torch.float32, "cpu") == 0  # T5: weight-only
    expected = int(int8_gemm_available() and cpu_int8_beats_bf16())
    assert pack_for_int8_gemm(module, "mmdit", torch.bfloat16, "cpu") == expected
    module[0].unpack()
    assert pack_for_int8_gemm(module, "mmdit", torch.float32, "cpu") == int(int8_gemm_available())


def test_pipeline_and_cli_int8(model_file, tmp_path, capsys):
    kw = dict(num_inference_steps=3, width=32, height=48, seed=2)
    plain = Pipeline.from_single_file(model_file, dtype=torch.float32)
    int8 = Pipeline.from_single_file(model_file, dtype=torch.float32, int8=True)
    assert type(int8.text_encoders().t5.encoder.block[0].layer[1].DenseReluDense.wo) is Int8Linear
    a = np.asarray(plain("a red circle", **kw)[0], dtype=np.float64)
    b = np.asarray(int8("a red circle", **kw)[0], dtype=np.float64)
    difference = np.abs(a - b).mean()
    assert difference < 4  # a near-identical picture (measured 1.87 with int8 GEMMs, 1.06 without)

    out, again = tmp_path / "int8.png", tmp_path / "again.png"
    argv = ["generate", "--model", str(model_file), "--steps", "3", "--width", "32"]
    argv += ["--height", "48", "--dtype", "fp32", "--seed", "2", "a red circle", "--int8"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "(int8 weights)" in capsys.readouterr().err
    print(f"int8 pipeline: mean |pixel difference| {difference:.2f} / 255")
    assert np.array_equal(np.asarray(Image.open(out)), b.astype(np.uint8))
    shutil.copy(model_file, tmp_path / model_file.name)  # found by name beside the PNG
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0  # int8 is stored
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
