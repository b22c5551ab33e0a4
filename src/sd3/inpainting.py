"""Inpainting and outpainting: repaint where a mask is white, keep every other pixel.

The standard masked blend for flow models (diffusers' SD3 inpaint pipeline, ComfyUI's noise
mask): at each model call the latent outside the mask is replaced by the init latent noised to
that call's sigma with the same noise the run started from, the prediction there is replaced by
the init latent, and after the last step the held region is the init latent itself. Any sampler
works unchanged, since it only sees a denoiser.

Grey mask values are per-pixel strengths (ComfyUI's differential diffusion): a latent pixel with
mask value m is held to the init latent until the schedule has come 1 - m of its way, so white
repaints from the first step, mid-grey for the second half, black never. A 0/1 mask is the plain
hard-mask blend. After decoding, the pixels are pasted back from the input through the (grown,
feathered) mask, so pixels where the mask is 0 equal the input exactly.

Masked-region crop (`crop`) inpaints a box around the mask at the full working resolution and
pastes it back into the full image; outpainting pads the canvas, fills the new area and inpaints
it with a mask that overlaps the old border.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .sampling import Denoiser, noise_latent

OUTPAINT_FILLS = ("edge-noise", "edge", "grey", "noise")
OUTPAINT_OVERLAP = 8  # pixels of the old image the outpainting mask also repaints, for a seam
LATENT_SCALE = 8


@dataclass(frozen=True)
class Inpaint:
    """How a masked generation treats its mask (the mask image itself is an input file)."""

    mask_blur: float = 0.0  # Gaussian feather of the mask, sigma in pixels (A1111's mask blur)
    mask_grow: int = 0  # pixels the mask is dilated by before the blur
    paste_back: bool = True  # unmasked pixels come from the input, not through the VAE
    crop: int | None = None  # inpaint only a box around the mask, grown by this many pixels
    outpaint: tuple[int, int, int, int] | None = None  # pixels added left, top, right, bottom
    outpaint_fill: str = "edge-noise"

    def check(self, has_mask: bool) -> None:
        """One ValueError naming the setting, for each impossible combination."""
        if not (math.isfinite(self.mask_blur) and self.mask_blur >= 0):
            raise ValueError(f"mask blur must be a finite number >= 0, got {self.mask_blur}")
        if self.mask_grow < 0:
            raise ValueError(f"mask grow must be >= 0 pixels, got {self.mask_grow}")
        if self.crop is not None and self.crop < 0:
            raise ValueError(f"inpaint crop padding must be >= 0 pixels, got {self.crop}")
        if self.outpaint_fill not in OUTPAINT_FILLS:
            raise ValueError(
                f"unknown outpaint fill {self.outpaint_fill!r}; choose one of {OUTPAINT_FILLS}"
            )
        if self.outpaint is not None:
            if (
                len(self.outpaint) != 4
                or any(p < 0 for p in self.outpaint)
                or not any(self.outpaint)
            ):
                raise ValueError(
                    f"outpaint takes LEFT,TOP,RIGHT,BOTTOM pixels >= 0, not all 0; got {self.outpaint}"
                )
            if has_mask:
                raise ValueError("outpaint makes its own mask: give either a mask or outpaint")
            if self.crop is not None:
                raise ValueError("outpaint works on the whole canvas: it takes no inpaint crop")
        elif not has_mask:
            raise ValueError("inpainting needs a mask image (white = repaint)")


# --- the mask ----------------------------------------------------------------------------------


def mask_tensor(mask: Image.Image, size: tuple[int, int]) -> Tensor:
    """The mask image as [1, 1, H, W] in [0, 1] (white = 1 = repaint) at `size` (W, H)."""
    grey = mask.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]


def grow_and_feather(mask: Tensor, grow: int, blur: float) -> Tensor:
    """Dilate by `grow` pixels (a square), then a Gaussian blur of sigma `blur` pixels (kernel
    2 * int(2.5 sigma + 0.5) + 1, as A1111), both in place of the edges, values kept in [0, 1]."""
    if grow > 0:
        mask = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)
    if blur > 0:
        radius = int(2.5 * blur + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * blur**2))
        kernel = kernel / kernel.sum()
        padded = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
        mask = F.conv2d(padded, kernel.view(1, 1, 1, -1))
        mask = F.conv2d(mask, kernel.view(1, 1, -1, 1))
    return mask.clamp(0, 1)


def latent_mask(mask: Tensor) -> Tensor:
    """The pixel mask at latent resolution: each latent pixel the mean of its 8 x 8 block."""
    return F.avg_pool2d(mask, LATENT_SCALE)


def free_at(mask: Tensor, sigmas: Tensor, step: int) -> Tensor:
    """Where the model repaints at `step` (1) and where the init latent is held (0): a pixel with
    mask value m > 0 is free once the schedule's progress (sigma from the first to the last one
    the model sees) reaches 1 - m."""
    first, last = float(sigmas[0]), float(sigmas[-2])
    threshold = 0.0 if first == last else (float(sigmas[step]) - last) / (first - last)
    return ((mask >= threshold) & (mask > 0)).to(mask.dtype)


def masked_denoiser(
    denoiser: Denoiser, latent: Tensor, noise: Tensor, mask: Tensor, sigmas: Tensor
) -> Denoiser:
    """`denoiser` that repaints only where `free_at` says: elsewhere the model sees the init
    latent noised to its sigma with the run's own noise, and its prediction is the init latent."""

    def denoise(x: Tensor, sigma: Tensor, step: int) -> Tensor:
        free = free_at(mask, sigmas, step)
        held = noise_latent(latent, noise, torch.as_tensor(sigma).reshape(-1, 1, 1, 1))
        denoised = denoiser(x * free + held * (1 - free), sigma, step)
        return denoised * free + latent * (1 - free)

    return denoise


def hold(x: Tensor, latent: Tensor, mask: Tensor, sigmas: Tensor) -> Tensor:
    """The final latent: the sampler's where the last step repainted, the init latent elsewhere."""
    free = free_at(mask, sigmas, len(sigmas) - 2)
    return x * free + latent * (1 - free)


# --- the canvas --------------------------------------------------------------------------------


def paste_back(result: Image.Image, original: Image.Image, mask: Tensor) -> Image.Image:
    """`result` where the pixel mask is 1, `original` where it is 0, blended in between; pixels
    with mask 0 are the original's bytes exactly."""
    a = np.asarray(original.convert("RGB"), dtype=np.float32)
    b = np.asarray(result.convert("RGB"), dtype=np.float32)
    m = mask[0, 0].numpy()[..., None]
    blended = np.clip(np.rint(a * (1 - m) + b * m), 0, 255).astype(np.uint8)
    blended = np.where(m == 0, np.asarray(original.convert("RGB")), blended)
    return Image.fromarray(blended, "RGB")


def crop_box(mask: Tensor, pad: int, aspect: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the mask's non-zero bounding box grown by `pad` pixels, then
    widened to `aspect` (width / height) and shifted or clipped to stay inside the image (as
    diffusers' `padding_mask_crop`)."""
    H, W = mask.shape[-2:]
    rows = torch.nonzero(mask[0, 0].amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask[0, 0].amax(dim=0) > 0).flatten()
    top, bottom = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, H)
    left, right = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, W)
    w, h = right - left, bottom - top
    if w / h < aspect:
        w = min(round(h * aspect), W)
    else:
        h = min(round(w / aspect), H)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(cx - w / 2), 0), W - w))
    top = int(min(max(round(cy - h / 2), 0), H - h))
    return left, top, left + w, top + h


def outpaint_pads(size: tuple[int, int], pads: tuple[int, int, int, int]) -> tuple[int, ...]:
    """The pads grown so the canvas is a multiple of 16 each way (the extra goes right and down)."""
    left, top, right, bottom = pads
    width, height = size[0] + left + right, size[1] + top + bottom
    return left, top, right + (-width) % 16, bottom + (-height) % 16


def outpaint_size(size: tuple[int, int], pads: tuple[int, int, int, int]) -> tuple[int, int]:
    """The outpainted canvas's (width, height)."""
    left, top, right, bottom = outpaint_pads(size, pads)
    return size[0] + left + right, size[1] + top + bottom


def outpaint_canvas(
    image: Image.Image, pads: tuple[int, int, int, int], fill: str, seed: int
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image padded by (left, top, right, bottom) pixels, the new area filled
    (edge pixels extended, plus seeded noise for "edge-noise"; mid grey; or noise), and a mask that
    is white over the new area and OUTPAINT_OVERLAP pixels into the old one."""
    left, top, right, bottom = pads
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    width = ((top, bottom), (left, right), (0, 0))
    new = np.pad(np.zeros(a.shape[:2], dtype=bool), width[:2], constant_values=True)
    if fill == "grey":
        canvas = np.pad(a, width, constant_values=127.5)
    else:
        canvas = np.pad(a, width, mode="edge")
    if fill in ("edge-noise", "noise"):
        rng = np.random.default_rng(seed)
        noise = rng.normal(0, 1, canvas.shape).astype(np.float32)
        if fill == "noise":
            canvas = np.where(new[..., None], 127.5 + 64 * noise, canvas)
        else:
            canvas = np.where(new[..., None], canvas + 32 * noise, canvas)
    canvas = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    # kept: the old image less OUTPAINT_OVERLAP pixels along each side that grew
    H, W = new.shape
    o = OUTPAINT_OVERLAP
    kept = np.zeros_like(new)
    rows = slice(top + o if top else 0, H - bottom - o if bottom else H)
    cols = slice(left + o if left else 0, W - right - o if right else W)
    kept[rows, cols] = True
    return canvas, Image.fromarray(np.where(kept, 0, 255).astype(np.uint8), "L")


# --- one masked generation ---------------------------------------------------------------------


@dataclass
class MaskedJob:
    """A masked generation prepared: what the sampler works on and how its images are finished."""

    image: Image.Image  # the init image at the working size
    mask: Tensor  # [1, 1, H/8, W/8]: the latent mask the sampler holds to
    finish: Callable[[Image.Image], Image.Image]  # decoded image -> the output image


def prepare(
    init: Image.Image,
    mask_image: Image.Image | None,
    size: tuple[int, int],
    inpaint: Inpaint,
    seed: int,
) -> MaskedJob:
    """The working image, the latent mask and the finishing step for `inpaint` at `size` (W, H)."""
    if inpaint.outpaint is not None:
        pads = outpaint_pads(init.size, inpaint.outpaint)
        init, mask_image = outpaint_canvas(init, pads, inpaint.outpaint_fill, seed)
    full = grow_and_feather(
        mask_tensor(mask_image, init.size), inpaint.mask_grow, inpaint.mask_blur
    )
    if not bool((full > 0).any()):
        raise ValueError("the mask is empty (all black): there is nothing to repaint")
    if inpaint.crop is None:
        work = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
        pixel = (
            full
            if init.size == size
            else grow_and_feather(
                mask_tensor(mask_image, size), inpaint.mask_grow, inpaint.mask_blur
            )
        )

        def finish(decoded: Image.Image) -> Image.Image:
            return paste_back(decoded, work, pixel) if inpaint.paste_back else decoded

        return MaskedJob(work, latent_mask(pixel), finish)
    box = crop_box(full, inpaint.crop, size[0] / size[1])
    work = init.crop(box).resize(size, Image.Resampling.LANCZOS)
    pixel = F.interpolate(
        full[..., box[1] : box[3], box[0] : box[2]],
        size=size[::-1],
        mode="bilinear",
        align_corners=False,
    )

    def finish_crop(decoded: Image.Image) -> Image.Image:
        patch = decoded.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
        whole = init.convert("RGB").copy()
        whole.paste(patch, box[:2])
        return paste_back(whole, init, full) if inpaint.paste_back else whole

    return MaskedJob(work, latent_mask(pixel.clamp(0, 1)), finish_crop)
