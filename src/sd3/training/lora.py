"""LoRA (Hu et al. 2021) on the MMDiT's linear layers, saved in diffusers' SD3 LoRA format.

W x  ->  W x + (alpha / rank) B A x, with W frozen, A [rank, in] random and B [out, rank] zero at
the start. Targets are module-name suffixes: "attn.qkv" selects every `*.attn.qkv` (both streams),
"x_block.attn.qkv" only the image stream's, "mlp.fc1" both MLP inputs, and so on.

diffusers' format (what `StableDiffusion3Pipeline.load_lora_weights` reads, PEFT naming):
`transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight`, `...lora_B.weight`. Our fused
`qkv` is three diffusers layers (to_q, to_k, to_v; add_q_proj... for the context stream): they
share lora_A and take a third of lora_B each. diffusers reads no alpha for SD3 (scale 1), so the
saved lora_B carries the factor alpha / rank.
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sd3.checkpoints import mmdit_diffusers_names, swap_halves
from sd3.models.mmdit import MMDiT

DEFAULT_TARGETS = ("attn.qkv", "attn.proj")  # diffusers' SD3 LoRA script default: attention only


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.lora_A.to(base.weight)
        self.lora_B.to(base.weight)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta(self) -> Tensor:
        """The update to W: scale * B A [out, in]."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(mmdit: MMDiT, targets: Sequence[str]) -> list[str]:
    """The names of the MMDiT's linear layers that `targets` select (checkable on a model on the
    meta device, before any weight is read), or a ValueError listing the layers there are."""
    linear = [
        name
        for name, m in mmdit.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith((".base", ".lora_A", ".lora_B"))
    ]
    chosen = [name for name in linear if _matches(name, targets)]
    if not chosen:
        kinds = sorted({re.sub(r"^joint_blocks\.\d+\.", "", n) for n in linear})
        raise ValueError(
            f"LoRA targets {list(targets)} match no linear layer of the MMDiT; its layers are {kinds}"
        )
    return chosen


def add_lora(
    mmdit: MMDiT, rank: int, alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS
) -> dict[str, LoRALinear]:
    """Freeze the MMDiT and put LoRA on the linear layers named by `targets`. Returns them by name."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    chosen = lora_targets(mmdit, targets)
    mmdit.requires_grad_(False)
    layers = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = mmdit.get_submodule(parent_name)
        layers[name] = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, layers[name])
    return layers


def lora_layers(mmdit: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in mmdit.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(mmdit: nn.Module) -> MMDiT:
    """Fold every LoRA update into its base weight and put the plain linear layers back."""
    for name, layer in lora_layers(mmdit).items():
        base = layer.base
        base.weight += layer.delta().to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(mmdit.get_submodule(parent_name), child, base)
    return mmdit


# ---------------------------------------------------------------------------------------------
# diffusers naming (`checkpoints.mmdit_diffusers_names`)


def to_diffusers(layers: Mapping[str, LoRALinear], depth: int) -> dict[str, Tensor]:
    """LoRA weights in diffusers' SD3 format; lora_B includes the alpha / rank scale."""
    out = {}
    for name, layer in layers.items():
        targets, swapped = mmdit_diffusers_names(name, depth)
        A = layer.lora_A.weight.detach().float()
        B = layer.scale * layer.lora_B.weight.detach().float()
        if swapped:
            B = swap_halves(B)
        for target, B_part in zip(targets, B.chunk(len(targets)), strict=True):
            out[f"transformer.{target}.lora_A.weight"] = A.clone().contiguous()
            out[f"transformer.{target}.lora_B.weight"] = B_part.contiguous()
    return out


@torch.no_grad()
def merge_diffusers_lora(mmdit: MMDiT, state_dict: Mapping[str, Tensor], scale: float = 1.0) -> int:
    """Add a diffusers-format SD3 LoRA (any rank, per-layer A) into the MMDiT's weights. Optional
    `.alpha` entries (kohya style) scale their layer by alpha / rank. Returns the layers changed."""
    ours = {}
    for name, module in mmdit.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith((".lora_A", ".lora_B")):
            try:
                targets, swapped = mmdit_diffusers_names(
                    name.removesuffix(".base"), mmdit.config.depth
                )
            except ValueError:
                continue
            for j, target in enumerate(targets):
                ours[target] = (module, j, len(targets), swapped)
    keys = {k.removeprefix("transformer.") for k in state_dict if k.endswith(".lora_A.weight")}
    unknown = sorted(k for k in (k.removesuffix(".lora_A.weight") for k in keys) if k not in ours)
    if unknown:
        raise ValueError(f"LoRA layers with no counterpart in this MMDiT: {unknown[:5]}")
    prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    for key in sorted(keys):
        target = key.removesuffix(".lora_A.weight")
        A = state_dict[f"{prefix}{target}.lora_A.weight"].float()
        B = state_dict[f"{prefix}{target}.lora_B.weight"].float()
        alpha = state_dict.get(f"{prefix}{target}.alpha")
        factor = scale * (float(alpha) / A.shape[0] if alpha is not None else 1.0)
        module, j, parts, swapped = ours[target]
        delta = factor * (B @ A)
        weight = module.weight
        rows = weight.shape[0] // parts
        if swapped:
            delta = swap_halves(delta)
        weight[j * rows : (j + 1) * rows] += delta.to(weight.dtype)
    return len(keys)
