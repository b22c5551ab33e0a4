"""Training data: a folder of images with same-name `.txt` captions, and the latent cache.

The folder convention is kohya-ss', OneTrainer's and SimpleTuner's: `cat.png` is captioned by
`cat.txt`. Images are resized (short side to the training size) and centre-cropped square, in
[-1, 1] as the VAE expects. Since the VAE stays frozen, every image is encoded once (the posterior
mean, in the MMDiT's latent format) and training reads latents from memory; `cached_latents`
keeps them in a safetensors file so a second run skips the VAE.
"""

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from sd3.checkpoints import CheckpointError, SafetensorsFile
from sd3.models.vae import AutoEncoder

from .checkpoint import save_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Example = tuple[Tensor, str]  # image [3, H, W] in [-1, 1], caption


def check_pairs(subject: str, counts: Mapping[str, int]) -> None:
    """Paired examples (2k and 2k + 1, e.g. a shapes scene and its mirror, `TrainConfig.paired`)
    come in twos, so every count of them must be even; else ValueError("{subject} an even {names},
    got {counts}"), e.g. check_pairs("paired examples need", {"batch_size": 5})."""
    if any(n % 2 for n in counts.values()):
        names, values = " and ".join(counts), " and ".join(str(n) for n in counts.values())
        raise ValueError(f"{subject} an even {names}, got {values}")


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


def cached_latents(
    path: str | Path,
    dataset: Dataset,
    vae: AutoEncoder,
    key: Mapping[str, str] | None = None,
    batch_size: int = 8,
    progress: dict | None = None,
) -> tuple[Tensor, list[str]]:
    """The dataset's latents and captions (`encode_latents`), kept in the safetensors file `path`:
    read from it if it carries every metadata entry of `key` (what the data and the VAE were; no
    key: any readable file will do), else encoded and written atomically. `progress`: tqdm options
    of the bar shown while encoding (None: no bar)."""
    key = dict(key or {})
    try:
        cached = SafetensorsFile(path).metadata
    except CheckpointError:  # no file, or a torn one
        cached = None
    if cached is not None and all(cached.get(k) == v for k, v in key.items()):
        return load_latents(path)
    options = {"total": len(dataset), "disable": progress is None} | (progress or {})
    with tqdm(**options) as bar:
        latents, captions = encode_latents(dataset, vae, batch_size, progress=bar.update)
    save_atomic(path, {"latents": latents}, {**key, "captions": json.dumps(captions)})
    return latents, captions


def load_latents(path: str | Path) -> tuple[Tensor, list[str]]:
    """(latents, captions) of a file written by `cached_latents`."""
    file = SafetensorsFile(path)
    return file.get("latents").clone(), json.loads(file.metadata["captions"])
