"""LoRAs on the command line: `sd3 generate --lora`, their provenance in the PNG and `--from-png`,
and `sd3 lora convert` (round trips through every target; diffusers then applies kohya's)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import max_rel_err, save_single_file, tiny_models
from lora_cases import (
    CASES,
    SEEDS,
    Rand,
    diffusers_reference,
    dora_case,
    inputs,
    kohya_case,
    loha_case,
    peft_lora_file,
    pipeline,
    write,
)
from PIL import Image

from sd3.cli import main
from sd3.loras import LoRAError, LoRAFile
from sd3.loras.convert import convert


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=6)


@pytest.fixture(scope="module")
def model_file(models, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", models)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    files = {}
    for case in ("kohya", "onetrainer"):
        tensors, _ = CASES[case](Rand(SEEDS[case]), None)
        files[case] = write(folder / f"{case}.safetensors", tensors)
    return files


def generate(model_file, out, *extra):
    base = ["generate", "a red circle", "--model", str(model_file), "--steps", "2"]
    return main([*base, "--width", "32", "--height", "32", "--dtype", "fp32", "--out", str(out), *extra])  # fmt: skip


def short_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_with_loras_records_them_and_from_png_applies_them_again(
    model_file, lora_files, tmp_path, capsys
):
    kohya, onetrainer = lora_files["kohya"], lora_files["onetrainer"]
    out, plain = tmp_path / "out" / "a.png", tmp_path / "plain.png"
    out.parent.mkdir()
    rc = generate(model_file, out, "--lora", f"{kohya}:0.8", "--lora", str(onetrainer))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (
        "LoRA kohya.safetensors (kohya LoRA, scale 0.8, merged): changed 5 of its 5 modules "
        "(MMDiT 4, CLIP-L 1)" in err
    )
    assert (
        "LoRA onetrainer.safetensors (OneTrainer LoRA, scale 1, merged): changed 6 of its 6 "
        "modules (MMDiT 5, CLIP-G 1)" in err
    )
    with Image.open(out) as image:
        params, stored = image.text["parameters"], json.loads(image.text["sd3"])
    assert params.startswith("a red circle <lora:kohya:0.8> <lora:onetrainer:1>\nNegative prompt:")
    assert (
        f'Lora hashes: "kohya: {short_hash(kohya)}, onetrainer: {short_hash(onetrainer)}"' in params
    )
    assert stored["settings"]["prompt"] == "a red circle"
    assert stored["files"]["loras"] == [
        {"name": "kohya.safetensors", "sha256": short_hash(kohya), "scale": 0.8},
        {"name": "onetrainer.safetensors", "sha256": short_hash(onetrainer), "scale": 1.0},
    ]
    assert str(kohya.parent) not in params + image.text["sd3"]
    assert generate(model_file, plain) == 0
    assert not np.array_equal(pixels(out), pixels(plain))  # the LoRAs change the picture

    # --from-png: the model beside the PNG, the LoRAs neither there nor in the current folder
    shutil.copy(model_file, out.parent / model_file.name)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"sd3 generate: error: --from-png {out}: the LoRA files 'kohya.safetensors' (sha256 "
        f"{short_hash(kohya)}...), 'onetrainer.safetensors' (sha256 {short_hash(onetrainer)}...) "
        "recorded in it are not next to the PNG or in the current folder; give them again with "
        "--lora FILE"
    )
    assert not again.exists()
    # one given again (its recorded scale kept), one found beside the PNG by name and hash
    shutil.copy(onetrainer, out.parent / onetrainer.name)
    assert (
        main(["generate", "--from-png", str(out), "--out", str(again), "--lora", str(kohya)]) == 0
    )
    assert np.array_equal(pixels(out), pixels(again))
    with Image.open(out) as a, Image.open(again) as b:
        assert a.text["sd3"] == b.text["sd3"]
    # a scale given again overrides the recorded one
    other = tmp_path / "other.png"
    rc = main(["generate", "--from-png", str(out), "--out", str(other), "--lora", f"{kohya}:0.2"])
    assert rc == 0 and not np.array_equal(pixels(out), pixels(other))
    with Image.open(other) as image:
        assert json.loads(image.text["sd3"])["files"]["loras"][0]["scale"] == 0.2


def test_lora_errors_on_the_command_line_are_one_line_and_write_nothing(
    model_file, lora_files, tmp_path, capsys
):
    out = tmp_path / "x.png"
    assert generate(model_file, out, "--lora", f"{lora_files['kohya']}:strong") == 2
    assert capsys.readouterr().err.strip() == (
        f"sd3 generate: error: --lora {lora_files['kohya']}:strong: the scale 'strong' is not a number"
    )
    assert generate(model_file, out, "--lora", str(tmp_path / "none.safetensors")) == 2
    assert capsys.readouterr().err.strip() == (
        f"sd3 generate: error: --lora {tmp_path / 'none.safetensors'}: no such file"
    )
    unet = write(tmp_path / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
    })  # fmt: skip
    assert generate(model_file, out, "--lora", str(unet)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"sd3 generate: error: {unet}: kohya LoRA with 0 of 1 modules matching this model (3 "
        "blocks, width 128): it was made for a U-Net (SD 1.x / SDXL), not an SD3 MMDiT"
    )
    assert not out.exists()


# --- sd3 lora convert ---------------------------------------------------------------------------


def merged_mmdit(model_file, path, scale=1.0):
    return pipeline(model_file, [(path, scale)]).mmdit.state_dict()


def assert_same_merge(model_file, a, b, label):
    ours, theirs = merged_mmdit(model_file, a), merged_mmdit(model_file, b)
    err = max(max_rel_err(ours[k], theirs[k]) for k in ours)
    print(f"{label}: merged weights, max rel err {err:.1e}")
    assert err < 1e-6


def test_kohya_converted_to_diffusers_is_applied_by_diffusers(models, model_file, tmp_path, capsys):
    tensors, _ = kohya_case(Rand(1), None)
    kohya = write(tmp_path / "kohya.safetensors", tensors)
    out = tmp_path / "diffusers.safetensors"
    assert main(["lora", "convert", str(kohya), str(out), "--to", "diffusers"]) == 0
    assert f"{out}: kohya LoRA -> diffusers" in capsys.readouterr().out
    keys = LoRAFile.open(out).modules
    assert "transformer.transformer_blocks.1.attn.to_k" in keys  # the fused qkv, split
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj" in keys
    reference = diffusers_reference(models)  # no text encoders: the transformer's part only
    state = reference.lora_state_dict(str(out.parent), weight_name=out.name)
    reference.load_lora_weights({k: v for k, v in state.items() if k.startswith("transformer.")})
    reference.fuse_lora(lora_scale=0.6)
    pipe = pipeline(model_file, [(kohya, 0.6)])
    x, t, context, pooled = inputs()
    with torch.no_grad():
        ours = pipe.mmdit(x, t, context, pooled)
        theirs = reference.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        base = models["mmdit"](x, t, context, pooled)
    err = max_rel_err(ours, theirs)
    print(f"kohya LoRA merged by sd3 vs converted and fused by diffusers: {err:.1e}")
    assert max_rel_err(base, theirs) > 0.01 and err < 1e-5
    # never over an existing file
    assert main(["lora", "convert", str(kohya), str(out), "--to", "kohya"]) == 2
    assert "exists already; sd3 never overwrites a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, chain",
    [
        ("kohya", ["diffusers", "kohya"]),
        ("kohya", ["comfy", "diffusers"]),
        ("onetrainer", ["kohya", "comfy"]),  # q/k/v parts fused, swapped halves put right
        ("onetrainer", ["diffusers"]),
        ("comfy", ["comfy"]),  # full updates
        ("loha", ["kohya", "comfy"]),
        ("lokr-whole-layers", ["kohya", "comfy"]),
        ("peft", ["kohya", "diffusers"]),
    ],
)
def test_round_trips_apply_the_same(models, model_file, tmp_path, case, chain):
    if case == "peft":
        source = peft_lora_file(models, tmp_path / "peft.safetensors", dora=False)
    elif case == "lokr-whole-layers":
        tensors, _ = CASES["lokr"](Rand(SEEDS["lokr"]), None)
        tensors = {k: v for k, v in tensors.items() if "add_v_proj" not in k}
        source = write(tmp_path / "lokr.safetensors", tensors)
    else:
        tensors, _ = CASES[case](Rand(SEEDS[case]), None)
        source = write(tmp_path / f"{case}.safetensors", tensors)
    path = source
    for i, to in enumerate(chain):
        tensors, header = convert(LoRAFile.open(path), to)
        previous, path = path, write(tmp_path / f"{i}-{to}.safetensors", tensors, header)
        assert header["sd3_lora_converted_from"].startswith(f"{previous.name} (")
    assert_same_merge(model_file, source, path, f"{case} -> {' -> '.join(chain)}")


def test_what_a_format_cannot_hold_is_refused(tmp_path):
    loha = write(tmp_path / "loha.safetensors", loha_case(Rand(0), None)[0])
    with pytest.raises(LoRAError) as e:
        convert(LoRAFile.open(loha), "diffusers")
    assert str(e.value) == (
        f"{loha}: 1 modules are ['LyCORIS LoHa'] updates, which diffusers' LoRA format cannot "
        "hold (e.g. ['lora_unet_joint_blocks_0_x_block_mlp_fc1']); convert to kohya or comfy instead"
    )
    sd = tiny_models(seed=6)["mmdit"].state_dict()
    dora = write(tmp_path / "dora.safetensors", dora_case(Rand(0), sd)[0])
    with pytest.raises(LoRAError, match="a DoRA file cannot be converted"):
        convert(LoRAFile.open(dora), "kohya")
    lokr = write(tmp_path / "lokr.safetensors", CASES["lokr"](Rand(0), None)[0])
    with pytest.raises(LoRAError) as e:
        convert(LoRAFile.open(lokr), "kohya")
    assert str(e.value) == (
        f"{lokr}: lycoris_transformer_blocks_0_attn_add_v_proj is a LyCORIS update of part of a "
        "layer or of halves stored the other way, which kohya's naming cannot hold"
    )
    comfy = write(tmp_path / "comfy.safetensors", CASES["comfy"](Rand(0), None)[0])
    with pytest.raises(LoRAError, match="updates a bias, which kohya LoRAs cannot"):
        convert(LoRAFile.open(comfy), "kohya")


def test_lora_inspect(lora_files, capsys):
    assert main(["lora", "inspect", str(lora_files["onetrainer"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  format: OneTrainer LoRA, 6 modules (MMDiT 5, CLIP-G 1)"
    assert out[-1] == "  made for a model with at least 3 blocks of width 128"


def test_low_memory_mode_merges_again_on_every_load(model_file, lora_files):
    from sd3.pipeline import Settings

    s = Settings(prompt="a red circle", steps=2, width=32, height=32, seed=3)
    loras = [(lora_files["kohya"], 0.8), (lora_files["onetrainer"], 1.0)]
    normal = pipeline(model_file, loras, low_memory=False).generate(s)[0]
    low = pipeline(model_file, loras, low_memory=True)
    first, second = low.generate(s)[0], low.generate(s)[0]  # every network loaded twice
    assert torch.equal(first, normal) and torch.equal(second, normal)
    assert all(
        lo.summary().count("changed") == 1 and "did not run" not in lo.summary() for lo in low.loras
    )
