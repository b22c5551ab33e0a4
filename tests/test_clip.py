"""CLIP-L / CLIP-G text encoders vs transformers' CLIPTextModel(WithProjection) on the same random weights."""

import pytest
import torch
from helpers import max_rel_err, read_layout, transformers_clip
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from sd3.models.clip import CLIPConfig, CLIPTextModel

BOS, EOS = 49406, 49407  # EOS is CLIP's largest id, so "argmax" and "first EOS" agree


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a realistic scale: unit-ish norms, biases and LN affine visibly non-trivial."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        if key.endswith("bias"):
            state[key] = 0.1 * noise
        elif p.ndim == 1:  # LayerNorm scale
            state[key] = 1 + 0.1 * noise
        elif "embedding" in key:
            state[key] = noise
        else:
            state[key] = noise / p.shape[1] ** 0.5
    return state


def build_pair(config: CLIPConfig, hf_cls, seed: int = 0):
    ours = CLIPTextModel(config).eval()
    state = random_state(ours, seed)
    ours.load_state_dict(state)
    ref = transformers_clip(config, state, with_projection=hf_cls is HFCLIPTextModelWithProjection)
    return ours, ref


def prompts(lengths: list[int], pad: int, eos: int = EOS, seed: int = 0) -> torch.Tensor:
    """[BOS, random tokens, EOS, pad...] rows of 77 tokens, as CLIP's tokenizer produces them."""
    g = torch.Generator().manual_seed(seed)
    bos = eos - 1  # CLIP's BOS and EOS are its two largest ids
    rows = []
    for n in lengths:
        row = torch.cat(
            [torch.tensor([bos]), torch.randint(0, bos, (n,), generator=g), torch.tensor([eos])]
        )
        rows.append(torch.cat([row, torch.full((77 - len(row),), pad)]))
    return torch.stack(rows)


def small_config(hidden_act: str, project_pooled: bool, vocab_size: int = 49408) -> CLIPConfig:
    return CLIPConfig(
        vocab_size=vocab_size,
        width=128,
        layers=3,
        heads=2,
        mlp_width=512,
        hidden_act=hidden_act,
        project_pooled=project_pooled,
    )


@pytest.mark.parametrize("pad", [EOS, 0], ids=["pad_eos", "pad_zero"])
def test_clip_l_like_matches_transformers(pad):
    """quick_gelu, pooled unprojected (as SD3 uses CLIP-L): pooled == transformers' pooler_output."""
    ours, ref = build_pair(small_config("quick_gelu", project_pooled=False), HFCLIPTextModel)
    ids = prompts([3, 20, 75, 0], pad=pad)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
    err_hidden = max_rel_err(hidden, out.hidden_states[-2])
    err_pooled = max_rel_err(pooled, out.pooler_output)
    print(f"CLIP-L-like pad={pad}: hidden {err_hidden:.2e} pooled {err_pooled:.2e}")
    assert err_hidden < 2e-6 and err_pooled < 2e-6
    # pooled really is the final-normed last-layer state at the EOS token (row 1: position 21)
    assert max_rel_err(pooled[1], out.last_hidden_state[1, 21]) < 2e-6


@pytest.mark.parametrize("pad", [0, EOS], ids=["pad_zero", "pad_eos"])
def test_clip_g_like_matches_transformers(pad):
    """gelu, pooled projected (as SD3 uses CLIP-G): pooled == transformers' text_embeds."""
    config = small_config("gelu", project_pooled=True)
    ours, ref = build_pair(config, HFCLIPTextModelWithProjection, seed=1)
    ids = prompts([5, 40, 75], pad=pad, seed=1)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
    err_hidden = max_rel_err(hidden, out.hidden_states[-2])
    err_pooled = max_rel_err(pooled, out.text_embeds)
    print(f"CLIP-G-like pad={pad}: hidden {err_hidden:.2e} pooled {err_pooled:.2e}")
    assert err_hidden < 2e-6 and err_pooled < 2e-6


def test_clip_g_full_width_matches_transformers():
    """Full CLIP-G width (1280, 20 heads, mlp 5120), 2 layers, small vocab (EOS = its largest id)."""
    config = CLIPConfig(
        1000, 1280, layers=2, heads=20, mlp_width=5120, hidden_act="gelu", project_pooled=True
    )
    ours, ref = build_pair(config, HFCLIPTextModelWithProjection, seed=2)
    ids = prompts([10, 60], pad=0, eos=999, seed=2)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
    err_hidden = max_rel_err(hidden, out.hidden_states[-2])
    err_pooled = max_rel_err(pooled, out.text_embeds)
    print(f"CLIP-G full width: hidden {err_hidden:.2e} pooled {err_pooled:.2e}")
    assert err_hidden < 5e-6 and err_pooled < 5e-6


def test_shorter_sequence_matches_prefix():
    """Causal attention: a prompt cut after its EOS gives the same states on the kept tokens."""
    ours, _ = build_pair(small_config("quick_gelu", project_pooled=False), HFCLIPTextModel)
    ids = prompts([7], pad=EOS)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        hidden_short, pooled_short = ours(ids[:, :9])
    assert max_rel_err(hidden_short, hidden[:, :9]) < 1e-6
    assert max_rel_err(pooled_short, pooled) < 1e-6


@pytest.mark.parametrize(
    ("name", "hidden_act", "expected"),
    [
        ("clip_l", "quick_gelu", dict(width=768, layers=12, heads=12, mlp_width=3072)),
        ("clip_g", "gelu", dict(width=1280, layers=32, heads=20, mlp_width=5120)),
    ],
)
def test_full_size_layout(name, hidden_act, expected):
    shapes = read_layout(name, f"text_encoders.{name}.transformer.")
    config = CLIPConfig.from_shapes(shapes, hidden_act=hidden_act, project_pooled=name == "clip_g")
    for field, value in expected.items():
        assert getattr(config, field) == value
    assert (config.vocab_size, config.max_positions, config.has_projection) == (49408, 77, True)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_from_shapes_without_projection():
    shapes = read_layout("clip_l", "text_encoders.clip_l.transformer.")
    del shapes["text_projection.weight"]
    config = CLIPConfig.from_shapes(shapes, hidden_act="quick_gelu")
    assert not config.has_projection and not config.project_pooled
    with torch.device("meta"):
        assert "text_projection.weight" not in CLIPTextModel(config).state_dict()
    with pytest.raises(ValueError, match="text_projection"):
        CLIPConfig.from_shapes(shapes, hidden_act="quick_gelu", project_pooled=True)


def test_bad_inputs_raise():
    shapes = read_layout("clip_l", "text_encoders.clip_l.transformer.")
    with pytest.raises(ValueError, match="relu"):
        CLIPConfig.from_shapes(shapes, hidden_act="relu")
    with pytest.raises(ValueError, match="token_embedding"):
        CLIPConfig.from_shapes({}, hidden_act="gelu")
    bad = dict(shapes, **{"text_model.embeddings.token_embedding.weight": (49408, 100)})
    with pytest.raises(ValueError, match="100"):
        CLIPConfig.from_shapes(bad, hidden_act="gelu")
    with pytest.raises(ValueError, match="heads 7"):
        CLIPConfig(width=128, heads=7)
    model = CLIPTextModel(small_config("gelu", project_pooled=False, vocab_size=100))
    with pytest.raises(ValueError, match="78"):
        model(torch.zeros(1, 78, dtype=torch.long))
