"""sd3 against stable-diffusion.cpp, the CPU peer people pick, on the same full-size SD3.5 Medium
random weights: its f16 and GGUF types (q8_0, q4_0, q4_K, written by its own converter) against
our bf16 (fp32 where the CPU has no bf16), --int8 and --int4; appends the table to
benchmarks/RESULTS.md (or prints it with --no-write).

    pip install -e .[bench]        # stable-diffusion-cpp-python: compiles its C++ once
    python benchmarks/sdcpp.py [--sides sd3-plain,sdcpp-q4_0,...] [--threads N]

Both sides read one float16 file in the official single-file layout (the MMDiT, VAE, CLIP-L and
CLIP-G of `run.py`'s cached weights; no T5, which neither side then runs) or the GGUF files the
peer's converter makes from it, which sd3 reads too. Each side runs in its own process (its own
peak RSS) and makes two generations with the euler sampler and shift 3:

- 512², 4 steps, CFG 5 (two MMDiT passes a step): the whole generation, text to pixels;
- 1024², 2 steps, CFG 1 (one pass a step): the MMDiT step, and the VAE decode at 1024².

A step is the sampling time over the steps, on both sides (the peer logs its stage times; ours
are `Pipeline.timings`). "% peak" is the MMDiT's FLOPs a second (counted on the meta device, as
`run.py` does) as a share of this machine's bf16 (or fp32) matmul throughput measured first.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    CONTEXT_TOKENS,
    ROOT,
    count_flops,
    matmul_peak,
    meta,
    peak_rss_bytes,
    weights_file,
)

from sd3.checkpoints import find_components, infer_config  # noqa: E402
from sd3.models.mmdit import MMDiT  # noqa: E402
from sd3.pipeline import default_dtype  # noqa: E402

PLAIN = {torch.bfloat16: "bf16", torch.float32: "fp32"}[default_dtype()]
SOURCE = "sd35_medium_random_f16_no_t5.safetensors"
PROMPT = "a photo of a cat on a red sofa"
RUNS = {"512": (512, 4, 5.0), "1024": (1024, 2, 1.0)}  # size, steps, CFG
SMOKE = {"512": (64, 2, 5.0), "1024": (64, 1, 1.0)}  # --smoke: does each side run at all

# side -> (program, weights: "source" or a GGUF type the peer's converter writes, our mode)
SIDES = {
    "sd3-plain": ("sd3", "source", None),
    "sd3-int8": ("sd3", "source", "int8"),
    "sd3-int4": ("sd3", "source", "int4"),
    "sd3-int4-q4_0": ("sd3", "q4_0", "int4"),  # the peer's Q4_0 file, its blocks kept as stored
    "sdcpp-f16": ("stable-diffusion.cpp", "source", None),
    "sdcpp-q8_0": ("stable-diffusion.cpp", "q8_0", None),
    "sdcpp-q4_0": ("stable-diffusion.cpp", "q4_0", None),
    "sdcpp-q4_K": ("stable-diffusion.cpp", "q4_K", None),
}


def source_file(weights: Path) -> Path:
    """The peer's input, made once from the cached bf16 weights: everything but T5, as float16."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = weights / SOURCE
    if not path.is_file():
        medium = weights_file(weights, "medium")
        print(f"writing {path} (once) ...", file=sys.stderr, flush=True)
        with safe_open(str(medium), "pt") as f:
            keys = [k for k in f.keys() if not k.startswith("text_encoders.t5xxl.")]
            tensors = {k: f.get_tensor(k).half() for k in keys}
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
    return path


def gguf_file(weights: Path, kind: str) -> Path:
    """The source converted by stable-diffusion.cpp's converter to `kind`, made once."""
    path = weights / f"sd35_medium_random_no_t5_{kind}.gguf"
    if not path.is_file():
        from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp
        from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP

        print(f"converting to {path} (once) ...", file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        kind_id = int(GGML_TYPE_MAP[kind.lower()])
        if not sd_cpp.convert(
            str(source_file(weights)).encode(), b"", str(tmp).encode(), kind_id, b"", True
        ):
            raise SystemExit(f"stable-diffusion.cpp could not convert to {kind}")
        tmp.rename(path)
    return path


# --- one side, in its own process -----------------------------------------------------------


def ours(file: Path, mode: str | None, threads: int) -> dict:
    from sd3.pipeline import Pipeline

    torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe = Pipeline.from_single_file(
        file, dtype=default_dtype(), low_memory=False, int8=mode == "int8", int4=mode == "int4"
    )
    pipe.load()
    out = {"load_s": time.perf_counter() - started}
    for run, (size, steps, cfg) in RUNS.items():
        t = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg, sampler="euler", shift=3.0,
             width=size, height=size, seed=0)  # fmt: skip
        out[run] = {"total_s": time.perf_counter() - t, "step_s": pipe.timings["denoise"] / steps,
                    "decode_s": pipe.timings["decode"]}  # fmt: skip
    return out


STAGE = re.compile(r"(sampling|decode_first_stage) completed, taking ([0-9.]+)s")


def peer(file: Path, threads: int) -> dict:
    """stable-diffusion.cpp through its Python binding; its stage times read from its log, which
    the binding prints to sys.stderr."""
    import contextlib
    import io

    from stable_diffusion_cpp import StableDiffusion

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        started = time.perf_counter()
        sd = StableDiffusion(model_path=str(file), n_threads=threads, verbose=True)
        out = {"load_s": time.perf_counter() - started}
        for run, (size, steps, cfg) in RUNS.items():
            t = time.perf_counter()
            sd.generate_image(PROMPT, width=size, height=size, cfg_scale=cfg, sample_steps=steps,
                              sample_method="euler", seed=0)  # fmt: skip
            out[run] = {"total_s": time.perf_counter() - t, "steps": steps}
    stages = STAGE.findall(log.getvalue())
    sampling = [float(s) for name, s in stages if name == "sampling"]
    decode = [float(s) for name, s in stages if name == "decode_first_stage"]
    if len(sampling) != len(RUNS) or len(decode) != len(RUNS):
        raise SystemExit(f"stable-diffusion.cpp's log had no stage times: {log.getvalue()[-2000:]}")
    for k, run in enumerate(RUNS):
        out[run]["step_s"] = sampling[k] / out[run].pop("steps")
        out[run]["decode_s"] = decode[k]
    return out


def worker(side: str, file: Path, threads: int) -> dict:
    program, _, mode = SIDES[side]
    out = ours(file, mode, threads) if program == "sd3" else peer(file, threads)
    out["peak_rss_gb"] = peak_rss_bytes() / 2**30
    return out


def run_side(side: str, file: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, str(file), "--threads", str(threads)]
    cmd += ["--smoke"] if RUNS == SMOKE else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_flops(file: Path, size: int, batch: int) -> float:
    """FLOPs of one MMDiT pass of `batch` images at size² (counted on the meta device)."""
    dtype = default_dtype()
    config = infer_config(find_components(file)["mmdit"])
    latent = size // 8
    return count_flops(MMDiT, config, lambda m: m(*meta(
        torch.zeros(batch, 16, latent, latent, dtype=dtype), torch.ones(batch),
        torch.zeros(batch, CONTEXT_TOKENS, config.context_dim, dtype=dtype),
        torch.zeros(batch, config.pooled_dim, dtype=dtype))), dtype)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default=",".join(SIDES), help=f"of {list(SIDES)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--weights", type=Path, default=Path.home() / ".cache" / "sd3" / "benchmark-weights"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--smoke", action="store_true", help="64² only, to see each side run; prints")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        RUNS.update(SMOKE)
        args.no_write = True
    if args.worker:
        side, file = args.worker
        print(json.dumps(worker(side, Path(file), args.threads)))
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := [s for s in sides if s not in SIDES]:
        p.error(f"unknown sides {unknown}; choose from {list(SIDES)}")
    source = source_file(args.weights)
    files = {
        side: source if SIDES[side][1] == "source" else gguf_file(args.weights, SIDES[side][1])
        for side in sides
    }  # fmt: skip
    torch.set_num_threads(args.threads)
    peak = matmul_peak(default_dtype())
    flops = {
        run: step_flops(source, size, 2 if cfg != 1 else 1) for run, (size, _, cfg) in RUNS.items()
    }
    table = [
        f"## sd3 and stable-diffusion.cpp, SD3.5 Medium without T5 "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} threads; "
        f"`benchmarks/sdcpp.py`; {PLAIN} matmul peak {peak / 1e12:.2f} TFLOP/s)",
        "",
        "| side | weights | 512² generation s (4 steps, CFG 5) | 512² step s | % peak | "
        "1024² step s (CFG 1) | % peak | VAE decode 1024² s | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(table), flush=True)
    for side in sides:
        program, weights, mode = SIDES[side]
        r = run_side(side, files[side], args.threads)
        what = (
            f"sd3 {({'int8': '--int8', 'int4': '--int4'}).get(mode, PLAIN)}"
            if program == "sd3"
            else program
        )
        stored = "float16 safetensors" if weights == "source" else f"its {weights} GGUF"
        if "error" in r:
            table.append(f"| {what} | {stored} | failed: {r['error'][:150]} | | | | | | |")
        else:
            a, b = r["512"], r["1024"]
            table.append(
                f"| {what} | {stored} | {a['total_s']:.1f} | {a['step_s']:.2f} | "
                f"{100 * flops['512'] / a['step_s'] / peak:.0f}% | {b['step_s']:.2f} | "
                f"{100 * flops['1024'] / b['step_s'] / peak:.0f}% | {b['decode_s']:.2f} | "
                f"{r['peak_rss_gb']:.1f} |"
            )
        print(table[-1], flush=True)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(table) + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
