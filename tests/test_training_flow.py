"""The rectified-flow objective: timestep densities against their closed forms (SD3 paper,
section 3.1), the loss against a hand computation, and the text-encoder dropout."""

import math

import numpy as np
import pytest
import torch
from helpers import max_rel_err, tiny_models

from sd3.text import TextEncoders
from sd3.training.conditioning import TextCache, encode_text, t5_length_for
from sd3.training.flow import TimestepSampling, flow_loss, validation_loss

N = 200_000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of `samples` and `cdf`."""
    x = np.sort(samples.double().numpy())
    f = cdf(x)
    n = len(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def draw(sampling: TimestepSampling, seed: int = 0) -> torch.Tensor:
    return sampling(torch.rand(N, generator=torch.Generator().manual_seed(seed)))


def normal_cdf(z):
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def logit_normal_cdf(mean, std):
    return lambda t: normal_cdf((np.log(t / (1 - t)) - mean) / std)


def mode_cdf(scale):
    """1 - f^-1(t) with f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), inverted by bisection."""

    def f(u):
        return 1 - u - scale * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)

    def cdf(t):
        lo, hi = np.zeros_like(t), np.ones_like(t)
        for _ in range(60):  # f is decreasing: f(lo) >= t >= f(hi)
            mid = (lo + hi) / 2
            above = f(mid) > t
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    return cdf


def cosmap_cdf(t):
    """The integral of the paper's pi_CosMap(t) = 2 / (pi - 2 pi t + 2 pi t^2)."""
    return 2 / np.pi * np.arctan(t / (1 - t))


# KS critical value at alpha = 0.001 for n = 200k is 1.95 / sqrt(n) = 0.0044
KS_LIMIT = 0.0044

CASES = {
    "uniform": (TimestepSampling("uniform"), lambda t: t),
    "logit_normal": (TimestepSampling("logit_normal"), logit_normal_cdf(0.0, 1.0)),
    "logit_normal(0.5,0.6)": (
        TimestepSampling("logit_normal", logit_mean=0.5, logit_std=0.6),
        logit_normal_cdf(0.5, 0.6),
    ),
    "mode(1.29)": (TimestepSampling("mode", mode_scale=1.29), mode_cdf(1.29)),
    "mode(-0.5)": (TimestepSampling("mode", mode_scale=-0.5), mode_cdf(-0.5)),
    "cosmap": (TimestepSampling("cosmap"), cosmap_cdf),
    "uniform, shift 3": (TimestepSampling("uniform", shift=3.0), lambda s: s / (3 - 2 * s)),
    "logit_normal, shift 3": (
        TimestepSampling("logit_normal", shift=3.0),
        lambda s: logit_normal_cdf(0.0, 1.0)(s / (3 - 2 * s)),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_timestep_density_matches_closed_form(name):
    sampling, cdf = CASES[name]
    sigmas = draw(sampling)
    assert sigmas.dtype == torch.float32 and 0 <= sigmas.min() and sigmas.max() <= 1
    d = ks_statistic(sigmas.clamp(1e-9, 1 - 1e-9), cdf)
    # every sampling is a monotone map of the same u, so with the right CDF the distance is
    # that of the u themselves to U(0, 1): equal up to float32 rounding
    d_uniform = ks_statistic(torch.rand(N, generator=torch.Generator().manual_seed(0)), lambda u: u)
    print(f"{name}: KS distance {d:.6f} (of the uniform draws: {d_uniform:.6f})")
    assert d < KS_LIMIT
    assert abs(d - d_uniform) < 2e-5


def test_ks_check_has_power():
    """The KS check tells close densities apart: logit-normal(0, 1) vs (0.1, 1), mode 1.29 vs 1.0."""
    d1 = ks_statistic(draw(TimestepSampling("logit_normal")), logit_normal_cdf(0.1, 1.0))
    d2 = ks_statistic(draw(TimestepSampling("mode", mode_scale=1.29)), mode_cdf(1.0))
    print(f"wrong-density KS distances {d1:.4f} {d2:.4f}")
    assert d1 > 5 * KS_LIMIT and d2 > 5 * KS_LIMIT


def test_mode_density_peaks_in_the_middle_and_cosmap_matches_paper_density():
    # pi_mode(t) = 1 / |f'(f^-1(t))|; with s > 0 the middle is denser than the ends
    hist = torch.histc(draw(TimestepSampling("mode", mode_scale=1.29)), bins=10, min=0, max=1) / N
    assert hist[4] > 1.5 * hist[0] and hist[5] > 1.5 * hist[9]
    # cosmap's histogram against the paper's density integrated over each bin
    hist = torch.histc(draw(TimestepSampling("cosmap")), bins=10, min=0, max=1).double() / N
    edges = np.linspace(0, 1, 11)
    expected = np.diff(cosmap_cdf(np.clip(edges, 0, 1 - 1e-12)))
    assert np.max(np.abs(hist.numpy() - expected)) < 0.003


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "lognorm"}, "unknown timestep sampling 'lognorm'"),
        ({"shift": 0.0}, "shift must be > 0"),
        ({"name": "mode", "mode_scale": 2.0}, "mode_scale must be in"),
        ({"logit_std": -1.0}, "logit_std must be > 0"),
    ],
)
def test_bad_sampling_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepSampling(**kwargs)


def test_flow_loss_by_hand():
    """x0 = (1, 2), noise = (3, -1), sigma = 1/4: x_t = (1.5, 1.25), target v = (2, -3);
    a prediction of (1, 1) costs ((1 - 2)^2 + (1 + 3)^2) / 2 = 8.5."""
    seen = {}

    def model(x, timestep, context, pooled):
        seen.update(x=x, timestep=timestep, context=context, pooled=pooled)
        return torch.ones_like(x)

    x0 = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    noise = torch.tensor([3.0, -1.0]).reshape(1, 1, 1, 2)
    context, pooled = torch.zeros(1, 3, 4), torch.zeros(1, 5)
    loss = flow_loss(model, x0, noise, torch.tensor([0.25]), context, pooled)
    assert loss.item() == 8.5
    assert seen["x"].flatten().tolist() == [1.5, 1.25]
    assert seen["timestep"].tolist() == [250.0]
    assert seen["context"] is context and seen["pooled"] is pooled
    # per-sample sigma in a batch of two: sigma = 0 regresses noise - x0 at x0 itself
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    loss = flow_loss(lambda x, *_: x, x0, noise, sigma, context, pooled)
    expected = ((x0[0] - (noise[0] - x0[0])) ** 2).sum() + (
        (noise[1] - (noise[1] - x0[1])) ** 2
    ).sum()
    assert torch.allclose(loss, expected / x0.numel(), rtol=1e-6)


def test_validation_loss_by_hand():
    """A model predicting x itself: at sigma, x_t - (noise - x0) = (2 - sigma) x0 - (1 - sigma) noise,
    so the loss at each level is a closed form of the fixed noise draw; batching changes nothing."""
    x0 = torch.randn(5, 16, 4, 4)
    context, pooled = torch.zeros(5, 3, 4), torch.zeros(5, 6)
    losses = validation_loss(lambda x, *_: x, x0, context, pooled, levels=4, seed=3, batch_size=2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    for k, loss in enumerate(losses):
        sigma = (k + 0.5) / 4
        expected = (((2 - sigma) * x0 - (1 - sigma) * noise) ** 2).mean().item()
        assert loss == pytest.approx(expected, rel=1e-5)


# --- text-encoder dropout ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    m = tiny_models()
    return TextEncoders(m["clip_l"], m["clip_g"], m["t5xxl"])


PROMPTS = ["a red circle", "two blue squares above a green triangle", "", "a cat"]


def test_encode_text_equals_text_encoders(encoders):
    context, pooled = encoders.encode(PROMPTS)
    ours_c, ours_p = encode_text(encoders, PROMPTS, t5_length_for(encoders, PROMPTS))
    errs = max_rel_err(ours_c, context), max_rel_err(ours_p, pooled)
    print(f"encode_text vs TextEncoders.encode: max rel err {max(errs):.2e}")
    assert max(errs) < 1e-5


@pytest.mark.parametrize("clip_length", [77, 10])
def test_dropped_encoder_sees_the_empty_prompt(encoders, clip_length, monkeypatch):
    """The cache's dropout equals encoding with "" for the dropped encoders, and dropping all three
    gives encode(""), the CFG negative the sampler uses; encode("") is not zeros. Also for a model
    that reads fewer CLIP positions (the bundled one)."""
    monkeypatch.setattr(encoders, "clip_length", clip_length)
    n = clip_length
    cache = TextCache(encoders, PROMPTS, batch_size=2)
    keep = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    rows = cache.rows(PROMPTS)
    context, pooled = cache.get(rows, keep)
    ref_c, ref_p = encode_text(encoders, PROMPTS, cache.t5_length, keep)
    err = max(max_rel_err(context, ref_c), max_rel_err(pooled, ref_p))
    print(f"cached vs direct dropout: max rel err {err:.2e}")
    assert err < 1e-5
    empty_c, empty_p = encoders.encode([""])
    assert torch.allclose(context[3], empty_c[0], atol=1e-5)
    assert torch.allclose(pooled[3], empty_p[0], atol=1e-5)
    assert empty_c.abs().amax() > 0.1 and empty_p.abs().amax() > 0.1
    # kept encoders are untouched: sample 0 keeps CLIP-L's and T5's parts of its own caption
    own_c, own_p = encoders.encode(PROMPTS[:1])
    wl = encoders.clip_l.config.width
    assert context.shape[1] == n + cache.t5_length
    assert torch.allclose(context[0, :n, :wl], own_c[0, :n, :wl], atol=1e-5)
    assert torch.allclose(context[0, n:], own_c[0, n:], atol=1e-5)
    assert torch.allclose(pooled[0, :wl], own_p[0, :wl], atol=1e-5)
    assert not torch.allclose(pooled[0, wl:], own_p[0, wl:], atol=1e-3)
