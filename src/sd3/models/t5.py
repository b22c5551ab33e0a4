"""T5-XXL v1.1 encoder: the third text encoder of SD3 / SD3.5, giving the T5 half of the context.

T5 v1.1 (Raffel et al. 2020, with the v1.1 changes): pre-norm blocks with RMS LayerNorm,
a gated-GELU feed-forward, no biases, no 1/sqrt(d) attention scaling, and a bucketed relative
position bias computed once (by block 0) and shared by every block. SD3 passes no attention
mask, so padding tokens are attended to. Parameter names follow transformers' `T5EncoderModel`,
which is how the official checkpoints store them.

Half precision: T5 v1.1's activations outgrow fp16 (the gated feed-forward product and the
residual stream reach ~1e5). The residual stream therefore stays in fp32 while the linear layers
run in the weight dtype, and the feed-forward output projection sees a power-of-two-rescaled
input (exact, since it is linear), so nothing is clamped.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_DIM = 64


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128  # not visible in the shapes; 128 for every T5
    eps: float = 1e-6

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"T5 needs at least one layer, got layers={self.layers}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4, got {self.num_buckets}")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "T5Config":
        """Infer the config from `{key: shape}` in transformers naming (no file prefix)."""
        attn = "encoder.block.0.layer.0.SelfAttention."
        needed = [
            "encoder.embed_tokens.weight",
            attn + "q.weight",
            attn + "relative_attention_bias.weight",
        ]
        needed.append("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
        for key in needed:
            if key not in shapes:
                raise ValueError(f"not a T5 v1.1 encoder: missing key {key!r}")
        vocab_size, d_model = shapes["encoder.embed_tokens.weight"]
        inner = shapes[attn + "q.weight"][0]  # heads * 64; equals d_model for T5-XXL only
        num_buckets, bias_heads = shapes[attn + "relative_attention_bias.weight"]
        if inner % HEAD_DIM or inner // HEAD_DIM != bias_heads:
            raise ValueError(
                f"attention inner dim {inner} must be {HEAD_DIM} * heads, with heads = {bias_heads} "
                "from relative_attention_bias"
            )
        block_ids = {int(m[1]) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
        if block_ids != set(range(len(block_ids))):
            raise ValueError(f"T5 block indices must be 0..N-1, got {sorted(block_ids)}")
        return cls(
            vocab_size=vocab_size,
            d_model=d_model,
            layers=len(block_ids),
            heads=bias_heads,
            d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
            num_buckets=num_buckets,
        )


def relative_position_bucket(
    relative_position: Tensor, num_buckets: int, max_distance: int
) -> Tensor:
    """Bidirectional T5 bucketing of (key - query) offsets: exact below num_buckets/4, log-spaced
    up to max_distance, everything beyond in the last bucket; the upper half is for keys after the query."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    # clamp_min(1) only avoids log(0); those positions take the exact branch anyway
    log_ratio = torch.log(n.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMS norm in fp32 (no mean subtraction, no bias), returned in the weight dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        inner, self.heads = config.heads * HEAD_DIM, config.heads
        self.q, self.k, self.v = (nn.Linear(config.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.heads)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        # T5 folds the 1/sqrt(d) scaling into its weights, so scale=1
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(x.transpose(1, 2).reshape(B, T, -1))


class T5DenseGatedGelu(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x).float(), approximate="tanh") * self.wi_1(x).float()
        # The product overflows fp16 in T5 v1.1; scaling each row by a power of two before the
        # (linear) output projection and undoing it in fp32 afterwards is exact.
        scale = torch.exp2(h.abs().amax(-1, keepdim=True).clamp_min(1).log2().ceil())
        return self.wo((h / scale).to(x.dtype)).float() * scale


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.eps)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), position_bias).float()


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x)).float()


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(config, has_relative_bias), T5LayerFF(config)]
        )

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.block = nn.ModuleList(
            T5Block(config, has_relative_bias=i == 0) for i in range(config.layers)
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.eps)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder stack: input_ids -> final-normed hidden states."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.encoder = T5Stack(config)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """Block 0's relative position bias [1, heads, length, length], shared by all blocks."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.config.num_buckets, self.config.max_distance
        )
        bias_table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return bias_table(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> hidden states [B, T, d_model] in the weight dtype (no mask, as SD3)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        x = self.encoder.embed_tokens(input_ids).float()  # the residual stream stays in fp32
        position_bias = self.position_bias(input_ids.shape[1], input_ids.device)
        for block in self.encoder.block:
            x = block(x, position_bias)
        return self.encoder.final_layer_norm(x)
