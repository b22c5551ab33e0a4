"""SD3 VAE: official key layout, config from shapes, parity with diffusers' AutoencoderKL, tiling."""

import weakref

import pytest
import torch
from helpers import max_rel_err, read_layout
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sd3.kernels.tiling import TileStats, decode_tiled
from sd3.models.vae import (
    SCALE,
    SHIFT,
    AutoEncoder,
    VAEConfig,
    from_latent_format,
    to_latent_format,
)

SMALL = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
SMALL4 = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


def random_vae(config: VAEConfig, seed: int = 0) -> AutoEncoder:
    """Seeded weights with non-trivial scales: fan-in scaled convs, GroupNorm affine away from (1, 0)."""
    vae = AutoEncoder(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return vae


def diffusers_twin(vae: AutoEncoder):
    """diffusers' AutoencoderKL holding our weights, renamed by diffusers' own LDM converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = vae.config
    n = len(c.ch_mult)
    ref = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        layers_per_block=c.num_res_blocks,
        latent_channels=c.z_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=SHIFT,
        scaling_factor=SCALE,
    ).eval()
    checkpoint = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, ref.config), strict=True)
    return ref


def test_official_layout():
    with torch.device("meta"):
        vae = AutoEncoder(VAEConfig())
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == read_layout("vae", strip_prefix="first_stage_model.")


def test_config_from_shapes():
    assert VAEConfig.from_shapes(read_layout("vae", "first_stage_model.")) == VAEConfig()
    for config in (SMALL, SMALL4):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in AutoEncoder(config).state_dict().items()}
        assert VAEConfig.from_shapes(shapes) == config

    shapes = read_layout("vae", "first_stage_model.")
    with pytest.raises(ValueError, match="decoder.up.1.block.0.conv1.weight"):
        VAEConfig.from_shapes({**shapes, "decoder.up.1.block.0.conv1.weight": (256, 256, 3, 3)})
    with pytest.raises(ValueError, match="decoder.mid.attn_1.q.bias"):
        VAEConfig.from_shapes({k: v for k, v in shapes.items() if k != "decoder.mid.attn_1.q.bias"})
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        VAEConfig.from_shapes(read_layout("mmdit_sd3_medium", "model.diffusion_model."))
    with pytest.raises(ValueError, match=r"\[48, 96\]"):
        VAEConfig(ch=48, ch_mult=(1, 2))


@pytest.mark.parametrize("config, size", [(SMALL, (48, 64)), (SMALL4, (40, 56))])
def test_parity_with_diffusers(config, size):
    vae = random_vae(config)
    ref = diffusers_twin(vae)
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(image)
        dist = ref.encode(image).latent_dist
        errors = {"mean": max_rel_err(mean, dist.mean), "logvar": max_rel_err(logvar, dist.logvar)}

        # Latent format: diffusers' pipelines scale with (z - shift_factor) * scaling_factor.
        latent = vae.encode(image)
        ref_latent = (dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
        errors["latent"] = max_rel_err(latent, ref_latent)
        ref_image = ref.decode(
            ref_latent / ref.config.scaling_factor + ref.config.shift_factor
        ).sample
        errors["decode"] = max_rel_err(vae.decode(latent), ref_image)
    print(f"VAE parity {config.ch_mult} {size}: {errors}")
    assert mean.shape == (2, 16, size[0] // vae.downscale, size[1] // vae.downscale)
    assert ref_image.shape == image.shape
    assert logvar.std() > 0.1 and ref_image.std() > 0.1  # non-degenerate activations
    assert max(errors.values()) < 1e-5


def test_attention_in_query_chunks_matches_diffusers(monkeypatch):
    from sd3.models.vae import AttnBlock

    vae = random_vae(SMALL)
    ref = diffusers_twin(vae)
    latent = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = vae.decode(latent)
        monkeypatch.setattr(AttnBlock, "max_scores", 100)  # 48 keys: chunks of 2 queries
        chunked = vae.decode(latent)
        expected = ref.decode(latent / ref.config.scaling_factor + ref.config.shift_factor).sample
    err, err_whole = max_rel_err(chunked, expected), max_rel_err(whole, expected)
    print(f"VAE decode vs diffusers: attention in 24 chunks {err:.1e}, in one {err_whole:.1e}")
    assert err < 1e-5 and max_rel_err(chunked, whole) < 5e-6


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_phases_equal_upsample_then_conv(layout):
    """The inference path of `Upsample` (one 2x2 conv on the low-res input, phases interleaved)
    against nearest 2x upsampling then the 3x3 conv (the training path, diffusers' order): equal
    up to rounding in fp64, and in bf16 no further from the fp64 result than the plain bf16 path."""
    from sd3.models.vae import Upsample

    g = torch.Generator().manual_seed(3)
    layer = Upsample(64).double()
    with torch.no_grad():
        layer.conv.weight.copy_(torch.randn(64, 64, 3, 3, generator=g) / 24)
        layer.conv.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(2, 64, 5, 7, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.enable_grad():
        plain = layer(x)  # gradients on: the plain path
    with torch.no_grad():
        phases = layer(x)
        assert phases.is_contiguous(memory_format=layout) and phases.shape == (2, 64, 10, 14)
        fp64_err = max_rel_err(phases, plain)
        bf16 = layer.bfloat16()
        phases_bf16 = bf16(x.bfloat16())
        plain_bf16 = bf16.conv(torch.nn.functional.interpolate(x.bfloat16(), scale_factor=2.0))
    err, plain_err = max_rel_err(phases_bf16, plain), max_rel_err(plain_bf16, plain)
    print(f"Upsample phases: fp64 {fp64_err:.1e}; bf16 {err:.2e} (plain bf16 {plain_err:.2e})")
    assert fp64_err < 1e-13
    assert err < 2 * plain_err  # measured 4.15e-3 vs 4.05e-3


def test_latent_format_round_trip():
    z = torch.randn(1, 16, 4, 4)
    assert torch.allclose(to_latent_format(z), (z - 0.0609) * 1.5305)
    assert torch.allclose(from_latent_format(to_latent_format(z)), z, atol=1e-6)


def test_seeded_sample():
    vae = random_vae(SMALL)
    ref = diffusers_twin(vae)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        a = vae.encode(image, torch.Generator().manual_seed(7))
        b = vae.encode(image, torch.Generator().manual_seed(7))
        c = vae.encode(image, torch.Generator().manual_seed(8))
        mean, logvar = vae.encode_moments(image)
        ref_sample = ref.encode(image).latent_dist.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    by_hand = to_latent_format(mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    assert torch.allclose(a, by_hand, rtol=0, atol=1e-6)
    err = max_rel_err(a, to_latent_format(ref_sample))
    print(f"seeded sample vs diffusers latent_dist.sample: {err:.2e}")
    assert err < 1e-5


def test_bad_sizes():
    vae = random_vae(SMALL4)
    with pytest.raises(ValueError, match="height 44 and width 64 multiples of 8"):
        vae.encode(torch.zeros(1, 3, 44, 64))
    with pytest.raises(ValueError, match=r"shape \(3, 64, 64\)"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="tile_size=0"):
        vae.decode(torch.zeros(1, 16, 8, 8), tile_size=0)


def inhomogeneous_latent(height: int, width: int) -> torch.Tensor:
    """Like a real image: flat regions next to busy ones, so per-tile statistics would differ."""
    gen = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0.2, 3.0, width)
    latent = torch.randn(1, 16, height, width, generator=gen) * ramp
    latent[..., : height // 2, :] += 1.5
    return latent


def test_tiled_decode_matches_untiled():
    vae = random_vae(SMALL)
    latent = torch.randn(1, 16, 24, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = vae.decode(latent)
        tiled = vae.decode(latent, tile_size=8)
        one_tile = vae.decode(latent, tile_size=40)
    err = max_rel_err(tiled, full)
    print(f"tiled decode (tile 8, merged GroupNorm stats) vs untiled: max rel err {err:.2e}")
    assert tiled.shape == full.shape == (1, 3, 96, 160)
    assert err < 3e-2
    assert torch.equal(one_tile, full)  # one tile: the untiled path


@pytest.mark.parametrize("config", [SMALL, SMALL4])
def test_tiles_are_exact_given_global_stats(config):
    """Tiles with `halo` margins reproduce the untiled decode when handed its GroupNorm statistics
    (gathered from one tile covering everything); the only tiling error left is the statistics."""
    vae = random_vae(config)
    latent = inhomogeneous_latent(24, 40)
    with torch.no_grad():
        full = vae.decode(latent)
        h = vae.decoder.forward_mid(from_latent_format(latent))
        exact = TileStats()
        decode_tiled(vae.decoder, h, tile_size=max(h.shape[-2:]), stats=exact)
        tiled = decode_tiled(vae.decoder, h, tile_size=10, stats=exact)
    err = max_rel_err(tiled, full)
    print(f"tiled decode {config.ch_mult} with the untiled GroupNorm stats: max rel err {err:.2e}")
    # fp32 rounding only: oneDNN picks convolution algorithms by input size (1.3e-5 on a Zen 5)
    assert err < 3e-5


class PeakMemory(TorchDispatchMode):
    """Peak bytes held by live tensors (kernel workspaces aside); works on the meta device."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:
                self.live += t.nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self.free, t.nbytes)
        return out

    def free(self, nbytes: int):
        self.live -= nbytes


def test_tiled_decode_memory_2048(monkeypatch):
    """Full-size model, 2048x2048 fp16 on the meta device: tiles bound the activation memory."""
    # The mid block's attention runs in query chunks of at most 2^26 scores (128 MB here).
    with torch.device("meta"):
        vae = AutoEncoder(VAEConfig()).eval().half()
        latent = torch.randn(1, 16, 256, 256, dtype=torch.half)
    peaks = {}
    for tile in (None, 64):
        with torch.no_grad(), PeakMemory() as memory:
            image = vae.decode(latent, tile_size=tile)
        assert image.shape == (1, 3, 2048, 2048)
        peaks[tile] = memory.peak / 2**30
        del image
    print(
        f"2048x2048 fp16 decode, peak activations GiB: untiled {peaks[None]:.2f}, tile 64 {peaks[64]:.2f}"
    )
    assert peaks[64] < 2.0 and peaks[None] > 3 * peaks[64]


needs_kernel = pytest.mark.skipif(
    __import__("sd3.kernels.flash_attention", fromlist=["x"]).kernel_library() is None,
    reason="no AVX-512 BF16 kernel library on this machine",
)


@needs_kernel
@pytest.mark.parametrize("shape,mean", [((2, 128, 33, 20), 0.0), ((1, 512, 16, 16), 6.0)])
def test_group_norm_silu_kernel(shape, mean):
    """The fused GroupNorm + SiLU kernel on channels-last bf16 against GroupNorm then SiLU in fp64
    (channel means up to 6 exercise the shifted sums), no further off than torch's bf16 path."""
    from sd3.kernels.fused import group_norm_silu

    g = torch.Generator().manual_seed(4)
    C = shape[1]
    x = torch.randn(shape, generator=g) * torch.rand(1, C, 1, 1, generator=g) * 3
    x = (x + mean * torch.rand(1, C, 1, 1, generator=g)).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(32, C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        norm.bias.copy_(0.1 * torch.randn(C, generator=g))
        expected = torch.nn.functional.group_norm(
            x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6
        )
        norm = norm.bfloat16()
        ours, ours_no_silu = group_norm_silu(x, norm), group_norm_silu(x, norm, silu=False)
        plain = torch.nn.functional.silu(norm(x))
    assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == torch.bfloat16
    err = max_rel_err(ours, torch.nn.functional.silu(expected))
    plain_err = max_rel_err(plain, torch.nn.functional.silu(expected))
    no_silu_err = max_rel_err(ours_no_silu, expected)
    print(f"GroupNorm+SiLU kernel {shape}: {err:.2e} (torch bf16 {plain_err:.2e}), "
          f"GroupNorm alone {no_silu_err:.2e}")  # fmt: skip
    assert (
        err <= 1.2 * plain_err and no_silu_err < 8e-3
    )  # measured 4.8e-3 vs 5.4e-3, 4.5e-3 vs 6.6e-3


@needs_kernel
def test_bf16_decode_close_to_diffusers():
    """The bf16 CPU decode (channels-last, fused GroupNorm + SiLU, sub-pixel upsampling) against
    diffusers in fp32, no further off than diffusers' own bf16 decode."""
    vae = random_vae(SMALL4)
    ref = diffusers_twin(vae)
    latent = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref.decode(latent / ref.config.scaling_factor + ref.config.shift_factor).sample
        ref_bf16 = (
            ref.bfloat16()
            .decode((latent / ref.config.scaling_factor + ref.config.shift_factor).bfloat16())
            .sample
        )
        ours = vae.bfloat16().decode(latent.bfloat16())
    err, ref_err = max_rel_err(ours, expected), max_rel_err(ref_bf16, expected)
    print(f"bf16 decode vs diffusers fp32: ours {err:.2e}, diffusers bf16 {ref_err:.2e}")
    assert ours.dtype == torch.bfloat16 and err < 1.5 * ref_err  # measured 2.02e-2 vs 2.36e-2
