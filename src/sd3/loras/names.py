"""Which of our layers a LoRA module name stands for, in every naming SD3 tools write.

Our layers carry Stability's names in the MMDiT (`joint_blocks.{i}.x_block.attn.qkv`) and
transformers' in the text encoders (`text_model.encoder.layers.{i}.self_attn.q_proj`,
`encoder.block.{i}.layer.0.SelfAttention.q`). The tools name them (`SCHEMES`):

| tool | MMDiT | CLIP-L / CLIP-G / T5-XXL |
|---|---|---|
| kohya sd-scripts | `lora_unet_` + our name, `.`→`_` | `lora_te1_` / `lora_te2_` / `lora_te3_` + name, `.`→`_` |
| ComfyUI | `diffusion_model.` (or `model.diffusion_model.`) + our name | `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` + name |
| diffusers / PEFT | `transformer.` (or PEFT's `base_model.model.`) + diffusers' name | `text_encoder.` / `text_encoder_2.` / `text_encoder_3.` + name |
| OneTrainer | `lora_transformer_` + diffusers' name, `.`→`_`; its OMI layout `transformer.` + our name, a fused qkv's q, k, v as `.qkv.0/1/2` | `lora_te1_` ... as kohya; OMI `clip_l.` / `clip_g.` / `t5.` + name |
| LyCORIS via SimpleTuner | `lycoris_` + diffusers' name, `.`→`_` | |
| no prefix | our name, or diffusers' name | |

diffusers' names come from the one diffusers <-> Stability map (`checkpoints.mmdit_diffusers_names`):
its separate to_q, to_k, to_v are row thirds of our fused qkv, and it orders the last block's
context modulation and the final layer's as (scale, shift) where ours are (shift, scale), so an
update named the diffusers way has its halves swapped there.

Names are looked up in a table made from the model's own layers, so an underscored name is never
guessed back into dots. Where there is no model (`sd3 lora convert`), the table is made from a
model of our own classes sized to cover the file's names (`layers_for_file`).
"""

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints import MMDIT_TOP_NAMES, mmdit_diffusers_names
from ..kernels.quantization import Int8Linear
from .formats import LoRAFile

COMPONENT_NAMES = {"mmdit": "MMDiT", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}


@dataclass(frozen=True)
class Target:
    """What a LoRA module changes: layer `module` of `component`, all of its rows or the `part`th
    of `parts` equal row blocks (q, k or v of a fused qkv), its two row halves exchanged where the
    module's naming stores them (scale, shift)."""

    component: str
    module: str
    part: int = 0
    parts: int = 1
    swapped: bool = False

    def rows(self, out: int) -> slice:
        size = out // self.parts
        return slice(self.part * size, (self.part + 1) * size)


@dataclass(frozen=True)
class Scheme:
    """One tool's naming of one network: a prefix, then our layer names ("ours") or diffusers'
    ("diffusers"), dots kept or turned into underscores."""

    family: str
    component: str
    prefix: str
    naming: str = "ours"
    underscored: bool = False


SCHEMES = (
    Scheme("kohya", "mmdit", "lora_unet_", underscored=True),
    Scheme("ComfyUI", "mmdit", "diffusion_model."),
    Scheme("ComfyUI", "mmdit", "model.diffusion_model."),
    Scheme("OneTrainer (OMI)", "mmdit", "transformer."),
    Scheme("Stability-named", "mmdit", ""),
    Scheme("diffusers/PEFT", "mmdit", "transformer.", "diffusers"),
    Scheme("PEFT", "mmdit", "base_model.model.", "diffusers"),
    Scheme("PEFT", "mmdit", "transformer.base_model.model.", "diffusers"),
    Scheme("diffusers-named", "mmdit", "", "diffusers"),
    Scheme("OneTrainer", "mmdit", "lora_transformer_", "diffusers", underscored=True),
    Scheme("LyCORIS (SimpleTuner)", "mmdit", "lycoris_", "diffusers", underscored=True),
    Scheme("kohya", "clip_l", "lora_te1_", underscored=True),
    Scheme("kohya", "clip_g", "lora_te2_", underscored=True),
    Scheme("kohya", "t5xxl", "lora_te3_", underscored=True),
    Scheme("diffusers/PEFT", "clip_l", "text_encoder."),
    Scheme("diffusers/PEFT", "clip_g", "text_encoder_2."),
    Scheme("diffusers/PEFT", "t5xxl", "text_encoder_3."),
    Scheme("ComfyUI", "clip_l", "text_encoders.clip_l.transformer."),
    Scheme("ComfyUI", "clip_g", "text_encoders.clip_g.transformer."),
    Scheme("ComfyUI", "t5xxl", "text_encoders.t5xxl.transformer."),
    Scheme("OneTrainer (OMI)", "clip_l", "clip_l."),
    Scheme("OneTrainer (OMI)", "clip_g", "clip_g."),
    Scheme("OneTrainer (OMI)", "t5xxl", "t5."),
)
# the first name of an MMDiT layer in each naming: tells "transformer." + ours (OneTrainer's OMI)
# from "transformer." + diffusers', and unprefixed names apart
FIRST_NAMES = {
    "ours": {"joint_blocks", *(n.split(".")[0] for n in MMDIT_TOP_NAMES)},
    "diffusers": {"transformer_blocks", *(n.split(".")[0] for n in MMDIT_TOP_NAMES.values())},
}


def layers_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weight shapes of a network's linear and convolution layers (what a LoRA can change),
    by our names; the network may be on the meta device."""
    return {
        name: tuple(m.weight.shape)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d | Int8Linear) and m.weight is not None
    }


def aliases(layers: dict[str, dict], depth: int) -> dict[str, tuple[Target, Scheme]]:
    """Every name a tool may give each layer in `layers` ({component: {our name: shape}}) ->
    (what it changes, the naming it is in). `depth`: the MMDiT's number of joint blocks."""
    table: dict[str, tuple[Target, Scheme]] = {}
    for scheme in SCHEMES:
        c = scheme.component
        for module in layers.get(c, {}):
            if scheme.naming == "ours":
                entries = [(module, Target(c, module))]
                if module.endswith(".qkv") and not scheme.underscored:  # OneTrainer's OMI parts
                    entries += [(f"{module}.{j}", Target(c, module, j, 3)) for j in range(3)]
            else:
                theirs, swapped = mmdit_diffusers_names(module, depth)
                entries = [
                    (name, Target(c, module, j, len(theirs), swapped))
                    for j, name in enumerate(theirs)
                ]
            for name, target in entries:
                alias = scheme.prefix + (name.replace(".", "_") if scheme.underscored else name)
                table.setdefault(alias, (target, scheme))
    return table


def scheme_of(key: str) -> Scheme | None:
    """The naming a module name is in, judged from the name alone (for files and names that
    match no layer of the model)."""
    best = None
    for scheme in SCHEMES:
        if not key.startswith(scheme.prefix):
            continue
        rest = key[len(scheme.prefix) :]
        if scheme.component == "mmdit" and not scheme.underscored:
            first = rest.split(".")[0]
            if first not in FIRST_NAMES[scheme.naming]:
                continue
        if best is None or len(scheme.prefix) > len(best.prefix):
            best = scheme
    return best


def family_of(file: LoRAFile) -> str:
    """The tool whose naming most of the file's modules are in (e.g. "kohya", "diffusers/PEFT"),
    "sd3 train" for our trainer's files, or "unrecognised" names."""
    if "sd3_lora_rank" in file.metadata:  # written by sd3 train (training/export.save_lora)
        return "sd3 train (diffusers format)"
    counts = Counter(s.family for k in file.modules if (s := scheme_of(k)) is not None)
    return counts.most_common(1)[0][0] if counts else "unrecognised"


def describe_format(file: LoRAFile) -> str:
    """e.g. "kohya LoRA", "diffusers/PEFT DoRA (LoRA)", "kohya LyCORIS LoKr"."""
    return f"{family_of(file)} {' + '.join(file.kinds)}"


BLOCK = re.compile(r"(?:joint_blocks|transformer_blocks)[._](\d+)[._]")
# layers whose input is the MMDiT's width, in either naming
WIDTH_INPUTS = re.compile(
    r"attn[._](qkv|to_[qkv]|add_[qkv]_proj)$|adaLN_modulation[._]1$|norm1(_context)?[._]linear$"
)
KNOWN_MODELS = {(24, 1536): "SD3 or SD3.5 Medium", (38, 2432): "SD3.5 Large"}


def origin(file: LoRAFile) -> str:
    """What the file's names and shapes say about the model it was made for."""
    keys = list(file.modules)
    if any(re.search(r"(down|up|input|output)_blocks|middle_block|mid_block", k) for k in keys):
        return "a U-Net (SD 1.x / SDXL), not an SD3 MMDiT"
    if any(re.search(r"double_blocks|single_blocks|single_transformer_blocks", k) for k in keys):
        return "Flux, not SD3"
    blocks = [int(m[1]) for k in keys if (m := BLOCK.search(k))]
    widths = Counter(
        file.modules[k].shape[1] for k in keys if file.modules[k].kind and WIDTH_INPUTS.search(k)
    )
    if not blocks:
        return f"layers named like {keys[:2]}" if keys else "nothing recognisable"
    depth = max(blocks) + 1
    width = widths.most_common(1)[0][0] if widths else None
    known = KNOWN_MODELS.get((depth, width))
    text = f"a model with {depth} blocks" if known else f"a model with at least {depth} blocks"
    if width:
        text += f" of width {width}"
    return text + (f" ({known})" if known else "")


def layers_for_file(file: LoRAFile) -> tuple[dict[str, dict], int]:
    """({component: {our layer name: None}}, MMDiT depth) for a model of our classes big enough
    to hold every layer the file names, for reading a file without its model (`sd3 lora
    convert`). The MMDiT's last block (the one whose context block only makes q, k, v) is the
    block whose context modulation makes 2·width outputs; with none such in the file, no block
    of the file is taken as the last."""
    from ..models.clip import CLIPConfig, CLIPTextModel
    from ..models.mmdit import MMDiT, MMDiTConfig
    from ..models.t5 import T5Config, T5Encoder

    counts: dict[str, int] = {}
    depth = None
    for key, m in file.modules.items():
        scheme = scheme_of(key)
        if scheme is None:
            continue
        index = re.search(r"(?:blocks|layers|block)[._](\d+)[._]", key)
        n = int(index[1]) + 1 if index else 1
        counts[scheme.component] = max(counts.get(scheme.component, 1), n)
        last = re.search(
            r"[._](context_block[._]adaLN_modulation[._]1|norm1_context[._]linear)$", key
        )
        if last and m.kind and m.shape[0] == 2 * m.shape[1]:
            depth = n
    layers: dict[str, dict] = {}
    with torch.device("meta"):
        if "mmdit" in counts:
            d = depth or counts["mmdit"] + 1
            mmdit = MMDiT(
                MMDiTConfig(hidden_size=64, depth=d, mlp_hidden=64, context_dim=64, pooled_dim=64,
                            pos_embed_max_size=2, attn2_layers=tuple(range(d)))
            )  # fmt: skip
            layers["mmdit"] = dict.fromkeys(layers_of(mmdit))
        for c in ("clip_l", "clip_g"):
            if c in counts:
                clip = CLIPTextModel(CLIPConfig(width=64, layers=counts[c], heads=1, mlp_width=64))
                layers[c] = dict.fromkeys(layers_of(clip))
        if "t5xxl" in counts:
            t5 = T5Encoder(T5Config(d_model=64, layers=counts["t5xxl"], heads=1, d_ff=64))
            layers["t5xxl"] = dict.fromkeys(layers_of(t5))
    return layers, depth or counts.get("mmdit", 0) + 1


def describe_model(layers: dict[str, dict], name: str = "") -> str:
    """e.g. "SD3.5 Medium model (24 blocks, width 1536)" from a model's layers."""
    mmdit = layers.get("mmdit", {})
    depth = len({k.split(".")[1] for k in mmdit if k.startswith("joint_blocks.")})
    shape = mmdit.get("context_embedder")
    width = f", width {shape[0]}" if shape else ""
    name = f"{name} " if name and not name.startswith("custom") else ""
    return f"{name}model ({depth} blocks{width})"
