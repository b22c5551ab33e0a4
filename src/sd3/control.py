"""ControlNet runs: how each ControlNet is applied (`Control`), the checks that a ControlNet fits
the base model, and the control image turned into the control latent as the references do.

The control image is resized to the output size (Lanczos, stretched, as Stability's reference and
diffusers), scaled for the VAE encoder and encoded to its posterior mean (deterministic; the
references sample the posterior). Scaling: Stability's SD3.5 canny ControlNet reads x*255*0.5 + 0.5
(x in [0, 1]; the reference's quirk, which the model card's diffusers snippet copies), every other
one 2x - 1. The latent is then shifted and scaled like any latent, except for the InstantX
ControlNets, which diffusers encodes without the shift.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoints import CheckpointError, Component, infer_config
from .models.controlnet import CONTROL_TYPES, INSTANTX, SD35, ControlNetConfig
from .models.mmdit import MMDiTConfig
from .models.vae import SCALE, SHIFT, AutoEncoder
from .preprocess import Preprocess

TYPES = tuple(CONTROL_TYPES.values())  # blur, canny, depth


@dataclass
class Control:
    """How one ControlNet is applied: its outputs times `strength`, on the steps i of n with
    start <= i/n and (i+1)/n <= end (diffusers' `control_guidance_start/end`); `control_type`
    says how its image is scaled (None: the file's own, or 2x - 1 where the file has none)."""

    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_type: str | None = None
    preprocess: Preprocess = Preprocess()  # how the control image was made from the given one

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def check(self, index: int) -> None:
        which = f"ControlNet {index + 1}"
        if not math.isfinite(self.strength):
            raise ValueError(
                f"{which}: control strength must be a finite number, got {self.strength}"
            )
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(
                f"{which}: control start and end need 0 <= start < end <= 1, got {self.start}, {self.end}"
            )
        if self.control_type is not None and self.control_type not in TYPES:
            raise ValueError(
                f"{which}: unknown control type {self.control_type!r}; choose one of {', '.join(TYPES)}"
            )
        self.preprocess.check()


def check_fit(component: Component, base: MMDiTConfig, model_name: str = "") -> ControlNetConfig:
    """The ControlNet's configuration, or one CheckpointError naming both files when its outputs
    cannot be added to this base model."""
    config = infer_config(component)
    where = f"ControlNet {component.where()}"
    model = model_name or "the model"

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where} does not fit {model}: {what}")

    if config.hidden_size != base.hidden_size:
        raise refuse(
            f"the ControlNet's width is {config.hidden_size}, the MMDiT's {base.hidden_size} "
            f"(e.g. an SD3.5 Large ControlNet needs SD3.5 Large, width 2432)"
        )
    if config.patch_size != base.patch_size or config.control_channels != base.in_channels:
        raise refuse(
            f"it patches {config.control_channels}-channel latents by {config.patch_size}, the "
            f"MMDiT {base.in_channels}-channel ones by {base.patch_size}"
        )
    if config.kind == SD35:
        if config.pooled_dim != base.pooled_dim:
            raise refuse(f"its pooled width is {config.pooled_dim}, the MMDiT's {base.pooled_dim}")
        n, depth = config.depth, base.depth
        if depth // n == 0 or (depth - 1) // (depth // n) >= n:
            raise refuse(
                f"its {n} outputs cannot serve the MMDiT's {depth} blocks by Stability's rule "
                f"(block i takes output i // (depth // outputs))"
            )
    elif config.context_dim != base.context_dim:
        raise refuse(f"its text width is {config.context_dim}, the MMDiT's {base.context_dim}")
    elif config.depth > base.depth:
        raise refuse(f"it has {config.depth} blocks, more than the MMDiT's {base.depth}")
    return config


def resolve_type(component: Component, config: ControlNetConfig, control: Control) -> str | None:
    """The control type this run uses: the one asked for, else the file's. An SD3.5 ControlNet
    whose file records none must be told (its canny kind scales its image differently)."""
    if control.control_type is not None:
        return control.control_type
    if component.control_type is None and config.kind == SD35:
        raise ValueError(
            f"ControlNet {component.where()} does not record its control type: give it with "
            f"--control-type {{{','.join(TYPES)}}} (Python: control_type=)"
        )
    return component.control_type


def control_pixels(
    image: Image.Image, width: int, height: int, control_type: str | None, kind: str
) -> Tensor:
    """The control image as the VAE encoder reads it: [1, 3, height, width]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if kind == SD35 and control_type == "canny":
        return x * 255 * 0.5 + 0.5
    return 2 * x - 1


def control_latent(vae: AutoEncoder, pixels: Tensor, kind: str) -> Tensor:
    """The encoded control image: the posterior mean, shifted (not for InstantX) and scaled."""
    with torch.no_grad():
        mean, _ = vae.encode_moments(pixels)
    shift = 0.0 if kind == INSTANTX else SHIFT
    return ((mean.float() - shift) * SCALE).float()
