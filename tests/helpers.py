"""Shared test utilities: official-layout key lists, error measures, tiny models and files."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
LAYOUTS = DATA / "checkpoint-layouts"  # see its README.md


def read_layout(name: str, strip_prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official file from `tests/data/checkpoint-layouts/NAME.tsv`."""
    shapes = {}
    for line in (LAYOUTS / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        if key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity test reports."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every tensor with seeded values of a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        fan_in = v[0].numel() if v.ndim > 1 else 1
        scale = 1.0 if v.ndim == 1 else fan_in**-0.5
        t = torch.randn(v.shape, generator=g) * scale
        if k.endswith("ln_q.weight") or k.endswith("ln_k.weight"):
            t = 1 + 0.2 * t
        sd[k] = t
    model.load_state_dict(sd)
    return sd


def tiny_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """A reduced-size SD3.5-Medium-shaped family with random weights whose widths fit together:
    context width 256 = T5 width >= CLIP-L + CLIP-G (64 + 128); pooled 192 = 64 + 128."""
    from sd3.models.clip import CLIPConfig, CLIPTextModel
    from sd3.models.mmdit import MMDiT, MMDiTConfig
    from sd3.models.t5 import T5Config, T5Encoder
    from sd3.models.vae import AutoEncoder, VAEConfig

    models = {
        "mmdit": MMDiT(
            MMDiTConfig(
                depth=3, hidden_size=128, mlp_hidden=512, pos_embed_max_size=16, context_dim=256,
                pooled_dim=192, qk_norm=True, attn2_layers=(0,),
            )
        ),
        "vae": AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)),
        "clip_l": CLIPTextModel(CLIPConfig(width=64, layers=2, heads=1, mlp_width=128)),
        "clip_g": CLIPTextModel(
            CLIPConfig(width=128, layers=2, heads=2, mlp_width=256, hidden_act="gelu", project_pooled=True)
        ),
        "t5xxl": T5Encoder(T5Config(d_model=256, layers=2, heads=4, d_ff=512)),
    }  # fmt: skip
    for i, model in enumerate(models.values()):
        randomize(model, seed * 10 + i)
        model.eval()
    return models


def sdcpp_source() -> dict[str, torch.nn.Module]:
    """The small SD3.5-shaped MMDiT, CLIP-L and T5 behind tests/data/stable-diffusion-cpp's GGUF
    files (rows of 32 and 256 values, so every block type applies; vocabularies cut short)."""
    from sd3.models.clip import CLIPConfig, CLIPTextModel
    from sd3.models.mmdit import MMDiT, MMDiTConfig
    from sd3.models.t5 import T5Config, T5Encoder

    models = {
        "mmdit": MMDiT(
            MMDiTConfig(
                depth=2, hidden_size=64, mlp_hidden=256, pos_embed_max_size=8, context_dim=64,
                pooled_dim=64, qk_norm=True, attn2_layers=(0,),
            )
        ),
        "clip_l": CLIPTextModel(CLIPConfig(vocab_size=256, width=64, layers=1, heads=1, mlp_width=128)),
        "t5xxl": T5Encoder(T5Config(vocab_size=64, d_model=64, layers=1, heads=1, d_ff=256)),
    }  # fmt: skip
    for i, model in enumerate(models.values()):
        randomize(model, 70 + i)
        model.eval()
    return models


PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


def bf16_mmdit_case(seed: int = 8):
    """A tiny bf16 MMDiT and a batch of inputs for it: (model, (x, timestep, context, pooled))."""
    model = tiny_models(seed=seed)["mmdit"].to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, 24, generator=g).bfloat16()
    context = torch.randn(2, 40, 256, generator=g).bfloat16()
    pooled = torch.randn(2, 192, generator=g).bfloat16()
    return model, (x, torch.tensor([900.0, 30.0]), context, pooled)


def save_single_file(path, models: dict[str, torch.nn.Module], dtype=torch.float32, prefixed=True):
    """Write `models` in Stability's single-file layout (or one standalone file if not prefixed)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, model in models.items():
        prefix = PREFIXES[name] if prefixed else ""
        tensors.update(
            {prefix + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        )
    save_file(tensors, str(path))
    return path


def diffusers_mmdit(model, dtype=torch.float32):
    """diffusers' SD3Transformer2DModel holding `model`'s weights, converted by diffusers' own code."""
    return diffusers_mmdit_from(model.config, model.state_dict(), dtype)


def diffusers_mmdit_from(c, state: dict[str, torch.Tensor], dtype=torch.float32):
    """diffusers' SD3Transformer2DModel for our MMDiTConfig `c` and official-layout `state`."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        ref = SD3Transformer2DModel(
            sample_size=c.pos_embed_max_size * 2, patch_size=c.patch_size, in_channels=c.in_channels,
            num_layers=c.depth, attention_head_dim=64, num_attention_heads=c.num_heads,
            joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size,
            pooled_projection_dim=c.pooled_dim, out_channels=c.out_channels,
            pos_embed_max_size=c.pos_embed_max_size, dual_attention_layers=c.attn2_layers,
            qk_norm="rms_norm" if c.qk_norm else None,
        )  # fmt: skip
    sd = {PREFIXES["mmdit"] + k: v.detach().to(dtype) for k, v in state.items()}
    ref.load_state_dict(
        convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True, assign=True
    )
    return ref.eval()


def diffusers_vae(model, dtype=torch.float32):
    """diffusers' AutoencoderKL holding `model`'s weights, converted by diffusers' own code."""
    return diffusers_vae_from(model.config, model.state_dict(), dtype)


def diffusers_vae_from(c, state: dict[str, torch.Tensor], dtype=torch.float32):
    """diffusers' AutoencoderKL for our VAEConfig `c` and official-layout `state`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(c.ch_mult)
    with torch.device("meta"):
        ref = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=[c.ch * m for m in c.ch_mult], layers_per_block=c.num_res_blocks,
            latent_channels=c.z_channels, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305,
        )  # fmt: skip
    sd = {PREFIXES["vae"] + k: v.detach().to(dtype) for k, v in state.items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, ref.config), strict=True, assign=True)
    return ref.eval()


def transformers_clip(c, state: dict[str, torch.Tensor], with_projection: bool):
    """transformers' CLIPTextModel(WithProjection) for our CLIPConfig `c`, holding `state`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf_config = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
        projection_dim=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        max_position_embeddings=c.max_positions, hidden_act=c.hidden_act,
        bos_token_id=c.vocab_size - 2, eos_token_id=c.vocab_size - 1,
    )  # fmt: skip
    # not on meta: transformers' CLIP keeps a non-persistent position_ids buffer
    ref = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf_config)
    if not with_projection:  # transformers 5 names its bare text model without "text_model."
        state = {
            k.removeprefix("text_model."): v
            for k, v in state.items()
            if k != "text_projection.weight"
        }
    ref.load_state_dict(state, assign=True)
    return ref.eval()


def transformers_t5(c, state: dict[str, torch.Tensor]):
    """transformers' T5 v1.1 encoder for our T5Config `c`, sharing `state`'s tensors (no copies)."""
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    hf_config = HFT5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=64, d_ff=c.d_ff, num_layers=c.layers,
        num_heads=c.heads, relative_attention_num_buckets=c.num_buckets,
        relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False,
    )  # fmt: skip
    assert hf_config.is_gated_act and hf_config.dense_act_fn == "gelu_new"
    with torch.device("meta"):
        ref = T5EncoderModel(hf_config)
    ref.load_state_dict(
        {"shared.weight": state["encoder.embed_tokens.weight"], **state}, assign=True
    )
    ref.encoder.embed_tokens.weight = ref.shared.weight  # re-tie after assign
    return ref.eval()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming this size, with one tiny (not matching) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def torchrun(nproc: int, module: str, argv: list[str], **popen) -> subprocess.Popen:
    """`python -m module argv` in `nproc` processes under torchrun (one thread each), output
    piped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", module, *argv,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def noise_images(folder: Path) -> Path:
    """Eight 32x32 noise images with three kinds of caption: a tiny training folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["noise", "static", "a photo of static noise"][i % 3])
    return folder


def controlnet_to_stability(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3.5 ControlNet state dict in Stability's single-file naming (the inverse of
    diffusers' convert_sd3_controlnet_to_diffusers.py): diffusers' names stay for the embedders,
    the blocks take Stability's (fused qkv). `state` is consumed."""
    out = {}
    for i in range(layers):
        p = f"transformer_blocks.{i}."
        for param in ("weight", "bias"):
            out[f"{p}attn.qkv.{param}"] = torch.cat(
                [state.pop(f"{p}attn.to_{x}.{param}") for x in "qkv"]
            )
            for ours, theirs in (
                ("attn.proj", "attn.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear"),
            ):  # fmt: skip
                out[f"{p}{ours}.{param}"] = state.pop(f"{p}{theirs}.{param}")
    out.update(state)
    return out
