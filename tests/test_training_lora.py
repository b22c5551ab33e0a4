"""LoRA on the MMDiT (diffusers reads our files and agrees with our merged model) and the
single-file export (read back by `sd3.checkpoints`)."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from helpers import max_rel_err, tiny_models
from safetensors.torch import load_file

from sd3.checkpoints import SafetensorsFile, find_components, load_component
from sd3.models.mmdit import MMDiT
from sd3.training.export import export_single_file, save_lora
from sd3.training.lora import LoRALinear, add_lora, lora_layers, merge_diffusers_lora, merge_lora

# every kind of linear layer: both attention streams, MMDiT-X's attn2, MLPs, the adaLN
# modulations (the last context block's and the final layer's are stored swapped by diffusers)
# and the embedders
ALL_TARGETS = (
    "attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2",
    "adaLN_modulation.1", "context_embedder", "t_embedder.mlp.0", "y_embedder.mlp.2",
    "final_layer.linear",
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(mmdit: MMDiT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = mmdit.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 21, c.context_dim, generator=g)
    pooled = torch.randn(2, c.pooled_dim, generator=g)
    return x, torch.tensor([250.0, 900.0]), context, pooled


def with_random_lora(mmdit: MMDiT, targets, rank=4, alpha=2.0, seed=2) -> MMDiT:
    mmdit = copy.deepcopy(mmdit)
    layers = add_lora(mmdit, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():  # B = 0 at init: give it values so the update shows
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return mmdit


def diffusers_twin(mmdit: MMDiT) -> SD3Transformer2DModel:
    config = mmdit.config
    ref = SD3Transformer2DModel(
        sample_size=config.pos_embed_max_size * 2, patch_size=config.patch_size,
        in_channels=config.in_channels, num_layers=config.depth, attention_head_dim=64,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        caption_projection_dim=config.hidden_size, pooled_projection_dim=config.pooled_dim,
        out_channels=config.out_channels, pos_embed_max_size=config.pos_embed_max_size,
        dual_attention_layers=config.attn2_layers, qk_norm="rms_norm" if config.qk_norm else None,
    )  # fmt: skip
    sd = {"model.diffusion_model." + k: v.clone() for k, v in mmdit.state_dict().items()}
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def base():
    return tiny_models()["mmdit"]


def test_add_lora_freezes_base_and_starts_as_identity(base):
    mmdit = copy.deepcopy(base)
    layers = add_lora(mmdit, rank=4, targets=("attn.qkv", "mlp.fc1"))
    # depth 3: qkv in 3 x-blocks + 3 context blocks, fc1 in 3 x-blocks + 2 context blocks (the
    # last context block is pre-only)
    assert len(layers) == 11
    assert "joint_blocks.0.x_block.attn2.qkv" not in layers
    trainable = {n for n, p in mmdit.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    with torch.no_grad():
        assert torch.equal(mmdit(*inputs(mmdit)), base(*inputs(base)))
    with pytest.raises(ValueError, match=r"LoRA targets \['attn.qvk'\] match no linear layer"):
        add_lora(copy.deepcopy(base), 4, targets=("attn.qvk",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(copy.deepcopy(base), 0)


def test_merge_lora_equals_lora_forward(base):
    mmdit = with_random_lora(base, ALL_TARGETS)
    with torch.no_grad():
        out = mmdit(*inputs(mmdit))
        merged = merge_lora(mmdit)
        assert not lora_layers(merged)
        err = max_rel_err(merged(*inputs(merged)), out)
        assert max_rel_err(out, base(*inputs(base))) > 1e-2  # the LoRA does change the output
    print(f"merged vs unmerged LoRA: {err:.2e}")
    assert err < 1e-5


def test_diffusers_loads_our_lora(base, tmp_path):
    """`StableDiffusion3Pipeline`'s LoRA loader puts our file into an SD3Transformer2DModel built
    from the same base weights; its output matches our LoRA model's."""
    pytest.importorskip("peft", reason="diffusers needs peft to load LoRA weights")
    mmdit = with_random_lora(base, ALL_TARGETS, rank=4, alpha=2.0)
    path = save_lora(tmp_path / "lora.safetensors", mmdit)
    keys = load_file(str(path)).keys()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.2.attn.add_v_proj.lora_B.weight" in keys
    assert "transformer.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    assert "transformer.norm_out.linear.lora_A.weight" in keys

    ref = diffusers_twin(base)
    state_dict = StableDiffusion3Pipeline.lora_state_dict(str(path))
    StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=ref)
    n_lora = sum(1 for n, _ in ref.named_parameters() if "lora_A" in n)
    assert n_lora == sum(len(v) for v in _diffusers_layers(mmdit).values())
    x, t, context, pooled = inputs(mmdit)
    with torch.no_grad():
        ours = mmdit(x, t, context, pooled)
        theirs = ref(
            hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
    err = max_rel_err(ours, theirs)
    print(f"diffusers with our LoRA vs ours: {err:.2e}")
    assert err < 1e-5

    # and our own loader for diffusers-format LoRAs gives the same model
    merged = copy.deepcopy(base)
    assert merge_diffusers_lora(merged, load_file(str(path))) == len(keys) // 2
    with torch.no_grad():
        err2 = max_rel_err(merged(x, t, context, pooled), ours)
    print(f"merge_diffusers_lora vs ours: {err2:.2e}")
    assert err2 < 1e-5


def _diffusers_layers(mmdit):
    from sd3.checkpoints import mmdit_diffusers_names

    return {n: mmdit_diffusers_names(n, mmdit.config.depth)[0] for n in lora_layers(mmdit)}


def test_lora_scale_is_alpha_over_rank(base):
    mmdit = copy.deepcopy(base)
    layer = add_lora(mmdit, rank=8, alpha=4.0, targets=("x_block.attn.proj",))[
        "joint_blocks.1.x_block.attn.proj"
    ]
    assert isinstance(layer, LoRALinear) and layer.scale == 0.5
    x = torch.randn(3, layer.base.in_features)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        by_hand = layer.base(x) + 0.5 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        assert torch.allclose(layer(x), by_hand, atol=1e-6)


# --- single-file export -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_single_file_round_trip(tmp_path, dtype):
    models = tiny_models(seed=3)
    models["mmdit"] = with_random_lora(models["mmdit"], ("attn.qkv",))
    expected_mmdit = merge_lora(copy.deepcopy(models["mmdit"])).state_dict()
    path = export_single_file(tmp_path / "model.safetensors", models, dtype)
    file = SafetensorsFile(path)
    assert {k.split(".")[0] for k in file.tensors} == {
        "model",
        "first_stage_model",
        "text_encoders",
    }
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in file.tensors
    assert not any("lora" in k for k in file.tensors)
    found = find_components(path)
    assert set(found) == {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    for name, comp in found.items():
        assert comp.stored_dtypes == [str(dtype).removeprefix("torch.")]
        loaded = load_component(comp).state_dict()
        ref = expected_mmdit if name == "mmdit" else models[name].state_dict()
        assert loaded.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(loaded[k], v.to(dtype).float()), (name, k)
    # the file it replaces stays readable until the end: a second export overwrites atomically
    export_single_file(path, {"vae": models["vae"]}, dtype)
    assert set(find_components(path)) == {"vae"}
    assert not list(tmp_path.glob(".*tmp*"))
