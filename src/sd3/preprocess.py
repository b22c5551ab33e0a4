"""Control images made from ordinary images, as the SD3.5 ControlNets expect them.

- canny: white edges on black from OpenCV's Canny on the RGB image, thresholds 100 / 200 by
  default (the model card's snippet);
- blur: OpenCV's Gaussian blur (sigma in pixels);
- depth: a transformers depth-estimation model folder on disk, scaled to 0..255 with near dark
  and far bright (Stability's sample depth input).

OpenCV (the headless build: no GUI libraries) is the library the model card's snippet and the
original ControlNet annotators use, so the edges are the ones the ControlNet was trained on.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PREPROCESSORS = ("none", "canny", "blur", "depth")


@dataclass(frozen=True)
class Preprocess:
    """Which preprocessor and its parameters (recorded in an image's settings)."""

    kind: str = "none"
    canny_low: int = 100
    canny_high: int = 200
    blur_sigma: float = 5.0

    def check(self) -> None:
        """One ValueError naming the option for an impossible setting, before any work (the
        depth model: `check_depth_model`)."""
        if self.kind not in PREPROCESSORS:
            raise ValueError(
                f"--control-preprocess {self.kind!r}: choose one of {', '.join(PREPROCESSORS)}"
            )
        if not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(
                f"--canny-low/--canny-high need 0 <= low <= high, got {self.canny_low}, "
                f"{self.canny_high}"
            )
        if not self.blur_sigma > 0:
            raise ValueError(f"--blur-sigma must be > 0, got {self.blur_sigma}")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ValueError(
            "--control-preprocess canny/blur needs OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White edges on black (RGB), from cv2.Canny on the RGB pixels."""
    edges = _cv2().Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


def blur(image: Image.Image, sigma: float = 5.0) -> Image.Image:
    """A Gaussian blur of `sigma` pixels (OpenCV picks the kernel size from sigma)."""
    array = _cv2().GaussianBlur(np.asarray(image.convert("RGB")), (0, 0), sigma)
    return Image.fromarray(array)


def check_depth_model(folder: str | Path | None) -> Path:
    """The depth model folder, or one ValueError saying what to pass."""
    if folder is None:
        raise ValueError(
            "--control-preprocess depth needs a depth-estimation model on disk: pass --depth-model "
            "FOLDER (a transformers model folder with config.json and .safetensors weights, e.g. "
            "Depth Anything V2 or DPT), or give a ready depth map with --control-preprocess none"
        )
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise ValueError(
            f"--depth-model {folder}: not a transformers model folder (needs config.json and "
            ".safetensors weights; pickle weights are never loaded)"
        )
    return folder


def depth(image: Image.Image, folder: str | Path) -> Image.Image:
    """A depth map (near dark, far bright) at the image's size from the model in `folder`.
    Relative models (DPT, Depth Anything) predict inverse depth, near large, which is inverted;
    metric ones (ZoeDepth) predict depth itself."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = check_depth_model(folder)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(
        folder, local_files_only=True, use_safetensors=True
    ).eval()
    rgb = image.convert("RGB")
    with torch.no_grad():
        predicted = model(**processor(images=rgb, return_tensors="pt")).predicted_depth
    d = torch.nn.functional.interpolate(
        predicted[:, None].float(), size=rgb.size[::-1], mode="bicubic", align_corners=False
    )[0, 0]
    d = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-8)
    if model.config.model_type != "zoedepth":
        d = 1 - d
    return Image.fromarray((d * 255).round().byte().numpy()).convert("RGB")


def preprocess(
    image: Image.Image, p: Preprocess, depth_model: str | Path | None = None
) -> Image.Image:
    """The control image from `image` by `p`."""
    if p.kind == "canny":
        return canny(image, p.canny_low, p.canny_high)
    if p.kind == "blur":
        return blur(image, p.blur_sigma)
    if p.kind == "depth":
        return depth(image, depth_model)
    return image
