"""How a LoRA module changes a layer: merged into its weight, or run beside it.

Merged: the weight, in fp32, gets s·ΔW added on the target's rows (halves swapped where the
module's naming orders them the other way), or with DoRA becomes W + s·(W' − W); the caller then
converts (or quantizes) the result. Beside (`Adapted`): the layer's output gets s·ΔW x added at run
time, so strengths change without touching the weights.
"""

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..checkpoints import swap_halves
from .formats import Module
from .names import Target


class Strength(Protocol):
    scale: float


def _delta(module: Module, target: Target) -> Tensor:
    delta = module.delta()
    return swap_halves(delta) if target.swapped else delta


def merge_into_weight(w: Tensor, module: Module, target: Target, strength: float) -> None:
    """Add the module's update at `strength` into the fp32 weight `w`, in place."""
    rows = w.view(w.shape[0], -1)[target.rows(w.shape[0])]
    delta = _delta(module, target)
    if module.magnitude is None:
        rows.add_(delta, alpha=strength)
        return
    m = module.read("magnitude").flatten()
    by_rows = module.magnitude_axis() == "rows"
    if target.swapped and by_rows:
        m = swap_halves(m)
    merged = rows + delta
    norm = merged.norm(dim=1 if by_rows else 0, keepdim=True).clamp_min(
        torch.finfo(torch.float32).tiny
    )
    dora = merged * ((m[:, None] if by_rows else m[None, :]) / norm)
    rows.add_(dora - rows, alpha=strength)


def merge_into_bias(b: Tensor, module: Module, target: Target, strength: float) -> None:
    """Add the module's bias update (if any) at `strength` into the fp32 bias `b`, in place."""
    delta = module.bias_delta()
    if delta is not None:
        b[target.rows(b.shape[0])] += strength * (swap_halves(delta) if target.swapped else delta)


class Adapted(nn.Module):
    """A linear or convolution layer with LoRA updates running beside it, not merged:
    y = layer(x) + Σ sᵢ ΔWᵢ x (+ Σ sᵢ Δbᵢ). Low-rank updates stay low-rank: all of the layer's
    LoRAs make one pair of thin matrices (their downs stacked, their ups side by side on their
    rows), so a layer costs two small GEMMs more; LoHa, LoKr and full updates are kept as one
    dense ΔW, as is everything on a convolution. `refresh()` takes new strengths."""

    def __init__(
        self,
        base: nn.Module,
        entries: Sequence[tuple[Strength, Module, Target]],
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.base = base
        self.entries = list(entries)
        self.dtype, self.device = dtype, device
        conv = isinstance(base, nn.Conv2d)
        self.out = base.out_channels if conv else base.out_features
        # each update once, in fp32 on the CPU: (owner, target, down, up) or (owner, target, ΔW)
        self._low_rank, self._dense, self._bias = [], [], []
        for owner, module, target in self.entries:
            if module.has_weight:
                if module.kind == "lora" and not conv:
                    down, up = module.factors()
                    up = swap_halves(up) if target.swapped else up
                    self._low_rank.append((owner, target, down, up))
                else:
                    self._dense.append((owner, target, _delta(module, target)))
            bias = module.bias_delta()
            if bias is not None:
                self._bias.append((owner, target, swap_halves(bias) if target.swapped else bias))
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the combined update from the owners' current strengths."""
        down = up = dense = bias = None
        if self._low_rank:
            down = torch.cat([d for _, _, d, _ in self._low_rank])
            up = torch.zeros(self.out, down.shape[0])
            col = 0
            for owner, target, _, u in self._low_rank:
                up[target.rows(self.out), col : col + u.shape[1]] = owner.scale * u
                col += u.shape[1]
        if self._dense:
            dense = torch.zeros(self.out, self._dense[0][2].shape[1])
            for owner, target, d in self._dense:
                dense[target.rows(self.out)] += owner.scale * d
        if self._bias:
            bias = torch.zeros(self.out)
            for owner, target, b in self._bias:
                bias[target.rows(self.out)] += owner.scale * b
        to = {"dtype": self.dtype, "device": self.device}
        self.down, self.up, self.dense, self.bias = (
            None if t is None else t.to(**to) for t in (down, up, dense, bias)
        )

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if isinstance(base, nn.Conv2d):
            y = base(x)
            if self.dense is not None:
                weight = self.dense.view(base.weight.shape)
                y = y + F.conv2d(
                    x, weight, None, base.stride, base.padding, base.dilation, base.groups
                )
            return y if self.bias is None else y + self.bias[:, None, None]
        y = kernels.linear(x, base)
        if self.down is not None:
            y = y + F.linear(F.linear(x, self.down), self.up)
        if self.dense is not None:
            y = y + F.linear(x, self.dense)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{len(self.entries)} LoRA update(s), not merged"


def adapted_layers(module: nn.Module) -> dict[str, Adapted]:
    return {n: m for n, m in module.named_modules() if isinstance(m, Adapted)}


def remove_adapted(module: nn.Module) -> None:
    """Put every adapted layer's own layer back."""
    for name, layer in adapted_layers(module).items():
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.base)
