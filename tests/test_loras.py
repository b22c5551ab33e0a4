"""LoRA at generation time (`sd3.loras`): every format against an independent reference.

- A PEFT LoRA (and DoRA) made on diffusers' own SD3Transformer2DModel: sd3's merge against
  diffusers' `load_lora_weights` + `fuse_lora` (fp32, output of the MMDiT).
- kohya, ComfyUI, OneTrainer (legacy and OMI), LyCORIS LoHa / LoKr, ComfyUI full updates and
  kohya-style DoRA: sd3's merged weights against weights merged in this file by the format's own
  formula, with the name maps written out here (q/k/v rows of the fused qkv, the (scale, shift)
  halves diffusers swaps) rather than taken from sd3.
- Text-encoder LoRAs: against transformers' CLIP / T5 with peft's LoRA merged (`merge_and_unload`).
- Not merged (`load_lora`) equals merged; strengths change and LoRAs unload without reloading.
- Files that do not apply: the exact error or warning.
"""

import copy
import json
import math
import warnings

import pytest
import torch
from helpers import max_rel_err, save_single_file, tiny_models, transformers_clip, transformers_t5
from lora_cases import (
    CASES,
    FORMAT_NAMES,
    SCALE,
    SEEDS,
    H,
    Rand,
    diffusers_reference,
    dora_case,
    expected_state,
    inputs,
    kohya_case,
    peft_lora_file,
    pipeline,
    write,
)

from sd3.loras import LoRAError, LoRAFile, layers_of, match


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


# --- diffusers / PEFT, against diffusers' own loader ------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_lora_equals_diffusers_fuse_lora(models, model_file, tmp_path, dora):
    path = peft_lora_file(models, tmp_path / "peft.safetensors", dora)
    assert "lora_adapter_metadata" in LoRAFile.open(path).metadata
    scale = 1.0 if dora else SCALE  # diffusers' DoRA strength rule is its own; DoRA is DoRA at 1
    reference = diffusers_reference(models)
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    reference.fuse_lora(lora_scale=scale)
    pipe = pipeline(model_file, [(path, scale)])
    lora = pipe.loras[0]
    assert lora.format == ("diffusers/PEFT DoRA (LoRA)" if dora else "diffusers/PEFT LoRA")
    x, t, context, pooled = inputs()
    with torch.no_grad():
        ours = pipe.mmdit(x, t, context, pooled)
        theirs = reference.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        base = models["mmdit"](x, t, context, pooled)
    err = max_rel_err(ours, theirs)
    print(f"PEFT {'DoRA' if dora else 'LoRA'} merged by sd3 vs diffusers fuse_lora: {err:.1e}")
    assert max_rel_err(base, theirs) > 0.05  # the LoRA changes the output
    assert err < 1e-5
    assert len(lora.applied) == lora.module_count == len(LoRAFile.open(path).modules)


# --- every other format, against its formula written here --------------------------------------


def assert_states(pipe, expected, changed_keys, label):
    worst = 0.0
    for component, state in expected.items():
        if component == "vae":
            continue
        ours = pipe.module(component).state_dict()
        for key, value in state.items():
            if f"{component}:{key}" in changed_keys:
                err = max_rel_err(ours[key], value)
                worst = max(worst, err)
                assert err < 1e-6, (label, component, key, err)
            else:
                assert torch.equal(ours[key], value.float()), (label, component, key)
    print(f"{label}: changed weights vs the formula, max rel err {worst:.1e}")


@pytest.mark.parametrize("case", list(CASES))
def test_format_equals_its_formula(models, model_file, tmp_path, case):
    tensors, changes = CASES[case](Rand(SEEDS[case]), models["mmdit"].state_dict())
    path = write(tmp_path / f"{case}.safetensors", tensors)
    pipe = pipeline(model_file, [(path, SCALE)])
    lora = pipe.loras[0]
    assert lora.format == FORMAT_NAMES[case]
    changed = {c[0] if ":" in c[0] else f"mmdit:{c[0]}" for c in changes}
    assert_states(pipe, expected_state(models, changes, SCALE), changed, case)
    assert len(lora.applied) == lora.module_count  # every module of the file applied
    assert (
        "not merged" not in lora.summary()
        and f"changed {lora.module_count} of its" in lora.summary()
    )


def test_several_loras_at_once_add_up(models, model_file, tmp_path):
    files, changes = [], []
    scales = {"kohya": 0.5, "onetrainer": -1.0, "lokr": 1.5}
    for case, scale in scales.items():
        tensors, case_changes = CASES[case](Rand(SEEDS[case]), None)
        files.append((write(tmp_path / f"{case}.safetensors", tensors), scale))
        changes.append((case_changes, scale))
    pipe = pipeline(model_file, files)
    expected = {n: {k: v.double() for k, v in m.state_dict().items()} for n, m in models.items()}
    for case_changes, scale in changes:
        for key, rows, delta in case_changes:
            component, _, key = key.rpartition(":")
            expected[component or "mmdit"][key][rows] += scale * delta.double()
    changed = {c[0] if ":" in c[0] else f"mmdit:{c[0]}" for cc, _ in changes for c in cc}
    assert_states(pipe, expected, changed, "kohya + OneTrainer + LoKr")


# --- not merged ---------------------------------------------------------------------------------


def outputs(pipe):
    x, t, context, pooled = inputs()
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return [
            pipe.mmdit(x, t, context, pooled),
            *pipe.module("clip_l")(ids),
            *pipe.module("clip_g")(ids),
        ]


def test_not_merged_equals_merged_and_switches_without_reloading(models, model_file, tmp_path):
    paths = {}
    for case in ("kohya", "onetrainer", "lokr", "comfy"):
        tensors, _ = CASES[case](Rand(SEEDS[case]), None)
        paths[case] = write(tmp_path / f"{case}.safetensors", tensors)
    merged = outputs(pipeline(model_file, [(paths["kohya"], 0.5), (paths["lokr"], 1.0), (paths["comfy"], 1.0)]))  # fmt: skip
    base = outputs(pipeline(model_file))
    pipe = pipeline(model_file)
    pipe.load()
    mmdit = pipe.mmdit
    pipe.load_lora(paths["kohya"], 0.5)
    pipe.load_lora(paths["lokr"])  # dense ΔW beside the layer
    pipe.load_lora(paths["comfy"])  # full updates and a bias
    assert pipe.mmdit is mmdit  # nothing reloaded
    errs = [max_rel_err(a, b) for a, b in zip(outputs(pipe), merged, strict=True)]
    print(f"not merged vs merged: max rel err {max(errs):.1e}")
    assert max(errs) < 1e-5
    assert all(lo.summary().endswith(")") and "not merged" in lo.summary() for lo in pipe.loras)

    pipe.set_lora_scales({"kohya": 0.0, "lokr": 0.0, "comfy": 0.0})  # all off: the base exactly
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base, strict=True))
    pipe.set_lora_scales([0.5, 1.0, 1.0])
    assert max(max_rel_err(a, b) for a, b in zip(outputs(pipe), merged, strict=True)) < 1e-5
    pipe.unload_loras()
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base, strict=True))
    assert pipe.mmdit is mmdit and not pipe.loras

    # a merged LoRA added to a loaded pipeline: its networks load again, merged
    pipe.add_lora(paths["onetrainer"], 1.0)
    assert pipe.mmdit is not mmdit
    one = outputs(pipeline(model_file, [(paths["onetrainer"], 1.0)]))
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), one, strict=True))
    with pytest.raises(
        LoRAError, match=r"LoRA 'nope' is not loaded; the LoRAs are \['onetrainer'\]"
    ):
        pipe.set_lora_scales({"nope": 1.0})


def test_dora_is_only_merged(model_file, tmp_path):
    tensors, _ = dora_case(Rand(1), tiny_models(seed=6)["mmdit"].state_dict())
    path = write(tmp_path / "dora.safetensors", tensors)
    with pytest.raises(LoRAError) as e:
        pipeline(model_file).load_lora(path)
    assert str(e.value) == (
        f"{path}: a DoRA LoRA changes each weight's norm, so it can only be merged: pass it to "
        "from_single_file(loras=...) or add_lora(...) instead"
    )


# --- int8 and fp8 ---------------------------------------------------------------------------------


def test_int8_quantizes_the_merged_weights(model_file, tmp_path):
    from sd3.kernels.quantization import quantize_weight

    tensors, _ = kohya_case(Rand(5), None)
    path = write(tmp_path / "k.safetensors", tensors)
    merged = pipeline(model_file, [(path, SCALE)]).mmdit.joint_blocks[1].x_block.attn.qkv.weight
    pipe = pipeline(model_file, [(path, SCALE)], int8=True)
    weight, scale = pipe.mmdit.joint_blocks[1].x_block.attn.qkv.unpacked()
    q, s = quantize_weight(merged)
    assert torch.equal(weight, q) and torch.equal(scale, s)


def test_fp8_file_merges_in_the_compute_dtype(models, tmp_path):
    from sd3.checkpoints import find_components, load_component
    from sd3.loras import merge_edits

    fp8 = torch.float8_e4m3fn
    path = save_single_file(tmp_path / "fp8.safetensors", {"mmdit": models["mmdit"]}, fp8)
    tensors, changes = kohya_case(Rand(5), None)
    lora = write(tmp_path / "k.safetensors", tensors)
    layers = {"mmdit": layers_of(models["mmdit"])}
    with pytest.warns(UserWarning, match=r"4 of 5 modules apply; .* CLIP-L, which is not loaded"):
        matched = match(LoRAFile.open(lora), layers, 3, scale=SCALE, model="this model")
    component = find_components(path)["mmdit"]
    loaded = load_component(component, torch.bfloat16, edits=merge_edits([matched], "mmdit"))
    key = "joint_blocks.1.x_block.attn.qkv.weight"
    stored = models["mmdit"].state_dict()[key].to(fp8).double()
    expected = stored + SCALE * changes[0][2].double()
    err = max_rel_err(loaded.state_dict()[key], expected)
    print(f"fp8 file + LoRA merged, bf16 compute: {err:.1e}")
    assert err < 2**-8  # bf16 rounding; merged in fp8 it would be ~2**-4


# --- text encoders against transformers + peft ------------------------------------------------


def peft_text_lora(ref, targets, seed):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets)
    peft_model = get_peft_model(ref, config)
    rand = Rand(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape, scale=0.3))
    state = {
        k.removeprefix("base_model.model.").replace(".default", ""): v.detach().clone()
        for k, v in peft_model.state_dict().items()
        if "lora_" in k
    }
    return state, config, peft_model.merge_and_unload().state_dict()


def kohya_names(state, prefix):
    """PEFT's keys as kohya writes them: prefix + name underscored, lora_down/up, alpha."""
    out = {}
    for k, v in state.items():
        module, _, rest = k.partition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(6.0)
    return out


def test_text_encoder_loras_equal_peft_merge(models, model_file, tmp_path):
    clip_l, clip_g, t5 = models["clip_l"], models["clip_g"], models["t5xxl"]
    # CLIP-L in diffusers' format: `text_encoder.` prefix, alpha from the LoraConfig in the header
    ref = transformers_clip(clip_l.config, clip_l.state_dict(), with_projection=True)
    state_l, config, merged_l = peft_text_lora(ref, ["q_proj", "v_proj", "out_proj", "fc1"], 1)
    meta = {f"text_encoder.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
    f1 = write(tmp_path / "te1.safetensors", {f"text_encoder.{k}": v for k, v in state_l.items()},
               {"lora_adapter_metadata": json.dumps(meta)})  # fmt: skip
    # CLIP-G and T5 in kohya's names
    ref = transformers_clip(clip_g.config, clip_g.state_dict(), with_projection=True)
    state_g, _, merged_g = peft_text_lora(ref, ["k_proj", "fc2", "text_projection"], 2)
    f2 = write(tmp_path / "te2.safetensors", kohya_names(state_g, "lora_te2_"))
    ref = transformers_t5(t5.config, {k: v.clone() for k, v in t5.state_dict().items()})
    state_t5, _, merged_t5 = peft_text_lora(ref, ["q", "o", "wi_0", "wo"], 3)
    f3 = write(tmp_path / "te3.safetensors", kohya_names(state_t5, "lora_te3_"))
    pipe = pipeline(model_file, [(f1, 1.0), (f2, 1.0), (f3, 1.0)])
    worst = 0.0
    for component, reference in (("clip_l", merged_l), ("clip_g", merged_g), ("t5xxl", merged_t5)):
        ours = pipe.module(component).state_dict()
        for key, value in ours.items():
            ref_key = key if key in reference else key.removeprefix("text_model.")
            if ref_key not in reference:
                assert key == "encoder.embed_tokens.weight", key
                continue
            worst = max(worst, max_rel_err(value, reference[ref_key]))
    print(f"CLIP-L, CLIP-G, T5 LoRAs merged by sd3 vs peft merge_and_unload: {worst:.1e}")
    assert worst < 1e-6
    assert [lo.format for lo in pipe.loras] == ["diffusers/PEFT LoRA", "kohya LoRA", "kohya LoRA"]
    assert pipe.loras[2].matched("t5xxl") == 8  # q, o, wi_0, wo in both blocks


# --- files that do not apply ------------------------------------------------------------------


def test_zero_matching_modules_is_one_error_naming_file_format_and_models(model_file, tmp_path):
    r = Rand(0)
    large = {}
    for i in range(30, 38):  # an SD3.5 Large LoRA's last blocks
        for s in ("x_block_attn_qkv", "context_block_attn_proj"):
            name = f"lora_unet_joint_blocks_{i}_{s}"
            out = 3 * 2432 if s.endswith("qkv") else 2432
            large |= {f"{name}.lora_down.weight": r(4, 2432), f"{name}.lora_up.weight": r(out, 4),
                      f"{name}.alpha": torch.tensor(4.0)}  # fmt: skip
    path = write(tmp_path / "large.safetensors", large)
    with pytest.raises(LoRAError) as e:
        pipeline(model_file, [(path, 1.0)])
    assert str(e.value) == (
        f"{path}: kohya LoRA with 0 of 16 modules matching this model (3 blocks, width 128): it "
        "was made for a model with 38 blocks of width 2432 (SD3.5 Large) (16 with no layer in "
        "this model (3 blocks, width 128); first names ['lora_unet_joint_blocks_30_context_block_attn_proj', "
        "'lora_unet_joint_blocks_30_x_block_attn_qkv', 'lora_unet_joint_blocks_31_context_block_attn_proj'])"
    )
    unet = write(tmp_path / "sdxl.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": r(4, 320),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": r(640, 4),
    })  # fmt: skip
    with pytest.raises(
        LoRAError, match=r"it was made for a U-Net \(SD 1.x / SDXL\), not an SD3 MMDiT"
    ):
        pipeline(model_file, [(unet, 1.0)])
    with pytest.raises(LoRAError) as e:  # a model file given as a LoRA
        pipeline(model_file, [(model_file, 1.0)])
    assert str(e.value).startswith(f"{model_file}: not a LoRA file: none of its ")
    pickle = tmp_path / "old.pt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(LoRAError, match="sd3 never unpickles"):
        pipeline(model_file, [(pickle, 1.0)])


def test_partial_match_is_one_warning_with_count_and_names(models, model_file, tmp_path):
    tensors, _ = kohya_case(Rand(3), None)
    tensors["lora_unet_joint_blocks_5_x_block_mlp_fc1.lora_down.weight"] = torch.zeros(4, H)
    tensors["lora_unet_joint_blocks_5_x_block_mlp_fc1.lora_up.weight"] = torch.zeros(4 * H, 4)
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(
        4, 256
    )
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(256, 4)
    tensors["lora_unet_joint_blocks_0_x_block_attn_proj.lora_mid.weight"] = torch.zeros(4, 4, 1, 1)
    tensors["lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight"] = torch.zeros(4, H)
    tensors["lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight"] = torch.zeros(H, 4)
    tensors["bundle_emb.cat.clip_l"] = torch.zeros(2, 64)
    path = write(tmp_path / "partial.safetensors", tensors)
    without_t5 = {k: v for k, v in models.items() if k != "t5xxl"}
    small = save_single_file(tmp_path / "no_t5.safetensors", without_t5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = pipeline(small, [(path, 1.0)])
    assert [str(w.message) for w in caught] == [
        f"{path}: kohya LoRA: 5 of 8 modules apply; not applied: 1 for T5-XXL, which is not "
        "loaded (e.g. ['lora_te3_encoder_block_0_layer_0_SelfAttention_q']); 1 that cannot be applied "
        "(Tucker-decomposed convolution updates are not supported) (e.g. "
        "['lora_unet_joint_blocks_0_x_block_attn_proj']); 1 with no layer in this model (3 "
        "blocks, width 128) (e.g. ['lora_unet_joint_blocks_5_x_block_mlp_fc1']); 1 tensors that are "
        "no LoRA weights (e.g. ['bundle_emb.cat.clip_l'])"
    ]
    assert pipe.loras[0].matched() == 5


def test_another_width_is_one_error_naming_module_and_shapes(model_file, tmp_path):
    r = Rand(0)
    path = write(tmp_path / "wide.safetensors", {
        "transformer.transformer_blocks.1.attn.add_q_proj.lora_A.weight": r(4, 192),
        "transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight": r(192, 4),
    })  # fmt: skip
    with pytest.raises(LoRAError) as e:
        pipeline(model_file, [(path, 1.0)])
    assert str(e.value) == (
        f"{path}: LoRA module transformer.transformer_blocks.1.attn.add_q_proj changes a [192, "
        "192] weight, but the MMDiT layer joint_blocks.1.context_block.attn.qkv rows 0-127 (its "
        "part 1 of 3) it names is [128, 128] in this model (3 blocks, width 128): the LoRA was "
        "made for a model of another width"
    )


def test_t5_only_lora_with_t5_left_out_is_an_error(models, model_file, tmp_path):
    r = Rand(0)
    name = "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo"
    path = write(tmp_path / "t5.safetensors", {f"{name}.lora_down.weight": r(4, 512),
                                               f"{name}.lora_up.weight": r(256, 4)})  # fmt: skip
    pipe = pipeline(model_file, [(path, 1.0)])
    with pytest.raises(LoRAError, match="changes only T5-XXL, which is left out"):
        pipe.check_loras(use_t5=False)
    pipe.check_loras(use_t5=True)


def test_missing_alpha_and_peft_patterns_follow_each_tools_rule(tmp_path):
    """No alpha: scale 1 (diffusers/ComfyUI); PEFT's header config: lora_alpha / r with
    alpha_pattern matched on the name's tail, √r under rsLoRA; alpha 0: rank (kohya)."""
    r = Rand(0)
    base = {"transformer.transformer_blocks.0.attn.to_q": 4, "transformer.proj_out": 8}
    tensors = {}
    for k, rank in base.items():
        tensors |= {f"{k}.lora_A.weight": r(rank, H), f"{k}.lora_B.weight": r(H, rank)}
    plain = LoRAFile.from_tensors(tensors)
    assert {m.scale for m in plain.modules.values()} == {1.0}
    meta = {"transformer.lora_alpha": 8, "transformer.r": 4,
            "transformer.alpha_pattern": {"proj_out": 2}}  # fmt: skip
    peft = LoRAFile.from_tensors(tensors, {"lora_adapter_metadata": json.dumps(meta)})
    scales = {k: m.scale for k, m in peft.modules.items()}
    assert scales == {
        "transformer.transformer_blocks.0.attn.to_q": 2.0,
        "transformer.proj_out": 0.25,
    }
    meta["transformer.use_rslora"] = True
    rs = LoRAFile.from_tensors(tensors, {"lora_adapter_metadata": json.dumps(meta)})
    assert rs.modules["transformer.transformer_blocks.0.attn.to_q"].scale == 8 / math.sqrt(4)
    with pytest.raises(LoRAError, match="lora_adapter_metadata header is not valid JSON"):
        LoRAFile.from_tensors(tensors, {"lora_adapter_metadata": "{"})


def test_our_trainers_lora_loads_the_same_way(models, model_file, tmp_path):
    from sd3.training.export import save_lora
    from sd3.training.lora import add_lora, merge_lora

    mmdit = copy.deepcopy(models["mmdit"])
    layers = add_lora(mmdit, rank=4, alpha=2.0, targets=("attn.qkv", "adaLN_modulation.1"))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    path = save_lora(tmp_path / "trained.safetensors", mmdit)
    pipe = pipeline(model_file, [(path, 1.0)])
    assert pipe.loras[0].format == "sd3 train (diffusers format) LoRA"
    expected = merge_lora(mmdit).state_dict()
    ours = pipe.mmdit.state_dict()
    assert max(max_rel_err(ours[k], v) for k, v in expected.items()) < 1e-6
