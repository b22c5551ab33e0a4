"""Sampling: the shifted sigma schedule vs hand values and diffusers, samplers vs hand-written
steps and analytic limits, CFG / skip-layer guidance with a recording fake MMDiT, and noise."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import max_rel_err

from sd3.sampling import (
    SAMPLERS,
    SkipLayerGuidance,
    cfg_denoiser,
    flow_sigma,
    get_noise,
    get_sampler,
    get_sigmas,
    noise_latent,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)


class FakeMMDiT:
    """A deterministic velocity model with the MMDiT's call signature that records its calls:
    a fixed channel mix of x, a timestep term, a per-sample context/pooled term, and skipped
    layers scaling the output (so skip-layer passes differ from normal ones)."""

    def __init__(self, channels: int = 16):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(channels, channels, generator=g) / channels**0.5
        self.bias = torch.randn(channels, 1, 1, generator=g)
        self.calls = []

    def __call__(self, x, timestep, context, pooled, skip_layers=()):
        self.calls.append(
            {
                "batch": x.shape[0],
                "timestep": timestep,
                "context": context,
                "skip": tuple(skip_layers),
            }
        )
        t = (timestep / 1000).view(-1, 1, 1, 1)
        v = torch.einsum("oc,bchw->bohw", self.mix, x) + t * self.bias
        v = v + context.mean((1, 2)).view(-1, 1, 1, 1) + pooled.mean(1).view(-1, 1, 1, 1)
        return v * (1 + 0.1 * len(skip_layers))


def conditioning(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    context, neg_context = torch.randn(2, batch, 7, 12, generator=g)
    pooled, neg_pooled = torch.randn(2, batch, 5, generator=g)
    return context, pooled, neg_context, neg_pooled


# --- schedule ---------------------------------------------------------------------------


def test_schedule_hand_values():
    sigmas = get_sigmas(4, 3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,)
    # By hand, in float64: sigma_min = 3*0.001 / (1 + 2*0.001), timesteps evenly spaced, shifted again.
    sigma_min = 0.003 / 1.002
    ts = [1000 + k * (1000 * sigma_min - 1000) / 3 for k in range(4)]
    expected = [3 * (t / 1000) / (1 + 2 * (t / 1000)) for t in ts] + [0.0]
    err = (sigmas.double() - torch.tensor(expected)).abs().max().item()
    print(f"schedule vs hand float64: {err:.2e}")
    assert err < 1e-6
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.8577, 0.6022, 0.00893, 0.0]), atol=5e-5)
    assert flow_sigma(torch.tensor(0.5), 1.0).item() == 0.5  # shift 1 is the identity


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_equals_diffusers_default(steps, shift):
    # diffusers' set_timesteps(N) also spaces timesteps between its shifted sigma_max and sigma_min
    # and shifts again, so its default SD3 schedule is Stability's (up to float64 vs float32).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    err = (get_sigmas(steps, shift) - scheduler.sigmas).abs().max().item()
    print(f"steps {steps} shift {shift}: max abs diff vs diffusers {err:.2e}")
    assert err < 2e-7


def test_schedule_explicit_sigmas_in_diffusers():
    # diffusers shifts explicit `sigmas=` again, so ours pass through unchanged only with shift=1.
    ours = get_sigmas(10, 3.0)
    identity = FlowMatchEulerDiscreteScheduler(shift=1.0)
    identity.set_timesteps(sigmas=ours[:-1].tolist())
    assert torch.equal(identity.sigmas, ours)
    reshifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reshifted.set_timesteps(sigmas=ours[:-1].tolist())
    assert (reshifted.sigmas - ours).abs().max() > 0.05


def test_img2img_truncation_and_start_latent():
    full = get_sigmas(10, 3.0)
    assert torch.equal(get_sigmas(10, 3.0, denoise=1.0), full)
    assert torch.equal(get_sigmas(10, 3.0, denoise=0.6), full[4:])
    assert torch.equal(get_sigmas(10, 3.0, denoise=0.7), full[3:])  # int(10 * 0.3...04) == 3
    assert torch.equal(get_sigmas(3, 3.0, denoise=0.5), get_sigmas(3, 3.0)[1:])  # int(1.5) == 1

    g = torch.Generator().manual_seed(2)
    latent, noise = torch.randn(2, 2, 16, 4, 4, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    ref = scheduler.scale_noise(latent, scheduler.timesteps[4:5], noise)
    ours = noise_latent(latent, noise, full[4])
    err = max_rel_err(ours, ref)
    print(f"noise_latent vs diffusers scale_noise: {err:.2e}")
    assert err < 1e-6


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        get_sigmas(4, 0.0)
    with pytest.raises(ValueError, match="denoise"):
        get_sigmas(4, 3.0, denoise=0.0)
    with pytest.raises(ValueError, match="1.5"):
        get_sigmas(4, 3.0, denoise=1.5)


# --- noise ------------------------------------------------------------------------------


def test_get_noise_matches_reference_draw():
    noise = get_noise(42, 3, 64, 96)
    assert noise.shape == (3, 16, 8, 12) and noise.dtype == torch.float32
    for i in range(3):
        torch.manual_seed(42 + i)  # the reference draws from the default generator re-seeded
        assert torch.equal(noise[i : i + 1], torch.randn(1, 16, 8, 12))
    assert torch.equal(get_noise(43, 1, 64, 96), noise[1:2])  # independent of the batch
    with pytest.raises(ValueError, match="60x96"):
        get_noise(0, 1, 60, 96)
    with pytest.raises(ValueError, match="num_images"):
        get_noise(0, 0, 64, 64)


# --- guidance ---------------------------------------------------------------------------


def test_cfg_scale_one_skips_uncond():
    mmdit = FakeMMDiT()
    context, pooled, _, _ = conditioning(batch=2)
    x = get_noise(0, 2, 32, 32)
    sigmas = get_sigmas(5, 3.0)
    sample_euler(cfg_denoiser(mmdit, context, pooled, guidance_scale=1.0), x, sigmas)
    assert [c["batch"] for c in mmdit.calls] == [2] * 5
    assert all(torch.equal(c["context"], context) for c in mmdit.calls)
    # and the output is the plain conditional prediction
    sigma = sigmas[1]
    denoised = cfg_denoiser(mmdit, context, pooled)(x, sigma, 1)
    v = mmdit(x, torch.full((2,), 1000 * sigma.item()), context, pooled)
    assert torch.allclose(denoised, x - sigma * v, rtol=0, atol=1e-6)


def test_cfg_batches_cond_and_uncond():
    mmdit = FakeMMDiT()
    context, pooled, neg_context, neg_pooled = conditioning()
    x = get_noise(0, 1, 32, 32)
    sigma = torch.tensor(0.75)
    denoise = cfg_denoiser(mmdit, context, pooled, neg_context, neg_pooled, guidance_scale=4.5)
    denoised = denoise(x, sigma, 0)
    (call,) = mmdit.calls
    assert call["batch"] == 2 and call["skip"] == ()
    assert torch.equal(call["context"], torch.cat([context, neg_context]))  # cond first
    assert torch.equal(call["timestep"], torch.tensor([750.0, 750.0]))
    t = torch.tensor([750.0])
    cond, uncond = mmdit(x, t, context, pooled), mmdit(x, t, neg_context, neg_pooled)
    expected = x - 0.75 * (uncond + 4.5 * (cond - uncond))
    err = max_rel_err(denoised, expected)
    print(f"cfg vs separate passes: {err:.2e}")
    assert err < 1e-6


def test_cfg_one_negative_serves_a_batch_of_prompts():
    """`sd3 eval` batches prompts against one negative; each row equals its own single run."""
    mmdit = FakeMMDiT()
    context, pooled, neg_context, neg_pooled = conditioning()
    contexts, pooleds = torch.cat([context, 2 * context]), torch.cat([pooled, -pooled])
    x = get_noise(0, 2, 32, 32)
    sigma = torch.tensor(0.5)
    batched = cfg_denoiser(mmdit, contexts, pooleds, neg_context, neg_pooled, 3.0)(x, sigma, 0)
    for i in range(2):
        alone = cfg_denoiser(mmdit, contexts[i : i + 1], pooleds[i : i + 1], neg_context,
                             neg_pooled, 3.0)(x[i : i + 1], sigma, 0)  # fmt: skip
        assert max_rel_err(batched[i : i + 1], alone) < 1e-6


def test_skip_layer_guidance_window_and_formula():
    mmdit = FakeMMDiT()
    context, pooled, neg_context, neg_pooled = conditioning()
    slg = SkipLayerGuidance()  # scale 2.5, layers (7, 8, 9), window 0.01 * 20 < step < 0.2 * 20
    denoise = cfg_denoiser(mmdit, context, pooled, neg_context, neg_pooled, 4.0, slg, steps=20)
    x = get_noise(1, 1, 32, 32)
    sigma = torch.tensor(0.5)
    skipped = []
    for step in range(20):
        mmdit.calls.clear()
        denoise(x, sigma, step)
        assert mmdit.calls[0]["batch"] == 2 and mmdit.calls[0]["skip"] == ()
        if len(mmdit.calls) == 2:
            skip_call = mmdit.calls[1]  # cond only, with the layers skipped
            assert skip_call["batch"] == 1 and skip_call["skip"] == (7, 8, 9)
            assert torch.equal(skip_call["context"], context)
            skipped.append(step)
    assert skipped == [1, 2, 3]

    mmdit.calls.clear()
    out = denoise(x, sigma, 2)
    t = torch.tensor([500.0])
    cond, uncond = mmdit(x, t, context, pooled), mmdit(x, t, neg_context, neg_pooled)
    skip = mmdit(x, t, context, pooled, skip_layers=(7, 8, 9))
    v = uncond + 4.0 * (cond - uncond) + 2.5 * (cond - skip)
    err = max_rel_err(out, x - 0.5 * v)
    print(f"slg vs hand formula: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("start, end", [(0.0, 0.5), (0.25, 0.75), (0.4, 0.4)])
def test_cfg_interval_matches_diffusers_guider(start, end):
    """CFG on part of the steps vs diffusers' ClassifierFreeGuidance(start=, stop=) guider in a
    diffusers Euler loop; off the interval a step is one conditional pass, half the batch."""
    from diffusers.guiders import ClassifierFreeGuidance

    steps, scale = 10, 4.0
    mmdit = FakeMMDiT()
    context, pooled, neg_context, neg_pooled = conditioning(batch=2)
    x = get_noise(3, 2, 32, 32)
    denoise = cfg_denoiser(mmdit, context, pooled, neg_context, neg_pooled, scale, steps=steps,
                           cfg_start=start, cfg_end=end)  # fmt: skip
    ours = sample_euler(denoise, x, get_sigmas(steps, 3.0))
    batches = [c["batch"] for c in mmdit.calls]

    guider = ClassifierFreeGuidance(guidance_scale=scale, start=start, stop=end)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents, guided = x.clone(), []
    negative = neg_context.expand(2, -1, -1), neg_pooled.expand(2, -1)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        cond = mmdit(latents, t.expand(2), context, pooled)
        uncond = None
        if guider.num_conditions == 2:
            uncond = mmdit(latents, t.expand(2), *negative)
            guided.append(i)
        latents = scheduler.step(guider.forward(cond, uncond).pred, t, latents).prev_sample

    assert guided == list(range(int(start * steps), int(end * steps)))
    assert batches == [4 if i in guided else 2 for i in range(steps)]
    err = max_rel_err(ours, latents)
    print(f"CFG on steps {guided} vs diffusers' guider: {err:.2e}")
    assert err < 1e-6


def test_guidance_rejects_bad_conditioning():
    context, pooled, neg_context, neg_pooled = conditioning()
    with pytest.raises(ValueError, match="neg_context"):
        cfg_denoiser(FakeMMDiT(), context, pooled, guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"\(1, 3, 12\)"):
        cfg_denoiser(FakeMMDiT(), context, pooled, neg_context[:, :3], neg_pooled, 5.0)
    with pytest.raises(ValueError, match="steps=0"):
        cfg_denoiser(FakeMMDiT(), context, pooled, slg=SkipLayerGuidance())
    with pytest.raises(ValueError, match="CFG interval needs the sampler's step count"):
        cfg_denoiser(FakeMMDiT(), context, pooled, neg_context, neg_pooled, 5.0, cfg_end=0.5)
    with pytest.raises(ValueError, match="cfg_start <= cfg_end"):
        cfg_denoiser(FakeMMDiT(), context, pooled, neg_context, neg_pooled, 5.0, steps=4,
                     cfg_start=0.5, cfg_end=0.25)  # fmt: skip
    two = torch.cat([context, context])
    with pytest.raises(ValueError, match="batch 2 does not match latent batch 3"):
        cfg_denoiser(FakeMMDiT(), two, pooled)(torch.zeros(3, 16, 4, 4), torch.tensor(0.5), 0)


@pytest.mark.parametrize("steps", [4, 28])
def test_euler_cfg_slg_matches_diffusers_loop(steps):
    """Our loop vs the StableDiffusion3Pipeline loop (uncond-first batch, guidance on velocity,
    SLG on velocity) stepped by diffusers' FlowMatchEulerDiscreteScheduler."""
    mmdit = FakeMMDiT()
    context, pooled, neg_context, neg_pooled = conditioning(batch=2)
    x = get_noise(7, 2, 64, 64)
    scale, slg = 5.0, SkipLayerGuidance(scale=2.8, start=0.01, end=0.5)

    ours = []
    denoise = cfg_denoiser(mmdit, context, pooled, neg_context, neg_pooled, scale, slg, steps)
    out = sample_euler(
        denoise, x, get_sigmas(steps, 3.0), callback=lambda i, n, x, d: ours.append(x)
    )

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents, ref = x.clone(), []
    embeds, pooled_embeds = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
    for i, t in enumerate(scheduler.timesteps):
        noise_pred = mmdit(torch.cat([latents] * 2), t.expand(4), embeds, pooled_embeds)
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + scale * (text - uncond)
        if steps * slg.start < i < steps * slg.end:
            skip = mmdit(latents, t.expand(2), context, pooled, skip_layers=slg.layers)
            noise_pred = noise_pred + (text - skip) * slg.scale
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        ref.append(latents)

    errs = [max_rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    print(f"{steps} steps: worst per-step error vs diffusers {max(errs):.2e}")
    assert max(errs) < 1e-6
    assert torch.equal(out, ours[-1])


# --- samplers: analytic limits and hand-written steps -----------------------------------

SIGMAS = torch.tensor([1.0, 0.6, 0.25, 0.0])


def affine_denoiser(x, sigma, step):
    """denoised = (1 - sigma/2) x + sigma c: simple, nonconstant, and cheap to step by hand."""
    return (1 - sigma / 2) * x + sigma * 0.3


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_constant_denoiser_lands_on_it(name):
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    x = get_noise(0, 2, 64, 64)
    out = get_sampler(name)(lambda x, s, i: x0, x, get_sigmas(6, 3.0))
    err = max_rel_err(out, x0)
    print(f"{name}: constant denoiser end error {err:.2e}")
    assert err < 1e-6


def test_euler_hand_steps():
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    x1 = x + (0.6 - 1.0) * (x - affine_denoiser(x, 1.0, 0)) / 1.0
    x2 = x1 + (0.25 - 0.6) * (x1 - affine_denoiser(x1, 0.6, 1)) / 0.6
    x3 = affine_denoiser(x2, 0.25, 2)  # Euler to sigma 0 lands on the denoised estimate
    assert max_rel_err(sample_euler(affine_denoiser, x, SIGMAS), x3) < 1e-6


def test_heun_hand_steps():
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))

    def d(x, s):
        return (x - affine_denoiser(x, s, 0)) / s

    x_pred = x + (0.6 - 1.0) * d(x, 1.0)
    x1 = x + (0.6 - 1.0) * (d(x, 1.0) + d(x_pred, 0.6)) / 2
    x_pred = x1 + (0.25 - 0.6) * d(x1, 0.6)
    x2 = x1 + (0.25 - 0.6) * (d(x1, 0.6) + d(x_pred, 0.25)) / 2
    x3 = x2 + (0.0 - 0.25) * d(x2, 0.25)  # last step is plain Euler
    calls = []

    def counting(x, s, i):
        calls.append(i)
        return affine_denoiser(x, s, i)

    err = max_rel_err(sample_heun(counting, x, SIGMAS), x3)
    print(f"heun vs hand: {err:.2e}")
    assert err < 1e-6
    assert calls == [0, 0, 1, 1, 2]


def test_dpmpp_2m_hand_steps():
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(6))
    d0 = affine_denoiser(x, 1.0, 0)
    x1 = 0.6 * x + (1 - 0.6) * d0  # first order: e^-h = sigma_next / sigma
    d1 = affine_denoiser(x1, 0.6, 1)
    r = math.log(1 / 0.6) / math.log(0.6 / 0.25)  # h_last / h in t = -log(sigma)
    d_mix = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x2 = (0.25 / 0.6) * x1 + (1 - 0.25 / 0.6) * d_mix
    x3 = affine_denoiser(x2, 0.25, 2)
    err = max_rel_err(sample_dpmpp_2m(affine_denoiser, x, SIGMAS), x3)
    print(f"dpmpp_2m vs hand: {err:.2e}")
    assert err < 1e-6


def draws(seed, n, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_euler_ancestral_hand_steps():
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    z1, z2 = draws(11, 2, x.shape)
    expected = x
    for (s, s_next), z in zip([(1.0, 0.6), (0.6, 0.25)], [z1, z2], strict=True):
        d = affine_denoiser(expected, s, 0)
        s_down = s_next**2 / s
        expected = (s_down / s) * expected + (1 - s_down / s) * d
        renoise = math.sqrt(s_next**2 - s_down**2 * (1 - s_next) ** 2 / (1 - s_down) ** 2)
        expected = (1 - s_next) / (1 - s_down) * expected + renoise * z
    expected = affine_denoiser(expected, 0.25, 2)
    g = torch.Generator().manual_seed(11)
    err = max_rel_err(sample_euler_ancestral(affine_denoiser, x, SIGMAS, generator=g), expected)
    print(f"euler_ancestral vs hand: {err:.2e}")
    assert err < 1e-6


def test_dpmpp_2m_sde_hand_steps():
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    sigmas = torch.tensor([0.9, 0.6, 0.25, 0.0])  # start below 1 so every lambda is finite
    z1, z2 = draws(12, 2, x.shape)
    lam = [math.log((1 - s) / s) for s in (0.9, 0.6, 0.25)]
    d0 = affine_denoiser(x, 0.9, 0)
    h0 = lam[1] - lam[0]
    x1 = (0.6 / 0.9) * math.exp(-h0) * x + 0.4 * (1 - math.exp(-2 * h0)) * d0
    x1 = x1 + 0.6 * math.sqrt(1 - math.exp(-2 * h0)) * z1
    d1 = affine_denoiser(x1, 0.6, 1)
    h1 = lam[2] - lam[1]
    x2 = (0.25 / 0.6) * math.exp(-h1) * x1 + 0.75 * (1 - math.exp(-2 * h1)) * d1
    x2 = x2 + 0.5 * 0.75 * (1 - math.exp(-2 * h1)) * (h1 / h0) * (d1 - d0)  # midpoint, 1/r
    x2 = x2 + 0.25 * math.sqrt(1 - math.exp(-2 * h1)) * z2
    x3 = affine_denoiser(x2, 0.25, 2)
    g = torch.Generator().manual_seed(12)
    err = max_rel_err(sample_dpmpp_2m_sde(affine_denoiser, x, sigmas, generator=g), x3)
    print(f"dpmpp_2m_sde vs hand: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_stochastic_samplers_keep_the_flow_marginal(name):
    # With a perfect (constant) denoiser, x after each step must be (1 - s) x0 + s * N(0, 1):
    # this is what the rectified-flow forms get right and the VE ancestral step would not.
    x0 = torch.full((4, 16, 32, 32), 0.7)
    sigmas = get_sigmas(8, 3.0)
    standardized = []

    def record(i, n, x, denoised):
        s = sigmas[i + 1].item()
        if s > 0:
            standardized.append((x - (1 - s) * x0) / s)

    sampler = SAMPLERS[name]
    sampler(lambda x, s, i: x0, get_noise(0, 4, 256, 256), sigmas, callback=record)
    assert len(standardized) == 7
    worst = max(max(z.mean().abs().item(), abs(z.std().item() - 1)) for z in standardized)
    print(f"{name}: worst |mean|, |std - 1| of standardized x: {worst:.2e}")
    assert worst < 0.02


def test_callback_protocol_and_generator_determinism():
    x = get_noise(0, 1, 32, 32)
    sigmas = get_sigmas(5, 3.0)
    seen = []

    def callback(i, n, x, denoised):
        seen.append((i, n, x, denoised))

    out = sample_euler_ancestral(
        affine_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), callback=callback
    )
    assert [(i, n) for i, n, _, _ in seen] == [(i, 5) for i in range(5)]
    assert torch.equal(seen[-1][2], out) and torch.equal(seen[-1][3], out)
    again = sample_euler_ancestral(
        affine_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1)
    )
    other = sample_euler_ancestral(
        affine_denoiser, x, sigmas, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(out, again) and not torch.allclose(out, other)


def test_get_sampler():
    assert set(SAMPLERS) == {"euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"}
    assert get_sampler("heun") is sample_heun
    with pytest.raises(ValueError, match="'ddim'.*euler, heun, euler_ancestral, dpmpp_2m"):
        get_sampler("ddim")
