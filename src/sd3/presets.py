"""Per-model defaults: which SD3 / SD3.5 model a checkpoint is, and how it is usually sampled.

The values are the published ones (the models' scheduler configs and Stability's sd3.5 reference):
every one of them can be overridden per call.
"""

import dataclasses
import json
from dataclasses import dataclass

from .models.mmdit import MMDiTConfig
from .sampling import SkipLayerGuidance


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    cfg: float
    shift: float
    sampler: str
    slg: SkipLayerGuidance | None = None
    cfg_start: float = 0.0  # CFG only on this fraction of the steps (see sampling.cfg_denoiser)
    cfg_end: float = 1.0
    size: int = 1024
    t5_length: int | None = None  # None: 77..256 tokens by prompt length, as the reference
    clip_length: int = 77  # CLIP positions the model reads (a property of the model, see text.py)


PRESETS = {
    "sd3_medium": Preset("SD3 Medium", steps=28, cfg=7.0, shift=3.0, sampler="euler"),
    "sd3.5_medium": Preset(
        "SD3.5 Medium",
        steps=50,
        cfg=5.0,
        shift=3.0,
        sampler="dpmpp_2m",
        slg=SkipLayerGuidance(scale=2.5, layers=(7, 8, 9), start=0.01, end=0.20),
    ),
    "sd3.5_large": Preset("SD3.5 Large", steps=40, cfg=4.5, shift=3.0, sampler="dpmpp_2m"),
    "sd3.5_large_turbo": Preset("SD3.5 Large Turbo", steps=4, cfg=1.0, shift=3.0, sampler="euler"),
}
# Stability's reference runs its SD3.5 Large ControlNets with these (sd3_infer.CONFIGS), keyed here
# by the control type the file records rather than by its file name
for _type in ("blur", "canny", "depth"):
    PRESETS[f"sd3.5_large_controlnet_{_type}"] = Preset(
        f"SD3.5 Large ControlNet ({_type})", steps=60, cfg=3.5, shift=3.0, sampler="euler"
    )


def detect_model(config: MMDiTConfig, filename: str = "") -> str:
    """The PRESETS key for an MMDiT of this shape, or "custom" for any other size.

    SD3.5 Large and Large Turbo share every shape; the file or folder name tells them apart.
    """
    shape = (config.hidden_size, config.depth, config.pos_embed_max_size, config.qk_norm)
    if shape == (1536, 24, 192, False) and not config.attn2_layers:
        return "sd3_medium"
    if shape == (1536, 24, 384, True) and config.attn2_layers:
        return "sd3.5_medium"
    if shape == (2432, 38, 192, True) and not config.attn2_layers:
        return "sd3.5_large_turbo" if "turbo" in filename.lower() else "sd3.5_large"
    return "custom"


PRESET_METADATA = "sd3_preset"  # a file's own preset, as JSON in its safetensors metadata


def stored_preset(text: str, filename: str) -> Preset:
    """A preset stored as JSON in a file's metadata, every field checked: one ValueError naming
    the file and the field otherwise."""
    where = f"{filename or 'the model file'}: its embedded preset ({PRESET_METADATA})"
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be a JSON object")
    known = {f.name: f for f in dataclasses.fields(Preset)}
    unknown = sorted(set(fields) - set(known))
    missing = sorted(
        f.name
        for f in known.values()
        if f.name not in fields and f.default is f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(f"{where} has unknown fields {unknown} or lacks {missing}")
    slg = fields.pop("slg", None)
    try:
        preset = Preset(**fields, slg=SkipLayerGuidance(**slg) if slg else None)
    except TypeError as e:
        raise ValueError(f"{where}: field slg is malformed ({e})") from None
    numbers = {
        "steps": int, "cfg": (int, float), "shift": (int, float), "cfg_start": (int, float),
        "cfg_end": (int, float), "size": int, "clip_length": int,
    }  # fmt: skip
    for name, kinds in numbers.items():
        value = getattr(preset, name)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{where}: field {name} must be a number, got {value!r}")
    if not isinstance(preset.name, str) or not isinstance(preset.sampler, str):
        raise ValueError(f"{where}: fields name and sampler must be strings")
    return preset


def preset_for(config: MMDiTConfig, filename: str = "", metadata: dict | None = None) -> Preset:
    """The preset a file carries in its metadata, else that of the detected model; a custom-size
    model gets SD3-style defaults at the largest size its positional table allows (up to 1024)."""
    if metadata and PRESET_METADATA in metadata:
        return stored_preset(metadata[PRESET_METADATA], filename)
    key = detect_model(config, filename)
    if key in PRESETS:
        return PRESETS[key]
    largest = config.pos_embed_max_size * config.patch_size * 8
    return Preset(
        f"custom MMDiT (depth {config.depth}, width {config.hidden_size})",
        steps=28,
        cfg=5.0,
        shift=3.0,
        sampler="euler",
        size=min(1024, largest),
    )
