"""GGUF checkpoints: files written here by the gguf package (GGUFWriter, gguf.quants) in
stable-diffusion.cpp's layout (official names, one file), ComfyUI-GGUF's (a bare MMDiT, F32
vectors, llama.cpp's T5 names), loaded by sd3 and compared with gguf's own reader and
dequantization (bit for bit) and, through the pipeline, with the same values from safetensors;
K-quant blocks are built here from ggml's format, since gguf's Python side only dequantizes them.
Broken files: one error each."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers import DATA, PREFIXES, save_single_file, sdcpp_source, tiny_models
from safetensors.torch import save_file

from sd3.checkpoints import CheckpointError, find_components, load_component
from sd3.cli import main
from sd3.gguf import T5_NAMES, GGUFFile, official, transformers_name
from sd3.pipeline import Pipeline

KQUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n * 256] -> Q4_K blocks (ggml's block_q4_K: fp16 d and dmin, 8 six-bit
    scales and mins packed in 12 bytes, 256 nibbles), a plain min/max quantizer."""
    b = x.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(b.min(-1), 0)
    scale, mins = (b.max(-1) - low) / 15, -low
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.clip(np.round(scale / d.astype(np.float32)), 0, 63)).astype(np.uint8)
        m = np.nan_to_num(np.clip(np.round(mins / dmin.astype(np.float32)), 0, 63)).astype(np.uint8)
        step = (d.astype(np.float32) * sc)[..., None]
        offset = (dmin.astype(np.float32) * m)[..., None]
        q = np.nan_to_num(np.clip(np.round((b + offset) / step), 0, 15)).astype(np.uint8)
    packed = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-blocks 2c, 2c + 1
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=1)
    return blocks.reshape(*x.shape[:-1], -1)


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` stored as `qtype`, falling back as stable-diffusion.cpp does: rows that are not
    whole blocks (conv kernels, odd widths) in F16, vectors in F32."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.ndim < 2:
        qtype = Q.F32
    elif array.shape[-1] % block:
        qtype = Q.F16
    if qtype == Q.Q4_K:
        return q4_k(array), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "sd3") -> dict:
    """Write {name: (array, type)}; returns {name: the type it was stored as}."""
    writer = gguf.GGUFWriter(str(path), arch)
    stored = {}
    for name, (array, qtype) in tensors.items():
        data, stored[name] = encode(array, qtype)
        raw = None if stored[name] in (Q.F32, Q.F16) else stored[name]
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def reference(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by gguf's own reader and dequantization, in torch's shape."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return out


def state(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


# one type per component: the MMDiT and T5 (the big ones) block-quantized, a K-quant among them
SDCPP_TYPES = {"mmdit": Q.Q4_0, "t5xxl": Q.Q4_K, "clip_g": Q.Q8_0, "clip_l": Q.BF16, "vae": Q.F16}


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


@pytest.fixture(scope="module")
def sdcpp_file(models, tmp_path_factory):
    """All five components in one file, stable-diffusion.cpp's names and types."""
    path = tmp_path_factory.mktemp("sdcpp") / "tiny-q4_0.gguf"
    tensors = {
        PREFIXES[name] + k: (v, SDCPP_TYPES[name])
        for name, model in models.items()
        for k, v in state(model).items()
    }
    stored = write_gguf(path, tensors)
    assert {Q.Q4_0, Q.Q4_K, Q.Q8_0, Q.BF16, Q.F16, Q.F32} <= set(stored.values())
    return path


def as_safetensors(path, out):
    """The reference values of a GGUF file saved as a float32 safetensors file, names kept."""
    save_file({k: v.contiguous() for k, v in reference(path).items()}, str(out))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *KQUANTS, Q.BF16])
def test_every_type_dequantizes_as_gguf_does_bit_for_bit(qtype, tmp_path):
    """Random bytes are valid blocks of every type (NaN and inf scales included): all bit
    patterns of the scales and quants, read back through the file; NaN where gguf has NaN."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (6, 3 * size), dtype=np.uint8)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "sd3")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(tmp_path / "t.gguf")
    assert file.tensors["w"].shape == (6, 3 * block) and file.tensors["w"].type.name == qtype.name
    with np.errstate(invalid="ignore"):
        expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    ours = file.get("w", torch.float32)
    nan = expected.isnan()  # NaN payloads are the CPU's choice, not the format's
    assert torch.equal(ours.isnan(), nan) and torch.equal(bits(ours[~nan]), bits(expected[~nan]))


def test_sdcpp_file_reads_as_gguf_does(sdcpp_file, models):
    """stable-diffusion.cpp's layout: the components found by their official prefixes, every
    tensor equal to gguf's reader and dequantization, the shapes torch's (ggml's reversed)."""
    found = find_components(sdcpp_file)
    assert set(found) == set(models)
    ref = reference(sdcpp_file)
    for name, comp in found.items():
        for k, t in comp.tensors.items():
            expected = ref[PREFIXES[name] + k]
            assert t.shape == tuple(expected.shape) == tuple(models[name].state_dict()[k].shape)
            assert torch.equal(t.read_in(torch.float32), expected), k
            assert torch.equal(t.read_in(torch.bfloat16), expected.bfloat16()), k
    q4k = find_components(sdcpp_file)["t5xxl"].tensors[
        "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    ]
    original = models["t5xxl"].state_dict()["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    error = (q4k.read() - original).abs().max() / original.abs().max()
    assert q4k.quant == "Q4_K" and error < 0.1  # this test's Q4_K quantizer works (measured 0.05)


# files written by stable-diffusion.cpp's own converter (tests/data/stable-diffusion-cpp)
CONVERTED = DATA / "stable-diffusion-cpp"


@pytest.mark.parametrize("name", ["sd35_q4_0.gguf", "sd35_mixed.gguf"])
def test_files_from_stable_diffusion_cpps_converter(name):
    """What the converter really writes: the official names and shapes back (CLIP's
    `text_model.text_projection` and pos_embed's dropped leading 1 undone), every tensor equal
    to gguf's dequantization bit for bit and to the float16 source where kept unquantized, the
    quantized ones near it, the MMDiT's output near the source's; T5 left out with a warning,
    since the converter drops its token embedding."""
    path = CONVERTED / name
    with pytest.warns(UserWarning, match="T5-XXL has no token embedding"):
        found = find_components(path)
    source = sdcpp_source()
    assert set(found) == {"mmdit", "clip_l"}
    ref = {}
    for k, v in reference(path).items():
        k, shape = official(k, tuple(v.shape))
        ref[k] = v.reshape(shape)
    types = set()
    for comp, tensors in ((c, found[c].tensors) for c in found):
        original = {k: v.half().float() for k, v in source[comp].state_dict().items()}
        assert set(tensors) == set(original)  # every official name, nothing else
        for k, t in tensors.items():
            types.add(t.stored)
            ours = t.read_in(torch.float32)
            assert t.shape == original[k].shape, k
            assert torch.equal(ours, ref[PREFIXES[comp] + k]), k
            if t.quant is None:
                assert torch.equal(ours, original[k]), k
            else:  # within the block type's error: Q4 at most 1/15 of a 32-block's range
                span = original[k].abs().max()
                assert (ours - original[k]).abs().max() <= 0.15 * span, k
    assert types >= ({"Q4_0"} if "q4_0" in name else {"Q8_0", "Q5_1", "Q4_1", "Q4_K"})
    mmdit = load_component(found["mmdit"], torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g)
    inputs = (
        x,
        torch.tensor([500.0]),
        torch.randn(1, 7, 64, generator=g),
        torch.randn(1, 64, generator=g),
    )
    with torch.no_grad():
        got, want = mmdit(*inputs), source["mmdit"].half().float()(*inputs)
    error = ((got - want).norm() / want.norm()).item()
    assert error < (0.25 if "q4_0" in name else 0.1), error  # measured 0.095 and 0.014


def test_pipeline_from_gguf_equals_the_same_values_from_safetensors(sdcpp_file, tmp_path):
    """The same weights (gguf's dequantization saved as fp32 safetensors): the same latents
    and image, exactly, since the fp32 weights are the same bits."""
    same = as_safetensors(sdcpp_file, tmp_path / "same.safetensors")
    kw = dict(steps=2, width=32, height=32, seed=2)
    a = Pipeline.from_single_file(sdcpp_file, dtype=torch.float32)
    b = Pipeline.from_single_file(same, dtype=torch.float32)
    (la, [ia]), (lb, [ib]) = (p.generate(p.settings("a red circle", **kw)) for p in (a, b))
    assert torch.equal(la, lb)
    assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_comfyui_layout_mmdit_and_llama_cpp_t5(models, tmp_path):
    """ComfyUI-GGUF's SD3.5 files: the MMDiT alone with bare `joint_blocks.*` names (its
    converter strips `model.diffusion_model.`), vectors in F32; its T5-XXL files in llama.cpp's
    names. Given with --model and --t5xxl beside safetensors encoders and VAE: the same latents
    as the same values from safetensors."""
    mmdit, t5 = tmp_path / "sd3.5_medium-Q8_0.gguf", tmp_path / "t5-v1_1-xxl-encoder-Q5_0.gguf"
    write_gguf(mmdit, {k: (v, Q.Q8_0) for k, v in state(models["mmdit"]).items()})
    llama_names = {}
    for k, v in state(models["t5xxl"]).items():
        for theirs, ours in T5_NAMES.items():
            k = k.replace(ours, theirs)
        llama_names[k.replace("encoder.embed_tokens.", "token_embd.")] = (v, Q.Q5_0)
    assert "enc.blk.0.attn_q.weight" in llama_names and "token_embd.weight" in llama_names
    write_gguf(t5, llama_names, arch="t5encoder")
    files = {
        n: save_single_file(tmp_path / f"{n}.safetensors", {n: models[n]}, prefixed=False)
        for n in ("clip_l", "clip_g", "vae")
    }
    same_t5 = {transformers_name(k): v.contiguous() for k, v in reference(t5).items()}
    save_file(same_t5, str(tmp_path / "t5.safetensors"))
    pairs = [(mmdit, t5), (as_safetensors(mmdit, tmp_path / "mmdit.safetensors"), tmp_path / "t5.safetensors")]  # fmt: skip

    latents = []
    for model, t5xxl in pairs:
        pipe = Pipeline.from_single_file(
            model, clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=t5xxl, vae=files["vae"],
            dtype=torch.float32,
        )  # fmt: skip
        latents.append(
            pipe.generate(pipe.settings("a blue square", steps=2, width=32, height=32))[0]
        )
    assert torch.equal(*latents)
    assert find_components(mmdit)["mmdit"].stored_dtypes == ["Q8_0", "float16", "float32"]
    assert find_components(t5xxl=t5)["t5xxl"].stored_dtypes == ["Q5_0", "float16", "float32"]


def test_inspect_shows_the_gguf_types(sdcpp_file, capsys):
    assert main(["inspect", str(sdcpp_file)]) == 0
    out = capsys.readouterr().out
    assert "Q4_0" in out and "Q4_K" in out and "Q8_0" in out and "bfloat16" in out


def test_broken_files_give_one_clear_error(sdcpp_file, tmp_path):
    data = sdcpp_file.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.gguf: truncated GGUF file: tensor"):
        find_components(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"header\.gguf: truncated or corrupt GGUF file"):
        find_components(header_only)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(CheckpointError, match=r"corrupt\.gguf: GGUF version"):
        find_components(corrupt)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_bytes(b"this is not a model at all, just some text")
    with pytest.raises(CheckpointError, match=r"text\.gguf: not a GGUF file"):
        find_components(not_gguf)

    unsupported = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(str(unsupported), "sd3")
    writer.add_tensor("model.diffusion_model.x_embedder.proj.weight", np.zeros((4, 66), np.uint8), raw_dtype=Q.IQ2_XXS)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"iq2\.gguf: tensor 'model\.diffusion_model\.x_embedder\.proj\.weight' is stored as IQ2_XXS, which sd3 does not read"):  # fmt: skip
        find_components(unsupported)


def test_int8_from_gguf_equals_int8_from_the_same_values(sdcpp_file, tmp_path):
    """--int8 quantizes a GGUF file's dequantized values as it does safetensors' values."""
    same = as_safetensors(sdcpp_file, tmp_path / "same.safetensors")
    a, b = (load_component(find_components(f)["mmdit"], torch.float32, int8=True) for f in (sdcpp_file, same))  # fmt: skip
    for m in (a, b):
        for layer in m.modules():
            if hasattr(layer, "unpack"):
                layer.unpack()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
