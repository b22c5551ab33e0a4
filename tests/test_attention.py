"""Attention: the CPU flash-attention kernel (AMX and AVX-512 BF16) against fp32 SDPA, and its
fallbacks. Each kernel test runs for every instruction set this machine has."""

import pytest
import torch
from helpers import max_rel_err

from sd3.kernels import build as build_module
from sd3.kernels import flash_attention as attention_module
from sd3.kernels.build import kernel_available, kernels_available
from sd3.kernels.flash_attention import (
    attention,
    flash_attention_cpu,
    matmul_attention,
    sdpa_attention,
)

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no bf16 attention kernel here")
ISAS = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels_available(), reason=f"no {isa}"))
    for isa in ("amx", "avx512")
]


def qkv(B: int, H: int, Lq: int, Lk: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, H, Lq, 64, generator=g)).bfloat16()
    k = (scale * torch.randn(B, H, Lk, 64, generator=g)).bfloat16()
    v = torch.randn(B, H, Lk, 64, generator=g).bfloat16()
    return q, k, v


def bf16_error_bound(ref: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What bf16 rounding alone explains, per output element [B, L, H * 64]: rounding the output
    (2^-9 |out|) plus rounding each softmax weight p_j (at most 2^-9 p_j |v_j|, summing to
    2^-9 max_j |v_j|); 1% on top for fp32 sums and the exp polynomial (relative error 3e-6)."""
    vmax = v.float().abs().amax(dim=2, keepdim=True).expand(-1, -1, ref.shape[1], -1)
    return 1.01 * 2**-9 * (ref.abs() + vmax.transpose(1, 2).flatten(2)) + 1e-6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "B, H, Lq, Lk, scale",
    [
        (1, 3, 1, 1, 1.0),  # a single token
        (2, 4, 93, 93, 1.0),  # 77 + 16 tokens: no length is a multiple of any block
        (2, 3, 1178, 1178, 1.0),  # SD3.5 Medium at 512² (1024 image + 154 text tokens)
        (1, 2, 4250, 4250, 1.0),  # ... at 1024²: several key blocks, a short last one
        (2, 2, 300, 300, 3.0),  # peaky softmax: scores up to ~±100, the running max matters
        (1, 2, 5, 700, 1.0),  # fewer queries than keys
    ],
)
def test_kernel_matches_fp32_sdpa_within_bf16_rounding(isa, B, H, Lq, Lk, scale):
    q, k, v = qkv(B, H, Lq, Lk, seed=Lq + Lk, scale=scale)
    ref = sdpa_attention(q.float(), k.float(), v.float())
    ours = flash_attention_cpu(q, k, v, isa)
    assert ours.shape == (B, Lq, H * 64) and ours.dtype == torch.bfloat16
    err = (ours.float() - ref).abs()
    worst = (err / bf16_error_bound(ref, v)).max().item()
    torch_bf16_err = max_rel_err(sdpa_attention(q, k, v), ref)
    print(
        f"{isa} L={Lq}x{Lk}: max abs {err.max().item():.2e}, max rel {max_rel_err(ours, ref):.2e} "
        f"(torch bf16 SDPA {torch_bf16_err:.2e}), worst error / bf16 bound {worst:.2f}"
    )
    assert worst <= 1.0
    assert max_rel_err(ours, ref) <= 4e-3  # 2^-8: a bf16 ulp at the output's largest magnitude


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_reads_strided_views_like_the_mmdit_passes_them(isa):
    # MMDiT: qkv(x).view(B, L, 3, H, 64).permute(2, 0, 3, 1, 4): q, k, v are strided views
    g = torch.Generator().manual_seed(1)
    qkv_proj = torch.randn(2, 150, 3, 4, 64, generator=g).bfloat16()
    q, k, v = qkv_proj.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    ours = flash_attention_cpu(q, k, v, isa)
    contiguous = (q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(ours, flash_attention_cpu(*contiguous, isa))
    err = max_rel_err(ours, sdpa_attention(q.float(), k.float(), v.float()))
    print(f"strided views: max rel err {err:.2e}")
    assert err <= 4e-3


@needs_kernel
def test_attention_takes_the_kernel_for_bf16_and_sdpa_otherwise(monkeypatch):
    monkeypatch.delenv("SD3_ATTENTION", raising=False)
    q, k, v = qkv(1, 2, 70, 70, seed=3)
    assert attention_module.kernel_choice() != "sdpa" or not attention_module.cpu_has_amx()
    fast = attention_module.kernel_choice()
    if fast != "sdpa":
        assert torch.equal(attention(q, k, v), flash_attention_cpu(q, k, v, fast))
    for t in (q.float(), k.float(), v.float()):
        t.requires_grad_(True)
    qf, kf, vf = q.float(), k.float(), v.float()
    assert torch.equal(attention(qf, kf, vf), sdpa_attention(qf, kf, vf))
    # bf16 with gradients: the kernel has no backward, so SDPA where the sequence is long
    q2, k2, v2 = (torch.cat([t, t, t], dim=2) for t in (q, k, v))  # 210 keys
    assert k2.shape[-2] > attention_module.MATMUL_MAX_KEYS
    qg = q2.clone().requires_grad_(True)
    out = attention(qg, k2, v2)
    assert torch.equal(out, sdpa_attention(q2, k2, v2))
    out.float().sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    # head dim 32: SDPA
    q32, k32, v32 = (t[..., :32] for t in (q, k, v))
    assert torch.equal(attention(q32, k32, v32), sdpa_attention(q32, k32, v32))


@needs_kernel
def test_choice_is_amx_where_it_runs_avx512_only_without_amx_and_can_be_forced(monkeypatch):
    q, k, v = qkv(1, 2, 70, 70, seed=3)
    monkeypatch.delenv("SD3_ATTENTION", raising=False)
    available = kernels_available()
    expected = (
        "amx" if "amx" in available else "sdpa" if attention_module.cpu_has_amx() else "avx512"
    )
    assert attention_module.kernel_choice() == expected
    # an AMX CPU whose kernel lacks the AMX path: SDPA beats the AVX-512 kernel there
    monkeypatch.setattr(attention_module, "kernels_available", lambda: ("avx512",))
    monkeypatch.setattr(attention_module, "cpu_has_amx", lambda: True)
    assert attention_module.kernel_choice() == "sdpa"
    assert torch.equal(attention(q, k, v), sdpa_attention(q, k, v))
    monkeypatch.setattr(attention_module, "cpu_has_amx", lambda: False)
    assert attention_module.kernel_choice() == "avx512"
    assert torch.equal(attention(q, k, v), flash_attention_cpu(q, k, v, "avx512"))
    monkeypatch.setenv("SD3_ATTENTION", "sdpa")
    assert torch.equal(attention(q, k, v), sdpa_attention(q, k, v))
    monkeypatch.setenv("SD3_ATTENTION", "amx")  # not available (as patched): SDPA, one warning
    build_module.warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="SD3_ATTENTION=amx cannot run on this machine"):
        assert torch.equal(attention(q, k, v), sdpa_attention(q, k, v))
    monkeypatch.setenv("SD3_ATTENTION", "fast")
    with pytest.raises(
        ValueError, match="SD3_ATTENTION='fast' is not one of auto, amx, avx512, sdpa"
    ):
        attention(q, k, v)


def test_without_a_compiler_attention_falls_back_to_sdpa_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-sd3")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build_module, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.delenv("SD3_ATTENTION", raising=False)
    build_module.kernel_library.cache_clear()
    build_module.warn_once.cache_clear()
    try:
        q, k, v = qkv(1, 2, 40, 40, seed=4)
        with pytest.warns(RuntimeWarning, match="using torch SDPA") as record:
            out = attention(q, k, v)
            attention(q, k, v)
        assert len(record) == 1
        assert torch.equal(out, sdpa_attention(q, k, v))
        assert not list(tmp_path.iterdir())  # nothing half-built left in the cache
        with pytest.raises(RuntimeError, match="not available"):
            flash_attention_cpu(q, k, v)
    finally:
        build_module.kernel_library.cache_clear()


def test_impossible_shapes_raise_value_errors():
    q, k, v = qkv(1, 2, 8, 8, seed=5)
    with pytest.raises(ValueError, match=r"\[B, heads, L, d\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="bf16 CPU"):
        flash_attention_cpu(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head dim 64"):
        flash_attention_cpu(q[..., :32], k[..., :32], v[..., :32])


@pytest.mark.parametrize("isa", ISAS)
def test_mmdit_in_bf16_with_the_kernel_matches_the_sdpa_path(monkeypatch, isa):
    from helpers import bf16_mmdit_case

    monkeypatch.setenv("SD3_ATTENTION", isa)
    model, inputs = bf16_mmdit_case()
    with torch.no_grad():
        fast = model(*inputs)
        monkeypatch.setenv("SD3_ATTENTION", "sdpa")
        plain = model(*inputs)
    err = max_rel_err(fast, plain)
    print(f"bf16 MMDiT, {isa} kernel vs SDPA: max rel err {err:.2e}")
    assert err < 2e-2


def two_streams(seed: int, n_ctx: int = 21, n_x: int = 150, qk_norm: bool = True):
    """The MMDiT's two streams as it passes them: q, k, v strided views of each stream's qkv
    projection, and RMS qk-norms with random bf16 weights (SD3.5) or none (SD3 Medium)."""
    from sd3.models.mmdit import RMSNorm

    g = torch.Generator().manual_seed(seed)
    streams = []
    for L in (n_ctx, n_x):
        q, k, v = (3 * torch.randn(2, L, 3, 4, 64, generator=g)).bfloat16().permute(2, 0, 3, 1, 4)
        norms = []
        for _ in range(2):
            norm = RMSNorm(64).bfloat16() if qk_norm else None
            if norm is not None:
                norm.weight.data = (1 + 0.3 * torch.randn(64, generator=g)).bfloat16()
            norms.append(norm)
        streams.append((q, k, v, *norms))
    return streams


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("n_streams", [1, 2])
def test_the_kernel_normalising_as_it_reads_equals_normalising_and_concatenating_first(
    monkeypatch, isa, qk_norm, n_streams
):
    """`joint_attention` through the kernel (the qk-norm applied as rows are read, the streams never
    concatenated) gives bit for bit what the kernel gives on `joint_heads`' normed, concatenated
    q, k and v; and both are within bf16 rounding of fp32 SDPA on the normed fp32 inputs."""
    from sd3.kernels.fused import joint_attention, joint_heads

    monkeypatch.setenv("SD3_ATTENTION", isa)
    streams = two_streams(seed=5, qk_norm=qk_norm)[:n_streams]
    with torch.no_grad():
        fused = joint_attention(streams)
        q, k, v = (
            joint_heads([(s[i], s[3 + i] if i < 2 else None) for s in streams]) for i in range(3)
        )
        apart = flash_attention_cpu(q, k, v, isa)
        assert torch.equal(fused, apart)

        def normed(x, norm):  # the plain module in fp32
            if norm is None:
                return x.float()
            x = x.float()
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()

        ref = sdpa_attention(
            *(
                torch.cat([normed(s[i], s[3 + i] if i < 2 else None) for s in streams], dim=2)
                for i in range(3)
            )
        )
    err = max_rel_err(fused, ref)
    print(f"{isa}, qk-norm {qk_norm}, {n_streams} streams: max rel err vs fp32 {err:.2e}")
    assert err <= 1e-2  # measured 2.7e-3 to 7.9e-3


@needs_kernel
def test_impossible_streams_raise_value_errors():
    from sd3.kernels.flash_attention import flash_attention_streams
    from sd3.models.mmdit import RMSNorm

    (q, k, v, nq, nk), (q2, k2, v2, *_) = two_streams(seed=6)
    with pytest.raises(ValueError, match="one or two streams, got 3"):
        flash_attention_streams([(q, k, v, nq, nk)] * 3)
    with pytest.raises(ValueError, match="differ in batch or heads"):
        flash_attention_streams([(q, k, v, nq, nk), (q2[:1], k2[:1], v2[:1], None, None)])
    with pytest.raises(ValueError, match=r"qk-norm weights must be bf16 of shape \(64,\)"):
        flash_attention_streams([(q, k, v, RMSNorm(64), None)])  # fp32 weight
    with pytest.raises(ValueError, match="at least one query"):
        flash_attention_streams([(q[:, :, :0], k, v, None, None)])


def test_short_attention_with_gradients_is_written_out_and_matches_fp64_sdpa():
    """With gradients, on a CPU, up to MATMUL_MAX_KEYS keys: two matmuls and an fp32 softmax (also
    under bf16 autocast), whose output and gradients match fp64 SDPA's within bf16 rounding, as
    torch's own bf16 SDPA does (measured: output 0.0035 against its 0.0021, gradients
    0.004-0.005 as its)."""
    q, k, v = qkv(4, 3, 112, 112, seed=5, scale=2.0)
    grad = torch.randn(4, 112, 3 * 64, generator=torch.Generator().manual_seed(6)).bfloat16()

    def run(fn, autocast: bool):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return out, [t.grad for t in leaves]

    ref, ref_grads = run(lambda *t: sdpa_attention(*(x.double() for x in t)), False)
    for autocast in (False, True):
        out, grads = run(attention, autocast)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, matmul_attention(q, k, v))  # the written-out path was taken
        assert max_rel_err(out, ref) < 0.006
        assert all(max_rel_err(a, b) < 0.008 for a, b in zip(grads, ref_grads, strict=True))
    # without gradients, or past MATMUL_MAX_KEYS, it is not taken
    assert not attention_module.matmul_applies(q, k, v)
    long = torch.zeros(1, 1, attention_module.MATMUL_MAX_KEYS + 1, 64, requires_grad=True)
    assert not attention_module.matmul_applies(long, long, long)
    assert attention_module.matmul_applies(long[..., :128, :], long[..., :128, :], long)
