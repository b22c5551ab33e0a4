"""Training data: a folder of images with same-name `.txt` captions, and the latent cache.

The folder convention is kohya-ss', OneTrainer's and SimpleTuner's: `cat.png` is captioned by
`cat.txt`. Images are resized (short side to the training size) and centre-cropped square, in
[-1, 1] as the VAE expects. Since the VAE stays frozen, every image is encoded once (the posterior
mean, in the MMDiT's latent format) and training reads latents from memory; `cached_latents`
keeps them in a safetensors file so a second run skips the VAE.
"""

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from sd3.checkpoints import CheckpointError, SafetensorsFile
from sd3.models.vae import AutoEncoder
from sd3.pipeline import load_image as read_image

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


def load_image(path: str | Path, size: int, option: str = "image") -> Tensor:
    """RGB image -> [3, size, size] in [-1, 1]: short side resized to `size`, centre crop. Read
    by `sd3.pipeline.load_image` (size limit before decoding, 16-bit images scaled), so a file
    that is not a readable image is one ValueError naming `option` and the file."""
    im = read_image(path, option)
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1


class ImageCaptionFolder(Dataset):
    """Images under `folder` (recursively), each captioned by the `.txt` file of the same name.

    Construction only lists the files and reads the captions; `check_images` decodes every image
    once, so that a broken one is found before any heavy work (and, with `skip_bad`, left out),
    and `leave_out` drops images known to be unreadable without decoding them again. `found` and
    `found_captions` keep everything listed, `images` and `captions` what is used, `skipped`
    (file, why) what is left out, `uncaptioned` the used images whose caption file is empty."""

    def __init__(self, folder: str | Path, size: int, option: str = "image"):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"data folder {folder} does not exist or is not a folder")
        if size < 8 or size % 16:
            raise ValueError(f"training size must be a positive multiple of 16, got {size}")
        self.folder, self.size, self.option = folder, size, option
        self.found = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.found:
            raise ValueError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p for p in self.found if not p.with_suffix(".txt").is_file()]
        if missing:
            names = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
            raise ValueError(
                f"{len(missing)} of {len(self.found)} images in {folder} have no caption file "
                f"(same name, .txt), e.g. {names}"
            )
        self.found_captions = [_read_caption(p.with_suffix(".txt")) for p in self.found]
        self.skipped: list[tuple[Path, str]] = []
        self._use(set())

    def _use(self, left_out: set[Path]) -> None:
        kept = [
            (p, c)
            for p, c in zip(self.found, self.found_captions, strict=True)
            if p not in left_out
        ]
        self.images = [p for p, _ in kept]
        self.captions = [c for _, c in kept]
        self.uncaptioned = [p for p, c in kept if not c]

    def name(self, path: Path) -> str:
        """`path` relative to the folder (how files are named in messages and the cache)."""
        return path.relative_to(self.folder).as_posix()

    def check_images(self, skip_bad: bool = False, progress: dict | None = None) -> None:
        """Decode every image once (in threads: decoders release the GIL). An unreadable one is a
        ValueError naming it, or with `skip_bad` is left out and listed in `skipped`; if none is
        left, a ValueError. `progress`: tqdm options of a bar (None: no bar)."""
        options = {"total": len(self.found), "disable": progress is None} | (progress or {})
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, tqdm(**options) as bar:
            for start in range(0, len(self.found), 256):  # a window at a time, in order
                chunk = self.found[start : start + 256]
                for path, problem in zip(chunk, pool.map(self._problem, chunk), strict=True):
                    if problem is not None and not skip_bad:
                        raise ValueError(problem)
                    if problem is not None:
                        self.skipped.append((path, problem))
                bar.update(len(chunk))
        self.leave_out([self.name(p) for p, _ in self.skipped])

    def _problem(self, path: Path) -> str | None:
        try:
            read_image(path, self.option)
        except ValueError as e:
            return str(e)
        return None

    def leave_out(self, names: Sequence[str]) -> None:
        """Use every image but those named (`name`), e.g. the ones a latent cache left out."""
        left_out = {self.folder / name for name in names}
        known = {self.name(p): p for p, _ in self.skipped}
        self.skipped = [(p, known.get(self.name(p), "unreadable")) for p in sorted(left_out)]
        self._use(left_out)
        if not self.images:
            why = self.skipped[0][1]
            raise ValueError(
                f"data folder {self.folder}: none of its {len(self.found)} images can be read "
                f"(e.g. {why})"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Example:
        return load_image(self.images[i], self.size, self.option), self.captions[i]

    def fingerprint(self) -> str:
        """Changes when any image found, caption or the size changes (for the latent cache)."""
        h = hashlib.sha256(str(self.size).encode())
        for p in self.found:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(json.dumps(self.found_captions).encode())
        return h.hexdigest()


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


@torch.no_grad()
def encode_latents(
    dataset: Dataset,
    vae: AutoEncoder,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[str]]:
    """VAE posterior means (MMDiT latent format, float32, CPU) and captions of the examples.
    `encode` replaces `vae.encode` (e.g. ControlNet control images, `sd3.control.control_latent`)."""
    encode = encode or vae.encode
    indices = range(len(dataset)) if indices is None else indices
    device = next(vae.parameters()).device
    latents, captions = [], []
    for start in range(0, len(indices), batch_size):
        examples = [dataset[i] for i in indices[start : start + batch_size]]
        images = torch.stack([image for image, _ in examples]).to(device)
        latents.append(encode(images).float().cpu())
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
    encode: Callable[[Tensor], Tensor] | None = None,
    on_encoded: Callable[[int], None] | None = None,
) -> tuple[Tensor, list[str]]:
    """The dataset's latents and captions (`encode_latents`), kept in the safetensors file `path`:
    read from it if it carries every metadata entry of `key` (what the data and the VAE were; no
    key: any readable file will do), else encoded and written atomically. `progress`: tqdm options
    of the bar shown while encoding (None: no bar); `on_encoded(n)` is called as each batch of n
    is encoded (a caller's own progress display)."""
    key = dict(key or {})
    try:
        cached = SafetensorsFile(path).metadata
    except CheckpointError:  # no file, or a torn one
        cached = None
    if cached is not None and all(cached.get(k) == v for k, v in key.items()):
        return load_latents(path)
    options = {"total": len(dataset), "disable": progress is None} | (progress or {})
    with tqdm(**options) as bar:

        def update(n: int) -> None:
            bar.update(n)
            if on_encoded is not None:
                on_encoded(n)

        latents, captions = encode_latents(dataset, vae, batch_size, progress=update, encode=encode)
    save_atomic(path, {"latents": latents}, {**key, "captions": json.dumps(captions)})
    return latents, captions


def load_latents(path: str | Path) -> tuple[Tensor, list[str]]:
    """(latents, captions) of a file written by `cached_latents`."""
    file = SafetensorsFile(path)
    return file.get("latents").clone(), json.loads(file.metadata["captions"])
