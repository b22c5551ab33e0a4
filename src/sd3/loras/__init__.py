"""LoRA at generation time: every format SD3 LoRAs come in, several at once, never a silent no-op.

- `formats.py` reads a file into modules (LoRA, LyCORIS LoHa / LoKr, full updates, DoRA) with each
  tool's alpha rule;
- `names.py` maps each tool's names (kohya, ComfyUI, diffusers/PEFT, OneTrainer, LyCORIS) onto our
  layers, q/k/v slices of a fused qkv and (scale, shift) halves included;
- `apply.py` matches a file against a model, before any weight is read, and errs or warns where
  modules do not apply;
- `weights.py` merges updates into weights as they load, or runs them beside the layers;
- `convert.py` writes a LoRA in diffusers', kohya's or ComfyUI's naming (`sd3 lora convert`).

`pipeline.Pipeline` applies LoRAs merged (`loras=` when built, `sd3 generate --lora`) or not
(`load_lora`, `set_lora_scales`, `unload_loras`).
"""

from .apply import LoRA, match, merge_edits, merge_into_module
from .formats import LoRAError, LoRAFile
from .names import layers_of

__all__ = [
    "LoRA",
    "LoRAError",
    "LoRAFile",
    "layers_of",
    "match",
    "merge_edits",
    "merge_into_module",
]
