"""Freshly initialised SD3-shaped model families of named sizes, for training from scratch.

The MMDiT is initialised as DiT / SD3 do (Peebles & Xie 2023): Xavier-uniform linear layers,
zero biases, N(0, 0.02) timestep embedder, adaLN-Zero (every modulation and the final projection
start at zero, so each block starts as the identity and the model predicts 0), and a fixed 2D
sin-cos positional table. Text encoders and VAE keep PyTorch's default initialisation: random
frozen encoders still give every caption a distinct embedding, but a random VAE's decoder does not
invert its encoder, so use a trained VAE (`vae=`) to get images out.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sd3.models.clip import CLIPConfig, CLIPTextModel
from sd3.models.mmdit import MMDiT, MMDiTConfig
from sd3.models.t5 import T5Config, T5Encoder
from sd3.models.vae import AutoEncoder, VAEConfig


@dataclass(frozen=True)
class FamilyConfig:
    mmdit: MMDiTConfig
    vae: VAEConfig
    clip_l: CLIPConfig
    clip_g: CLIPConfig
    t5xxl: T5Config | None


def family_config(
    depth: int,
    hidden: int,
    pos: int,
    clip_l: int,
    clip_g: int,
    t5: int | None,
    vae_ch: int,
    vae_mult: tuple[int, ...] = (1, 2, 4, 4),
    attn2_layers: tuple[int, ...] = (),
) -> FamilyConfig:
    """A family of these widths: an MMDiT (RMS qk-norm; attn2 in `attn2_layers`, MMDiT-X) of
    `depth` blocks, `hidden` wide, with a `pos` x `pos` positional table; 2-layer CLIP-L, CLIP-G and
    T5 (None: no T5) with 64-wide heads; a VAE of `vae_ch` base channels times `vae_mult`."""
    context = max(clip_l + clip_g, t5 or 0)
    return FamilyConfig(
        mmdit=MMDiTConfig(
            hidden_size=hidden, depth=depth, mlp_hidden=4 * hidden, pos_embed_max_size=pos,
            context_dim=context, pooled_dim=clip_l + clip_g, qk_norm=True,
            attn2_layers=tuple(attn2_layers),
        ),
        vae=VAEConfig(ch=vae_ch, ch_mult=tuple(vae_mult), num_res_blocks=1),
        clip_l=CLIPConfig(width=clip_l, layers=2, heads=clip_l // 64, mlp_width=4 * clip_l),
        clip_g=CLIPConfig(
            width=clip_g, layers=2, heads=clip_g // 64, mlp_width=4 * clip_g, hidden_act="gelu",
            project_pooled=True,
        ),
        t5xxl=T5Config(d_model=t5, layers=2, heads=t5 // 64, d_ff=2 * t5) if t5 else None,
    )  # fmt: skip


INIT_CONFIGS = {
    # name: (depth, hidden, pos_embed_max_size, CLIP-L, CLIP-G, T5 widths, VAE channels)
    "tiny": family_config(2, 64, 32, 64, 128, 128, 32),  # for tests and smoke runs
    "small": family_config(6, 384, 64, 128, 256, 256, 32),  # ~30M MMDiT parameters
    "base": family_config(12, 768, 96, 256, 512, 512, 64),  # ~220M MMDiT parameters
}


def sincos_table(size: int, dim: int) -> Tensor:
    """2D sin-cos positional embeddings [size * size, dim] (MAE / DiT): the first half of the
    channels encode the column, the second half the row."""

    def one_axis(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    table = torch.cat([one_axis(cols.flatten(), dim // 2), one_axis(rows.flatten(), dim // 2)], 1)
    return table.float()


@torch.no_grad()
def init_mmdit(mmdit: MMDiT) -> MMDiT:
    for module in mmdit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    w = mmdit.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(mmdit.x_embedder.proj.bias)
    for layer in (mmdit.t_embedder.mlp[0], mmdit.t_embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    for block in mmdit.joint_blocks:
        for half in (block.x_block, block.context_block):
            nn.init.zeros_(half.adaLN_modulation[-1].weight)
            nn.init.zeros_(half.adaLN_modulation[-1].bias)
    final = mmdit.final_layer
    for layer in (final.adaLN_modulation[-1], final.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    size = mmdit.config.pos_embed_max_size
    mmdit.pos_embed.copy_(sincos_table(size, mmdit.config.hidden_size)[None])
    return mmdit


def fresh_text_encoders(family: FamilyConfig) -> dict[str, nn.Module | None]:
    """{"clip_l", "clip_g", "t5xxl"} (None if the family has no T5), frozen and in eval mode,
    drawn from the global RNG in that order (seed it, or fork it as `fresh_models` does)."""
    models = {
        "clip_l": CLIPTextModel(family.clip_l),
        "clip_g": CLIPTextModel(family.clip_g),
        "t5xxl": T5Encoder(family.t5xxl) if family.t5xxl else None,
    }
    for m in models.values():
        if m is not None:
            m.eval().requires_grad_(False)
    return models


def fresh_models(name: str, seed: int = 0) -> dict[str, nn.Module | None]:
    """{"mmdit", "vae", "clip_l", "clip_g", "t5xxl"} of the named size, seeded, in eval mode."""
    if name not in INIT_CONFIGS:
        raise ValueError(f"unknown init config {name!r}; choose one of {', '.join(INIT_CONFIGS)}")
    family = INIT_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):  # default initialisers draw from the global RNG
        torch.manual_seed(seed)
        models = {"mmdit": init_mmdit(MMDiT(family.mmdit)), "vae": AutoEncoder(family.vae)}
        models |= fresh_text_encoders(family)
    for m in (models["mmdit"], models["vae"]):
        m.eval().requires_grad_(False)
    return models
