"""The VAE decoder's nearest 2x upsampling + 3x3 conv, computed on the low-resolution input.

Output pixel (2i + a, 2j + b) reads low-res pixels i - 1 + a .. i + a and j - 1 + b .. j + b
only, so each of the four phases (a, b) is a 2x2 conv whose taps are sums of the 3x3 taps (as in
a transposed conv). Each phase's 2x2 conv is written into its pixels of the output: the same
numbers up to the rounding of the summed taps, with 16 products per output pixel and channel
pair instead of 36, and no upsampled copy of the input. Training keeps the plain path, and so do
GPUs, where the strided writes of the phases cost more than the products they save
(benchmarks/RESULTS.md).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Which low-resolution rows a 3x3 conv's kernel rows read after a nearest 2x upsampling, by the
# output row's parity a: [a, u, ky] = 1 where kernel row ky lands on low-res row i - 1 + a + u.
_PHASE_TAPS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])


def upsample_phases_apply(x: Tensor) -> bool:
    """Whether `upsample_conv3x3_phases` serves: CPU inference (no gradients)."""
    return not torch.is_grad_enabled() and x.device.type == "cpu"


def phase_weight(conv: nn.Conv2d) -> Tensor:
    """[4 * out, in, 2, 2]: the 2x2 kernels of phases (a, b) in the order 2a + b."""
    w = conv.weight
    taps = _PHASE_TAPS.to(w.device, torch.float64 if w.dtype == torch.float64 else torch.float32)
    kernels = torch.einsum("auy,bvx,ocyx->abocuv", taps, taps, w.to(taps.dtype))
    return kernels.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(w.dtype)


def upsample_conv3x3_phases(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`conv(F.interpolate(x, scale_factor=2, mode="nearest"))` for a 3x3, padding-1 conv, in the
    layout of `x` (channels-last or not)."""
    B, _, H, W = x.shape
    out_channels = conv.out_channels
    kernels, bias = phase_weight(conv), conv.bias
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(
        B, out_channels, 2 * H, 2 * W, dtype=x.dtype, device=x.device, memory_format=layout
    )
    for a in (0, 1):
        for b in (0, 1):
            # one phase at a time (as fast as one conv of all four, a quarter of the memory):
            # phase (a, b) of low-res pixel (i, j) is at (i + a, j + b) of [B, out, H+1, W+1]
            i = 2 * a + b
            kernel = kernels[i * out_channels : (i + 1) * out_channels]
            phase = F.conv2d(x, kernel, bias, padding=1)
            out[:, :, a::2, b::2] = phase[:, :, a : a + H, b : b + W]
    return out
