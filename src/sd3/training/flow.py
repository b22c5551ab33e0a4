"""The rectified-flow training objective of SD3 (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", sections 2 and 3.1).

Forward process: x_t = (1 - t) x0 + t noise, t in [0, 1] (t = sigma, the noise level). The MMDiT,
called at timestep 1000 t, regresses the velocity v = noise - x0 with a plain MSE. Which t are
trained is decided by the timestep density pi(t) alone (the paper's "loss weighting" is
equivalent to sampling t from pi); each density is written as a map of u ~ U(0, 1):

- uniform:           t = u
- logit_normal(m, s): t = sigmoid(m + s * Phi^-1(u))                 (the SD3 default, m=0, s=1)
- mode(s):           t = 1 - u - s (cos^2(pi u / 2) - 1 + u)          (heavy tails; s=0 is uniform)
- cosmap:            t = 1 - 1 / (tan(pi u / 2) + 1)                  (pi(t) = 2 / (pi - 2 pi t + 2 pi t^2))

then optionally shifted like the sampling schedule: sigma = shift t / (1 + (shift - 1) t).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sd3.sampling import flow_sigma


def uniform(u: Tensor) -> Tensor:
    return u


def logit_normal(u: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    return torch.sigmoid(mean + std * torch.special.ndtri(u))


def mode(u: Tensor, scale: float = 1.29) -> Tensor:
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def cosmap(u: Tensor) -> Tensor:
    return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)


SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")


@dataclass
class TimestepSampling:
    """Which noise levels are trained: one of SAMPLINGS, its parameters, and the shift."""

    name: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self):
        if self.name not in SAMPLINGS:
            raise ValueError(
                f"unknown timestep sampling {self.name!r}; choose one of {', '.join(SAMPLINGS)}"
            )
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        # f_mode is monotone (a valid change of variables) only for -1 <= s <= 2 / (pi - 2)
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"mode_scale must be in [-1, {2 / (math.pi - 2):.3f}], got {self.mode_scale}"
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def density_map(self) -> Callable[[Tensor], Tensor]:
        """u ~ U(0, 1) -> t distributed with this density (before the shift)."""
        if self.name == "logit_normal":
            return lambda u: logit_normal(u, self.logit_mean, self.logit_std)
        if self.name == "mode":
            return lambda u: mode(u, self.mode_scale)
        return {"uniform": uniform, "cosmap": cosmap}[self.name]

    def __call__(self, u: Tensor) -> Tensor:
        """Uniform draws u in [0, 1) -> sigmas (float32)."""
        t = self.density_map()(u.float()).clamp(0, 1)
        return flow_sigma(t, self.shift) if self.shift != 1 else t


def noisy_latent(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma [B]."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocities(
    mmdit: Callable[..., Tensor],
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    context: Tensor,
    pooled: Tensor,
) -> tuple[Tensor, Tensor]:
    """(predicted, true) velocity at x_sigma, float32: the MMDiT called at timestep 1000 sigma,
    and v = noise - x0."""
    predicted = mmdit(noisy_latent(x0, noise, sigma), 1000 * sigma, context, pooled)
    return predicted.float(), (noise - x0).float()


def flow_loss(
    mmdit: Callable[..., Tensor],
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    context: Tensor,
    pooled: Tensor,
) -> Tensor:
    """The rectified-flow loss: mean squared error between the predicted and true velocity."""
    return F.mse_loss(*velocities(mmdit, x0, noise, sigma, context, pooled))


@torch.no_grad()
def validation_loss(
    mmdit: Callable[..., Tensor],
    x0: Tensor,
    context: Tensor,
    pooled: Tensor,
    levels: int = 8,
    seed: int = 0,
    batch_size: int = 32,
) -> list[float]:
    """The flow loss of held-out latents at `levels` fixed noise levels sigma = (k + 1/2) / levels,
    with fixed noise: a measure every model is scored on alike, whatever density trained it. Their
    mean estimates the loss under uniform t (the SD3 paper compares validation losses so)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    losses = []
    for k in range(levels):
        total = 0.0
        for i in range(0, len(x0), batch_size):
            rows = slice(i, i + batch_size)
            sigma = torch.full((len(x0[rows]),), (k + 0.5) / levels, device=x0.device)
            loss = flow_loss(mmdit, x0[rows], noise[rows], sigma, context[rows], pooled[rows])
            total += loss.item() * len(x0[rows])
        losses.append(total / len(x0))
    return losses
