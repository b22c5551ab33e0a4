"""Inpainting and outpainting: the masked blend against diffusers' SD3 inpaint pipeline, the
soft-mask schedule and the paste-back derived by hand, crop and outpaint canvases, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3InpaintPipeline
from helpers import diffusers_mmdit, diffusers_vae, max_rel_err, save_single_file, tiny_models
from PIL import Image, ImageDraw

from sd3.cli import main
from sd3.inpainting import (
    OUTPAINT_OVERLAP,
    Inpaint,
    free_at,
    grow_and_feather,
    masked_denoiser,
    outpaint_size,
)
from sd3.pipeline import Pipeline, Settings, to_image_tensor
from sd3.sampling import get_sigmas


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


@pytest.fixture(scope="module")
def model_file(models, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", models)


@pytest.fixture(scope="module")
def pipe(model_file):
    return Pipeline.from_single_file(model_file, dtype=torch.float32)


def random_image(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(
        (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    )


def box_mask(width, height, box):
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_hard_mask_matches_diffusers_inpaint_pipeline(pipe, models, denoise):
    """Latents before decoding, fp32, Euler, CFG: the kept region follows the init latent noised
    with the run's own noise at every step, and is the clean init latent after the last."""
    init, mask = random_image(64, 48), box_mask(64, 48, (16, 8, 47, 31))  # on the 8-px grid
    s = Settings(
        prompt="a red circle", steps=8, cfg=2.5, sampler="euler", shift=3.0, seed=5, width=64,
        height=48, denoise=denoise, inpaint=Inpaint(paste_back=False),
    )  # fmt: skip
    ours, _ = pipe.generate(s, init, mask_image=mask)

    ref = StableDiffusion3InpaintPipeline(
        transformer=diffusers_mmdit(models["mmdit"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae(models["vae"]),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    # diffusers samples the VAE posterior; hand it the posterior mean (our deterministic encode)
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = ref.vae.encode(pixels).latent_dist.mean
        context, pooled, neg_context, neg_pooled = pipe.encode_prompt(s)
        theirs = ref(
            image=(mean - 0.0609) * 1.5305, mask_image=mask, strength=denoise,
            masked_image_latents=(mean - 0.0609) * 1.5305,  # unused by 16-channel models
            prompt_embeds=context, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=neg_context, negative_pooled_prompt_embeds=neg_pooled,
            num_inference_steps=8, guidance_scale=2.5, height=48, width=64,
            generator=torch.Generator().manual_seed(5), output_type="latent",
        ).images  # fmt: skip
    err = max_rel_err(ours, theirs)
    print(f"inpaint, denoise {denoise}: latent max rel err vs diffusers {err:.2e}")
    assert err < 1e-5
    with torch.no_grad():  # our own encode: the held region is exactly it
        latent = pipe.vae.encode(to_image_tensor(init, 64, 48))
    kept = torch.ones(1, 1, 6, 8, dtype=torch.bool)
    kept[..., 1:4, 2:6] = False
    assert torch.equal(ours[kept.expand_as(ours)], latent[kept.expand_as(latent)])


def test_soft_mask_schedule_holds_each_pixel_until_1_minus_m():
    """A pixel with mask m joins at the first step whose progress p = (sigma_0 - sigma_i) /
    (sigma_0 - sigma_last) is at least 1 - m; black never, white from the first step."""
    sigmas = get_sigmas(10, 3.0)
    values = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    mask = torch.tensor(values).view(1, 1, 1, -1)
    first, last = float(sigmas[0]), float(sigmas[-2])
    for step in range(10):
        progress = (first - float(sigmas[step])) / (first - last)
        expected = [m > 0 and progress >= 1 - m - 1e-9 for m in values]
        assert free_at(mask, sigmas, step).flatten().bool().tolist() == expected, step
    # through the denoiser: while held, the model sees exactly the init latent noised to sigma
    latent, noise = torch.randn(1, 16, 1, 7), torch.randn(1, 16, 1, 7)
    seen = []

    def model(x, sigma, step):
        seen.append((x.clone(), sigma))
        return torch.zeros_like(x)

    denoise = masked_denoiser(model, latent, noise, mask, sigmas)
    x = torch.randn(1, 16, 1, 7)
    for step in range(10):
        out = denoise(x, sigmas[step], step)
        free = free_at(mask, sigmas, step).expand_as(x).bool()
        held = sigmas[step] * noise + (1 - sigmas[step]) * latent
        assert torch.equal(seen[-1][0][~free], held[~free])
        assert torch.equal(seen[-1][0][free], x[free])
        assert torch.equal(out[~free], latent[~free]) and (out[free] == 0).all()


def test_grow_and_feather_follow_their_definitions():
    mask = torch.zeros(1, 1, 21, 21)
    mask[..., 10, 10] = 1
    grown = grow_and_feather(mask, grow=3, blur=0)
    assert grown[0, 0].nonzero().tolist() == [[r, c] for r in range(7, 14) for c in range(7, 14)]
    blurred = grow_and_feather(mask, grow=0, blur=1.0)
    radius = int(2.5 * 1.0 + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / 2)
    k = k / k.sum()
    expected = torch.zeros(21, 21)
    expected[10 - radius : 11 + radius, 10 - radius : 11 + radius] = k[:, None] * k[None]
    assert torch.allclose(blurred[0, 0], expected, atol=1e-7)


def test_paste_back_keeps_every_pixel_outside_the_grown_feathered_mask(pipe, tmp_path):
    init = random_image(64, 64, seed=1)
    mask = box_mask(64, 64, (24, 24, 39, 39))
    s = Settings(
        prompt="a blue square", steps=4, cfg=2.0, seed=2, width=64, height=64,
        inpaint=Inpaint(mask_blur=2.0, mask_grow=2),
    )  # fmt: skip
    _, (out,) = pipe.generate(s, init, mask_image=mask)
    a, b = np.asarray(init), np.asarray(out)
    reach = 2 + int(2.5 * 2.0 + 0.5)  # grow, then the blur's radius
    outside = np.ones((64, 64), dtype=bool)
    outside[24 - reach : 40 + reach, 24 - reach : 40 + reach] = False
    assert np.array_equal(a[outside], b[outside])  # exactly the input's bytes
    assert np.abs(a[26:38, 26:38].astype(int) - b[26:38, 26:38]).mean() > 10  # repainted
    plain = Settings(
        **{**s.__dict__, "inpaint": Inpaint(mask_blur=2.0, mask_grow=2, paste_back=False)}
    )
    _, (unpasted,) = pipe.generate(plain, init, mask_image=mask)
    assert not np.array_equal(a[outside], np.asarray(unpasted)[outside])  # the VAE round trip


def test_crop_inpaints_a_box_at_working_size_and_returns_the_whole_image(pipe):
    init = random_image(160, 96, seed=2)
    mask = box_mask(160, 96, (100, 40, 115, 55))
    s = Settings(prompt="x", steps=3, cfg=1.0, seed=3, width=32, height=32, inpaint=Inpaint(crop=4))
    _, (out,) = pipe.generate(s, init, mask_image=mask)
    assert out.size == (160, 96)
    a, b = np.asarray(init), np.asarray(out)
    m = np.asarray(mask) > 0
    assert np.array_equal(a[~m], b[~m]) and not np.array_equal(a[m], b[m])


def test_outpaint_grows_the_canvas_and_keeps_the_old_image(pipe):
    init = random_image(40, 48, seed=4)
    assert outpaint_size(init.size, (10, 0, 0, 0)) == (64, 48)  # 50 wide, rounded to 64
    s = Settings(
        prompt="x", steps=3, cfg=1.0, seed=3, width=64, height=48,
        inpaint=Inpaint(outpaint=(10, 0, 0, 0)),
    )  # fmt: skip
    _, (out,) = pipe.generate(s, init, mask_image=None)
    assert out.size == (64, 48)
    b = np.asarray(out)
    o = OUTPAINT_OVERLAP
    # the old image sits at x = 10..49; its columns past the overlap and before the grown right
    # edge's overlap are the input's bytes
    assert np.array_equal(b[:, 10 + o : 50 - o], np.asarray(init)[:, o : 40 - o])


def test_masked_generation_from_the_cli_and_again_from_its_png(model_file, tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    random_image(32, 32).save(init)
    box_mask(32, 32, (8, 8, 23, 23)).save(mask)
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    base = ["generate", "x", "--model", str(model_file), "--steps", "3", "--width", "32"]
    base += ["--height", "32", "--dtype", "fp32", "--init-image", str(init)]
    assert main([*base, "--mask", str(mask), "--mask-blur", "1", "--out", str(out)]) == 0
    with Image.open(out) as image:
        stored = json.loads(image.text["sd3"])
    assert stored["settings"]["denoise"] == 1.0  # a mask's default strength
    assert stored["settings"]["inpaint"]["mask_blur"] == 1.0
    assert stored["files"]["mask"]["name"] == "mask.png"
    shutil.copy(model_file, tmp_path / model_file.name)
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()


def test_bad_masks_and_settings_are_one_error_each(model_file, tmp_path, capsys):
    init, black, notimage = tmp_path / "i.png", tmp_path / "black.png", tmp_path / "m.txt"
    random_image(32, 32).save(init)
    Image.new("L", (32, 32), 0).save(black)
    notimage.write_text("not an image")
    base = ["generate", "x", "--model", str(model_file), "--steps", "2", "--width", "32"]
    base += ["--height", "32", "--dtype", "fp32"]
    cases = [
        (["--mask", str(black)], "inpainting and outpainting need an init image"),
        (["--init-image", str(init), "--mask", str(black)], "the mask is empty"),
        (["--init-image", str(init), "--mask", str(notimage)], f"--mask {notimage}: cannot read"),
        (["--init-image", str(init), "--mask-blur", "2"], "--mask-blur apply to inpainting"),
        (["--init-image", str(init), "--outpaint", "1,2"], "must be four whole numbers"),
        (
            ["--init-image", str(init), "--outpaint", "8,0,0,0", "--mask", str(black)],
            "give either a mask or outpaint",
        ),
        (["--init-image", str(init), "--outpaint", "16,0,0,0"], "leave out --width and --height"),
        (["--init-image", str(init), "--mask", str(init), "--mask-grow", "-1"], "mask grow"),
    ]
    for extra, message in cases:
        out = tmp_path / "out.png"
        rc = main([*base, *extra, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not out.exists()


@pytest.mark.parametrize(
    "sampler", ["euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]
)
def test_every_sampler_holds_the_unmasked_latent_and_repaints_the_rest(pipe, sampler):
    init, mask = random_image(32, 32, seed=6), box_mask(32, 32, (8, 8, 23, 23))
    s = Settings(
        prompt="x", steps=4, cfg=2.0, sampler=sampler, seed=9, width=32, height=32, num_images=2,
        inpaint=Inpaint(paste_back=False),
    )  # fmt: skip
    latents, images = pipe.generate(s, init, mask_image=mask)
    with torch.no_grad():
        latent = pipe.vae.encode(to_image_tensor(init, 32, 32))
    kept = torch.ones(4, 4, dtype=torch.bool)
    kept[1:3, 1:3] = False
    for i in range(2):
        assert torch.equal(latents[i][:, kept], latent[0][:, kept])
        assert not torch.equal(latents[i][:, ~kept], latent[0][:, ~kept])
    assert not torch.equal(latents[0], latents[1])  # image i of a batch: seed + i
    alone = Settings(**{**s.__dict__, "seed": 10, "num_images": 1})
    assert max_rel_err(pipe.generate(alone, init, mask_image=mask)[0][0], latents[1]) < 1e-5
