"""A rank-16 LoRA on full-size SD3.5 Medium: what merging it as the weights load costs in load
time and peak memory, and what running it beside the weights (not merged) costs per forward.
Appends its table to benchmarks/RESULTS.md (or prints it with --no-write).

    python benchmarks/lora.py [--rank 16] [--repeats 2]

The LoRA is a kohya-format file with random factors on every linear layer of the 24 joint blocks
(q/k/v, projections, MLPs, modulations, attn2), made once per run. Each side runs in its own
worker process (its own peak RSS) on the cached random weights of `run.py`:
- no LoRA: the MMDiT loaded as `sd3 generate` loads it;
- merged: the same with the LoRA merged as the weights load (`Pipeline(loras=...)`);
- not merged: the MMDiT loaded, then `pipe.load_lora` (its time reported apart).
Load time counts from opening the files (every key and shape checked, the LoRA matched) to the
MMDiT in memory; the forward is one 512² MMDiT call, median after a warm-up.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CONTEXT_TOKENS, ROOT, peak_rss_bytes, weights_file  # noqa: E402

from sd3.checkpoints import check_component, find_components  # noqa: E402
from sd3.loras import layers_of  # noqa: E402
from sd3.pipeline import Pipeline, default_dtype  # noqa: E402

DTYPE = default_dtype()
SIDES = ("no LoRA", "merged", "not merged")


def make_lora(weights: Path, path: Path, rank: int) -> int:
    """A kohya LoRA of `rank` on every joint-block linear layer; returns its module count."""
    layers = layers_of(check_component(find_components(weights)["mmdit"]))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in layers.items():
        if not name.startswith("joint_blocks.") or len(shape) != 2:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (
            torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
        ).bfloat16()
        tensors[f"{key}.lora_up.weight"] = (
            0.01 * torch.randn(shape[0], rank, generator=g)
        ).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3


def worker(side: str, weights: Path, lora: Path, repeats: int) -> dict:
    started = time.perf_counter()
    loras = [(lora, 1.0)] if side == "merged" else []
    pipe = Pipeline.from_single_file(
        weights, dtype=DTYPE, low_memory=False, load=False, loras=loras
    )
    mmdit = pipe.module("mmdit")
    load_s = time.perf_counter() - started
    load_lora_s = None
    if side == "not merged":
        t = time.perf_counter()
        pipe.load_lora(lora, 1.0)
        load_lora_s = time.perf_counter() - t
    peak_load = peak_rss_bytes()
    config = pipe.config
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 16, 64, 64, generator=g).to(DTYPE),
        torch.tensor([500.0]),
        torch.randn(1, CONTEXT_TOKENS, config.context_dim, generator=g).to(DTYPE),
        torch.randn(1, config.pooled_dim, generator=g).to(DTYPE),
    )
    times = []
    with torch.no_grad():
        mmdit(*inputs)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            mmdit(*inputs)
            times.append(time.perf_counter() - t)
    return {"load_s": load_s, "load_lora_s": load_lora_s, "peak_load_gb": peak_load / 2**30,
            "peak_gb": peak_rss_bytes() / 2**30, "forward_s": statistics.median(times),
            "applied": len(pipe.loras[0].applied) if pipe.loras else 0}  # fmt: skip


def run_side(side: str, weights: Path, lora: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, str(weights), str(lora),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--weights", type=Path, default=Path.home() / ".cache" / "sd3" / "benchmark-weights"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        side, weights, lora = args.worker
        print(json.dumps(worker(side, Path(weights), Path(lora), args.repeats)))
        return
    weights = weights_file(args.weights, "medium")
    dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "lora.safetensors"
        modules = make_lora(weights, lora, args.rank)
        table = [
            f"## LoRA: rank {args.rank} on SD3.5 Medium ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{dtype}, {args.threads} threads; `benchmarks/lora.py`)",
            "",
            f"A kohya LoRA ({lora.stat().st_size / 2**20:.0f} MB, bf16) on all {modules} linear "
            "layers of the joint blocks. Load: from opening the files to the MMDiT in memory "
            "(page cache warm); forward: one 512² MMDiT call, median of "
            f"{args.repeats} after a warm-up.",
            "",
            "| side | MMDiT load s | peak RSS after load GB | forward 512² s | peak RSS GB | modules applied |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        print("\n".join(table), flush=True)
        run_side("no LoRA", weights, lora, args)  # warms the page cache for all sides
        for side in SIDES:
            r = run_side(side, weights, lora, args)
            load = f"{r['load_s']:.1f}"
            if r["load_lora_s"] is not None:
                load += f" + {r['load_lora_s']:.1f} (`load_lora`)"
            table.append(
                f"| {side} | {load} | {r['peak_load_gb']:.1f} | {r['forward_s']:.2f} | "
                f"{r['peak_gb']:.1f} | {r['applied']} |"
            )
            print(table[-1], flush=True)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(table) + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
