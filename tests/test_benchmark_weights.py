"""The benchmarks' random full-size weights: streamed to disk in the official layout, loadable."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from run import write_random_checkpoint  # noqa: E402

from sd3.checkpoints import find_components, load_component  # noqa: E402
from sd3.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from sd3.models.t5 import T5Config, T5Encoder  # noqa: E402
from sd3.models.vae import AutoEncoder, VAEConfig  # noqa: E402


def test_streamed_random_checkpoint_loads_with_the_intended_scales(tmp_path):
    mmdit = MMDiTConfig(hidden_size=128, depth=2, mlp_hidden=512, context_dim=64, pooled_dim=32,
                        pos_embed_max_size=16, qk_norm=True, attn2_layers=(0,))  # fmt: skip
    vae = VAEConfig(ch=32, ch_mult=(1, 2))
    path = tmp_path / "random.safetensors"
    t5 = T5Config(d_model=128, layers=1, heads=2, d_ff=256)
    modules = {"mmdit": (MMDiT, mmdit), "vae": (AutoEncoder, vae), "t5xxl": (T5Encoder, t5)}
    write_random_checkpoint(path, modules)
    found = find_components(path)
    assert sorted(found) == ["mmdit", "t5xxl", "vae"]
    attention = load_component(found["t5xxl"]).encoder.block[0].layer[0].SelfAttention
    assert abs(attention.k.weight.std().item() * 128**0.5 - 1) < 0.05
    assert abs(attention.q.weight.std().item() * 128**0.5 * 8 - 1) < 0.05  # T5's 1/sqrt(d_kv)
    model = load_component(found["mmdit"], torch.bfloat16)
    assert model.config == mmdit
    w = model.joint_blocks[0].x_block.mlp.fc1.weight.float()
    assert abs(w.std().item() * 128**0.5 - 1) < 0.05  # randn / sqrt(fan_in)
    norm = model.joint_blocks[0].x_block.attn.ln_q.weight.float()
    assert abs(norm.mean().item() - 1) < 0.05 and 0.05 < norm.std().item() < 0.15
    table = model.pos_embed.float().reshape(-1, 128)  # the fixed sin-cos table, not noise
    assert (
        table.abs().max().item() <= 1 + 1e-2 and table[0, 0] == 0 and table[0, 32] == 1
    )  # sin 0, cos 0
    assert load_component(found["vae"]).config == vae
