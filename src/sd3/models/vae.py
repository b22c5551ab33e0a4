"""The SD3 / SD3.5 autoencoder: the LDM "AutoencoderKL" with a 16-channel latent.

Same network as Stability's sd3.5 reference (`VAEEncoder` / `VAEDecoder`): ResNet blocks with
GroupNorm(32) and swish, one self-attention block in the middle, no quant convs. The MMDiT works
on `(z - SHIFT) * SCALE`; `encode` returns and `decode` takes that latent format. Tiled decoding
keeps memory bounded at large sizes without seams (see `kernels.decode_tiled`).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import TileStats

SHIFT = 0.0609
SCALE = 1.5305


def to_latent_format(z: Tensor) -> Tensor:
    return (z - SHIFT) * SCALE


def from_latent_format(latent: Tensor) -> Tensor:
    return latent / SCALE + SHIFT


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 16

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or any(w <= 0 or w % 32 for w in widths):
            raise ValueError(
                f"VAE widths {widths} (ch={self.ch}, ch_mult={self.ch_mult}) must be positive multiples of 32"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={self.num_res_blocks} must be at least 1")

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "VAEConfig":
        """Infer the config from an official-layout state dict's shapes (no `first_stage_model.` prefix)."""
        if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
            raise ValueError(
                "not an SD3 VAE: encoder.conv_in.weight or decoder.conv_in.weight is missing"
            )
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = 0
        while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
            levels += 1
        num_res_blocks = 0
        while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in shapes:
            num_res_blocks += 1
        widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
        if not levels or any(w % ch for w in widths):
            raise ValueError(
                f"not an SD3 VAE: encoder level widths {widths} are not multiples of ch={ch}"
            )
        config = cls(
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=num_res_blocks,
            in_channels=in_channels,
            out_channels=shapes.get("decoder.conv_out.weight", (3,))[0],
            z_channels=shapes["decoder.conv_in.weight"][1],
        )
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoEncoder(config).state_dict().items()}
        wrong = [k for k, s in expected.items() if k not in shapes or tuple(shapes[k]) != s]
        if wrong:
            found = {k: tuple(shapes[k]) if k in shapes else "missing" for k in wrong[:3]}
            raise ValueError(
                f"not an SD3 VAE of inferred {config}: {len(wrong)} keys differ, e.g. {found}"
            )
        return config


class Normalize(nn.GroupNorm):
    """GroupNorm(32, eps=1e-6); during tiled decoding, `stats` shares image-wide statistics across tiles."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-6)
        self.stats: TileStats | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.stats is None:
            return super().forward(x)
        return self.stats.normalize(self, x)

    def silu(self, x: Tensor, inplace: bool = False) -> Tensor:
        """`F.silu(self(x))`, fused into one kernel where it can be (`kernels.group_norm_silu`),
        over `x` if `inplace` and the kernel runs."""
        if self.stats is None:
            return kernels.group_norm_silu(x, self, inplace=inplace)
        return F.silu(self.stats.normalize(self, x))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        same = in_channels == out_channels
        self.nin_shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1.silu(x))
        if torch.is_grad_enabled():
            return self.nin_shortcut(x) + self.conv2(self.norm2.silu(h))
        # inference: conv1's and conv2's outputs are overwritten, not copied (less peak memory)
        return self.conv2(self.norm2.silu(h, inplace=True)).add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 convs as the projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    # Queries per SDPA call: at head dim 512 torch's CPU SDPA forms the full score matrix, which
    # at 2048² (65,536 latent pixels) would be 16 GB; in chunks it is at most 2^26 scores.
    max_scores = 2**26

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # [B, 1, pixels, C] with C contiguous: a channels-last CPU tensor already is; otherwise a
        # copy, without which CUDA's SDPA falls back to its slower fp32 math path
        q, k, v = (
            p(h).flatten(2).transpose(1, 2).contiguous()[:, None] for p in (self.q, self.k, self.v)
        )
        chunk = max(1, self.max_scores // k.shape[2])
        h = torch.cat(
            [F.scaled_dot_product_attention(qc, k, v) for qc in q.split(chunk, dim=2)], dim=2
        )
        return x + self.proj_out(h[:, 0].transpose(1, 2).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        if kernels.upsample_phases_apply(x):  # the same on the low-resolution input
            return kernels.upsample_conv3x3_phases(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in (1, *c.ch_mult)]
        self.conv_in = conv3x3(c.in_channels, c.ch)
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(widths[i + (j > 0)], widths[i + 1]) for j in range(c.num_res_blocks)
            )
            if i < len(c.ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)
        self.mid = MidBlock(widths[-1])
        self.norm_out = Normalize(widths[-1])
        self.conv_out = conv3x3(widths[-1], 2 * c.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return self.conv_out(self.norm_out.silu(self.mid(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = conv3x3(c.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # `up[i]` mirrors `down[i]` (as in the LDM code), so it runs from the last index to 0.
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()
            in_width = widths[min(i + 1, len(widths) - 1)]
            level.block = nn.ModuleList(
                ResnetBlock(width if j else in_width, width) for j in range(c.num_res_blocks + 1)
            )
            if i > 0:
                level.upsample = Upsample(width)
            self.up.append(level)
        self.norm_out = Normalize(widths[0])
        self.conv_out = conv3x3(widths[0], c.out_channels)
        # Latent pixels an output pixel can see through `forward_up` (one per 3x3 conv at its
        # resolution, summed over levels) rounded up: the margin tiles need to be exact.
        self.halo = 4 * c.num_res_blocks + 6

    def forward_mid(self, z: Tensor) -> Tensor:
        return self.mid(self.conv_in(z))

    def forward_up(self, h: Tensor) -> Tensor:
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out.silu(h))


class AutoEncoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.downscale = 2 ** (len(config.ch_mult) - 1)

    def memory_format_for(self, x: Tensor) -> Tensor:
        """`x` in the layout the convolutions run fastest on (`kernels.channels_last_for_inference`)."""
        return kernels.channels_last_for_inference(self, x, self.decoder.conv_in.weight)

    def encode_moments(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the posterior, [B, 16, H/8, W/8] each."""
        height, width = image.shape[-2:] if image.ndim == 4 else (None, None)
        if height is None or height % self.downscale or width % self.downscale:
            raise ValueError(
                f"image of shape {tuple(image.shape)}: expected [B, C, H, W] with height {height} "
                f"and width {width} multiples of {self.downscale}"
            )
        image = self.memory_format_for(image.to(self.encoder.conv_in.weight.dtype))
        with kernels.for_inference(image):
            moments = self.encoder(image)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latent in the MMDiT format: the posterior mean, or a sample from it when given a generator."""
        mean, logvar = self.encode_moments(image)
        if generator is None:
            return to_latent_format(mean)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        return to_latent_format(mean + torch.exp(0.5 * logvar) * noise.to(mean))

    def decode(self, latent: Tensor, tile_size: int | None = None) -> Tensor:
        """MMDiT-format latent -> image in [-1, 1] (not clamped).

        `tile_size` (latent pixels) bounds memory: the mid block, attention included, still sees
        the whole latent, and the upsampling path runs on tiles that share GroupNorm statistics.
        """
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"tile_size={tile_size} must be a positive number of latent pixels")
        z = self.memory_format_for(from_latent_format(latent.to(self.decoder.conv_in.weight.dtype)))
        if tile_size is None or tile_size >= max(z.shape[-2:]):  # the mid block keeps the size
            with kernels.for_inference(z):
                return self.decoder.forward_up(self.decoder.forward_mid(z))
        # Tiles keep malloc's default past the mid block: memory bound first (kept blocks would
        # fragment the heap across tiles of several sizes)
        with kernels.for_inference(z):
            h = self.decoder.forward_mid(z)
        return kernels.decode_tiled(self.decoder, h, tile_size)
