"""Autoencoder training for small models, and fitting its latents to the MMDiT latent format."""

import math

import torch
from helpers import max_rel_err, tiny_models

from sd3.models.vae import from_latent_format
from sd3.shapes.autoencoder import (
    HELDOUT_SEED,
    fit_latent_format,
    measure_reconstruction,
    psnr,
    to_uint8,
    train_autoencoder,
)
from sd3.shapes.scenes import ShapesDataset


def test_fit_latent_format_keeps_reconstructions_and_unit_std():
    vae = tiny_models(seed=5)["vae"]
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(images))
        mu, sigma = fit_latent_format(vae, images)
        latent = vae.encode(images)
        after = vae.decode(latent)
    assert max_rel_err(after, before) < 1e-5
    std = from_latent_format(latent).std(dim=(0, 2, 3)) * 1.5305
    torch.testing.assert_close(std, torch.ones(16), atol=1e-4, rtol=0)
    assert sigma.shape == mu.shape == (16,)


def test_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    vae = tiny_models(seed=6)["vae"]
    data = ShapesDataset(size=32, length=64, seed=0)
    images = torch.stack([data[i][0] for i in range(8)])

    def error():
        with torch.no_grad():
            return (vae.decode(vae.encode(images)) - images).abs().mean().item()

    start = error()
    losses = train_autoencoder(vae, data, steps=30, batch_size=8, lr=2e-3, bf16=False)
    assert len(losses) == 30
    assert error() < 0.5 * start, (start, error())


def test_psnr_of_a_known_error():
    reference = torch.full((2, 3, 8, 8), 100.0)
    images = reference.clone()
    images[0] += 5  # every pixel off by 5: 20 log10(255 / 5)
    images[1, :, :4] += 10  # half the pixels off by 10: mse 50
    torch.testing.assert_close(
        psnr(reference, images),
        torch.tensor([20 * math.log10(255 / 5), 10 * math.log10(255**2 / 50)], dtype=torch.float64),
    )
    torch.testing.assert_close(to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0])),
                               torch.tensor([0.0, 0.0, 128.0, 255.0, 255.0]))  # fmt: skip


def test_measure_reconstruction_reads_the_round_trip():
    vae = tiny_models(seed=7)["vae"]
    got = measure_reconstruction(vae, size=32, count=6)
    data = ShapesDataset(32, 6, HELDOUT_SEED)
    images = torch.stack([data[i][0] for i in range(6)])
    with torch.no_grad():  # the public round trip: the posterior mean, in the MMDiT's format
        recon = vae.decode(vae.encode(images))
    expected = psnr(to_uint8(images), to_uint8(recon)).mean().item()
    assert got.size == 32 and got.images == 6
    assert abs(got.psnr - expected) < 1e-3 and got.psnr < 20  # an untrained autoencoder
    assert 0.4 < got.render_edge_width < 1 and 0 <= got.ghost_share <= 1
