"""int8 weight-only quantization of the two big networks, T5-XXL and the MMDiT.

Each weight row (one output channel) is stored as int8 with one scale, symmetric: scale = max|w|
/ 127 and q = round(w / scale), so every weight is off by at most scale / 2 (what torchao calls
int8 weight-only). Activations stay in the compute dtype: a layer converts its int8 weight to that
dtype when it runs and multiplies as before, so the saving is memory (a weight takes 1 byte
instead of 2), not time. Only the linear layers of the repeated blocks are quantized, which
hold nearly all the weights (the MMDiT's joint blocks, T5's encoder blocks); embeddings, norms
and the final layer keep the compute dtype.

int8 GEMMs. Where the int8 layers can multiply in int8 faster than in the compute dtype, they do
(`pack_for_int8_gemm`): fbgemm's dynamic int8 GEMM. That is fp32 compute on a CPU, and bf16
compute on a CPU with AVX-512 VNNI and no AMX (`hardware.cpu_int8_beats_bf16`); the speed-ups are
in benchmarks/RESULTS.md. fbgemm quantizes
the activation with one scale for the whole tensor, which loses the small tokens next to large
ones (16-23% error on tokens of log-normal magnitudes), so each token (row) is first divided by
its max |x| and the output multiplied back: one scale per token, as in LLM.int8 / SmoothQuant's
per-token mode, at 1.1-1.8% error per layer against 0.8% for the weight-only path. On AVX2 fbgemm
keeps 7 bits of the activation (`reduce_range`), since its u8 x s8 pair sums saturate int16; with
AVX-512 VNNI it keeps 8 (1.1% error instead of 1.8%). T5 keeps the weight-only path: T5's
activations have outlier channels (the reason LLM.int8 exists), which one scale per token cannot
represent, and T5 runs once per prompt, the MMDiT once per step.

int4 (`--int4`), the same layers: groups of GROUP = 32 consecutive weights of a row share one
fp16 scale, symmetric, exactly as ggml's Q4_0 (the format of stable-diffusion.cpp's and
ComfyUI-GGUF's 4-bit files): the group's weight of largest magnitude w_max gives d = w_max / -8,
q = min(15, floor(w / d + 8.5)) and w ~ d * (q - 8), so the extreme weight lands on a level (up
to d's fp16 rounding) and the 16 levels span [-8 d, 7 d] on the side where the extreme lies.
4.5 bits a weight. Symmetric rather than with a zero point (Q4_1): weights are centred on zero,
a zero point costs 16 more bits a group and a subtraction per weight, and taking the sign of the
extreme already uses the odd 16th level. 32 weights a group rather than 64 or 128: on Gaussian
weights the RMS error is 8.6% against 9.5% and 10.4%, and an outlier coarsens the step of 32
weights, not of 128; and Q4_0 files then load as they are stored (`--model x.gguf --int4`), bit
for bit. The weights are unpacked into a reused buffer in the compute dtype as each layer runs
(the int8 design).
"""

import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build import bf16_cpu_eager, kernel_library
from .hardware import cpu_int8_beats_bf16, cpu_int8_full_range

# component -> the prefixes of its quantized layers
INT8_SCOPE = {
    "mmdit": ("joint_blocks.",),
    "t5xxl": ("encoder.block.",),
    "controlnet": ("transformer_blocks.", "joint_blocks."),
}
INT8_GEMM = ("mmdit",)  # components whose int8 layers multiply in int8 where that pays
SCALE = "weight_scale"
GROUP = 32  # int4 weights a scale


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


def _scratch(numel: int, dtype: torch.dtype, device: torch.device, use: str = "weight") -> Tensor:
    """A per-thread buffer for `use` of at least `numel` elements, grown to the largest layer and
    reused (a fresh large tensor per call costs page faults on every call)."""
    buffers = _buffers.__dict__.setdefault("by_kind", {})
    buffer = buffers.get((use, dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(use, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
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
        self.packed = None  # fbgemm's packed weight once `pack()`ed, which then holds the weight

    def pack(self) -> None:
        """Move the weight into fbgemm's packed layout for `int8_gemm` (the int8 buffers are
        dropped: the weight is held once; `unpacked()` gives it back)."""
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's op is not
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                self.weight,
                self.weight_scale.double(),
                torch.zeros_like(self.weight_scale, dtype=torch.long),
                0,
            )
        self.packed = torch.ops.quantized.linear_prepack(weight, None)
        self.weight = self.weight_scale = None

    def unpack(self) -> None:
        """Back to the int8 buffers and the weight-only path (the inverse of `pack()`)."""
        if self.packed is not None:
            self.weight, self.weight_scale = self.unpacked()
            self.packed = None

    def unpacked(self) -> tuple[Tensor, Tensor]:
        """(int8 weight, fp32 scale), from the packed weight if the layer is packed."""
        if self.packed is None:
            return self.weight, self.weight_scale
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"], destination[prefix + SCALE] = self.unpacked()

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight in `dtype`: converted (exact: |q| <= 127), then scaled in place, two
        vectorised passes (far faster than torch's mixed-dtype int8 * bf16 kernel). Without autograd
        it is written into this thread's scratch buffer, valid until the next layer's call: a
        fresh buffer per call costs more in page faults than the conversion itself."""
        weight, scale = self.unpacked()
        scale = scale.to(dtype)[:, None]
        if torch.is_grad_enabled():  # autograd may keep the weight for the backward pass
            return weight.to(dtype) * scale
        out = _scratch(weight.numel(), dtype, weight.device).view(weight.shape)
        return out.copy_(weight).mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.packed is not None
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return self.int8_gemm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def int8_gemm(self, x: Tensor) -> Tensor:
        """The layer on fp32 or bf16 `x` with fbgemm's int8 GEMM, one activation scale per token
        (fbgemm takes and gives fp32: a bf16 `x` is widened while it is scaled, and the output
        narrowed while it is scaled back)."""
        rows = x.reshape(-1, self.in_features)
        scaled = _scratch(rows.numel(), torch.float32, rows.device, "tokens").view(rows.shape)
        scaled.copy_(rows)  # max and -min: faster than aminmax or vector_norm(ord=inf)
        peak = torch.maximum(
            scaled.amax(dim=1, keepdim=True), scaled.amin(dim=1, keepdim=True).neg_()
        )
        peak.clamp_min_(torch.finfo(torch.float32).tiny)
        full_range = cpu_int8_full_range()
        y = torch.ops.quantized.linear_dynamic(scaled.div_(peak), self.packed, not full_range)
        out = y if x.dtype == torch.float32 else torch.empty_like(y, dtype=x.dtype)
        if self.bias is None:
            out = torch.mul(y, peak, out=out)
        else:
            out = torch.addcmul(self.bias.to(y.dtype), y, peak, out=out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@functools.cache
def int8_gemm_available() -> bool:
    """fbgemm's dynamic int8 GEMM runs in this torch build on this CPU."""
    layer = Int8Linear(16, 4, bias=False, dtype=torch.float32)
    layer.weight.fill_(1)
    layer.weight_scale.fill_(1 / 127)
    try:
        layer.pack()
        expected = torch.full((1, 4), 16 / 127)
        return bool(torch.allclose(layer.int8_gemm(torch.ones(1, 16)), expected, rtol=1e-2))
    except (RuntimeError, AttributeError):
        return False


def pack_for_int8_gemm(module: nn.Module, component: str, dtype: torch.dtype, device) -> int:
    """Pack `component`'s int8 layers for int8 GEMMs where that pays: a component in
    `INT8_GEMM` on a CPU computing in fp32, or in bf16 where `cpu_int8_beats_bf16`, and fbgemm
    available. Returns how many layers were packed."""
    if not (
        component in INT8_GEMM
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_int8_beats_bf16()))
        and torch.device(device).type == "cpu"
        and int8_gemm_available()
    ):
        return 0
    layers = [m for m in module.modules() if type(m) is Int8Linear]
    for layer in layers:
        layer.pack()
    return len(layers)


def linear_layers(module: nn.Module, component: str) -> list[str]:
    """The names of the `nn.Linear` layers int8 mode quantizes in `component`'s module."""
    if component not in INT8_SCOPE:
        raise ValueError(f"int8 weights are for {' and '.join(INT8_SCOPE)}, not {component}")
    prefix = INT8_SCOPE[component]
    return [
        name
        for name, layer in module.named_modules()
        if name.startswith(tuple(prefix)) and type(layer) is nn.Linear
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


def quantize_int4(weight: Tensor, rows: int = 256) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (uint8 [out, in / 2], fp16 scale [out, in / 32]), ggml's Q4_0: each
    group of 32 stored as 16 bytes, value j in the low nibble of byte j and value j + 16 in
    its high nibble, off by 8. A few rows at a time, as `quantize_weight`."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise ValueError(f"int4 needs rows of a multiple of {GROUP} weights, not {in_features}")
    groups = in_features // GROUP
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, groups, dtype=torch.float16, device=weight.device)
    for start in range(0, out_features, rows):
        w = weight[start : start + rows].to(torch.float32).reshape(-1, groups, GROUP)
        peak = w.gather(2, w.abs().argmax(dim=2, keepdim=True))
        d = peak / -8
        inverse = torch.where(d == 0, 0.0, 1.0 / d)
        q = (w * inverse + 8.5).trunc_().clamp_(0, 15).to(torch.uint8)
        packed[start : start + rows] = (q[..., :16] | (q[..., 16:] << 4)).reshape(len(w), -1)
        scales[start : start + rows] = d.squeeze(2).half()
    return packed, scales


class Int4Linear(nn.Module):
    """`nn.Linear` with a 4-bit weight in ggml's Q4_0 layout (`quantize_int4`): the packed
    `weight` (uint8 [out, in / 2]) and `weight_scale` (fp16 [out, in / 32]); computes in the
    input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // GROUP
        self.register_buffer("weight", torch.empty(out_features, groups * 16, dtype=torch.uint8))
        self.register_buffer(SCALE, torch.empty(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight in `dtype`: the nibbles written into this thread's scratch buffer (reused
        until the next layer's call), then off by 8 and scaled in place. In float32 it equals
        ggml's Q4_0 dequantization."""
        n, groups = self.out_features, self.in_features // GROUP
        packed = self.weight.view(n, groups, 16)
        scale = self.weight_scale.to(dtype)[:, :, None, None]
        if torch.is_grad_enabled():
            low, high = packed & 0x0F, packed >> 4
            w = (torch.stack([low, high], dim=2).to(dtype) - 8) * scale
            return w.view(n, self.in_features)
        out = _scratch(n * self.in_features, dtype, packed.device).view(n, groups, 2, 16)
        if bf16_cpu_eager(out) and (lib := kernel_library()) is not None:  # the same, one pass
            scales = self.weight_scale.contiguous()
            lib.sd3_q4_0_to_bf16(packed.contiguous().data_ptr(), scales.data_ptr(),
                                 out.data_ptr(), n * groups, torch.get_num_threads())  # fmt: skip
            return out.view(n, self.in_features)
        nibbles = _scratch(packed.numel(), torch.uint8, packed.device, "nibbles")
        nibbles = nibbles.view(packed.shape)
        out[:, :, 0].copy_(torch.bitwise_and(packed, 0x0F, out=nibbles))
        out[:, :, 1].copy_(torch.bitwise_right_shift(packed, 4, out=nibbles))
        return out.sub_(8).mul_(scale).view(n, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


def use_int4(module: nn.Module, component: str) -> list[str]:
    """Replace `component`'s quantized linear layers (those of int8 mode) by empty `Int4Linear`s;
    returns their names."""
    names = linear_layers(module, component)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer = getattr(parent, child)
        if layer.in_features % GROUP:
            raise ValueError(
                f"int4: layer {name} has {layer.in_features} inputs, not a multiple of {GROUP}"
            )
        with torch.device(layer.weight.device):
            int4 = Int4Linear(
                layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype
            )
        setattr(parent, child, int4)
    return names
