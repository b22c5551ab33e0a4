"""SD3 / SD3.5 sampling: the rectified-flow sigma schedule with shift, noise, CFG and skip-layer
guidance, and k-diffusion style samplers.

Rectified flow (SD3 paper, Esser et al. 2024): x_sigma = (1 - sigma) * x0 + sigma * noise, and the
MMDiT, called at timestep 1000 * sigma, predicts the velocity v = noise - x0. Samplers see it as a
denoiser, denoised = x - sigma * v, so dx/dsigma = (x - denoised) / sigma is exactly the flow ODE and
k-diffusion's samplers apply unchanged. Schedule and guidance follow Stability's SD3.5 reference
(sd3_infer.py / sd3_impls.py); the ancestral and SDE samplers follow ComfyUI's flow (CONST) forms.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, int], Tensor]  # (x, sigma 0-dim or [B], step) -> denoised
Callback = Callable[[int, int, Tensor, Tensor], None]  # (step, total, x after the step, denoised)
Sampler = Callable[..., Tensor]  # (model, x, sigmas, *, generator, callback) -> x at the last sigma
Generators = torch.Generator | Sequence[torch.Generator] | None  # a sequence: one per image


# --- schedule and noise ------------------------------------------------------------------


def flow_sigma(t: Tensor, shift: float) -> Tensor:
    """Shifted sigma for t in [0, 1] (the SD3 paper's timestep shift): shift > 1 spends more of
    the steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas(steps: int, shift: float, denoise: float = 1.0) -> Tensor:
    """float32 sigmas from 1 down to 0, `steps` + 1 long (fewer for img2img with `denoise` < 1).

    Steps are spaced evenly in timestep between the model's discrete sigma_max and sigma_min, then
    shifted once more, as Stability's reference (and diffusers' FlowMatchEulerDiscreteScheduler) do.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    # The model's discrete table is sigma(k / 1000), k = 1..1000; float32 throughout, as the reference.
    sigma_max = flow_sigma(torch.tensor(1.0), shift)
    sigma_min = flow_sigma(torch.tensor(1 / 1000.0), shift)
    timesteps = torch.linspace(1000 * sigma_max, 1000 * sigma_min, steps)
    sigmas = torch.cat([flow_sigma(timesteps / 1000.0, shift), torch.zeros(1)])
    return sigmas[int(steps * (1 - denoise)) :]


def noise_latent(latent: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The img2img start point: the clean latent moved along the flow to `sigma`."""
    return sigma * noise + (1 - sigma) * latent


def get_noise(seed: int | Sequence[int], num_images: int, height: int, width: int) -> Tensor:
    """Initial latent noise [num_images, 16, height/8, width/8], image i drawn on CPU from its own
    seed, seed + i (or seed[i] for a list of one seed per image), so an image does not depend on
    the batch it was made in."""
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    seeds = [seed + i for i in range(num_images)] if isinstance(seed, int) else list(seed)
    if len(seeds) != num_images:
        raise ValueError(f"{len(seeds)} seeds for {num_images} images")
    return torch.cat(
        [
            torch.randn(
                (1, 16, height // 8, width // 8),
                generator=torch.Generator("cpu").manual_seed(k),
                dtype=torch.float32,
            )
            for k in seeds
        ]
    )


# --- guidance ----------------------------------------------------------------------------


@dataclass
class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5): push away from the prediction made without `layers`, on steps
    start * steps < step < end * steps."""

    scale: float = 2.5
    layers: Sequence[int] = (7, 8, 9)
    start: float = 0.01
    end: float = 0.20


def cfg_denoiser(
    mmdit: Callable[..., Tensor],
    context: Tensor,
    pooled: Tensor,
    neg_context: Tensor | None = None,
    neg_pooled: Tensor | None = None,
    guidance_scale: float = 1.0,
    slg: SkipLayerGuidance | None = None,
    steps: int = 0,
    cfg_start: float = 0.0,
    cfg_end: float = 1.0,
) -> Denoiser:
    """Wrap the MMDiT as a denoiser with classifier-free guidance (Ho & Salimans 2022) and optional
    skip-layer guidance; `steps` is the sampler's step count, needed for the SLG window.

    CFG applies on steps int(cfg_start * steps) <= step < int(cfg_end * steps), as diffusers'
    `ClassifierFreeGuidance(start=, stop=)`; other steps run the conditional pass alone, at half
    the cost (a "CFG cutoff": guidance matters most while the layout forms, at high noise)."""
    if guidance_scale != 1:
        if neg_context is None or neg_pooled is None:
            raise ValueError(
                f"guidance_scale {guidance_scale} != 1 needs neg_context and neg_pooled"
            )
        if neg_context.shape[1:] != context.shape[1:] or neg_pooled.shape[1:] != pooled.shape[1:]:
            raise ValueError(
                f"negative conditioning {tuple(neg_context.shape)}, {tuple(neg_pooled.shape)} must "
                f"match the positive {tuple(context.shape)}, {tuple(pooled.shape)}"
            )
    if slg is not None and steps < 1:
        raise ValueError(f"skip-layer guidance needs the sampler's step count, got steps={steps}")
    if not 0 <= cfg_start <= cfg_end <= 1:
        raise ValueError(f"CFG needs 0 <= cfg_start <= cfg_end <= 1, got {cfg_start}, {cfg_end}")
    interval = (cfg_start, cfg_end) != (0.0, 1.0)
    if interval and steps < 1:
        raise ValueError(f"a CFG interval needs the sampler's step count, got steps={steps}")
    first, stop = (int(cfg_start * steps), int(cfg_end * steps)) if interval else (0, math.inf)

    def batch(c: Tensor, b: int) -> Tensor:
        if c.shape[0] not in (1, b):
            raise ValueError(f"conditioning batch {c.shape[0]} does not match latent batch {b}")
        return c.expand(b, *c.shape[1:])

    def denoise(x: Tensor, sigma: Tensor, step: int) -> Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        timestep = (1000 * sigma).expand(b)
        c, p = batch(context, b), batch(pooled, b)
        if guidance_scale == 1 or not first <= step < stop:
            v = cond = mmdit(x, timestep, c, p)
        else:  # cond and uncond as one batch, as the reference does
            nc, np_ = batch(neg_context, b), batch(neg_pooled, b)
            both = mmdit(
                torch.cat([x, x]), timestep.repeat(2), torch.cat([c, nc]), torch.cat([p, np_])
            )
            cond, uncond = both.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        if slg is not None and slg.scale != 0 and slg.start * steps < step < slg.end * steps:
            v = v + slg.scale * (cond - mmdit(x, timestep, c, p, skip_layers=slg.layers))
        return x - sigma.reshape(-1, 1, 1, 1) * v

    return denoise


# --- samplers ----------------------------------------------------------------------------


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Noise like x; from one generator per row where given a sequence, so that image i of a
    batch draws what it draws alone."""
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([_randn_like(row[None], g) for row, g in zip(x, generator, strict=True)])
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x)


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps on the flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        d = (x - denoised) / sigma
        x = x + (sigma_next - sigma) * d
        if callback is not None:
            callback(i, len(sigmas) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2); Euler for the step to sigma 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        d = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - model(x_euler, sigma_next, i)) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        if callback is not None:
            callback(i, len(sigmas) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler ancestral (eta = 1) in the rectified-flow form of ComfyUI's sample_euler_ancestral_RF:
    step deterministically down to sigma_down = sigma_next^2 / sigma, then rescale and add noise so
    that x is again (1 - sigma_next) * x0 + sigma_next * noise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down = sigma_next**2 / sigma
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
            x = (alpha_next / alpha_down) * x + renoise * _randn_like(x, generator)
        if callback is not None:
            callback(i, len(sigmas) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form, t = -log(sigma); the first step and
    the step to sigma 0 are first order."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised  # the t -> inf limit of the update below
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t + sigmas[i - 1].log()) / h  # h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        if callback is not None:
            callback(i, len(sigmas) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint form, eta = 1 (Lu et al. 2022), in half-log-SNR
    lambda = log(alpha / sigma) with alpha = 1 - sigma, as ComfyUI does for flow models.
    At sigma = 1, lambda = -inf and the step is x = alpha_next * denoised + sigma_next * noise."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next = ((1 - sigma) / sigma).log(), ((1 - sigma_next) / sigma_next).log()
            h = lam_next - lam
            alpha_next = 1 - sigma_next
            x = (sigma_next / sigma) * (-h).exp() * x - alpha_next * (-2 * h).expm1() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * alpha_next * (-2 * h).expm1() / r * (denoised - old_denoised)
            x = x + sigma_next * (-(-2 * h).expm1()).sqrt() * _randn_like(x, generator)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, len(sigmas) - 1, x, denoised)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}


def get_sampler(name: str) -> Sampler:
    """The sampler function called `name` (a key of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
