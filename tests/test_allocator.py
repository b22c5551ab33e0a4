"""`allocator.reuse_freed_memory`: inside it freed large activations are reused without new page
faults; outside it glibc maps every block over 32 MB afresh and faults in each page again."""

import resource

import pytest
import torch

from sd3.kernels.allocator import _libc, reuse_freed_memory

pytestmark = pytest.mark.skipif(_libc() is None, reason="not glibc")

MB = 1 << 20


def faults_per_round(rounds: int = 4) -> list[int]:
    """Minor page faults in each round of a VAE-like chain: each activation (64-256 MB, filled)
    is made from the previous one, which then dies."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(64 * MB, dtype=torch.uint8).fill_(1)
        for size in (256, 128, 256, 64):
            x = torch.empty(size * MB, dtype=torch.uint8).fill_(2)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def test_freed_blocks_are_reused_inside():
    pages = (64 + 256 + 128 + 256 + 64) * MB // 4096  # one round's, ~196,600
    outside = faults_per_round()
    with reuse_freed_memory():
        inside = faults_per_round()
    print(f"page faults per round: outside {outside}, inside {inside} ({pages} pages)")
    assert min(outside) > pages * 0.8  # (nearly) every block a fresh mapping
    assert min(inside[1:]) < pages * 0.05 and sum(inside) < 0.6 * sum(outside)
    # measured outside 180,228-196,613; inside e.g. 114,688, 0, 0, 0 or 180,224, 65,536, 131,072, 0
    # (the heap grows, then the freed blocks fit the next ones)


@pytest.mark.parametrize(
    ("dtype", "grad", "reuses"),
    [(torch.bfloat16, False, True), (torch.float32, False, True), (torch.bfloat16, True, False)],
)
def test_mmdit_inference_runs_inside_it_and_training_does_not(dtype, grad, reuses):
    """The MMDiT's blocks see malloc's reuse setting in inference (both dtypes), not in training,
    and the setting is restored when the forward returns."""
    from sd3.kernels import allocator
    from sd3.models.mmdit import MMDiT, MMDiTConfig

    config = MMDiTConfig(
        depth=2,
        hidden_size=128,
        mlp_hidden=256,
        pos_embed_max_size=8,
        context_dim=32,
        pooled_dim=16,
    )
    model = MMDiT(config).to(dtype)
    seen = []
    model.joint_blocks[0].register_forward_hook(lambda *_: seen.append(allocator._depth))
    x = torch.randn(1, 16, 8, 8, dtype=dtype)
    args = (
        torch.tensor([500.0]),
        torch.randn(1, 5, 32, dtype=dtype),
        torch.randn(1, 16, dtype=dtype),
    )
    with torch.set_grad_enabled(grad):
        model(x, *args)
    assert seen == [1 if reuses else 0]
    assert allocator._depth == 0
