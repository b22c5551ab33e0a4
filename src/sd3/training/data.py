"""Training data: a folder of images with same-name `.txt` captions, and the latent cache.

The folder convention is kohya-ss', OneTrainer's and SimpleTuner's: `cat.png` is captioned by
`cat.txt`. Images are resized (short side to the training size) and centre-cropped square, in
[-1, 1] as the VAE expects. Since the VAE stays frozen, every image is encoded once (the posterior
mean, in the MMDiT's latent format) and training reads latents from memory; `encode_latents` can
keep them in a safetensors file so a second run skips the VAE.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sd3.models.vae import AutoEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Example = tuple[Tensor, str]  # image [3, H, W] in [-1, 1], caption


def load_image(path: str | Path, size: int) -> Tensor:
    """RGB image -> [3, size, size] in [-1, 1]: short side resized to `size`, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1


class ImageCaptionFolder(Dataset):
    """Images under `folder` (recursively), each captioned by the `.txt` file of the same name."""

    def __init__(self, folder: str | Path, size: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"data folder {folder} does not exist or is not a folder")
        if size < 8 or size % 16:
            raise ValueError(f"training size must be a positive multiple of 16, got {size}")
        self.size = size
        self.images = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.images:
            raise ValueError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p for p in self.images if not p.with_suffix(".txt").is_file()]
        if missing:
            names = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
            raise ValueError(
                f"{len(missing)} of {len(self.images)} images in {folder} have no caption file "
                f"(same name, .txt), e.g. {names}"
            )
        self.captions = [
            p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in self.images
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Example:
        return load_image(self.images[i], self.size), self.captions[i]

    def fingerprint(self) -> str:
        """Changes when any image, caption or the size changes (for the latent cache)."""
        h = hashlib.sha256(str(self.size).encode())
        for p in self.images:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(json.dumps(self.captions).encode())
        return h.hexdigest()


@torch.no_grad()
def encode_latents(
    dataset: Dataset,
    vae: AutoEncoder,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, list[str]]:
    """VAE posterior means (MMDiT latent format, float32, CPU) and captions of the examples."""
    indices = range(len(dataset)) if indices is None else indices
    device = next(vae.parameters()).device
    latents, captions = [], []
    for start in range(0, len(indices), batch_size):
        examples = [dataset[i] for i in indices[start : start + batch_size]]
        images = torch.stack([image for image, _ in examples]).to(device)
        latents.append(vae.encode(images).float().cpu())
        captions.extend(caption for _, caption in examples)
        if progress is not None:
            progress(len(examples))
    return torch.cat(latents), captions
