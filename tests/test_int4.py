"""int4 weights (`--int4`): the quantization is ggml's Q4_0 (checked against the gguf package's
quantize and dequantize), the error it costs per layer and for the whole MMDiT and T5 against
the unquantized model on reduced-size weights, Q4_0 GGUF weights taken as stored, and the
pipeline and CLI with the flag stored in the PNG."""

import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers import max_rel_err, save_single_file, tiny_models
from PIL import Image
from test_gguf import state, write_gguf
from test_t5 import SMALL, build, random_state

from sd3.checkpoints import find_components, load_component
from sd3.cli import main
from sd3.kernels import quantization
from sd3.kernels.build import kernel_library
from sd3.kernels.quantization import Int4Linear, linear_layers, quantize_int4
from sd3.pipeline import Pipeline


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=6)


@pytest.fixture(scope="module")
def model_file(models, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", models)


def test_int4_is_ggml_q4_0():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.logspace(-3, 1, 96)[:, None]
    w[0, :32] = 0  # an all-zero group: scale 0
    w[1, :32], w[1, 5] = 0.5, -0.5  # a tie between +max and -max: the first wins
    packed, scale = quantize_int4(w.bfloat16())
    blocks = gguf.quants.quantize(w.bfloat16().float().numpy(), Q.Q4_0).reshape(96, 8, 18)
    assert np.array_equal(packed.numpy(), blocks[:, :, 2:].reshape(96, -1))
    assert np.array_equal(scale.numpy(), blocks[:, :, :2].copy().view(np.float16)[..., 0])
    layer = Int4Linear(256, 96, bias=False, dtype=torch.float32)
    layer.weight.copy_(packed)
    layer.weight_scale.copy_(scale)
    expected = gguf.quants.dequantize(blocks.reshape(96, -1), Q.Q4_0)
    with torch.no_grad():
        assert np.array_equal(layer.dequantized(torch.float32).numpy(), expected)
    assert torch.equal(layer.dequantized(torch.float32), torch.from_numpy(expected))  # autograd


@pytest.mark.skipif(kernel_library() is None, reason="no AVX-512 BF16 kernel on this CPU")
def test_int4_kernel_gives_the_plain_paths_bf16_weights(monkeypatch):
    """csrc/int4_cpu.cpp writes the same bf16 bits as the plain path (scale rounded to bf16,
    then (q - 8) * d rounded once); odd block counts, a zero scale, subnormal and huge scales."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 96, generator=g) * torch.logspace(-6, 4, 37)[:, None]
    w[0, :32] = 0
    layer = Int4Linear(96, 37, bias=False, dtype=torch.bfloat16)
    packed, scale = quantize_int4(w)
    layer.weight.copy_(packed)
    layer.weight_scale.copy_(scale)
    with torch.no_grad():
        fast = layer.dequantized(torch.bfloat16).clone()
        monkeypatch.setattr(quantization, "kernel_library", lambda: None)
        plain = layer.dequantized(torch.bfloat16)
    assert torch.equal(fast.view(torch.int16), plain.view(torch.int16))


def test_int4_mmdit_error_per_layer_and_whole(models, model_file):
    """Per layer: each int4 linear against the same layer unquantized on the same input; whole:
    the MMDiT's output (fp32 weights; int8 for scale). Bounds: the layer's error is that of its
    weight (4-bit with groups of 32: ~9% RMS of the weight, less of the output); the model's
    is larger, as these random weights amplify any weight change through the blocks (int8's
    error grows alike)."""
    component = find_components(model_file)["mmdit"]
    int4 = load_component(component, torch.float32, int4=True)
    int8 = load_component(component, torch.float32, int8=True)
    plain = models["mmdit"]
    names = linear_layers(plain, "mmdit")
    assert all(type(int4.get_submodule(n)) is Int4Linear for n in names) and len(names) > 0

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for name in names:
            layer = plain.get_submodule(name)
            x = torch.randn(64, layer.in_features, generator=g)
            ref, ours = layer(x), int4.get_submodule(name)(x)
            rms = ((ours - ref).norm() / ref.norm()).item()
            worst = max(worst, rms)
        x, context = torch.randn(2, 16, 32, 24, generator=g), torch.randn(2, 40, 256, generator=g)
        pooled, t = torch.randn(2, 192, generator=g), torch.tensor([900.0, 30.0])
        ref = plain(x, t, context, pooled)
        err4 = ((int4(x, t, context, pooled) - ref).norm() / ref.norm()).item()
        err8 = ((int8(x, t, context, pooled) - ref).norm() / ref.norm()).item()
    print(f"int4 MMDiT: worst layer {worst:.3f} RMS, whole model {err4:.3f} (int8 {err8:.4f})")
    assert worst < 0.08  # measured 0.064
    assert err4 < 0.2  # measured 0.130 (int8: 0.011): random weights amplify errors through depth


def test_int4_t5_error(tmp_path):
    """At T5's own init scales (as the int8 test)."""
    state_ = random_state(SMALL, seed=2)
    path = save_single_file(tmp_path / "t5.safetensors", {"t5xxl": build(SMALL, state_)})
    int4 = load_component(find_components(t5xxl=path)["t5xxl"], torch.float32, int4=True)
    assert type(int4.encoder.block[0].layer[1].DenseReluDense.wo) is Int4Linear
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = build(SMALL, state_)(ids)
        err = ((int4(ids) - ref).norm() / ref.norm()).item()
        peak = max_rel_err(int4(ids), ref)
    print(f"int4 T5: {err:.3f} RMS, {peak:.3f} max relative")
    assert err < 0.2  # measured 0.134


def test_q4_0_gguf_weights_load_as_stored(models, tmp_path):
    """A Q4_0 GGUF MMDiT with --int4: the packed weights are the file's bytes, and the same as
    int4 from the same values in safetensors (Q4_0 of Q4_0's values is the identity)."""
    path = tmp_path / "mmdit-q4_0.gguf"
    write_gguf(path, {f"model.diffusion_model.{k}": (v, Q.Q4_0) for k, v in state(models["mmdit"]).items()})  # fmt: skip
    from test_gguf import as_safetensors

    same = as_safetensors(path, tmp_path / "same.safetensors")
    a = load_component(find_components(path)["mmdit"], torch.float32, int4=True)
    b = load_component(find_components(same)["mmdit"], torch.float32, int4=True)
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    name = "joint_blocks.0.x_block.mlp.fc1"
    blocks = np.asarray(reader[f"model.diffusion_model.{name}.weight"].data).reshape(512, -1, 18)
    assert np.array_equal(a.get_submodule(name).weight.numpy(), blocks[:, :, 2:].reshape(512, -1))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_and_cli_int4(model_file, tmp_path, capsys):
    kw = dict(num_inference_steps=2, width=32, height=32, seed=2)
    plain = Pipeline.from_single_file(model_file, dtype=torch.float32)
    int4 = Pipeline.from_single_file(model_file, dtype=torch.float32, int4=True)
    assert type(int4.text_encoders().t5.encoder.block[0].layer[1].DenseReluDense.wo) is Int4Linear
    a = np.asarray(plain("a red circle", **kw)[0], dtype=np.float64)
    b = np.asarray(int4("a red circle", **kw)[0], dtype=np.float64)
    difference = np.abs(a - b).mean()
    print(f"int4 pipeline: mean |pixel difference| {difference:.2f} / 255")
    assert difference < 16  # a similar picture (measured 8.5; int8: 1.5)
    with pytest.raises(ValueError, match="exclude each other"):
        Pipeline.from_single_file(model_file, int8=True, int4=True, load=False)

    out, again = tmp_path / "int4.png", tmp_path / "again.png"
    argv = ["generate", "--model", str(model_file), "--steps", "2", "--width", "32"]
    argv += ["--height", "32", "--dtype", "fp32", "--seed", "2", "a red circle", "--int4"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "(int4 weights)" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out)), b.astype(np.uint8))
    shutil.copy(model_file, tmp_path / model_file.name)  # found by name beside the PNG
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0  # int4 is stored
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
