"""Writing a LoRA in another tool's naming (`sd3 lora convert IN OUT --to diffusers|kohya|comfy`).

A file is read as for applying it (`formats`, `names`; without a model, against a model of our
classes sized to its names), every module then written for the target:
- diffusers: PEFT naming (`transformer.` + diffusers' layer names, `text_encoder.`,
  `text_encoder_2.`); an update of our fused qkv splits into to_q, to_k, to_v, each with the shared
  down (exact); halves are swapped where diffusers orders a modulation (scale, shift); the scale
  is folded into lora_B, so diffusers' default (alpha = r) is right and no `lora_adapter_metadata`
  is needed. diffusers loads no T5 LoRA: T5 modules are written as `text_encoder_3.` with a warning.
- kohya (`lora_unet_`, `lora_te1_` ...) and comfy (`diffusion_model.`,
  `text_encoders.clip_l.transformer.` ...): Stability's names with a fused qkv; separate q, k, v
  updates become one of rank r_q + r_k + r_v, downs stacked and ups block-diagonal (kohya's own
  `split_qkv` layout) with alpha = that rank, their scales folded into the ups; a whole-layer LoRA
  keeps its factors and gets alpha = scale · rank; LoHa and LoKr on whole layers keep their
  factors and alpha; comfy also takes full (`.diff`) updates.
Refused with one error: DoRA (the tools differ in how a strength applies to it), LoHa and LoKr
to diffusers or on part of a layer or on a swapped one, full updates other than to comfy, bias
updates other than to diffusers.
"""

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checkpoints import mmdit_diffusers_names, swap_halves
from .apply import match
from .formats import LoRAError, LoRAFile, Module
from .names import SCHEMES, Target, layers_for_file

TARGETS = {"diffusers": "diffusers/PEFT", "kohya": "kohya", "comfy": "ComfyUI"}
PREFIXES = {
    to: {s.component: s.prefix for s in reversed(SCHEMES) if s.family == family}
    for to, family in TARGETS.items()
}


@dataclass
class Update:
    """A low-rank update in our naming: the `part`th of `parts` row blocks of layer `module` of
    `component` changes by up @ down, up in our row order with the scale folded in."""

    component: str
    module: str
    down: Tensor  # [r, in] ([r, in, kh, kw] on a convolution)
    up: Tensor  # [rows, r] ([rows, r, 1, 1])
    part: int = 0
    parts: int = 1
    bias: Tensor | None = None  # [rows], scale folded in


def update_of(module: Module, target: Target) -> Update:
    """A LoRA module as an Update (its factors as stored, the scale folded into up)."""
    up = module.scale * module.read("up")
    bias = module.bias_delta()
    if target.swapped:
        up, bias = swap_halves(up), None if bias is None else swap_halves(bias)
    return Update(
        target.component, target.module, module.read("down"), up, target.part, target.parts, bias
    )


def diffusers_tensors(updates: list[Update], depth: int) -> dict[str, Tensor]:
    """PEFT-named lora_A / lora_B (/ lora_B.bias) tensors for `updates` (`depth`: the MMDiT's
    joint blocks, which says where diffusers swaps halves)."""
    pieces: dict[str, list[tuple[Tensor, Tensor, Tensor | None]]] = defaultdict(list)
    for u in updates:
        if u.component == "mmdit":
            theirs, swapped = mmdit_diffusers_names(u.module, depth)
        else:
            theirs, swapped = (u.module,), False
        prefix = PREFIXES["diffusers"][u.component]
        if u.parts == len(theirs):  # one of diffusers' separate q, k, v already
            chunks = [(theirs[u.part], u.up, u.bias)]
        elif u.parts == 1:
            bias = [None] * len(theirs) if u.bias is None else u.bias.chunk(len(theirs))
            chunks = list(zip(theirs, u.up.chunk(len(theirs)), bias, strict=True))
        else:
            raise LoRAError(f"{u.module}: {u.parts} parts do not map onto diffusers' {theirs}")
        for name, up, bias in chunks:
            if swapped:
                up, bias = swap_halves(up), None if bias is None else swap_halves(bias)
            pieces[prefix + name].append((u.down, up, bias))
    out = {}
    for name, parts in pieces.items():
        downs, ups, biases = zip(*parts, strict=True)
        out[f"{name}.lora_A.weight"] = torch.cat(downs).contiguous()
        out[f"{name}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()
        if any(b is not None for b in biases):
            out[f"{name}.lora_B.bias"] = sum(b for b in biases if b is not None).contiguous()
    return out


def _fused(updates: list[Update], where: str) -> tuple[Tensor, Tensor]:
    """Several updates of one layer as one: downs stacked, ups side by side on their rows."""
    rows = {u.up.shape[0] * u.parts for u in updates}
    if len(rows) != 1 or any(u.down.ndim != 2 for u in updates):
        raise LoRAError(f"{where}: its updates of one layer do not fit together")
    out = rows.pop()
    down = torch.cat([u.down for u in updates])
    up = torch.zeros(out, down.shape[0])
    col = 0
    for u in updates:
        size = out // u.parts
        up[u.part * size : (u.part + 1) * size, col : col + u.up.shape[1]] = u.up
        col += u.up.shape[1]
    return down, up


def stability_tensors(items: list[tuple[Module, Target]], to: str, where: str) -> dict[str, Tensor]:
    """kohya- or ComfyUI-named tensors (Stability's layer names, fused qkv) for matched modules."""
    by_layer: dict[tuple[str, str], list[tuple[Module, Target]]] = defaultdict(list)
    for module, target in items:
        by_layer[(target.component, target.module)].append((module, target))
    out = {}
    for (component, layer), group in by_layer.items():
        prefix = PREFIXES[to][component]
        name = prefix + (layer.replace(".", "_") if to == "kohya" else layer)
        kinds = {m.kind for m, _ in group}
        biased = [m.key for m, _ in group if m.has_bias]
        if biased and not (kinds == {"full"} and to == "comfy"):
            raise LoRAError(f"{where}: {biased[0]} updates a bias, which {to} LoRAs cannot")
        if kinds == {"lora"} and len(group) == 1 and group[0][1].parts == 1:
            module, target = group[0]
            up = module.read("up")
            out[f"{name}.lora_down.weight"] = module.read("down")
            out[f"{name}.lora_up.weight"] = swap_halves(up) if target.swapped else up
            out[f"{name}.alpha"] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
        elif kinds == {"lora"}:
            down, up = _fused([update_of(m, t) for m, t in group], where)
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
        elif kinds <= {"loha", "lokr"} and len(group) == 1:
            module, target = group[0]
            if target.parts != 1 or target.swapped:
                raise LoRAError(
                    f"{where}: {module.key} is a LyCORIS update of part of a layer or of halves "
                    f"stored the other way, which {to}'s naming cannot hold"
                )
            for role, t in module.tensors.items():
                out[f"{name}.{role}"] = t.read()
        elif kinds == {"full"} and to == "comfy":
            shape = {(m.shape[0] * t.parts, m.shape[1]) for m, t in group}
            diff, diff_b = torch.zeros(shape.pop()), None
            for m, t in group:
                rows = t.rows(diff.shape[0])
                if m.has_weight:
                    d = m.delta()
                    diff[rows] += swap_halves(d) if t.swapped else d
                b = m.bias_delta()
                if b is not None:
                    diff_b = torch.zeros(diff.shape[0]) if diff_b is None else diff_b
                    diff_b[rows] += swap_halves(b) if t.swapped else b
            if any(m.has_weight for m, _ in group):
                out[f"{name}.diff"] = diff
            if diff_b is not None:
                out[f"{name}.diff_b"] = diff_b
        else:
            what = " and ".join(sorted(kinds))
            raise LoRAError(f"{where}: {layer} has {what} updates that {to}'s naming cannot hold")
    return out


def convert(
    file: LoRAFile, to: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of `file` written for `to` (one of TARGETS), in `dtype` (by
    default the dtype most of the file's tensors have)."""
    if to not in TARGETS:
        raise LoRAError(f"unknown LoRA format {to!r}; choose one of {', '.join(TARGETS)}")
    where = str(file.path)
    if file.has_dora:
        raise LoRAError(
            f"{where}: a DoRA file cannot be converted: the tools apply a strength to DoRA in "
            "different ways (apply it with sd3 generate --lora instead)"
        )
    layers, depth = layers_for_file(file)
    lora = match(file, layers, depth, model="any SD3 layer sd3 knows")
    items = [pair for pairs in lora.matches.values() for pair in pairs]
    if to == "diffusers":
        bad = [m.key for m, _ in items if m.kind != "lora"]
        if bad:
            raise LoRAError(
                f"{where}: {len(bad)} modules are {file.kinds} updates, which diffusers' LoRA "
                f"format cannot hold (e.g. {bad[:3]}); convert to kohya or comfy instead"
            )
        if lora.matched("t5xxl"):
            warnings.warn(
                f"{where}: its {lora.matched('t5xxl')} T5-XXL modules are written as "
                "text_encoder_3.*, which diffusers does not load (it has no T5 LoRA loader)",
                stacklevel=2,
            )
        tensors = diffusers_tensors([update_of(m, t) for m, t in items], depth)
    else:
        tensors = stability_tensors(items, to, where)
    if dtype is None:
        found = Counter(t.dtype for m in file.modules.values() for t in m.tensors.values())
        floats = [d for d, _ in found.most_common() if d.is_floating_point]
        dtype = floats[0] if floats else torch.float32
    # alphas stay fp32: in bf16, alpha = 4.8 would become 4.8125
    tensors = {
        k: v.contiguous() if k.endswith(".alpha") else v.to(dtype).contiguous()
        for k, v in tensors.items()
    }
    metadata = {"format": "pt", "sd3_lora_converted_from": f"{file.path.name} ({lora.format})"}
    return tensors, metadata
