"""The MM-DiT of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers", section 4) and
the MMDiT-X of SD3.5 Medium (an extra self-attention `attn2` on the image stream in early layers).

Two streams, image patches `x` and text `context`, each with its own weights (the "dismantled"
blocks `x_block` and `context_block`), meet in one joint attention over [context, x]. Every block is
modulated by adaLN from `c` = timestep embedding + pooled text embedding. Parameter names follow
Stability's reference files (`joint_blocks.N.x_block.attn.qkv` ...), so official state dicts load as-is.
"""

import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import kernels

HEAD_DIM = 64


@dataclass
class MMDiTConfig:
    hidden_size: int = 1536
    depth: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    context_dim: int = 4096  # width of the text context fed to context_embedder
    pooled_dim: int = 2048  # width of the pooled text vector fed to y_embedder
    mlp_hidden: int = 6144
    qk_norm: bool = False  # RMS norm on q and k per head (SD3.5)
    attn2_layers: tuple[int, ...] = ()  # MMDiT-X: blocks whose x_block has a second self-attention

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "MMDiTConfig":
        """Infer the configuration from tensor shapes of an official-layout state dict (no prefix)."""
        for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight"):
            if key not in shapes:
                raise ValueError(f"not an MMDiT state dict: tensor {key!r} is missing")
        hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
        if hidden % HEAD_DIM:
            raise ValueError(f"hidden size {hidden} must be divisible by the head dim {HEAD_DIM}")
        blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
        depth = len(blocks)
        if blocks != set(range(depth)) or depth == 0:
            raise ValueError(f"joint_blocks must be numbered 0..N-1, found {sorted(blocks)[:10]}")
        table = shapes["pos_embed"][1]
        max_size = math.isqrt(table)
        if max_size * max_size != table:
            raise ValueError(f"pos_embed has {table} positions, which is not a square table")
        return cls(
            hidden_size=hidden,
            depth=depth,
            patch_size=patch,
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
            pos_embed_max_size=max_size,
            context_dim=shapes["context_embedder.weight"][1],
            pooled_dim=shapes["y_embedder.mlp.0.weight"][1],
            mlp_hidden=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0],
            qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
            attn2_layers=tuple(
                i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes
            ),
        )


class Modulation(NamedTuple):
    """adaLN's per-sample (shift, scale, gate) for one sub-layer (DiT's adaLN-Zero): the input
    is normed, then scaled and shifted; the sub-layer's output is gated into the residual."""

    shift: Tensor
    scale: Tensor
    gate: Tensor | None = None  # None where no residual follows (the final layer, pre_only blocks)


def modulate(x: Tensor, m: Modulation) -> Tensor:
    """x (1 + scale) + shift, per sample, in one pass over x."""
    return torch.addcmul(m.shift.unsqueeze(1), x, 1 + m.scale.unsqueeze(1))


def gated(x: Tensor, m: Modulation, y: Tensor) -> Tensor:
    """The gated residual x + gate y, per sample, in one pass."""
    return torch.addcmul(x, m.gate.unsqueeze(1), y)


class BlockModulation(NamedTuple):
    """One stream's modulations in a joint block: attention, MLP and (MMDiT-X) the second
    self-attention. Stored in the adaLN linear's output in the order of Stability's reference:
    (shift, scale, gate) of attn, mlp, attn2; a `pre_only` block has attn's (shift, scale) only."""

    attn: Modulation
    mlp: Modulation | None = None
    attn2: Modulation | None = None


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the (continuous) timestep t = 1000·sigma, cos half first."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear: the timestep (`t_embedder`) and pooled-text (`y_embedder`) embedders."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """2x2 patches of the latent to tokens: [B, C, H, W] -> [B, H/2 * W/2, hidden]."""

    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        # contiguous tokens: else every later elementwise op keeps the conv's channels-first layout
        # and each LayerNorm and linear copies it back
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


class QKV(NamedTuple):
    """One stream's attention inputs, each [B, heads, L, 64], and its qk-norms (or None)."""

    q: Tensor
    k: Tensor
    v: Tensor
    q_norm: nn.Module | None
    k_norm: nn.Module | None


class SelfAttention(nn.Module):
    """The q, k, v projections (with optional per-head RMS qk-norm) and output projection.

    The attention itself happens outside, jointly over both streams; `pre_only` blocks have no
    output projection because their attention output is never used.
    """

    def __init__(self, dim: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(HEAD_DIM), RMSNorm(HEAD_DIM)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> QKV:
        """x [B, L, dim] -> q, k, v heads (views of one projection) with this stream's qk-norms."""
        B, L, _ = x.shape
        qkv = kernels.linear(x, self.qkv).view(B, L, 3, self.num_heads, HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return QKV(q, k, v, getattr(self, "ln_q", None), getattr(self, "ln_k", None))

    def project(self, attn: Tensor) -> Tensor:
        return kernels.linear(attn, self.proj)


def joint_attention(streams: Sequence[QKV]) -> Tensor:
    """Attention over the streams' concatenated sequence (SD3, section 4): each stream's q and k
    RMS-normed by its own norms, then softmax(q kᵀ / √d) v over all tokens; [B, ΣL, heads * 64].

    Where a CPU kernel applies, it computes the same while reading the streams in place."""
    if kernels.joint_attention_fusable(streams):
        return kernels.joint_attention(streams)
    q = _cat([s.q_norm(s.q) if s.q_norm is not None else s.q for s in streams])
    k = _cat([s.k_norm(s.k) if s.k_norm is not None else s.k for s in streams])
    v = _cat([s.v for s in streams])
    return kernels.attention(q, k, v)


def _cat(heads: list[Tensor]) -> Tensor:
    return heads[0] if len(heads) == 1 else torch.cat(heads, dim=2)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(kernels.linear(x, self.fc1, "gelu_tanh"), self.fc2)


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: its own LayerNorms, q/k/v and output projections, MLP
    and adaLN modulation. A `pre_only` block (the last context block) only produces its q, k, v.
    With `attn2` (MMDiT-X) the image stream also attends to itself alone."""

    def __init__(self, config: MMDiTConfig, pre_only: bool = False, attn2: bool = False):
        super().__init__()
        dim = config.hidden_size
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, config.qk_norm, pre_only)
        if attn2:
            self.attn2 = SelfAttention(dim, config.qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, config.mlp_hidden)
        self.n_mods = 2 if pre_only else 9 if attn2 else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim))

    @property
    def has_attn2(self) -> bool:
        return hasattr(self, "attn2")

    def modulation(self, c: Tensor) -> BlockModulation:
        chunks = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        if self.pre_only:
            return BlockModulation(Modulation(*chunks))
        return BlockModulation(
            Modulation(*chunks[0:3]),
            Modulation(*chunks[3:6]),
            Modulation(*chunks[6:9]) if self.has_attn2 else None,
        )

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """This stream alone (`self_attention_block`): a module call, so hooks on the block run."""
        return self_attention_block(self, x, c)

    def mlp_residual(self, x: Tensor, mod: BlockModulation) -> Tensor:
        return gated(x, mod.mlp, self.mlp(modulate(self.norm2(x), mod.mlp)))


class JointBlock(nn.Module):
    """The MM-DiT block: both streams attend jointly over the concatenated sequence [context, x].
    The last block's context stream is `pre_only` unless `context_pre_only` says otherwise (an
    InstantX ControlNet's blocks all carry the context on)."""

    def __init__(self, config: MMDiTConfig, index: int, context_pre_only: bool | None = None):
        super().__init__()
        if context_pre_only is None:
            context_pre_only = index == config.depth - 1
        self.context_block = DismantledBlock(config, pre_only=context_pre_only)
        self.x_block = DismantledBlock(config, attn2=index in config.attn2_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        ctx_block, x_block = self.context_block, self.x_block
        ctx_mod, x_mod = ctx_block.modulation(c), x_block.modulation(c)

        # each stream's q, k, v from its own adaLN-modulated input
        ctx_qkv = ctx_block.attn.heads(modulate(ctx_block.norm1(context), ctx_mod.attn))
        x_normed = x_block.norm1(x)
        x_qkv = x_block.attn.heads(modulate(x_normed, x_mod.attn))

        # one attention over [context, x], split back into the streams
        attn = joint_attention([ctx_qkv, x_qkv])
        ctx_attn, x_attn = attn.split([context.shape[1], x.shape[1]], dim=1)

        x = gated(x, x_mod.attn, x_block.attn.project(x_attn))
        if x_block.has_attn2:  # MMDiT-X: the image tokens attend among themselves too
            x_qkv2 = x_block.attn2.heads(modulate(x_normed, x_mod.attn2))
            x = gated(x, x_mod.attn2, x_block.attn2.project(joint_attention([x_qkv2])))
        x = x_block.mlp_residual(x, x_mod)
        if ctx_block.pre_only:
            return None, x
        context = gated(context, ctx_mod.attn, ctx_block.attn.project(ctx_attn))
        return ctx_block.mlp_residual(context, ctx_mod), x


def self_attention_block(block: DismantledBlock, x: Tensor, c: Tensor) -> Tensor:
    """One stream through a DismantledBlock alone: adaLN-modulated self-attention, then the MLP
    (the blocks of the SD3.5 Large ControlNet, which see no text tokens)."""
    mod = block.modulation(c)
    qkv = block.attn.heads(modulate(block.norm1(x), mod.attn))
    x = gated(x, mod.attn, block.attn.project(joint_attention([qkv])))
    return block.mlp_residual(x, mod)


def crop_pos_embed(table: Tensor, size: int, h: int, w: int) -> Tensor:
    """The centre h x w crop of a square size x size table of positional embeddings."""
    top, left = (size - h) // 2, (size - w) // 2
    grid = table.view(1, size, size, -1)
    return grid[:, top : top + h, left : left + w].reshape(1, h * w, -1)


class ControlResiduals(NamedTuple):
    """One ControlNet's outputs (already scaled by its strength) and where they are added.

    `every_block` (Stability's rule, the SD3.5 ControlNets): after every joint block i, the last
    included, output i // (depth // n). Otherwise diffusers' rule (the InstantX ControlNets): after
    every block but the last, output floor(i * n / depth)."""

    residuals: Sequence[Tensor]
    every_block: bool = False

    def after_block(self, i: int, depth: int) -> Tensor | None:
        n = len(self.residuals)
        if self.every_block:
            return self.residuals[i // (depth // n)]
        return None if i == depth - 1 else self.residuals[i * n // depth]


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from tokens back to patches."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        dim, p = config.hidden_size, config.patch_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = Modulation(*self.adaLN_modulation(c).chunk(2, dim=1))
        return self.linear(modulate(self.norm_final(x), mod))


class MMDiT(nn.Module):
    """The SD3 / SD3.5 diffusion transformer. Predicts the flow velocity v = noise - x0."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_max_size**2, dim))
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        self.t_embedder = MLPEmbedder(256, dim)
        self.y_embedder = MLPEmbedder(config.pooled_dim, dim)
        self.context_embedder = nn.Linear(config.context_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(config)

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError unless a latent of this size fits the positional-embedding table."""
        p, max_size = self.config.patch_size, self.config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(
                f"latent size {height}x{width} must be a multiple of the patch size {p}"
            )
        if height // p > max_size or width // p > max_size:
            limit = max_size * p * 8
            raise ValueError(
                f"image size {width * 8}x{height * 8} is larger than this model's positional table "
                f"allows ({limit}x{limit})"
            )

    def temporaries(self) -> AbstractContextManager:
        """Where an inference pass runs: with freed activations kept for reuse, in either CPU dtype
        (`kernels.for_inference`). Each forward holds it; a sampling loop holds it across all its
        steps, so the memory is not given back and faulted in again between them."""
        return kernels.for_inference(self.pos_embed, (torch.bfloat16, torch.float32))

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w crop of the stored square table of positional embeddings."""
        return crop_pos_embed(self.pos_embed, self.config.pos_embed_max_size, h, w)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        pooled: Tensor,
        skip_layers: Sequence[int] = (),
        controlnet_residuals: Sequence[Tensor] | Sequence[ControlResiduals] | None = None,
    ) -> Tensor:
        """x [B, C, H, W] latent, timestep [B] = 1000·sigma, context [B, L, context_dim],
        pooled [B, pooled_dim] -> velocity [B, C, H, W].

        `skip_layers` drops whole joint blocks (skip-layer guidance); a skipped block gets no
        ControlNet residual either, as in Stability's reference. `controlnet_residuals`: one
        `ControlResiduals` per ControlNet, their residuals summed (`ControlResiduals.after_block`
        says which is added after which block); a plain list of tensors is one ControlNet under
        diffusers' rule.
        """
        controls = list(controlnet_residuals or ())
        if controls and isinstance(controls[0], Tensor):
            controls = [ControlResiduals(controls)]
        B, _, H, W = x.shape
        self.check_size(H, W)
        p = self.config.patch_size
        h, w = H // p, W // p
        with self.temporaries():
            x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)
            t_emb = timestep_embedding(timestep.expand(B), 256).to(x.dtype)
            c = self.t_embedder(t_emb) + self.y_embedder(pooled)
            context = self.context_embedder(context)

            for i, block in enumerate(self.joint_blocks):
                if i in skip_layers:
                    continue
                context, x = block(context, x, c)
                for control in controls:
                    residual = control.after_block(i, self.config.depth)
                    if residual is not None:
                        x = x + residual

            x = self.final_layer(x, c)
            return self.unpatchify(x, h, w)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """[B, h*w, p*p*C] tokens -> [B, C, h*p, w*p] latent."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)
