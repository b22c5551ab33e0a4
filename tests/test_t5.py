"""T5-XXL v1.1 encoder vs transformers' T5EncoderModel on the same random weights, and half precision."""

import pytest
import torch
from helpers import max_rel_err, read_layout, transformers_t5
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from sd3.models.t5 import T5Config, T5Encoder, relative_position_bucket


def random_state(config: T5Config, seed: int, ff_gain: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights at T5's own init scales (q carries the 1/sqrt(d) T5 leaves out of attention).

    ff_gain scales wi_0 and wi_1, making the gated product (and so the residual stream) ff_gain^2 larger.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5Encoder(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if key.endswith("layer_norm.weight"):
            state[key] = 1 + 0.1 * noise
        elif key.endswith(("embed_tokens.weight", "relative_attention_bias.weight")):
            state[key] = noise
        elif key.endswith("q.weight"):
            state[key] = noise / (shape[1] * 64) ** 0.5
        elif key.endswith(("wi_0.weight", "wi_1.weight")):
            state[key] = ff_gain * noise / shape[1] ** 0.5
        else:
            state[key] = noise / shape[1] ** 0.5
    return state


def build(config: T5Config, state: dict[str, torch.Tensor]) -> T5Encoder:
    with torch.device("meta"):
        model = T5Encoder(config)
    model.load_state_dict(state, assign=True)
    return model.eval()


def compare(config: T5Config, ids: torch.Tensor, seed: int = 0) -> float:
    state = random_state(config, seed)
    ours, ref = build(config, state), transformers_t5(config, state)
    with torch.no_grad():
        return max_rel_err(ours(ids), ref(input_ids=ids).last_hidden_state)


SMALL = T5Config(vocab_size=1000, d_model=128, layers=2, heads=3, d_ff=320)  # inner 192 != d_model


def test_small_matches_transformers():
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    err = compare(SMALL, ids)
    print(f"T5 small: {err:.2e}")
    assert err < 1e-6


def test_long_sequence_matches_transformers():
    """300 tokens: offsets beyond max_distance=128 all land in the last bucket of each direction."""
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(1))
    err = compare(SMALL, ids, seed=1)
    print(f"T5 300 tokens: {err:.2e}")
    assert err < 1e-6


def test_relative_position_bucket():
    offsets = torch.arange(-400, 401)
    ours = relative_position_bucket(offsets, num_buckets=32, max_distance=128)
    ref = HFT5Attention._relative_position_bucket(
        offsets, bidirectional=True, num_buckets=32, max_distance=128
    )
    assert torch.equal(ours, ref)
    # by hand: 16 buckets per direction (keys after the query in 16..31), 8 exact, then
    # 8 + floor(8 * log(n / 8) / log(16)), capped at 15 from n = 128 on
    expected = {0: 0, -1: 1, -7: 7, -8: 8, -15: 9, -16: 10, -127: 15, -128: 15, -400: 15}
    expected |= {1: 17, 7: 23, 8: 24, 16: 26, 31: 27, 32: 28, 128: 31, 400: 31}
    for offset, bucket in expected.items():
        assert ours[offset + 400].item() == bucket, offset


@pytest.mark.slow
def test_full_size_layer_matches_transformers():
    """One T5-XXL block at full size: d_model 4096, 64 heads, d_ff 10240 (~190M parameters)."""
    config = T5Config(vocab_size=500, layers=1)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    err = compare(config, ids, seed=2)
    print(f"T5-XXL full-size layer: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_stays_finite_and_close(dtype, tol):
    """Weights scaled so the feed-forward product and residual stream exceed fp16's range (65504)."""
    state = random_state(SMALL, seed=3, ff_gain=200.0)
    model = build(SMALL, state)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    residual_max = []
    hook = model.encoder.block[-1].register_forward_hook(
        lambda m, i, out: residual_max.append(out.abs().max())
    )
    with torch.no_grad():
        ref = model(ids)
        hook.remove()
        # the test only means something if plain fp16 would overflow
        assert residual_max[0] > 1e5, residual_max
        out = model.to(dtype)(ids)
    err = max_rel_err(out, ref)
    print(f"T5 {dtype} with residual max {residual_max[0]:.1e}: {err:.2e}")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err < tol


def test_full_size_layout():
    shapes = read_layout("t5xxl", "text_encoders.t5xxl.transformer.")
    config = T5Config.from_shapes(shapes)
    assert config == T5Config(
        vocab_size=32128, d_model=4096, layers=24, heads=64, d_ff=10240, num_buckets=32
    )
    with torch.device("meta"):
        model = T5Encoder(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_from_shapes_reads_inner_dim_and_rejects_bad_shapes():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5Encoder(SMALL).state_dict().items()}
    assert T5Config.from_shapes(shapes) == SMALL
    with pytest.raises(ValueError, match="relative_attention_bias"):
        T5Config.from_shapes({k: v for k, v in shapes.items() if "relative" not in k})
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    with pytest.raises(ValueError, match="inner dim 200"):
        T5Config.from_shapes({**shapes, q: (200, 128)})
    renamed = {k.replace("encoder.block.1.", "encoder.block.2."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        T5Config.from_shapes(renamed)
    with pytest.raises(ValueError, match="input_ids"):
        build(SMALL, random_state(SMALL, 0))(torch.zeros(77, dtype=torch.long))
