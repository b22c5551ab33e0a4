"""Attention speed at the MMDiT's shapes: torch SDPA vs sd3's bf16 CPU kernels, side by side.

    python benchmarks/attention.py [--threads N] [--repeats N] [--cpu-time]

SD3.5 Medium has 24 heads of 64 and attends over 1024 + 154 tokens at 512² and 4096 + 154 at 1024².
GFLOP/s count 4·B·H·L²·D (Q Kᵀ and P V). "% of it" is our share of the bf16 matmul throughput
measured in the same repeats at the MMDiT's MLP shape, what the same cores reach on a plain GEMM.
`--cpu-time` divides by process CPU time instead of wall time: on a shared, loaded machine that
estimates speed on idle cores (with one thread; with more, idle-waiting threads count as well).
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sd3.kernels.flash_attention import flash_attention_cpu, kernels_available, sdpa_attention

SHAPES = [(1, 24, 1178), (2, 24, 1178), (1, 24, 4250), (2, 24, 4250)]  # (B, heads, L)
HEAD_DIM = 64


def timed(fns: dict, repeats: int, clock) -> dict:
    """Median seconds per call of each function, after one warm-up call each. The functions take
    turns within every repeat, so a change in machine load affects all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    isas = kernels_available()
    if not isas:
        raise SystemExit("no bf16 attention kernel is available here (see warnings above)")

    print(
        f"torch {torch.__version__}, {args.threads} threads, {'CPU' if args.cpu_time else 'wall'} time, "
        f"median of {args.repeats}, load average before: {os.getloadavg()[0]:.2f}"
    )
    # The MMDiT's first MLP layer on 2 x 1178 tokens: the throughput these cores reach on a plain GEMM.
    x = torch.randn(2356, 1536, dtype=torch.bfloat16)
    w = torch.randn(6144, 1536, dtype=torch.bfloat16)
    mm_flops = 2 * x.shape[0] * w.shape[0] * w.shape[1]
    header = (
        f"{'B x H x L x D':>18} | {'matmul GFLOP/s':>14} | {'SDPA ms':>8} {'GFLOP/s':>7} | "
        + " | ".join(
            f"{isa + ' ms':>8} {'GFLOP/s':>7} {'vs SDPA':>7} {'% mm':>5} {'max rel err':>11}"
            for isa in isas
        )
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for B, H, L in SHAPES:
        q, k, v = (torch.randn(B, H, L, HEAD_DIM, generator=gen).bfloat16() for _ in range(3))
        fns = {"matmul": lambda: F.linear(x, w), "sdpa": lambda: sdpa_attention(q, k, v)}  # noqa: B023
        for isa in isas:
            fns[isa] = lambda isa=isa: flash_attention_cpu(q, k, v, isa)  # noqa: B023
        t = timed(fns, args.repeats, clock)
        ref = sdpa_attention(q.float(), k.float(), v.float())
        flops = 4 * B * H * L * L * HEAD_DIM
        gf_mm = mm_flops / t["matmul"] / 1e9
        line = (
            f"{f'{B} x {H} x {L} x {HEAD_DIM}':>18} | {gf_mm:14.0f} | "
            f"{t['sdpa'] * 1e3:8.1f} {flops / t['sdpa'] / 1e9:7.0f}"
        )
        for isa in isas:
            err = (flash_attention_cpu(q, k, v, isa).float() - ref).abs().max().item()
            gf = flops / t[isa] / 1e9
            line += (
                f" | {t[isa] * 1e3:8.1f} {gf:7.0f} {t['sdpa'] / t[isa]:6.2f}x {100 * gf / gf_mm:4.0f}%"
                f" {err / ref.abs().max().item():11.2e}"
            )
        print(line)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
