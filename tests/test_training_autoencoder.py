"""Autoencoder training for small models, and fitting its latents to the MMDiT latent format."""

import torch
from helpers import max_rel_err, tiny_models

from sd3.models.vae import from_latent_format
from sd3.shapes.autoencoder import fit_latent_format, train_autoencoder
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
