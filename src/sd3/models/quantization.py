"""int8 weight-only quantization of the two big networks, T5-XXL and the MMDiT.

Each weight row (one output channel) is stored as int8 with one scale, symmetric: scale = max|w|
/ 127 and q = round(w / scale), so every weight is off by at most scale / 2 (what torchao calls
int8 weight-only). Activations stay in the compute dtype: a layer converts its int8 weight to that
dtype when it runs and multiplies as before, so the saving is memory (a weight takes 1 byte
instead of 2), not time. Only the linear layers of the repeated blocks are quantized, which
hold nearly all the weights (the MMDiT's joint blocks, T5's encoder blocks); embeddings, norms
and the final layer keep the compute dtype.
"""

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT8_SCOPE = {"mmdit": "joint_blocks.", "t5xxl": "encoder.block."}  # component -> layers prefix
SCALE = "weight_scale"


def quantize_weight(weight: Tensor, rows: int = 256) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (int8 [out, in], fp32 scale [out]) with |weight - q * scale| <= scale / 2.
    A few rows at a time, so the fp32 temporaries stay small (large ones, freed between tensors
    of a loading model, fragment the heap and can leave gigabytes resident)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].to(torch.float32, copy=True)
        s = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q[start : start + rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[start : start + rows] = s
    return q, scale


_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-thread buffer of at least `numel` elements, grown to the largest layer and reused."""
    buffers = _buffers.__dict__.setdefault("by_kind", {})
    buffer = buffers.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and a per-output-channel fp32 scale (same state-dict key
    for the weight, plus `weight_scale`); computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer(SCALE, torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight in `dtype`: converted (exact: |q| <= 127), then scaled in place, two
        vectorised passes (6x faster than the mixed-dtype int8 * bf16 kernel). Without autograd
        it is written into this thread's scratch buffer, valid until the next layer's call: a
        fresh buffer per call costs more in page faults than the conversion itself."""
        scale = self.weight_scale.to(dtype)[:, None]
        if torch.is_grad_enabled():  # autograd may keep the weight for the backward pass
            return self.weight.to(dtype) * scale
        out = _scratch(self.weight.numel(), dtype, self.weight.device).view(self.weight.shape)
        return out.copy_(self.weight).mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def linear_layers(module: nn.Module, component: str) -> list[str]:
    """The names of the `nn.Linear` layers int8 mode quantizes in `component`'s module."""
    if component not in INT8_SCOPE:
        raise ValueError(f"int8 weights are for {' and '.join(INT8_SCOPE)}, not {component}")
    prefix = INT8_SCOPE[component]
    return [
        name
        for name, layer in module.named_modules()
        if name.startswith(prefix) and type(layer) is nn.Linear
    ]


def use_int8(module: nn.Module, component: str) -> list[str]:
    """Replace `component`'s quantized linear layers by empty `Int8Linear`s on the same device
    (typically meta, before loading); returns their names."""
    names = linear_layers(module, component)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer = getattr(parent, child)
        with torch.device(layer.weight.device):
            int8 = Int8Linear(
                layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype
            )
        setattr(parent, child, int8)
    return names
