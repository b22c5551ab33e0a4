"""Training the SD3 16-channel autoencoder from scratch (for small models; SD3 itself reuses a
pretrained one), and fitting its latents to the MMDiT's fixed latent format.

The loss is the KL-regularised reconstruction of the LDM autoencoder (Rombach et al. 2022) without
its perceptual and adversarial terms: L1 + MSE on pixels plus a small KL to N(0, 1).
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sd3.kernels.hardware import cpu_has_bf16
from sd3.models.vae import SCALE, AutoEncoder
from sd3.shapes.evaluation import total_cleanliness
from sd3.shapes.scenes import ShapesDataset

HELDOUT_SEED = 2**31 - 1  # the scenes reconstructions are measured on (no recipe stage draws it)


def reconstruction_loss(
    vae: AutoEncoder,
    images: Tensor,
    generator: torch.Generator,
    kl_weight: float,
    train_encoder: bool = True,
) -> Tensor:
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        mean, logvar = vae.encode_moments(images)
    noise = torch.randn(mean.shape, generator=generator)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = vae.decoder.forward_up(vae.decoder.forward_mid(z))
    loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
    if not train_encoder:  # the KL term is then a constant
        return loss
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return loss + kl_weight * kl


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def train_autoencoder(
    vae: AutoEncoder,
    dataset: Dataset,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    bf16: bool | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    train_encoder: bool = True,
) -> list[float]:
    """Train `vae` in place on (image, caption) items; returns the loss per step. `bf16`: autocast
    to bf16; by default where the CPU computes it natively (elsewhere it is emulated, slower).
    `progress`: show a bar; `on_step(step, loss)`: called after every step (a caller's display).
    `train_encoder=False` trains the decoder alone, keeping the latents a model was trained on."""
    if bf16 is None:
        bf16 = cpu_has_bf16()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
    )
    trained = vae if train_encoder else vae.decoder
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    vae.train().requires_grad_(False)
    trained.requires_grad_(True)
    if not train_encoder:
        vae.encoder.eval()
    losses = []
    batches = _forever(loader)
    with tqdm(range(steps), desc="autoencoder", unit="step", disable=not progress) as bar:
        for step in bar:
            images, _captions = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = reconstruction_loss(vae, images, generator, kl_weight, train_encoder)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step + 1, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def fit_latent_format(vae: AutoEncoder, images: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale the encoder's output and the decoder's input per channel so that the latents of
    `images` in the MMDiT format, (z − SHIFT)·SCALE, have unit standard deviation. Only a scale
    (no offset) is moved, because the decoder's zero-padded first conv absorbs a scale exactly:
    reconstructions are unchanged.

    Returns the channel means and stds of z before the change.
    """
    mean, _ = vae.encode_moments(images)
    mu = mean.mean(dim=(0, 2, 3))
    sigma = mean.std(dim=(0, 2, 3)).clamp_min(1e-6)
    a = 1 / (SCALE * sigma)  # z' = a z
    out = vae.encoder.conv_out  # 2 * z_channels outputs: mean, then logvar
    n = a.numel()
    out.weight[:n] *= a[:, None, None, None]
    out.bias[:n] *= a
    out.bias[n:] += 2 * torch.log(a)  # the posterior's std scales with its mean
    vae.decoder.conv_in.weight /= a[None, :, None, None]
    return mu, sigma


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> 0..255 (as floats), as a saved picture holds them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(reference: Tensor, images: Tensor) -> Tensor:
    """Per-picture PSNR in dB of 8-bit pictures [N, C, H, W] (0..255) against `reference`."""
    mse = (reference.double() - images.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255**2 / mse)


@dataclass(frozen=True)
class Reconstruction:
    size: int
    images: int
    psnr: float  # dB, mean over the pictures
    edge_width: float  # pixels (`evaluation.Cleanliness`); the renders' own is `render_edge_width`
    render_edge_width: float
    ghost_share: float  # of the reconstructions' pixels (renders have none)


def measure_reconstruction(vae: AutoEncoder, size: int, count: int = 256) -> Reconstruction:
    """How well `vae` reconstructs `count` held-out scenes at `size`: PSNR of the 8-bit round trip,
    and its edges and ghosts next to the renders' (`evaluation.cleanliness`)."""
    data = ShapesDataset(size, count, HELDOUT_SEED)
    images = torch.stack([data[i][0] for i in range(count)])
    with torch.no_grad():  # the posterior mean, decoded, in batches of 32
        recon = torch.cat([vae.decode(vae.encode(images[k : k + 32])) for k in range(0, count, 32)])
    reference, recon = to_uint8(images), to_uint8(recon)
    pictures = [Image.fromarray(a) for a in recon.permute(0, 2, 3, 1).to(torch.uint8).numpy()]
    clean = total_cleanliness(pictures)
    renders = total_cleanliness([data.render(i) for i in range(count)])
    return Reconstruction(
        size, count, round(psnr(reference, recon).mean().item(), 3), round(clean.edge_width, 3),
        round(renders.edge_width, 3), round(clean.ghost_share, 5),
    )  # fmt: skip
