"""ControlNets for the MM-DiT: a trainable copy of (part of) the transformer that reads a control
latent (edges, depth, a blurred image ... encoded by the VAE) and returns one residual per block,
which the base MMDiT adds to its image tokens (`mmdit.ControlResiduals`).

Two flavours, told apart by their tensors' shapes:

- "sd3.5" (Stability's SD3.5 Large ControlNets, `dit_embedder.ControlNetEmbedder`, its "8B" path):
  the input is the base model's own patch embedding plus its cropped positional embedding, plus
  `pos_embed_input` of the control latent; c = t_embedder(t) + y_embedder(raw pooled vector);
  chained self-attention blocks (DismantledBlocks without a text stream); one linear output per
  block. Its outputs are added after every base block, the last included (`every_block`).
- "instantx" (the SD3 Medium ControlNets of InstantX, diffusers' `SD3ControlNetModel` with a
  `context_embedder`): full joint blocks over [context, x] with their own patch and positional
  embedding and context embedder; the pooled vector is zeros. Added under diffusers' rule.

Parameter names follow Stability's: `transformer_blocks.N.attn.qkv` ... for the SD3.5 kind (as in
its official files), `joint_blocks.N.x_block...` as in the MMDiT for the InstantX kind.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .mmdit import (
    HEAD_DIM,
    ControlResiduals,
    DismantledBlock,
    JointBlock,
    MLPEmbedder,
    MMDiT,
    MMDiTConfig,
    PatchEmbed,
    crop_pos_embed,
    timestep_embedding,
)

SD35, INSTANTX = "sd3.5", "instantx"

# Stability's control types, as its files store them in the int `control_type` tensor
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}


@dataclass
class ControlNetConfig:
    kind: str = SD35
    hidden_size: int = 2432
    depth: int = 19
    patch_size: int = 2
    control_channels: int = 16  # channels of the control latent (pos_embed_input)
    pooled_dim: int = 2048
    mlp_hidden: int = 9728
    # InstantX only: its own patch embedding, positional table and text stream
    in_channels: int = 16
    pos_embed_max_size: int = 0
    context_dim: int = 0
    qk_norm: bool = False
    attn2_layers: tuple[int, ...] = ()

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    def block_config(self) -> MMDiTConfig:
        """The MMDiT configuration its blocks are built from."""
        return MMDiTConfig(
            hidden_size=self.hidden_size, depth=self.depth, patch_size=self.patch_size,
            in_channels=self.in_channels, out_channels=self.in_channels,
            pos_embed_max_size=max(self.pos_embed_max_size, 1), context_dim=self.context_dim,
            pooled_dim=self.pooled_dim, mlp_hidden=self.mlp_hidden, qk_norm=self.qk_norm,
            attn2_layers=self.attn2_layers,
        )  # fmt: skip

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "ControlNetConfig":
        """Infer the configuration (and the flavour) from tensor shapes in our naming."""
        for key in ("pos_embed_input.proj.weight", "controlnet_blocks.0.weight"):
            if key not in shapes:
                raise ValueError(f"not an SD3 ControlNet: tensor {key!r} is missing")
        hidden, control_channels, patch, _ = shapes["pos_embed_input.proj.weight"]
        if hidden % HEAD_DIM:
            raise ValueError(f"hidden size {hidden} must be divisible by the head dim {HEAD_DIM}")
        joint = any(k.startswith("joint_blocks.") for k in shapes)
        prefix = "joint_blocks" if joint else "transformer_blocks"
        blocks = {int(k.split(".")[1]) for k in shapes if k.startswith(prefix + ".")}
        depth = len(blocks)
        if depth == 0 or blocks != set(range(depth)):
            raise ValueError(f"{prefix} must be numbered 0..N-1, found {sorted(blocks)[:10]}")
        outputs = {int(k.split(".")[1]) for k in shapes if k.startswith("controlnet_blocks.")}
        if outputs != blocks:
            raise ValueError(f"{depth} blocks but {len(outputs)} controlnet_blocks outputs")
        pooled_dim = shapes["y_embedder.mlp.0.weight"][1]
        if not joint:
            return cls(
                SD35, hidden, depth, patch, control_channels, pooled_dim,
                mlp_hidden=shapes["transformer_blocks.0.mlp.fc1.weight"][0],
            )  # fmt: skip
        table = shapes["pos_embed"][1]
        max_size = math.isqrt(table)
        if max_size * max_size != table:
            raise ValueError(f"pos_embed has {table} positions, which is not a square table")
        return cls(
            INSTANTX, hidden, depth, patch, control_channels, pooled_dim,
            mlp_hidden=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0],
            in_channels=shapes["x_embedder.proj.weight"][1], pos_embed_max_size=max_size,
            context_dim=shapes["context_embedder.weight"][1],
            qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
            attn2_layers=tuple(
                i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes
            ),
        )  # fmt: skip


class ControlNet(nn.Module):
    """Control latent (+ the base model's inputs) -> one residual per block, times a strength."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        dim, blocks = config.hidden_size, config.block_config()
        self.t_embedder = MLPEmbedder(256, dim)
        self.y_embedder = MLPEmbedder(config.pooled_dim, dim)
        self.pos_embed_input = PatchEmbed(config.patch_size, config.control_channels, dim)
        if config.kind == INSTANTX:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_max_size**2, dim))
            self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
            self.context_embedder = nn.Linear(config.context_dim, dim)
            self.joint_blocks = nn.ModuleList(
                JointBlock(blocks, i, context_pre_only=False) for i in range(config.depth)
            )
        else:
            self.transformer_blocks = nn.ModuleList(
                DismantledBlock(blocks) for _ in range(config.depth)
            )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.depth))

    @property
    def every_block(self) -> bool:
        """Whether the base model adds an output after every block (Stability's rule)."""
        return self.config.kind == SD35

    def forward(
        self,
        base: MMDiT,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        pooled: Tensor,
        control: Tensor,
        strength: float = 1.0,
    ) -> ControlResiduals:
        """The base model's inputs (x [B, C, H, W], timestep [B], context, pooled) and the control
        latent [B or 1, C, H, W] -> the residuals `base` adds, scaled by `strength`."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        if self.config.kind == SD35:
            tokens = base.x_embedder(x) + base.cropped_pos_embed(h, w).to(x.dtype)
            y = pooled
        else:
            table = crop_pos_embed(self.pos_embed, self.config.pos_embed_max_size, h, w)
            tokens = self.x_embedder(x) + table.to(x.dtype)
            y = torch.zeros_like(pooled)
        t_emb = timestep_embedding(timestep.expand(B), 256).to(x.dtype)
        c = self.t_embedder(t_emb) + self.y_embedder(y)
        tokens = tokens + self.pos_embed_input(control.to(x.dtype)).expand(B, -1, -1)

        outputs = []
        if self.config.kind == SD35:
            for block in self.transformer_blocks:
                tokens = block(tokens, c)
                outputs.append(tokens)
        else:
            context = self.context_embedder(context)
            for block in self.joint_blocks:
                context, tokens = block(context, tokens, c)
                outputs.append(tokens)
        residuals = [
            out(h) * strength for out, h in zip(self.controlnet_blocks, outputs, strict=True)
        ]
        return ControlResiduals(residuals, self.every_block)
