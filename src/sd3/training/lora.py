"""LoRA (Hu et al. 2021) on the MMDiT's linear layers, saved in diffusers' SD3 LoRA format.

W x  ->  W x + (alpha / rank) B A x, with W frozen, A [rank, in] random and B [out, rank] zero at
the start. Targets are module-name suffixes: "attn.qkv" selects every `*.attn.qkv` (both streams),
"x_block.attn.qkv" only the image stream's, "mlp.fc1" both MLP inputs, and so on.

diffusers' format (what `StableDiffusion3Pipeline.load_lora_weights` reads, PEFT naming):
`transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight`, `...lora_B.weight`, written by
`sd3.loras.convert` (our fused `qkv` is three diffusers layers sharing lora_A; the saved lora_B
carries the factor alpha / rank, so diffusers' default scale 1 is right). The file loads back
like any other LoRA (`sd3 generate --lora`, `sd3.loras`).
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sd3.loras import LoRAFile, layers_of, match, merge_into_module
from sd3.loras.convert import Update, diffusers_tensors
from sd3.models.mmdit import MMDiT

DEFAULT_TARGETS = ("attn.qkv", "attn.proj")  # diffusers' SD3 LoRA script default: attention only


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight)
        self.lora_B.to(base.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta_factor(self) -> Tensor:
        """scale * B [out, rank] in fp32: the up factor with the scale folded in."""
        return self.scale * self.lora_B.weight.detach().float()

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
    mmdit: MMDiT,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Freeze the MMDiT and put LoRA on the linear layers named by `targets` (their A drawn from
    `generator`, a CPU one). Returns them by name."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    chosen = lora_targets(mmdit, targets)
    mmdit.requires_grad_(False)
    layers = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = mmdit.get_submodule(parent_name)
        layers[name] = LoRALinear(getattr(parent, child), rank, alpha, generator)
        setattr(parent, child, layers[name])
    return layers


def lora_layers(mmdit: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in mmdit.named_modules() if isinstance(m, LoRALinear)}


def lora_weights(mmdit: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights by their names in the MMDiT: all that LoRA training changes."""
    return {
        f"{name}.{factor}.weight": getattr(layer, factor).weight
        for name, layer in lora_layers(mmdit).items()
        for factor in ("lora_A", "lora_B")
    }


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
# diffusers' format (`sd3.loras`)


def to_diffusers(layers: Mapping[str, LoRALinear], depth: int) -> dict[str, Tensor]:
    """LoRA weights in diffusers' SD3 format; lora_B includes the alpha / rank scale."""
    updates = [
        Update("mmdit", name, layer.lora_A.weight.detach().float(), layer.delta_factor())
        for name, layer in layers.items()
    ]
    return diffusers_tensors(updates, depth)


@torch.no_grad()
def merge_diffusers_lora(mmdit: MMDiT, state_dict: Mapping[str, Tensor], scale: float = 1.0) -> int:
    """Add a LoRA in any format `sd3.loras` reads (diffusers' SD3 format from `to_diffusers`,
    kohya's ...) into the MMDiT's weights. Returns the number of LoRA modules applied."""
    lora = match(
        LoRAFile.from_tensors(state_dict), {"mmdit": layers_of(mmdit)}, mmdit.config.depth,
        scale=scale,
    )  # fmt: skip
    merge_into_module(mmdit, "mmdit", [lora])
    return len(lora.applied)
