"""The whole generation path against diffusers' SD3 pipelines on the same weights and inputs."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from helpers import diffusers_mmdit, diffusers_vae, max_rel_err, save_single_file, tiny_models
from PIL import Image

from sd3.pipeline import Pipeline, Settings, to_pil
from sd3.sampling import SkipLayerGuidance, get_noise


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3)


@pytest.fixture(scope="module")
def pipe(models, tmp_path_factory):
    path = save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", models)
    return Pipeline.from_single_file(path, dtype=torch.float32)


def reference(models, cls=StableDiffusion3Pipeline):
    return cls(
        transformer=diffusers_mmdit(models["mmdit"]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae(models["vae"]),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def conditioning(pipe, prompt="a red circle above a blue square", negative=""):
    return pipe.encode_prompt(Settings(prompt=prompt, negative_prompt=negative))


def run_reference(ref, cond, latents, **kw):
    context, pooled, neg_context, neg_pooled = cond
    with torch.no_grad():
        return ref(
            prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_context,
            negative_pooled_prompt_embeds=neg_pooled, latents=latents, output_type="latent", **kw,
        ).images  # fmt: skip


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_euler_txt2img_matches_diffusers(pipe, models, cfg):
    s = Settings(
        prompt="", steps=6, cfg=cfg, sampler="euler", shift=3.0, seed=7, width=64, height=48
    )
    cond = conditioning(pipe)
    ours = pipe.sample(s, conditioning=cond)
    theirs = run_reference(
        reference(models), cond, get_noise(7, 1, 48, 64), num_inference_steps=6,
        guidance_scale=cfg, height=48, width=64,
    )  # fmt: skip
    err = max_rel_err(ours, theirs)
    print(f"euler cfg {cfg}: latent max rel err {err:.2e}")
    assert err < 1e-5
    # and the decoded images agree with diffusers' VAE decode
    ref_image = diffusers_vae(models["vae"]).decode(theirs / 1.5305 + 0.0609).sample
    ours_image = np.asarray(pipe.decode(ours)[0], dtype=np.int16)
    assert np.abs(ours_image - np.asarray(to_pil(ref_image)[0], dtype=np.int16)).max() <= 1


def test_skip_layer_guidance_matches_diffusers(pipe, models):
    slg = SkipLayerGuidance(scale=2.8, layers=(1,), start=0.01, end=0.3)
    s = Settings(
        prompt="", steps=10, cfg=3.0, sampler="euler", seed=1, width=48, height=48, slg=slg
    )
    cond = conditioning(pipe)
    ours = pipe.sample(s, conditioning=cond)
    theirs = run_reference(
        reference(models), cond, get_noise(1, 1, 48, 48), num_inference_steps=10, guidance_scale=3.0,
        height=48, width=48, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.3,
    )  # fmt: skip
    without = pipe.sample(Settings(**{**s.__dict__, "slg": None}), conditioning=cond)
    assert max_rel_err(ours, theirs) < 1e-5
    assert max_rel_err(ours, without) > 1e-3  # the guidance did act


def test_img2img_matches_diffusers(pipe, models):
    g = torch.Generator().manual_seed(0)
    init = Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    s = Settings(
        prompt="", steps=10, cfg=2.0, sampler="euler", seed=5, width=64, height=48, denoise=0.5
    )
    cond = conditioning(pipe)
    ours = pipe.sample(s, init_image=init, conditioning=cond)

    # diffusers samples the VAE posterior; hand it the posterior mean (our deterministic encode)
    # in latent format, computed by its own VAE, so its generator draws only the noise.
    ref = reference(models, StableDiffusion3Img2ImgPipeline)
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = ref.vae.encode(pixels).latent_dist.mean
    theirs = run_reference(
        ref, cond, None, image=(mean - 0.0609) * 1.5305, strength=0.5, num_inference_steps=10,
        guidance_scale=2.0, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    err = max_rel_err(ours, theirs)
    print(f"img2img: latent max rel err {err:.2e}")
    assert err < 1e-5


def test_call_returns_images_and_uses_preset(pipe):
    assert pipe.preset.name.startswith("custom MMDiT")
    calls = []
    images = pipe(
        "a red circle", num_inference_steps=3, width=32, height=32, num_images=2, seed=3,
        callback=lambda step, total, x, den: calls.append((step, total)),
    )  # fmt: skip
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    assert calls == [(0, 3), (1, 3), (2, 3), (0, 3), (1, 3), (2, 3)] or calls == [
        (0, 3),
        (1, 3),
        (2, 3),
    ]
    # image i of a batch is the image made alone with seed + i
    alone = pipe("a red circle", num_inference_steps=3, width=32, height=32, seed=4)
    assert np.array_equal(np.asarray(alone[0]), np.asarray(images[1]))


def test_a_batch_with_one_seed_per_image_draws_each_image_as_made_alone(pipe):
    # one row per prompt, a seed per image: each row is the image its prompt and seed make alone
    # (the same noise, bit for bit; latents within float rounding, as the CPU kernels' sums are
    # grouped by batch size; the same 8-bit pixels but for a rounding step of one level)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [11, 2**62, 5]
    assert torch.equal(get_noise(seeds, 3, 32, 32)[1:2], get_noise(2**62, 1, 32, 32))
    s = Settings(prompt="", steps=3, width=32, height=32, sampler="euler_ancestral", cfg=3.0)
    context, pooled = pipe.text_encoders(True, None).encode([*prompts, ""])
    cond = (context[:-1], pooled[:-1], context[-1:], pooled[-1:])
    batch = pipe.sample(dataclasses.replace(s, num_images=3), conditioning=cond, seeds=seeds)
    images = pipe.decode(batch)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = pipe.sample(dataclasses.replace(s, prompt=prompt, seed=seed))
        assert max_rel_err(batch[i : i + 1], alone) < 1e-5, (prompt, seed)
        a, b = (np.asarray(x, dtype=np.int16) for x in (images[i], pipe.decode(alone)[0]))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, (prompt, seed)
    assert not torch.allclose(batch[0], batch[2], atol=0.1)  # same prompt, other seed
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        pipe.sample(dataclasses.replace(s, num_images=3), conditioning=cond, seeds=seeds[:2])
    with pytest.raises(ValueError, match="out of range"):
        pipe.sample(dataclasses.replace(s, num_images=3), conditioning=cond, seeds=[1, 2, -1])


def test_low_memory_loads_encoders_first_releases_them_and_draws_the_same(models, tmp_path):
    path = save_single_file(tmp_path / "m.safetensors", models)
    eager = Pipeline.from_single_file(path, dtype=torch.float32, low_memory=False)
    lean = Pipeline.from_single_file(path, dtype=torch.float32, low_memory=True)
    assert set(eager._modules) == {"mmdit", "vae"} and not lean._modules  # nothing read yet
    loads, load = [], lean.module
    lean.module = lambda name: (
        (loads.append(name) if name not in lean._modules else None) or load(name)
    )
    kw = dict(num_inference_steps=2, width=32, height=48, seed=5)
    images = lean("a red circle above a blue square", **kw)
    assert loads == ["clip_l", "clip_g", "t5xxl", "mmdit", "vae"]
    assert set(lean._modules) == {"vae"} and lean._text is None  # encoders and MMDiT dropped
    expected = eager("a red circle above a blue square", **kw)
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))
    lean("a blue square", **kw)  # everything but the VAE comes back for the next prompt
    assert loads[5:] == ["clip_l", "clip_g", "t5xxl", "mmdit"]


def test_generate_times_each_stage_and_counts_steps_after_encoding(pipe, monkeypatch):
    import time

    # A clock that advances 1 s per reading: each stage's time is the number of readings it spans.
    ticks = iter(range(1000))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    calls = []
    s = pipe.settings("a red circle", steps=4, width=32, height=32)
    latents, images = pipe.generate(s, callback=lambda step, total, x, den: calls.append(step))
    assert calls == [0, 1, 2, 3] and latents.shape == (1, 16, 4, 4) and len(images) == 1
    t = pipe.timings
    assert t["text"] == 1.0 and t["decode"] == 1.0  # stages read the clock once each
    assert t["denoise"] == 1.0 and t["per_step"] == 0.25
    from sd3.pipeline import describe_timings

    assert describe_timings(t) == (
        "text encoders 1.0s, denoising 1.0s (0.25s per step), decode 1.0s"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"width": 1000}, "width 1000 must be a positive multiple of 16: try 992 or 1008"),
        ({"height": 40}, "height 40 must be a positive multiple of 16: try 32 or 48"),
        ({"width": 512}, "width 512 is larger than this model allows \\(256\\)"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"cfg": float("nan")}, "cfg \\(guidance scale\\) must be a finite number"),
        ({"cfg": float("inf")}, "cfg \\(guidance scale\\) must be a finite number"),
        ({"sampler": "ddim"}, "unknown sampler 'ddim'; choose one of euler"),
        ({"denoise": 0.0}, "denoise must be in \\(0, 1\\]"),
        ({"denoise": 1.5}, "denoise must be in \\(0, 1\\]"),
        ({"denoise": 0.5}, "denoise 0.5 needs an init image"),
        ({"slg": SkipLayerGuidance(layers=(7,))}, "layers \\[7\\] do not exist"),
        ({"cfg_start": 0.6, "cfg_end": 0.5}, "0 <= cfg_start <= cfg_end <= 1, got 0.6, 0.5"),
        ({"cfg_end": 1.5}, "0 <= cfg_start <= cfg_end <= 1, got 0.0, 1.5"),
    ],
)
def test_bad_settings_raise_one_clear_error(pipe, overrides, message):
    s = Settings(**{"prompt": "x", "width": 32, "height": 32, "steps": 2, **overrides})
    with pytest.raises(ValueError, match=message):
        pipe.sample(s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mmdit_draws_what_the_eager_one_draws_and_times_its_compile(
    models, pipe, tmp_path, dtype
):
    """Against the fp32 eager pipeline. fp32: the same ops, compiled. bf16 on the CPU: eager runs
    sd3's kernels, compiled the plain ops they replace (torch.compile cannot trace the kernels), so
    both are held to bf16's own distance from fp32."""
    path = save_single_file(tmp_path / "tiny.safetensors", models)
    compiled = Pipeline.from_single_file(path, dtype=dtype, compile=True)
    assert isinstance(compiled.mmdit, torch._dynamo.eval_frame.OptimizedModule)
    s = compiled.settings("a red circle above a blue square", steps=3, width=32, height=32)
    latents, _ = compiled.generate(s)
    reference, _ = pipe.generate(s)
    err = max_rel_err(latents, reference)
    if dtype == torch.float32:
        print(f"compiled vs eager fp32 latents: max rel err {err:.1e}")
        assert err < 1e-4
    else:
        eager, _ = Pipeline.from_single_file(path, dtype=dtype).generate(s)
        eager_err = max_rel_err(eager, reference)
        print(f"bf16 vs fp32 latents, max rel err: compiled {err:.1e}, eager {eager_err:.1e}")
        assert err < 1.5 * eager_err < 0.1
    t = compiled.timings  # compiling takes seconds; a step of this tiny model milliseconds
    assert t["compile"] > t["per_step"] > 0
    from sd3.pipeline import describe_timings

    assert f"after {t['compile']:.1f}s compiling" in describe_timings(t)


def test_an_unknown_compile_mode_is_one_error_naming_it(models, tmp_path):
    path = save_single_file(tmp_path / "tiny.safetensors", models)
    with pytest.raises(ValueError, match="compile must be True, False or one of .*'fast'"):
        Pipeline.from_single_file(path, compile="fast")


def test_sampling_keeps_freed_memory_across_steps_and_gives_it_back_after(pipe):
    """Every step's MMDiT forward runs inside the sampling loop's `reuse_freed_memory` (depth 2:
    the loop's and the forward's own), and the setting is restored when sampling ends."""
    from sd3.kernels import allocator

    if allocator._libc() is None:
        pytest.skip("not glibc")
    seen = []
    hook = pipe.mmdit.joint_blocks[0].register_forward_hook(
        lambda *_: seen.append(allocator._depth)
    )
    try:
        pipe("a red circle", num_inference_steps=2, width=32, height=32, seed=3)
    finally:
        hook.remove()
    assert seen and set(seen) == {2}  # 2 steps, CFG in one batch or two
    assert allocator._depth == 0
