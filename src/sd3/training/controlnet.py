"""Training a ControlNet of the SD3.5 Large kind for a frozen MMDiT, and saving it in Stability's
single-file layout (what `sd3 generate --controlnet` and the reference load).

Initialisation follows diffusers' ControlNet training (`SD3ControlNetModel.from_transformer`,
train_controlnet_sd3.py): the timestep and pooled-text embedders and the first N blocks are copied
from the base model, and what feeds the control in and the residuals out starts at zero
(`pos_embed_input`, `controlnet_blocks`), so the untrained ControlNet adds exactly nothing and the
model starts as the base model. The SD3.5 kind's blocks see no text tokens: each is the image
stream's half (`x_block`) of the base's joint block, without the base's qk-norm and second
self-attention (MMDiT-X), which this layout has no place for.

The objective is the base model's rectified-flow loss (`flow.flow_loss`), the velocity now that of
the base model plus the ControlNet's residuals for the example's control latent.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from sd3.checkpoints import MMDIT_TOP_NAMES
from sd3.control import control_latent, control_pixels
from sd3.models.controlnet import CONTROL_TYPES, SD35, ControlNet, ControlNetConfig
from sd3.models.mmdit import MMDiT
from sd3.models.vae import AutoEncoder

from .checkpoint import save_atomic, save_new

CONTROL_CODES = {name: code for code, name in CONTROL_TYPES.items()}


def valid_block_counts(depth: int) -> list[int]:
    """The ControlNet block counts whose outputs serve a `depth`-block MMDiT by Stability's rule
    (block i takes output i // (depth // n), the last block included)."""
    return [n for n in range(1, depth + 1) if (depth - 1) // (depth // n) < n]


def check_blocks(blocks: int, depth: int) -> None:
    if blocks not in valid_block_counts(depth):
        raise ValueError(
            f"a ControlNet of {blocks} blocks cannot serve the MMDiT's {depth} blocks (block i "
            f"takes output i // (depth // blocks)); choose one of "
            f"{', '.join(map(str, valid_block_counts(depth)))}"
        )


@torch.no_grad()
def controlnet_from_base(mmdit: MMDiT, blocks: int) -> ControlNet:
    """A ControlNet of the SD3.5 Large kind for `mmdit`, initialised from its first `blocks`
    blocks with zero input and output projections (the module docstring)."""
    c = mmdit.config
    check_blocks(blocks, c.depth)
    config = ControlNetConfig(
        SD35, c.hidden_size, blocks, c.patch_size, c.in_channels, c.pooled_dim, c.mlp_hidden
    )
    like = mmdit.pos_embed
    net = ControlNet(config).to(like.device, like.dtype)
    net.t_embedder.load_state_dict(mmdit.t_embedder.state_dict())
    net.y_embedder.load_state_dict(mmdit.y_embedder.state_dict())
    n_mods = 6 * c.hidden_size  # (shift, scale, gate) of attn and mlp; not attn2's
    for block, joint in zip(net.transformer_blocks, mmdit.joint_blocks, strict=False):
        source = joint.x_block
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            block.get_submodule(name).load_state_dict(source.get_submodule(name).state_dict())
        block.adaLN_modulation[1].weight.copy_(source.adaLN_modulation[1].weight[:n_mods])
        block.adaLN_modulation[1].bias.copy_(source.adaLN_modulation[1].bias[:n_mods])
    for layer in (net.pos_embed_input.proj, *net.controlnet_blocks):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


def controlled(mmdit: MMDiT, controlnet: ControlNet, control: Tensor) -> Callable[..., Tensor]:
    """The velocity model (x, timestep, context, pooled) -> v of the MMDiT with the ControlNet's
    residuals for the control latent [B, C, H, W] added (`flow.flow_loss` takes it as its model)."""

    def velocity(x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        residuals = controlnet(mmdit, x, timestep, context, pooled, control)
        return mmdit(x, timestep, context, pooled, controlnet_residuals=[residuals])

    return velocity


# --- data -------------------------------------------------------------------------------------


class ControlImages(Dataset):
    """The control images of a dataset's examples, as the VAE encoder reads them for this
    ControlNet kind and control type (`sd3.control.control_pixels`), with the captions: what
    `data.cached_latents(..., encode=control_encoder(vae))` turns into control latents."""

    def __init__(
        self,
        image: Callable[[int], Image.Image],
        captions: Sequence[str],
        size: int,
        control_type: str,
    ):
        self.image, self.captions = image, captions
        self.size, self.control_type = size, control_type

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        pixels = control_pixels(self.image(i), self.size, self.size, self.control_type, SD35)
        return pixels[0], self.captions[i]


def shapes_edges(dataset) -> ControlImages:
    """The canny control images of a `ShapesDataset`: its scenes' edges (`render_edges`)."""
    from sd3.shapes.scenes import render_edges

    captions = [dataset.scene(i).caption for i in range(len(dataset))]
    return ControlImages(
        lambda i: render_edges(dataset.scene(i), dataset.size), captions, dataset.size, "canny"
    )


def control_encoder(vae: AutoEncoder) -> Callable[[Tensor], Tensor]:
    """Control pixels -> control latents, as `sd3.control.control_latent` makes them at sampling."""
    return lambda pixels: control_latent(vae, pixels, SD35)


# --- Stability's single-file layout -------------------------------------------------------------


def stability_tensors(controlnet: ControlNet, control_type: str) -> dict[str, Tensor]:
    """The ControlNet's tensors as Stability's SD3.5 ControlNet files hold them: diffusers' names
    for the embedders, Stability's for the blocks, no prefix, and an int32 `control_type`."""
    if controlnet.config.kind != SD35:
        raise ValueError(
            f"Stability's layout holds SD3.5 ControlNets, not {controlnet.config.kind}"
        )
    if control_type not in CONTROL_CODES:
        raise ValueError(
            f"unknown control type {control_type!r}; choose one of {list(CONTROL_CODES)}"
        )
    renames = {k: v for k, v in MMDIT_TOP_NAMES.items() if k.startswith(("t_", "y_"))}
    tensors = {}
    for key, t in controlnet.state_dict().items():
        stem, _, param = key.rpartition(".")
        tensors[f"{renames.get(stem, stem)}.{param}"] = t.detach().cpu().contiguous()
    tensors["control_type"] = torch.tensor([CONTROL_CODES[control_type]], dtype=torch.int32)
    return tensors


def save_controlnet(
    path: str | Path,
    controlnet: ControlNet,
    control_type: str,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    new: str | None = None,
) -> Path:
    """Write the ControlNet in Stability's layout (`stability_tensors`), floating-point tensors in
    `dtype`; with `new=OPTION` never over an existing file (`checkpoint.save_new`)."""
    tensors = {
        k: t.to(dtype) if t.is_floating_point() else t
        for k, t in stability_tensors(controlnet, control_type).items()
    }
    if new is None:
        return save_atomic(path, tensors, metadata)
    return save_new(path, tensors, metadata, new)
