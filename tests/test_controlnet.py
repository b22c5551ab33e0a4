"""ControlNets (both flavours) against diffusers' SD3ControlNetModel and
StableDiffusion3ControlNetPipeline on the same reduced-size random weights.

diffusers adds no output after the last joint block; Stability's reference (which we follow for
the SD3.5 ControlNets) does. The model test checks that this is the only difference: the image
tokens entering the final layer differ by exactly the last output. The pipeline test runs our
pipeline with diffusers' rule (patched) to compare the rest of the path. Tolerances reached (fp32,
max |ours - theirs| / max |theirs|): ControlNet outputs and velocities ~1e-7, pipeline latents
~1e-6; asserted < 1e-5.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers import (
    controlnet_to_stability,
    diffusers_mmdit,
    diffusers_vae,
    max_rel_err,
    randomize,
    save_single_file,
    tiny_models,
)
from PIL import Image
from safetensors.torch import save_file

from sd3.checkpoints import CheckpointError, load_component, open_controlnet
from sd3.control import Control
from sd3.models.controlnet import ControlNet
from sd3.models.mmdit import ControlResiduals, MMDiT, MMDiTConfig
from sd3.pipeline import Pipeline, Settings
from sd3.sampling import get_noise

BASE = MMDiTConfig(
    depth=6, hidden_size=128, mlp_hidden=512, pos_embed_max_size=16, context_dim=256,
    pooled_dim=192, qk_norm=True,
)  # fmt: skip


def diffusers_controlnet(kind: str, seed: int, layers: int = 3) -> SD3ControlNetModel:
    """diffusers' SD3.5 Large kind (no text stream) or InstantX kind, width 128, random weights."""
    if kind == "sd3.5":
        kw = dict(
            joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None,
            use_pos_embed=False, force_zeros_for_pooled_projection=False,
        )  # fmt: skip
    else:
        kw = dict(joint_attention_dim=256, pos_embed_max_size=16)
    net = SD3ControlNetModel(
        sample_size=32, num_layers=layers, attention_head_dim=64, num_attention_heads=2,
        caption_projection_dim=128, pooled_projection_dim=192, **kw,
    )  # fmt: skip
    randomize(net, seed)
    return net.eval()


def stability_layout(net: SD3ControlNetModel, control_type: int) -> dict[str, torch.Tensor]:
    """The official SD3.5 files' layout, written out from diffusers' weights by the inverse of
    diffusers' convert_sd3_controlnet_to_diffusers.py: diffusers names for the embedders,
    Stability's for the blocks, an int32 control_type, and an unused pos_embed.proj."""
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out = controlnet_to_stability(sd, len(net.transformer_blocks))
    out["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    out["pos_embed.proj.weight"] = torch.zeros(128, 16, 2, 2)
    out["pos_embed.proj.bias"] = torch.zeros(128)
    return out


@pytest.fixture(scope="module")
def base():
    model = MMDiT(BASE).eval()
    randomize(model, 11)
    return model


def inputs(seed=0, b=2, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, h, w, generator=g)
    context = torch.randn(b, 9, 256, generator=g)
    pooled = torch.randn(b, 192, generator=g)
    control = torch.randn(b, 16, h, w, generator=g)
    return x, torch.tensor([700.0, 120.0][:b]), context, pooled, control


def final_input(module, hook_on):
    """Run, capturing the image tokens entering `hook_on` (the final layer / norm_out)."""
    seen = []
    handle = hook_on.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    return seen, handle


def test_sd35_controlnet_matches_diffusers_and_adds_the_last_block(base, tmp_path):
    ref_net = diffusers_controlnet("sd3.5", seed=1)
    path = tmp_path / "cn_canny.safetensors"
    save_file(stability_layout(ref_net, control_type=1), str(path))
    with pytest.warns(UserWarning, match="ignoring 2 tensors.*x_embedder.proj"):
        component = open_controlnet(path)
    assert component.control_type == "canny"
    net = load_component(component)
    assert isinstance(net, ControlNet) and net.config.kind == "sd3.5" and net.every_block
    ref_base = diffusers_mmdit(base)
    ref_net.pos_embed = ref_net._get_pos_embed_from_transformer(ref_base)

    x, t, context, pooled, control = inputs()
    with torch.no_grad():
        ours = net(base, x, t, context, pooled, control, strength=0.7)
        theirs = ref_net(
            hidden_states=x, controlnet_cond=control, conditioning_scale=0.7,
            pooled_projections=pooled, timestep=t, return_dict=False,
        )[0]  # fmt: skip
        errs = [max_rel_err(a, b) for a, b in zip(ours.residuals, theirs, strict=True)]
        print(f"sd3.5 ControlNet outputs: max rel err {max(errs):.1e}")
        assert max(errs) < 1e-5

        # under diffusers' rule the whole MMDiT agrees ...
        seen_ours, h1 = final_input(base, base.final_layer)
        seen_theirs, h2 = final_input(ref_base, ref_base.norm_out)
        v_rule = base(
            x, t, context, pooled, controlnet_residuals=[ControlResiduals(ours.residuals)]
        )
        v_ref = ref_base(
            hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
            timestep=t, block_controlnet_hidden_states=theirs,
        ).sample  # fmt: skip
        assert max_rel_err(v_rule, v_ref) < 1e-5
        # ... and Stability's rule (block i takes output i // (6 // 3), the last block too)
        # differs from it by exactly the last output, added after the last block
        v_ours = base(x, t, context, pooled, controlnet_residuals=[ours])
        h1.remove(), h2.remove()
        diff = seen_ours[1] - seen_theirs[0]
        err = max_rel_err(diff, ours.residuals[-1])
        print(f"sd3.5 last-block difference vs its output: max rel err {err:.1e}")
        assert err < 1e-5
        assert max_rel_err(v_ours, v_ref) > 1e-3


def test_diffusers_format_sd35_controlnet_loads_the_same(base, tmp_path):
    ref_net = diffusers_controlnet("sd3.5", seed=2)
    folder = tmp_path / "diffusers-cn"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in ref_net.state_dict().items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(dict(ref_net.config)))
    single = tmp_path / "cn.safetensors"
    save_file(stability_layout(ref_net, control_type=2), str(single))
    from_folder = load_component(open_controlnet(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_single = load_component(open_controlnet(single))
    a, b = from_folder.state_dict(), from_single.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open_controlnet(folder).control_type is None  # diffusers' files do not record it


def test_instantx_controlnet_matches_diffusers(tmp_path):
    base = tiny_models(seed=4)["mmdit"]  # depth 3: two outputs over three blocks
    ref_net = diffusers_controlnet("instantx", seed=3, layers=2)
    path = tmp_path / "instantx.safetensors"
    save_file({k: v.contiguous() for k, v in ref_net.state_dict().items()}, str(path))
    net = load_component(open_controlnet(path))
    assert net.config.kind == "instantx" and not net.every_block
    ref_base = diffusers_mmdit(base)
    x, t, context, pooled, control = inputs(seed=1)
    with torch.no_grad():
        ours = net(base, x, t, context, pooled, control, strength=1.3)
        theirs = ref_net(
            hidden_states=x, controlnet_cond=control, conditioning_scale=1.3,
            encoder_hidden_states=context, pooled_projections=torch.zeros_like(pooled),
            timestep=t, return_dict=False,
        )[0]  # fmt: skip
        errs = [max_rel_err(a, b) for a, b in zip(ours.residuals, theirs, strict=True)]
        v_ours = base(x, t, context, pooled, controlnet_residuals=[ours])
        v_ref = ref_base(
            hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
            timestep=t, block_controlnet_hidden_states=theirs,
        ).sample  # fmt: skip
    print(f"instantx: outputs {max(errs):.1e}, velocity {max_rel_err(v_ours, v_ref):.1e}")
    assert max(errs) < 1e-5 and max_rel_err(v_ours, v_ref) < 1e-5


# --- the whole pipeline -------------------------------------------------------------------


class CannyImageProcessor(VaeImageProcessor):
    """The SD3.5 canny model card's processor for diffusers: [0, 1] pixels, then *255*0.5+0.5."""

    def __init__(self):
        super().__init__(vae_scale_factor=8, do_normalize=False)

    def preprocess(self, image, height=None, width=None, **kw):
        return super().preprocess(image, height=height, width=width, **kw) * 255 * 0.5 + 0.5


@pytest.fixture()
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior for the control image; we use its mean."""
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


def control_image(seed=0, w=80, h=56):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


def family(base_model, tmp_path):
    models = {**tiny_models(seed=6), "mmdit": base_model}
    return save_single_file(tmp_path / "model.safetensors", models), models


@pytest.mark.parametrize("flavour", ["sd3.5", "instantx"])
def test_controlnet_pipeline_matches_diffusers(
    flavour, base, tmp_path, posterior_mean, monkeypatch
):
    if flavour == "sd3.5":
        ref_net = diffusers_controlnet("sd3.5", seed=7)
        cn_path = tmp_path / "canny.safetensors"
        save_file(stability_layout(ref_net, control_type=1), str(cn_path))
        base_model = base
        # the pipeline path under diffusers' rule; the last-block rule is tested above
        monkeypatch.setattr(ControlNet, "every_block", property(lambda self: False))
    else:
        ref_net = diffusers_controlnet("instantx", seed=8, layers=2)
        cn_path = tmp_path / "instantx.safetensors"
        save_file({k: v.contiguous() for k, v in ref_net.state_dict().items()}, str(cn_path))
        base_model = tiny_models(seed=9)["mmdit"]
    path, models = family(base_model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_single_file(path, dtype=torch.float32, controlnets=[cn_path])
    if flavour == "sd3.5":
        assert pipe.preset.name == "SD3.5 Large ControlNet (canny)" and pipe.preset.steps == 60
    image = control_image()
    s = Settings(
        prompt="a cat", steps=5, cfg=3.0, sampler="euler", shift=3.0, seed=3, width=64, height=48,
        controls=(Control(strength=0.8, start=0.2, end=1.0),),
    )  # fmt: skip
    cond = pipe.encode_prompt(s)
    ours = pipe.sample(s, conditioning=cond, control_images=[image])

    ref = StableDiffusion3ControlNetPipeline(
        transformer=diffusers_mmdit(base_model), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae(models["vae"]), controlnet=ref_net, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    if flavour == "sd3.5":
        ref.image_processor = CannyImageProcessor()
    context, pooled, neg_context, neg_pooled = cond
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_context,
            negative_pooled_prompt_embeds=neg_pooled, latents=get_noise(3, 1, 48, 64),
            output_type="latent", control_image=image, controlnet_conditioning_scale=0.8,
            control_guidance_start=0.2, control_guidance_end=1.0, num_inference_steps=5,
            guidance_scale=3.0, height=48, width=64,
        ).images  # fmt: skip
    without = pipe.sample(
        Settings(**{**s.__dict__, "controls": (Control(strength=0.0),)}),
        conditioning=cond, control_images=[image],
    )  # fmt: skip
    err = max_rel_err(ours, theirs)
    print(f"{flavour} ControlNet pipeline: latent max rel err {err:.1e}")
    assert err < 1e-5
    assert max_rel_err(ours, without) > 1e-3  # the ControlNet did act


# --- errors -------------------------------------------------------------------------------


def test_a_controlnet_that_does_not_fit_is_one_clear_error(tmp_path):
    ref_net = diffusers_controlnet("sd3.5", seed=1)
    cn = tmp_path / "cn.safetensors"
    save_file(stability_layout(ref_net, control_type=0), str(cn))
    wide = MMDiT(MMDiTConfig(depth=2, hidden_size=192, mlp_hidden=256, pos_embed_max_size=8,
                             context_dim=256, pooled_dim=192))  # fmt: skip
    path, _ = family(wide, tmp_path)
    with pytest.raises(CheckpointError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Pipeline.from_single_file(path, controlnets=[cn], load=False)
    msg = str(e.value)
    assert "cn.safetensors" in msg and "model.safetensors" in msg and "128" in msg and "192" in msg


def test_controlnet_settings_errors(base, tmp_path):
    ref_net = diffusers_controlnet("sd3.5", seed=1)
    folder = tmp_path / "dcn"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in ref_net.state_dict().items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    path, _ = family(base, tmp_path)
    pipe = Pipeline.from_single_file(path, controlnets=[folder], load=False)
    s = Settings(prompt="", steps=2, width=32, height=32)
    with pytest.raises(ValueError, match="1 ControlNets need as many control images, got 0"):
        pipe.sample(s)
    with pytest.raises(
        ValueError, match="does not record its control type: give it with --control-type"
    ):
        pipe.sample(s, control_images=[control_image()])
    bad = Settings(prompt="", width=32, height=32, controls=(Control(start=0.8, end=0.2),))
    with pytest.raises(ValueError, match="control start and end"):
        pipe.sample(bad, control_images=[control_image()])
    with pytest.raises(CheckpointError, match="not an SD3 ControlNet"):
        open_controlnet(path)


# --- command line -------------------------------------------------------------------------


def test_cli_controlnet_run_records_and_repeats(base, tmp_path, capsys):
    from sd3.cli import main

    ref_net = diffusers_controlnet("sd3.5", seed=12)
    cn = tmp_path / "edges.safetensors"
    save_file(stability_layout(ref_net, control_type=1), str(cn))
    model, _ = family(base, tmp_path)
    photo = tmp_path / "photo.png"
    control_image(seed=4, w=64, h=64).save(photo)
    out, again = tmp_path / "out" / "1.png", tmp_path / "out" / "2.png"
    out.parent.mkdir()
    common = ["--dtype", "fp32", "--steps", "3", "--width", "32", "--height", "32"]
    argv = [
        "generate", "a cat", "--model", str(model), *common, "--controlnet", str(cn),
        "--control-image", str(photo), "--control-preprocess", "canny", "--canny-low", "50",
        "--control-strength", "0.6", "--control-start", "0.0", "--control-end", "0.7",
        "--out", str(out),
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
        with Image.open(out) as im:
            record = json.loads(im.text["sd3"])
        assert record["files"]["controlnet"][0]["name"] == "edges.safetensors"
        assert record["files"]["controlnet"][0]["sha256"]
        assert record["files"]["control_image"][0]["name"] == "photo.png"
        control = record["settings"]["controls"][0]
        assert control["strength"] == 0.6 and control["end"] == 0.7
        assert control["preprocess"] == {
            "kind": "canny", "canny_low": 50, "canny_high": 200, "blur_sigma": 5.0
        }  # fmt: skip
        assert record["settings"]["cfg"] == 3.5 and record["settings"]["sampler"] == "euler"
        # the same run again from the PNG, the files given again
        repeat = [
            "generate", "--from-png", str(out), "--model", str(model), "--controlnet", str(cn),
            "--control-image", str(photo), "--out", str(again),
        ]  # fmt: skip
        assert main(repeat) == 0
    a, b = (np.asarray(Image.open(p)) for p in (out, again))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--control-image", "IMG"], "--controlnet and --control-image come in pairs"),
        (["--controlnet", "CN"], "--controlnet and --control-image come in pairs"),
        (["--controlnet", "CN", "--control-image", "BAD"], "--control-image"),
        (
            ["--controlnet", "CN", "--control-image", "IMG", "--control-preprocess", "depth"],
            "needs a depth-estimation model on disk: pass --depth-model",
        ),
        (
            [
                "--controlnet",
                "CN",
                "--control-image",
                "IMG",
                "--control-end",
                "0.1",
                "--control-start",
                "0.5",
            ],
            "control start and end",
        ),  # fmt: skip
        (
            [
                "--controlnet",
                "CN",
                "--control-image",
                "IMG",
                "--control-strength",
                "1",
                "--control-strength",
                "2",
            ],
            "--control-strength given 2 times for 1 ControlNets",
        ),  # fmt: skip
    ],
)
def test_cli_control_errors_before_loading(base, tmp_path, capsys, extra, message):
    from sd3.cli import main

    cn = tmp_path / "cn.safetensors"
    save_file(stability_layout(diffusers_controlnet("sd3.5", seed=1), 0), str(cn))
    model, _ = family(base, tmp_path)
    img, bad = tmp_path / "c.png", tmp_path / "bad.png"
    control_image().save(img)
    bad.write_bytes(b"not an image")
    swap = {"CN": str(cn), "IMG": str(img), "BAD": str(bad)}
    argv = ["generate", "x", "--model", str(model), "--width", "32", "--height", "32"]
    argv += [swap.get(a, a) for a in extra] + ["--out", str(tmp_path / "o.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    assert not (tmp_path / "o.png").exists()


# --- preprocessors ------------------------------------------------------------------------


def test_preprocessors_are_opencvs():
    import cv2

    from sd3.preprocess import blur, canny

    image = control_image(seed=2, w=40, h=30)
    rgb = np.asarray(image)
    edges = np.asarray(canny(image, 60, 120))
    assert edges.shape == (30, 40, 3) and set(np.unique(edges)) <= {0, 255}
    assert np.array_equal(edges[..., 0], cv2.Canny(rgb, 60, 120))
    assert np.array_equal(np.asarray(blur(image, 3.0)), cv2.GaussianBlur(rgb, (0, 0), 3.0))


def test_depth_model_folder_errors(tmp_path):
    from sd3.preprocess import check_depth_model

    with pytest.raises(ValueError, match="pass --depth-model FOLDER"):
        check_depth_model(None)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a transformers model folder"):
        check_depth_model(tmp_path)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_stored_dtypes_int8_img2img_and_inpainting(base, tmp_path, stored):
    """A ControlNet stored in fp16 / bf16 / fp8 loads like the other components, --int8 quantizes
    its blocks, and it runs under img2img and inpainting."""
    from sd3.kernels.quantization import Int8Linear

    sd = stability_layout(diffusers_controlnet("sd3.5", seed=5), 2)
    sd = {k: v if k == "control_type" else v.to(stored) for k, v in sd.items()}
    cn = tmp_path / "depth.safetensors"
    save_file(sd, str(cn))
    model, _ = family(base, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_single_file(model, dtype=torch.float32, controlnets=[cn], int8=True)
    net = pipe.controlnet(0)
    assert isinstance(net.transformer_blocks[0].attn.qkv, Int8Linear)
    assert net.controlnet_blocks[0].weight.dtype == torch.float32
    init = control_image(seed=9, w=32, h=32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for kw in ({"denoise": 0.6}, {"mask_image": mask}):
        images = pipe(
            "x", num_inference_steps=3, width=32, height=32, init_image=init,
            control_images=[control_image(seed=1)], control_strength=0.5, **kw,
        )  # fmt: skip
        assert images[0].size == (32, 32)
