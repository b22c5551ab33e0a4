"""The bundled default model's family, preset and export, shared by the scripts that train it
(`scripts/train_default_model.py`, the whole recipe; `scripts/train_one_stage.py`, one stage)."""

import json
import sys
from pathlib import Path

from torch import nn

from sd3.presets import PRESET_METADATA
from sd3.training.export import export_single_file
from sd3.training.fresh import FamilyConfig, family_config

SIZE = 64  # pre-training image size: latents 8x8, 16 image tokens
HIRES = 128  # fine-tuning and sampling size: latents 16x16, 64 image tokens
T5_LENGTH = 24  # captions are short (at most 22 T5 tokens): the preset fixes the T5 length ...
CLIP_POSITIONS = 24  # ... and the CLIP positions the model reads (at most 17 used)
PRESET = {"name": "sd3 shapes", "steps": 20, "cfg": 2.0, "shift": 1.0, "sampler": "euler",
          "size": HIRES, "t5_length": T5_LENGTH, "clip_length": CLIP_POSITIONS}  # fmt: skip
CURRICULUM_MIX = "single=1,counting=6,pair=3,position=8,group=2"  # the 128x128 stages' captions
POSITION_MIX = "position=1"  # the 64x64 stages': relations only, where order is learned


def model_family(hidden: int = 192, depth: int = 6) -> FamilyConfig:
    """64-wide CLIP-L, CLIP-G and T5; an MMDiT-X of `hidden` and `depth` (attn2 in its first half)
    with a 16x16 positional table (128x128 images); a VAE of 32 channels, downsampling 8x."""
    return family_config(
        depth, hidden, pos=16, clip_l=64, clip_g=64, t5=64, vae_ch=32,
        vae_mult=(1, 2, 2, 2), attn2_layers=tuple(range(depth // 2)),
    )  # fmt: skip


def export(path: Path, components: dict[str, nn.Module], size: int) -> None:
    """The model in the official single-file layout, fp16, its preset (at `size`) in the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    export_single_file(
        path, components, "fp16", {PRESET_METADATA: json.dumps({**PRESET, "size": size})}
    )
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
