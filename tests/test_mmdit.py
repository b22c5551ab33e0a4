"""MMDiT: config inference from the official layouts, and parity with diffusers' SD3Transformer2DModel."""

import pytest
import torch
from helpers import diffusers_mmdit, max_rel_err, randomize, read_layout

from sd3.models.mmdit import MMDiT, MMDiTConfig

PREFIX = "model.diffusion_model."

OFFICIAL = {
    "mmdit_sd3_medium": MMDiTConfig(
        depth=24, hidden_size=1536, pos_embed_max_size=192, qk_norm=False
    ),
    "mmdit_sd3.5_medium": MMDiTConfig(
        depth=24,
        hidden_size=1536,
        pos_embed_max_size=384,
        qk_norm=True,
        attn2_layers=tuple(range(13)),
    ),
    "mmdit_sd3.5_large": MMDiTConfig(
        depth=38, hidden_size=2432, pos_embed_max_size=192, qk_norm=True, mlp_hidden=9728
    ),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_layout_infers_config_and_matches_keys(name):
    shapes = read_layout(name, PREFIX)
    config = MMDiTConfig.from_shapes(shapes)
    assert config == OFFICIAL[name]
    with torch.device("meta"):
        model = MMDiT(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes


def twin(model: MMDiT, _weights) -> torch.nn.Module:
    return diffusers_mmdit(model)


REDUCED = {
    "sd3_medium": MMDiTConfig(depth=3, hidden_size=128, mlp_hidden=512, pos_embed_max_size=16, context_dim=96, pooled_dim=80),
    "sd3.5_medium": MMDiTConfig(
        depth=3, hidden_size=128, mlp_hidden=512, pos_embed_max_size=16, context_dim=96, pooled_dim=80,
        qk_norm=True, attn2_layers=(0, 1),
    ),
    "sd3.5_large": MMDiTConfig(
        depth=4, hidden_size=192, mlp_hidden=768, pos_embed_max_size=12, context_dim=64, pooled_dim=48, qk_norm=True
    ),
}  # fmt: skip


def inputs(config: MMDiTConfig, batch: int, h: int, w: int, n_ctx: int = 21, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    context = torch.randn(batch, n_ctx, config.context_dim, generator=g)
    pooled = torch.randn(batch, config.pooled_dim, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    return x, timestep, context, pooled


@pytest.mark.parametrize("variant", REDUCED)
@pytest.mark.parametrize("size", [(24, 16), (16, 24), (8, 8)])
def test_forward_matches_diffusers(variant, size):
    config = REDUCED[variant]
    model = MMDiT(config).eval()
    ref = twin(model, randomize(model, seed=1))
    x, t, context, pooled = inputs(config, 2, *size)
    with torch.no_grad():
        ours = model(x, t, context, pooled)
        theirs = ref(
            hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
    err = max_rel_err(ours, theirs)
    print(f"{variant} {size}: max rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("variant", ["sd3_medium", "sd3.5_medium"])
def test_skip_layers_match_diffusers(variant):
    config = REDUCED[variant]
    model = MMDiT(config).eval()
    ref = twin(model, randomize(model, seed=2))
    x, t, context, pooled = inputs(config, 1, 16, 16)
    with torch.no_grad():
        full = model(x, t, context, pooled)
        ours = model(x, t, context, pooled, skip_layers=[1])
        theirs = ref(
            hidden_states=x,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=t,
            skip_layers=[1],
        ).sample
    assert max_rel_err(ours, theirs) < 1e-5
    assert max_rel_err(ours, full) > 1e-2  # skipping a block changes the output


def test_controlnet_residuals_match_diffusers():
    config = REDUCED["sd3.5_large"]
    model = MMDiT(config).eval()
    ref = twin(model, randomize(model, seed=3))
    x, t, context, pooled = inputs(config, 1, 12, 12)
    g = torch.Generator().manual_seed(4)
    residuals = [torch.randn(1, 36, config.hidden_size, generator=g) for _ in range(3)]
    with torch.no_grad():
        ours = model(x, t, context, pooled, controlnet_residuals=residuals)
        theirs = ref(
            hidden_states=x,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=t,
            block_controlnet_hidden_states=residuals,
        ).sample
    assert max_rel_err(ours, theirs) < 1e-5


@pytest.mark.slow
def test_full_width_sd35_medium_blocks_match_diffusers():
    """Two joint blocks at the real SD3.5 Medium width: block 0 with attn2, block 1 pre-only."""
    config = MMDiTConfig(depth=2, pos_embed_max_size=16, qk_norm=True, attn2_layers=(0,))
    torch.manual_seed(0)
    model = MMDiT(config).eval()
    ref = twin(model, randomize(model, seed=5))
    x, t, context, pooled = inputs(config, 1, 16, 12, n_ctx=154)
    with torch.no_grad():
        ours = model(x, t, context, pooled)
        theirs = ref(
            hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
    err = max_rel_err(ours, theirs)
    print(f"full-width SD3.5 Medium blocks: max rel err {err:.2e}")
    assert err < 1e-5


def test_bad_sizes_raise_clear_errors():
    model = MMDiT(REDUCED["sd3_medium"])
    x, t, context, pooled = inputs(REDUCED["sd3_medium"], 1, 34, 16)
    with pytest.raises(ValueError, match="larger than this model's positional table allows"):
        model(x, t, context, pooled)
    x, t, context, pooled = inputs(REDUCED["sd3_medium"], 1, 15, 16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(x, t, context, pooled)


def test_from_shapes_rejects_non_mmdit():
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        MMDiTConfig.from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3)})
    shapes = read_layout("mmdit_sd3_medium", PREFIX)
    shapes["pos_embed"] = (1, 1000, 1536)
    with pytest.raises(ValueError, match="not a square"):
        MMDiTConfig.from_shapes(shapes)
