"""int8 (or with --mode int4, int4) mode against the plain compute dtype (bf16 where the CPU has
it, else fp32) on the same full-size random weights: time, peak memory and output error; appends
its table to benchmarks/RESULTS.md (or prints it with --no-write). In fp32 the MMDiT's int8 layers
multiply in int8 (`kernels.quantization`); otherwise int8 is weight-only, as int4 always is.

    python benchmarks/int8.py [--mode int8|int4] [--rows t5,mmdit-512,mmdit-1024] [--repeats 3]

Each side of each row runs in its own worker process (its own peak RSS) on the cached weights of
`run.py`; the error is max |int8 - plain| / max |plain| of the two outputs, and the mean relative
error ‖int8 - plain‖ / ‖plain‖, computed in fp64.
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
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CONTEXT_TOKENS, ROOT, peak_rss_bytes, weights_file  # noqa: E402

from sd3.checkpoints import find_components, infer_config, load_component  # noqa: E402
from sd3.kernels.quantization import Int8Linear  # noqa: E402
from sd3.pipeline import default_dtype  # noqa: E402

DTYPE = default_dtype()  # the plain side's, and the int8 side's compute dtype
PLAIN = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]

ROWS = {
    "t5": ("T5-XXL encode, 77 tokens", "medium"),
    "mmdit-512": ("SD3.5 Medium MMDiT forward, 512²", "medium"),
    "mmdit-1024": ("SD3.5 Medium MMDiT forward, 1024²", "medium"),
    "mmdit-large-1024": ("SD3.5 Large MMDiT forward, 1024²", "large"),
}


def worker(row: str, mode: str | None, file: Path, repeats: int, out: Path) -> dict:
    low_bit = {"int8": mode == "int8", "int4": mode == "int4"}
    torch.manual_seed(0)
    components = find_components(file)
    started = time.perf_counter()
    if row == "t5":
        model = load_component(components["t5xxl"], DTYPE, **low_bit)
        inputs = (torch.randint(0, 32000, (1, 77)),)
    else:
        size = int(row.rsplit("-", 1)[1])
        config = infer_config(components["mmdit"])
        model = load_component(components["mmdit"], DTYPE, **low_bit)
        inputs = (
            torch.randn(1, 16, size // 8, size // 8, dtype=DTYPE),
            torch.tensor([500.0]),
            torch.randn(1, CONTEXT_TOKENS, config.context_dim, dtype=DTYPE),
            torch.randn(1, config.pooled_dim, dtype=DTYPE),
        )
    load_s = time.perf_counter() - started
    int8_gemm = sum(m.packed is not None for m in model.modules() if type(m) is Int8Linear)
    times = []
    with torch.no_grad():
        output = model(*inputs)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            output = model(*inputs)
            times.append(time.perf_counter() - t)
    peak_rss = peak_rss_bytes()  # before the state dict, which unpacks packed int8 layers
    save_file({"output": output.float().contiguous()}, str(out))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"median_s": statistics.median(times), "load_s": load_s,
            "peak_rss_gb": peak_rss / 2**30, "weights_gb": weight_bytes / 2**30,
            "int8_gemm_layers": int8_gemm}  # fmt: skip


def run_side(row: str, mode: str | None, file: Path, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", row, mode or PLAIN, str(file),
           str(out), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{row} ({mode or PLAIN}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["int8", "int4"], default="int8", help="the low-bit side")
    p.add_argument("--rows", default="t5,mmdit-512,mmdit-1024", help=f"of {list(ROWS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--weights", type=Path, default=Path.home() / ".cache" / "sd3" / "benchmark-weights"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        row, side, file, out = args.worker
        mode = side if side in ("int8", "int4") else None
        print(json.dumps(worker(row, mode, Path(file), args.repeats, Path(out))))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    low = args.mode
    table = [
        f"## {low} vs {PLAIN} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{args.threads} threads, median of {args.repeats} after a warm-up; `benchmarks/int8.py`)",
        "",
        f"| row | {PLAIN} s | {low} s | {low} / {PLAIN} time | int8 GEMM layers | {PLAIN} weights GB | {low} weights GB | "
        f"{PLAIN} peak RSS GB | {low} peak RSS GB | max rel err | mean rel err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    print("\n".join(table), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            what, which = ROWS[row]
            weights_file(args.weights, "medium")
            file = weights_file(args.weights, which)
            outs = {side: Path(tmp) / f"{row}-{side}.safetensors" for side in ("plain", low)}
            plain = run_side(row, None, file, args, outs["plain"])
            quant = run_side(row, low, file, args, outs[low])
            a, b = (load_file(str(outs[s]))["output"].double() for s in ("plain", low))
            max_err = ((b - a).abs().max() / a.abs().max()).item()
            mean_err = ((b - a).norm() / a.norm()).item()
            table.append(
                f"| {what} | {plain['median_s']:.3f} | {quant['median_s']:.3f} | "
                f"{quant['median_s'] / plain['median_s']:.2f} | {quant['int8_gemm_layers']} | "
                f"{plain['weights_gb']:.2f} | {quant['weights_gb']:.2f} | "
                f"{plain['peak_rss_gb']:.1f} | {quant['peak_rss_gb']:.1f} | "
                f"{max_err:.2e} | {mean_err:.2e} |"
            )
            print(table[-1], flush=True)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(table) + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
