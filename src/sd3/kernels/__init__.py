"""Speed and memory, underneath the models: nothing here changes what a model computes.

The models call only the functions below. Each one either takes a faster path (a C++ kernel
built for this CPU, oneDNN's fused ops, a layout or memory trick) or runs the plain PyTorch it
stands for, so every model also runs on any device, with gradients, and under torch.compile.

- `linear(x, layer, activation)`: `activation(layer(x))`, bias and GELU fused into oneDNN's GEMM
  for bf16 CPU inference (`fused.py`); int8 layers (`quantization.py`) dequantize into it.
- `attention(q, k, v)`: softmax(q kᵀ / √d) v, through the flash-attention kernel for bf16 CPU
  inference (`flash_attention.py`, `csrc/flash_attention_cpu.cpp`), else torch's SDPA.
- `joint_attention(streams)` where `joint_attention_fusable(streams)`: the MM-DiT's qk-norm,
  concatenation and attention read in place by the kernel (`fused.py`).
- `group_norm_silu(x, norm)`: GroupNorm then SiLU in two passes over a channels-last bf16 tensor.
- `upsample_conv3x3_phases(x, conv)` where `upsample_phases_apply(x)`: nearest 2x upsampling and
  a 3x3 conv on the low-resolution input (`upsample.py`).
- `decode_tiled(decoder, h, tile_size)` with `TileStats`: the VAE's upsampling path on tiles that
  share GroupNorm statistics, to bound memory (`tiling.py`).
- `for_inference(x)`: a context in which freed activations are kept for reuse (`allocator.py`).
- `channels_last_for_inference(module, x, probe)`: the layout oneDNN's CPU convolutions run
  fastest on, for inference (`layout.py`).

`hardware.py` says what the CPU has; `build.py` compiles and loads the C++ kernels (`csrc/`).
"""

from .allocator import for_inference
from .flash_attention import attention
from .fused import group_norm_silu, joint_attention, joint_attention_fusable, linear
from .layout import channels_last_for_inference
from .tiling import TileStats, decode_tiled
from .upsample import upsample_conv3x3_phases, upsample_phases_apply

__all__ = [
    "TileStats",
    "attention",
    "channels_last_for_inference",
    "decode_tiled",
    "for_inference",
    "group_norm_silu",
    "joint_attention",
    "joint_attention_fusable",
    "linear",
    "upsample_conv3x3_phases",
    "upsample_phases_apply",
]
