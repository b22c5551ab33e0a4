"""Tiled VAE decoding: the decoder's upsampling path on tiles, to bound memory at large sizes.

Each tile is a core widened by the decoder's `halo` (the latent pixels an output pixel can see),
so convolutions at the tile's core are exact; GroupNorm statistics are gathered image-wide first
(`TileStats`) so every tile normalises alike and the cores join without seams. The decoder's
GroupNorms consult a `stats` attribute (the VAE's `Normalize`) while tiling.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TileStats:
    """Image-wide GroupNorm statistics for tiled decoding, gathered from each tile's own core.

    While gathering, tiles normalize with their local statistics and add (count, sum, sum of
    squares) over their cores, which partition the image. Once `frozen`, every tile normalizes
    with the merged values, so all tiles compute one function and their cores join without seams.
    """

    def __init__(self):
        self.sums: dict[nn.GroupNorm, Tensor] = {}
        self.frozen = False
        self.tile_height = 1  # latent pixels
        self.core = (slice(None), slice(None))  # latent pixels, relative to the tile

    def normalize(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        """GroupNorm of tile `x` [B, C, h, w]: while gathering, with the tile's own statistics
        (adding its core's sums); once frozen, with the merged ones, as one per-channel scale and
        shift computed in fp32."""
        B, C = x.shape[:2]
        G = norm.num_groups
        if not self.frozen:
            s = x.shape[-2] // self.tile_height  # this layer's pixels per latent pixel
            rows, cols = (slice(r.start * s, r.stop * s) for r in self.core)
            core = x[..., rows, cols].float()
            per_channel = torch.stack([core.sum((2, 3)), core.square().sum((2, 3))])  # [2, B, C]
            sums = per_channel.double().view(2, B, G, C // G).sum(-1)
            n = torch.full_like(sums[:1], core[0, 0].numel() * (C // G))
            self.sums[norm] = self.sums.get(norm, 0) + torch.cat([n, sums])
            return F.group_norm(x, G, norm.weight, norm.bias, norm.eps)
        n, total, squares = self.sums[norm]  # [B, G] each
        mean = total / n
        rstd = torch.rsqrt(squares / n - mean**2 + norm.eps).float().repeat_interleave(C // G, 1)
        scale = rstd * norm.weight.float()
        shift = norm.bias.float() - mean.float().repeat_interleave(C // G, 1) * scale
        return torch.addcmul(shift[..., None, None], x, scale[..., None, None]).to(x.dtype)


def decode_tiled(
    decoder: nn.Module, h: Tensor, tile_size: int, stats: TileStats | None = None
) -> Tensor:
    """`decoder.forward_up(h)` on `tile_size`-square cores widened by `decoder.halo`.

    Runs twice, gathering GroupNorm statistics and then rendering, unless `stats` is frozen.
    """
    height, width = h.shape[-2:]
    halo = decoder.halo
    spans = [
        [
            (i, min(i + tile_size, n), max(i - halo, 0), min(i + tile_size + halo, n))
            for i in range(0, n, tile_size)
        ]
        for n in (height, width)
    ]
    stats = stats or TileStats()
    norms = [m for m in decoder.modules() if isinstance(m, nn.GroupNorm) and hasattr(m, "stats")]
    for norm in norms:
        norm.stats = stats
    out = None
    try:
        for render in (True,) if stats.frozen else (False, True):
            stats.frozen = render
            for y0, y1, ty0, ty1 in spans[0]:
                for x0, x1, tx0, tx1 in spans[1]:
                    stats.tile_height = ty1 - ty0
                    stats.core = (slice(y0 - ty0, y1 - ty0), slice(x0 - tx0, x1 - tx0))
                    tile = decoder.forward_up(h[..., ty0:ty1, tx0:tx1])
                    if render:
                        s = tile.shape[-2] // (ty1 - ty0)
                        if out is None:
                            out = tile.new_empty(*tile.shape[:2], height * s, width * s)
                        rows, cols = (slice(r.start * s, r.stop * s) for r in stats.core)
                        out[..., y0 * s : y1 * s, x0 * s : x1 * s] = tile[..., rows, cols]
    finally:
        for norm in norms:
            norm.stats = None
    return out
