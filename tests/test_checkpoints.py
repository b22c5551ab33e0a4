"""Loading every checkpoint layout, stored dtypes, and one clear error for each kind of bad file."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from helpers import (
    PREFIXES,
    diffusers_mmdit,
    diffusers_vae,
    max_rel_err,
    save_single_file,
    tiny_models,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd3.checkpoints import CheckpointError, find_components, load_component


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=1)


def assert_same_weights(module, reference, atol=0.0):
    ours, ref = module.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k].float(), ref[k].float(), atol=atol, rtol=0, msg=k)


def test_single_file_with_bundled_encoders(tmp_path, models):
    path = save_single_file(tmp_path / "sd3.5_tiny.safetensors", models)
    found = find_components(path)
    assert sorted(found) == sorted(models)
    for name, model in models.items():
        loaded = load_component(found[name])
        assert loaded.config == model.config
        assert_same_weights(loaded, model)


def test_single_file_plus_standalone_encoders(tmp_path, models):
    main = save_single_file(
        tmp_path / "model.safetensors", {k: models[k] for k in ("mmdit", "vae")}
    )
    files = {
        name: save_single_file(
            tmp_path / f"{name}.safetensors", {name: models[name]}, prefixed=False
        )
        for name in ("clip_l", "clip_g", "t5xxl")
    }
    assert sorted(find_components(main)) == ["mmdit", "vae"]
    found = find_components(main, **files)
    assert sorted(found) == sorted(models)
    for name in files:
        assert_same_weights(load_component(found[name]), models[name])


def test_standalone_file_replaces_bundled(tmp_path, models):
    main = save_single_file(tmp_path / "model.safetensors", models)
    other = tiny_models(seed=2)["clip_g"]
    clip_g = save_single_file(tmp_path / "clip_g.safetensors", {"clip_g": other}, prefixed=False)
    assert_same_weights(load_component(find_components(main, clip_g=clip_g)["clip_g"]), other)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_stored_dtypes_are_read(tmp_path, models, dtype):
    path = save_single_file(
        tmp_path / "t5.safetensors", {"t5xxl": models["t5xxl"]}, dtype=dtype, prefixed=False
    )
    component = find_components(t5xxl=path)["t5xxl"]
    assert component.stored_dtypes == [str(dtype).removeprefix("torch.")]
    loaded = load_component(component, dtype=torch.float32)
    for k, v in models["t5xxl"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(dtype).float()), k


def test_same_dtype_weights_stay_memory_mapped(tmp_path, models):
    path = save_single_file(
        tmp_path / "m.safetensors", {"mmdit": models["mmdit"]}, dtype=torch.bfloat16
    )
    component = find_components(path)["mmdit"]
    module = load_component(component, dtype=torch.bfloat16)
    weight = module.joint_blocks[0].x_block.attn.qkv.weight
    again = component.tensors["joint_blocks.0.x_block.attn.qkv.weight"].read()
    assert weight.untyped_storage().data_ptr() != 0
    # Both views point into the same mapping of the file: nothing was copied.
    file = (
        component.tensors["joint_blocks.0.x_block.attn.qkv.weight"]
        .read.__closure__[0]
        .cell_contents
    )
    base = torch.frombuffer(file._mmap, dtype=torch.uint8).data_ptr()
    assert base <= weight.data_ptr() < base + len(file._mmap)
    assert torch.equal(weight, again)


def resident_bytes(path) -> int:
    """This process's resident bytes of its mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_converted_weights_leave_no_file_pages_and_release_drops_mapped_ones(tmp_path):
    # One 16 MB layer stored in fp16: loading it as bf16 converts it and must not keep the file's
    # pages; loading it as fp16 uses the file in place until the component is released.
    from sd3.models.clip import CLIPConfig, CLIPTextModel

    config = CLIPConfig(width=64, layers=1, heads=1, mlp_width=128, vocab_size=131072)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model = model.to_empty(device="cpu")
    for p_ in model.parameters():
        torch.nn.init.normal_(p_, std=0.02)
    path = save_single_file(tmp_path / "clip.safetensors", {"clip_l": model}, dtype=torch.float16)
    path = path.resolve()
    table = "text_model.embeddings.token_embedding.weight"
    expected = model.state_dict()[table].half()
    size = expected.numel() * 2

    component = find_components(path)["clip_l"]
    converted = load_component(component, dtype=torch.bfloat16)
    assert resident_bytes(path) < size / 8
    assert torch.equal(converted.state_dict()[table], expected.bfloat16())

    component = find_components(path)["clip_l"]
    in_place = load_component(component, dtype=torch.float16)
    weight = in_place.state_dict()[table]
    assert torch.equal(weight, expected)  # touches every page of it
    assert resident_bytes(path) >= size
    component.release()
    assert resident_bytes(path) < size / 8
    assert torch.equal(weight, expected)  # still readable: the pages fault back in from the file


def test_diffusers_folder(tmp_path, models):
    """A folder written by diffusers and transformers themselves, sharded transformer included."""
    diffusers_mmdit(models["mmdit"]).save_pretrained(tmp_path / "transformer", max_shard_size="1MB")
    assert list((tmp_path / "transformer").glob("*.index.json"))
    diffusers_vae(models["vae"]).save_pretrained(tmp_path / "vae")

    encoders = {}
    for sub, name, act in (
        ("text_encoder", "clip_l", "quick_gelu"),
        ("text_encoder_2", "clip_g", "gelu"),
    ):
        cfg = models[name].config
        enc = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, projection_dim=cfg.width,
                hidden_act=act, eos_token_id=49407, bos_token_id=49406,
            )
        )  # fmt: skip
        enc.load_state_dict(models[name].state_dict(), strict=False)
        enc.save_pretrained(tmp_path / sub)
        encoders[name] = enc
    t5 = models["t5xxl"].config
    t5_ref = T5EncoderModel(
        T5Config(
            vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=64, d_ff=t5.d_ff, num_layers=t5.layers,
            num_heads=t5.heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        )
    )  # fmt: skip
    t5_ref.load_state_dict(models["t5xxl"].state_dict(), strict=False)
    t5_ref.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="2MB")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline"})
    )

    found = find_components(tmp_path)
    assert sorted(found) == sorted(models)
    for name in ("mmdit", "vae", "clip_g", "t5xxl"):
        assert_same_weights(load_component(found[name]), models[name])
    # CLIP-L from a diffusers folder carries transformers' (random) text_projection: weights equal too
    loaded_l = load_component(found["clip_l"])
    torch.testing.assert_close(
        loaded_l.text_projection.weight, encoders["clip_l"].text_projection.weight
    )

    # And the loaded MMDiT computes what diffusers computes from that folder.
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = (
        torch.randn(1, 16, 8, 12, generator=g),
        torch.randn(1, 5, 256, generator=g),
        torch.randn(1, 192, generator=g),
    )
    t = torch.tensor([500.0])
    with torch.no_grad():
        ours = load_component(found["mmdit"])(x, t, ctx, pooled)
        ref = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer")(
            x, ctx, pooled, t
        ).sample
    assert max_rel_err(ours, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    for name in (
        "model.ckpt",
        "model.safetensors",
    ):  # by suffix, and by content whatever the suffix
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil(), protocol=4))
        with pytest.raises(CheckpointError, match=f"{name}: this is a pickle"):
            find_components(path)
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.safetensors")
    with pytest.raises(CheckpointError, match="zip.safetensors: this is a pickle"):
        find_components(tmp_path / "zip.safetensors")
    assert not marker.exists()


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is a text file and no checkpoint at all")
    with pytest.raises(CheckpointError, match="notes.safetensors: not a safetensors file"):
        find_components(path)


def test_truncated_file(tmp_path, models):
    path = save_single_file(tmp_path / "cut.safetensors", {"vae": models["vae"]})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match="cut.safetensors: truncated: tensor '.*' ends at byte"
    ):
        find_components(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # unterminated JSON
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="bad.safetensors: corrupt safetensors header"):
        find_components(path)
    header = b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'  # 3 floats in 8 bytes
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="tensor 'a' of shape \\[3\\] needs 12 bytes"):
        find_components(path)


def test_missing_unexpected_and_wrong_shape(tmp_path, models):
    sd = {PREFIXES["mmdit"] + k: v for k, v in models["mmdit"].state_dict().items()}
    missing = dict(sd)
    del missing[PREFIXES["mmdit"] + "joint_blocks.1.x_block.mlp.fc2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        CheckpointError, match="missing.safetensors: mmdit is missing 1 tensors.*fc2.bias"
    ):
        load_component(find_components(tmp_path / "missing.safetensors")["mmdit"])

    extra = dict(
        sd, **{PREFIXES["mmdit"] + "joint_blocks.0.x_block.lora_up.weight": torch.zeros(2, 2)}
    )
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(
        CheckpointError, match="extra.safetensors: mmdit has 1 unexpected tensors.*lora_up"
    ):
        load_component(find_components(tmp_path / "extra.safetensors")["mmdit"])

    wrong = dict(sd)
    wrong[PREFIXES["mmdit"] + "joint_blocks.2.x_block.mlp.fc1.weight"] = torch.zeros(512, 100)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"wrong.safetensors:.*fc1.weight: wrong shape \[512, 100\], expected \[512, 128\]",
    ):
        load_component(find_components(tmp_path / "wrong.safetensors")["mmdit"])


def test_harmless_extras_are_tolerated(tmp_path, models):
    sd = {PREFIXES["clip_l"] + k: v for k, v in models["clip_l"].state_dict().items()}
    sd[PREFIXES["clip_l"] + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd[PREFIXES["clip_l"] + "logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(tmp_path / "clip.safetensors"))
    assert_same_weights(
        load_component(find_components(tmp_path / "clip.safetensors")["clip_l"]), models["clip_l"]
    )


def test_unknown_model_and_wrong_role(tmp_path, models):
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(CheckpointError, match="foo.safetensors: unknown model"):
        find_components(tmp_path / "foo.safetensors")
    t5 = save_single_file(tmp_path / "t5.safetensors", {"t5xxl": models["t5xxl"]}, prefixed=False)
    with pytest.raises(
        CheckpointError, match="t5.safetensors: expected a clip_l file, but it holds t5xxl"
    ):
        find_components(clip_l=t5)
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such file"):
        find_components(tmp_path / "nowhere.safetensors")


def test_inconsistent_shapes_name_the_file(tmp_path, models):
    sd = {k: v for k, v in models["mmdit"].state_dict().items()}
    sd["pos_embed"] = torch.zeros(1, 250, 128)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(
        CheckpointError, match="odd.safetensors: the mmdit tensors do not fit: .*not a square"
    ):
        load_component(find_components(tmp_path / "odd.safetensors")["mmdit"])
