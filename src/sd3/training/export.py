"""Writing trained models for inference: Stability's single-file layout, and LoRA files.

The single file has `model.diffusion_model.*` (MMDiT), `first_stage_model.*` (VAE) and
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, as the official SD3 / SD3.5 releases, so
`sd3.checkpoints.find_components` (and ComfyUI, diffusers' `from_single_file`) read it back.
With `new=OPTION` a file is written as the user's (`checkpoint.save_new`: never over an existing
file, the next free name if taken; errors name OPTION), else replaced atomically (`save_atomic`).
"""

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sd3.checkpoints import DTYPE_NAMES, SINGLE_FILE_PREFIXES
from sd3.models.mmdit import MMDiT

from .checkpoint import save_atomic, save_new
from .lora import LoRALinear, lora_layers, to_diffusers


def plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with any LoRA folded in (the module itself is left unchanged)."""
    state = dict(module.state_dict())
    for name, layer in lora_layers(module).items():
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = layer.base.weight.detach() + layer.delta().to(layer.base.weight)
        if layer.base.bias is not None:
            state[f"{name}.bias"] = layer.base.bias.detach()
    return state


def export_single_file(
    path: str | Path,
    components: Mapping[str, nn.Module | None],
    dtype: torch.dtype | str = torch.float32,
    metadata: Mapping[str, str] | None = None,
    new: str | None = None,
) -> Path:
    """Save {"mmdit", "vae", "clip_l", "clip_g", "t5xxl": module} (None entries are left out) in
    the official single-file layout, floating-point tensors in `dtype`; returns where it went."""
    dtype = DTYPE_NAMES[dtype] if isinstance(dtype, str) else dtype
    unknown = set(components) - set(SINGLE_FILE_PREFIXES)
    if unknown:
        raise ValueError(
            f"unknown components {sorted(unknown)}; expected some of {list(SINGLE_FILE_PREFIXES)}"
        )
    tensors = {}
    for name, module in components.items():
        if module is None:
            continue
        prefix = SINGLE_FILE_PREFIXES[name]
        for key, t in plain_state_dict(module).items():
            t = t.detach().to("cpu")
            tensors[prefix + key] = t.to(dtype) if t.is_floating_point() else t
    return _save(path, tensors, metadata, new)


def save_lora(
    path: str | Path,
    mmdit: MMDiT,
    dtype: torch.dtype | str = torch.float32,
    new: str | None = None,
) -> Path:
    """The MMDiT's LoRA adapters in diffusers' SD3 format (`load_lora_weights` reads it); returns
    where it went."""
    dtype = DTYPE_NAMES[dtype] if isinstance(dtype, str) else dtype
    layers = lora_layers(mmdit)
    if not layers:
        raise ValueError("this MMDiT has no LoRA layers to save")
    tensors = {k: v.to(dtype) for k, v in to_diffusers(layers, mmdit.config.depth).items()}
    first: LoRALinear = next(iter(layers.values()))
    meta = {"format": "pt", "sd3_lora_rank": str(first.rank), "sd3_lora_targets": ",".join(layers)}
    return _save(path, tensors, meta, new)


def _save(
    path: str | Path,
    tensors: dict[str, Tensor],
    metadata: Mapping[str, str] | None,
    new: str | None,
) -> Path:
    return (
        save_atomic(path, tensors, metadata)
        if new is None
        else save_new(path, tensors, metadata, new)
    )
