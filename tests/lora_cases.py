"""LoRA files of every format for the LoRA tests, each with the change it should make written
out by its format's own formula (name maps included): `test_loras.py`, `test_lora_cli.py`."""

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from helpers import diffusers_mmdit
from safetensors.torch import save_file

from sd3.pipeline import Pipeline

H = 128  # the tiny MMDiT's width (tests/helpers.tiny_models): depth 3, attn2 in block 0
SCALE = 0.75  # the strength every merged case is applied at


class Rand:
    """Seeded random tensors of a scale that makes every update visible."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.1) -> torch.Tensor:
        return scale * torch.randn(shape, generator=self.g)


def pipeline(model_file, loras=(), **kw) -> Pipeline:
    return Pipeline.from_single_file(model_file, dtype=torch.float32, loras=loras, load=False, **kw)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 21, 256, generator=g)
    pooled = torch.randn(2, 192, generator=g)
    return x, torch.tensor([250.0, 900.0]), context, pooled


def swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) rows -> Stability's (shift, scale): the halves exchanged."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


PEFT_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff.net.0.proj",
    "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out",
    "context_embedder", "pos_embed.proj", "time_text_embed.timestep_embedder.linear_1",
]  # fmt: skip


def peft_lora_file(models, path, dora: bool):
    """A LoRA made with PEFT on diffusers' SD3 transformer and saved by diffusers (the
    LoraConfig goes into the header): every lora_A/lora_B (and DoRA magnitude) random."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = diffusers_mmdit(copy.deepcopy(models["mmdit"]))
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=PEFT_TARGETS, use_dora=dora,
        rank_pattern={"proj_out": 2}, alpha_pattern={"proj_out": 6, "norm_out.linear": 1},
    )  # fmt: skip
    ref.add_adapter(config)
    rand = Rand(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + rand(*p.shape, scale=0.2))
            elif "lora_" in name:
                p.copy_(rand(*p.shape, scale=0.2))
    state = get_peft_model_state_dict(ref)
    StableDiffusion3Pipeline.save_lora_weights(
        path.parent, transformer_lora_layers=state, weight_name=path.name,
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    return path


def diffusers_reference(models):
    """diffusers' SD3 pipeline around a copy of the tiny MMDiT (no text encoders or VAE)."""
    return StableDiffusion3Pipeline(
        transformer=diffusers_mmdit(copy.deepcopy(models["mmdit"])),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def kohya_case(r: Rand, sd):
    """kohya sd-scripts: `lora_unet_` + Stability's names underscored, lora_down/up, alpha."""
    t, changes = {}, []
    q = "lora_unet_joint_blocks_1_x_block_attn_qkv"  # alpha 2, rank 4: scale 1/2
    t[f"{q}.lora_down.weight"], t[f"{q}.lora_up.weight"] = r(4, H), r(3 * H, 4)
    t[f"{q}.alpha"] = torch.tensor(2.0)
    changes.append(("joint_blocks.1.x_block.attn.qkv.weight", slice(None), 0.5 * t[f"{q}.lora_up.weight"] @ t[f"{q}.lora_down.weight"]))  # fmt: skip
    a = "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"  # the last block: 2H rows
    t[f"{a}.lora_down.weight"], t[f"{a}.lora_up.weight"] = r(8, H), r(2 * H, 8)  # no alpha: 1
    changes.append(("joint_blocks.2.context_block.adaLN_modulation.1.weight", slice(None), t[f"{a}.lora_up.weight"] @ t[f"{a}.lora_down.weight"]))  # fmt: skip
    x = "lora_unet_x_embedder_proj"  # the patch embedder, a 2x2 convolution; alpha 8, rank 4
    t[f"{x}.lora_down.weight"], t[f"{x}.lora_up.weight"] = r(4, 16, 2, 2), r(H, 4, 1, 1)
    t[f"{x}.alpha"] = torch.tensor(8.0)
    conv = 2 * t[f"{x}.lora_up.weight"][:, :, 0, 0] @ t[f"{x}.lora_down.weight"].reshape(4, -1)
    changes.append(("x_embedder.proj.weight", slice(None), conv.reshape(H, 16, 2, 2)))
    f = "lora_unet_final_layer_adaLN_modulation_1"  # alpha 0 counts as rank: scale 1
    t[f"{f}.lora_down.weight"], t[f"{f}.lora_up.weight"] = r(2, H), r(2 * H, 2)
    t[f"{f}.alpha"] = torch.tensor(0.0)
    changes.append(("final_layer.adaLN_modulation.1.weight", slice(None), t[f"{f}.lora_up.weight"] @ t[f"{f}.lora_down.weight"]))  # fmt: skip
    c = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"  # CLIP-L, alpha 1, rank 2
    t[f"{c}.lora_down.weight"], t[f"{c}.lora_up.weight"] = r(2, 64), r(64, 2, scale=0.5)
    t[f"{c}.alpha"] = torch.tensor(1.0)
    changes.append(("clip_l:text_model.encoder.layers.1.self_attn.q_proj.weight", slice(None), 0.5 * t[f"{c}.lora_up.weight"] @ t[f"{c}.lora_down.weight"]))  # fmt: skip
    return t, changes


def comfy_case(r: Rand, sd):
    """ComfyUI's generic names: `diffusion_model.` + Stability's dotted names, any suffix
    spelling; full updates (`.diff`, `.diff_b`)."""
    t, changes = {}, []
    a = "diffusion_model.joint_blocks.0.x_block.attn2.qkv"  # PEFT spelling, no alpha: scale 1
    t[f"{a}.lora_A.weight"], t[f"{a}.lora_B.weight"] = r(3, H), r(3 * H, 3)
    changes.append(("joint_blocks.0.x_block.attn2.qkv.weight", slice(None), t[f"{a}.lora_B.weight"] @ t[f"{a}.lora_A.weight"]))  # fmt: skip
    m = "diffusion_model.joint_blocks.0.context_block.mlp.fc2"
    t[f"{m}.diff"], t[f"{m}.diff_b"] = r(H, 4 * H), r(H)
    changes.append(("joint_blocks.0.context_block.mlp.fc2.weight", slice(None), t[f"{m}.diff"]))
    changes.append(("joint_blocks.0.context_block.mlp.fc2.bias", slice(None), t[f"{m}.diff_b"]))
    g = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1"
    t[f"{g}.lora_up.weight"], t[f"{g}.lora_down.weight"] = r(256, 4), r(4, 128)
    t[f"{g}.alpha"] = torch.tensor(16.0)
    changes.append(("clip_g:text_model.encoder.layers.0.mlp.fc1.weight", slice(None), 4 * t[f"{g}.lora_up.weight"] @ t[f"{g}.lora_down.weight"]))  # fmt: skip
    return t, changes


def onetrainer_case(r: Rand, sd):
    """OneTrainer: legacy `lora_transformer_` + diffusers' names underscored (separate q/k/v,
    (scale, shift) modulations), and its OMI layout (`transformer.` + Stability's names,
    `.qkv.{0,1,2}`)."""
    t, changes = {}, []
    k = "lora_transformer_transformer_blocks_1_attn_add_k_proj"  # context k: rows H..2H
    t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"] = r(4, H), r(H, 4)
    t[f"{k}.alpha"] = torch.tensor(4.0)
    changes.append(("joint_blocks.1.context_block.attn.qkv.weight", slice(H, 2 * H), t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"]))  # fmt: skip
    n = "lora_transformer_norm_out_linear"  # the final layer's modulation, diffusers-ordered
    t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"] = r(4, H), r(2 * H, 4)
    t[f"{n}.alpha"] = torch.tensor(2.0)
    changes.append(("final_layer.adaLN_modulation.1.weight", slice(None), 0.5 * swap(t[f"{n}.lora_up.weight"] @ t[f"{n}.lora_down.weight"])))  # fmt: skip
    c = "lora_transformer_transformer_blocks_2_norm1_context_linear"  # last block: swapped too
    t[f"{c}.lora_down.weight"], t[f"{c}.lora_up.weight"] = r(4, H), r(2 * H, 4)
    t[f"{c}.alpha"] = torch.tensor(4.0)
    changes.append(("joint_blocks.2.context_block.adaLN_modulation.1.weight", slice(None), swap(t[f"{c}.lora_up.weight"] @ t[f"{c}.lora_down.weight"])))  # fmt: skip
    f = "lora_transformer_transformer_blocks_0_ff_context_net_0_proj"
    t[f"{f}.lora_down.weight"], t[f"{f}.lora_up.weight"] = r(4, H), r(4 * H, 4)
    t[f"{f}.alpha"] = torch.tensor(4.0)
    changes.append(("joint_blocks.0.context_block.mlp.fc1.weight", slice(None), t[f"{f}.lora_up.weight"] @ t[f"{f}.lora_down.weight"]))  # fmt: skip
    v = "transformer.joint_blocks.1.x_block.attn.qkv.2"  # OMI: v rows 2H..3H
    t[f"{v}.lora_down.weight"], t[f"{v}.lora_up.weight"] = r(4, H), r(H, 4)
    t[f"{v}.alpha"] = torch.tensor(4.0)
    changes.append(("joint_blocks.1.x_block.attn.qkv.weight", slice(2 * H, 3 * H), t[f"{v}.lora_up.weight"] @ t[f"{v}.lora_down.weight"]))  # fmt: skip
    p = "lora_te2_text_projection"  # OneTrainer's CLIP-G projection
    t[f"{p}.lora_down.weight"], t[f"{p}.lora_up.weight"] = r(2, 128), r(128, 2)
    t[f"{p}.alpha"] = torch.tensor(2.0)
    changes.append(("clip_g:text_projection.weight", slice(None), t[f"{p}.lora_up.weight"] @ t[f"{p}.lora_down.weight"]))  # fmt: skip
    return t, changes


def loha_case(r: Rand, sd):
    """LyCORIS LoHa on kohya's names: ΔW = (alpha / rank) (w1a @ w1b) ⊙ (w2a @ w2b)."""
    t, changes = {}, []
    m = "lora_unet_joint_blocks_0_x_block_mlp_fc1"
    w = {n: r(*s, scale=0.5) for n, s in (("hada_w1_a", (4 * H, 4)), ("hada_w1_b", (4, H)), ("hada_w2_a", (4 * H, 4)), ("hada_w2_b", (4, H)))}  # fmt: skip
    t |= {f"{m}.{n}": v for n, v in w.items()}
    t[f"{m}.alpha"] = torch.tensor(2.0)
    delta = 0.5 * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    changes.append(("joint_blocks.0.x_block.mlp.fc1.weight", slice(None), delta))
    return t, changes


def lokr_case(r: Rand, sd):
    """LyCORIS LoKr on SimpleTuner's names (`lycoris_` + diffusers' names):
    ΔW = kron(w1, w2) · (alpha / rank if a factor is low-rank, else 1)."""
    t, changes = {}, []
    o = "lycoris_transformer_blocks_1_attn_to_out_0"  # w1 whole, w2 low-rank: alpha / rank
    w1, w2a, w2b = r(8, 4, scale=1.0), r(16, 2), r(2, 32)
    t |= {f"{o}.lokr_w1": w1, f"{o}.lokr_w2_a": w2a, f"{o}.lokr_w2_b": w2b}
    t[f"{o}.alpha"] = torch.tensor(1.0)
    changes.append(("joint_blocks.1.x_block.attn.proj.weight", slice(None), 0.5 * torch.kron(w1, w2a @ w2b)))  # fmt: skip
    v = "lycoris_transformer_blocks_0_attn_add_v_proj"  # both whole: scale 1, alpha ignored
    w1, w2 = r(4, 2, scale=1.0), r(32, 64)
    t |= {f"{v}.lokr_w1": w1, f"{v}.lokr_w2": w2, f"{v}.alpha": torch.tensor(7.0)}
    changes.append(("joint_blocks.0.context_block.attn.qkv.weight", slice(2 * H, 3 * H), torch.kron(w1, w2)))  # fmt: skip
    return t, changes


def dora_case(r: Rand, sd):
    """DoRA the LyCORIS / kohya way (`.dora_scale`, [1, in]: norms per input column):
    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per column, then W + s (W' − W)."""
    t, changes = {}, []
    d = "lora_unet_joint_blocks_1_context_block_attn_proj"
    down, up = r(4, H), r(H, 4)
    w = sd["joint_blocks.1.context_block.attn.proj.weight"].double()
    merged = w + 0.5 * (up @ down).double()
    m = merged.norm(dim=0, keepdim=True) * (1 + r(1, H, scale=0.3).double())
    t |= {f"{d}.lora_down.weight": down, f"{d}.lora_up.weight": up, f"{d}.alpha": torch.tensor(2.0)}
    t[f"{d}.dora_scale"] = m.float()
    dora = m * merged / merged.norm(dim=0, keepdim=True)
    changes.append(("joint_blocks.1.context_block.attn.proj.weight", slice(None), "set", dora))
    return t, changes


CASES = {
    "kohya": kohya_case,
    "comfy": comfy_case,
    "onetrainer": onetrainer_case,
    "loha": loha_case,
    "lokr": lokr_case,
    "dora": dora_case,
}
SEEDS = {case: i for i, case in enumerate(CASES)}
FORMAT_NAMES = {
    "kohya": "kohya LoRA",
    "comfy": "ComfyUI LoRA + full-weight",
    "onetrainer": "OneTrainer LoRA",
    "loha": "kohya LyCORIS LoHa",
    "lokr": "LyCORIS (SimpleTuner) LyCORIS LoKr",
    "dora": "kohya DoRA (LoRA)",
}


def expected_state(models, changes, scale):
    """Each network's state dict with the changes applied at `scale`, in float64."""
    states = {n: {k: v.double() for k, v in m.state_dict().items()} for n, m in models.items()}
    for change in changes:
        key, rows = change[0], change[1]
        component, _, key = key.rpartition(":")
        state = states[component or "mmdit"]
        if isinstance(change[2], str):  # "set", DoRA's W': W + s (W' - W)
            state[key][rows] += scale * (change[3] - state[key][rows])
        else:
            state[key][rows] += scale * change[2].double()
    return states
