"""Step previews: a linear map from the 16 latent channels to RGB, fitted once to the VAE.

Decoding every step would cost as much as the final decode; a per-pixel linear map costs 16
multiply-adds a latent pixel. The map is fitted by least squares when the server starts: a few
synthetic images (smooth random colour fields with sharp-edged rectangles) are encoded by the
VAE, the latents decoded again, and the decoded images averaged over each 8x8 block are the
targets of `rgb = W @ latent + b` at the latent's resolution. Fitting to the decoder's output
(rather than to the images) maps what the VAE would show; encoding real-looking images keeps
the latents in the region the sampler's predictions live in. See docs/serve.md.
"""

import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

FIT_IMAGES = 8
FIT_SIZE = 128
MIN_PREVIEW_SIDE = 128  # previews are scaled up (by a whole factor) to at least this long side


@dataclass
class PreviewMap:
    weight: Tensor  # [3, 16]
    bias: Tensor  # [3]

    def rgb(self, latent: Tensor) -> Tensor:
        """[16, h, w] MMDiT-format latent -> [3, h, w] in [-1, 1]."""
        x = latent.float().flatten(1)  # [16, h*w]
        return (self.weight @ x + self.bias[:, None]).reshape(3, *latent.shape[1:]).clamp(-1, 1)

    def png(self, latent: Tensor) -> bytes:
        """The preview of one latent as PNG bytes."""
        rgb = ((self.rgb(latent.cpu()) + 1) * 127.5).round().to(torch.uint8)
        image = Image.fromarray(rgb.permute(1, 2, 0).numpy())
        factor = -(-MIN_PREVIEW_SIDE // max(image.size))
        if factor > 1:
            image = image.resize(
                (image.width * factor, image.height * factor), Image.Resampling.BILINEAR
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()


def synthetic_images(n: int = FIT_IMAGES, size: int = FIT_SIZE, seed: int = 0) -> Tensor:
    """[n, 3, size, size] in [-1, 1]: smooth random colour fields with a few flat rectangles."""
    g = torch.Generator().manual_seed(seed)
    fields = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    for i in range(n):
        for _ in range(4):
            x0, y0 = (torch.randint(0, size * 3 // 4, (2,), generator=g)).tolist()
            w, h = (torch.randint(size // 8, size // 2, (2,), generator=g)).tolist()
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
            images[i, :, y0 : y0 + h, x0 : x0 + w] = colour
    return images


def fit(vae, device: torch.device, dtype: torch.dtype) -> PreviewMap:
    """The least-squares map from the VAE's latents to its decoded images' 8x8 block means."""
    images = synthetic_images()
    with torch.no_grad():
        latents = vae.encode(images.to(device, dtype)).float()
        decoded = vae.decode(latents.to(device, dtype)).float().clamp(-1, 1)
    targets = F.avg_pool2d(decoded.cpu(), kernel_size=images.shape[-1] // latents.shape[-1])
    x = latents.cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [N, 16]
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # [17, 3]
    return PreviewMap(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())
