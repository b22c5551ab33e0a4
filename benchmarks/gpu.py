"""sd3 against diffusers (and transformers for the text encoders) on a CUDA GPU, side by side,
with the card's measured bf16 matmul peak; prints a section for benchmarks/RESULTS.md.

    python benchmarks/gpu.py [--out gpu.md] [--budget-s 420] [--no-compile] [--compile-mode M]

The rows of `run.py` that make sense on a GPU (MMDiT forward passes, VAE, text encoders), plus
full 1024² generations of SD3.5 Medium and Large (euler, CFG as one batch of 2, all three
encoders, decode; no skip-layer guidance, which diffusers' pipeline does not run by default)
reported as images/s, eagerly and under torch.compile for both sides. Weights are full-size
random bf16 tensors made on the GPU in the official layout with `run.py`'s init; our modules use
them in place, diffusers' modules convert them with diffusers' own code; nothing goes to disk.
Module rows: CUDA-event medians after a warm-up. Generations: wall-clock medians, synchronized.
"working GB" is the peak memory allocated during the timed calls above what was allocated just
before them (activations and workspace; the weights are held either way). "max rel err" compares
the two sides' outputs on the same inputs. Rows past `--budget-s` are skipped, so the script ends
inside a lease; each finished row is printed (and appended to `--out`) as it completes.
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [
    str(HERE),
    str(HERE.parent / "tests"),
]  # run.py's rows; the peers, as tests build them
from helpers import (  # noqa: E402
    diffusers_mmdit_from,
    diffusers_vae_from,
    max_rel_err,
    transformers_clip,
    transformers_t5,
)
from run import (  # noqa: E402
    CONTEXT_TOKENS,
    ENCODERS,
    LARGE,
    MEDIUM,
    count_flops,
    diffusers_pipeline,
    generation_flops,
    meta,
    random_tensor,
    read,
)

from sd3.checkpoints import Component, LazyTensor, infer_config, load_component  # noqa: E402
from sd3.models.clip import CLIPTextModel  # noqa: E402
from sd3.models.mmdit import MMDiT  # noqa: E402
from sd3.models.t5 import T5Encoder  # noqa: E402
from sd3.models.vae import AutoEncoder  # noqa: E402
from sd3.pipeline import COMPILE_MODES, Pipeline  # noqa: E402
from sd3.text import Tokenizers  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
PROMPT = "a photo of a cat on a red sofa"
SIZE = 1024  # the generations' and VAE rows' image size
# (name for the preset, steps, CFG): the presets' step counts and scales, euler on both sides
GENERATIONS = {"medium": ("sd3.5_medium", 50, 5.0), "large": ("sd3.5_large", 40, 4.5)}
COMPILE_MODE = "default"  # torch.compile's mode for the compiled rows, both sides (--compile-mode)


def random_components(modules: dict, seed: int) -> dict[str, Component]:
    """{name: Component} of random bf16 GPU tensors for {name: (class, config)}, official keys."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    components = {}
    for name, (cls, config) in modules.items():
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        tensors = {}
        for key, shape in shapes.items():
            t = random_tensor(key, shape, config, generator).to(DTYPE)
            tensors[key] = LazyTensor(shape, DTYPE, f"random {name}:{key}", lambda t=t: t)
        components[name] = Component(name, [], tensors)
    return components


def matmul_peak() -> dict[str, float]:
    """bf16 TFLOP/s at the MMDiT's MLP GEMM (batch 2 at 1024²: 8312x1536 @ 1536x6144) and at
    8192³, on random data, median of 50 CUDA-event timings."""
    out = {}
    for name, (m, k, n) in {"mmdit-mlp": (8312, 1536, 6144), "8192^3": (8192, 8192, 8192)}.items():
        a = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
        b = torch.randn(k, n, device=DEVICE, dtype=DTYPE)
        a @ b
        out[name] = 2 * m * k * n / event_median(lambda a=a, b=b: a @ b, 50)[0] / 1e12
    return out


def event_median(fn: Callable, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls between CUDA events, the last call's output)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out


def wall_median(fn: Callable, repeats: int) -> tuple[float, object]:
    """The same on the wall clock, synchronized (calls with host work between kernels)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(build: Callable, repeats: int, wall: bool) -> tuple[dict, object]:
    """Build one side, call it once (warm-up; compiles a compiled side), then time `repeats`
    calls. Returns the timings and the last output."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn = build()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    with torch.no_grad():
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        median, out = (wall_median if wall else event_median)(fn, repeats)
        work_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    out = first_tensor(out)
    del fn
    gc.collect()
    torch.cuda.empty_cache()
    result = {"median_s": median, "first_s": first_s, "load_s": load_s, "working_gb": work_gb}
    return result, out


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0].float()
    return None  # images


# --- rows: (what, build ours, build the peer, FLOPs, repeats, wall-clock) -------------------


def mmdit_rows(components: dict, size: int, large: bool, compiled: bool):
    comp = components["mmdit"]
    config = infer_config(comp)
    g = torch.Generator(DEVICE).manual_seed(1)
    x = torch.randn(1, 16, size // 8, size // 8, generator=g, device=DEVICE, dtype=DTYPE)
    t = torch.full((1,), 500.0, device=DEVICE)
    ctx = torch.randn(
        1, CONTEXT_TOKENS, config.context_dim, generator=g, device=DEVICE, dtype=DTYPE
    )
    y = torch.randn(1, config.pooled_dim, generator=g, device=DEVICE, dtype=DTYPE)
    flops = count_flops(MMDiT, config, lambda m: m(*meta(x, t, ctx, y)), DTYPE)

    def ours():
        model = maybe_compile(load_component(comp, DTYPE, DEVICE), compiled)
        return lambda: model(x, t, ctx, y)

    def peer():
        ref = maybe_compile(diffusers_mmdit_from(config, read(comp), DTYPE), compiled)
        return lambda: ref(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
            return_dict=False,
        )[0]  # fmt: skip

    what = f"SD3.5 {'Large' if large else 'Medium'} MMDiT forward, {size}², batch 1"
    return what + compiled_note(compiled), ours, peer, flops, 20, False


def vae_rows(components: dict, decode: bool):
    comp = components["vae"]
    config = infer_config(comp)
    g = torch.Generator(DEVICE).manual_seed(2)
    if decode:
        z = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g, device=DEVICE, dtype=DTYPE)
        flops = count_flops(AutoEncoder, config, lambda m: m.decode(*meta(z)), DTYPE, True)

        def ours():
            vae = load_component(comp, DTYPE, DEVICE)
            return lambda: vae.decode(z)

        def peer():
            ref = diffusers_vae_from(config, read(comp), DTYPE)
            return lambda: ref.decode(z / 1.5305 + 0.0609).sample

        return f"VAE decode, {SIZE}²", ours, peer, flops, 10, False
    image = torch.rand(1, 3, SIZE, SIZE, generator=g, device=DEVICE, dtype=DTYPE) * 2 - 1
    flops = count_flops(AutoEncoder, config, lambda m: m.encode(*meta(image)), DTYPE)

    def ours():
        vae = load_component(comp, DTYPE, DEVICE)
        return lambda: vae.encode(image)

    def peer():
        ref = diffusers_vae_from(config, read(comp), DTYPE)
        return lambda: (ref.encode(image).latent_dist.mean - 0.0609) * 1.5305  # MMDiT format

    return f"VAE encode, {SIZE}²", ours, peer, flops, 10, False


def text_rows(components: dict, t5: bool):
    g = torch.Generator(DEVICE).manual_seed(3)
    if t5:
        comp = components["t5xxl"]
        config = infer_config(comp)
        ids = torch.randint(0, 32000, (1, 77), generator=g, device=DEVICE)
        flops = count_flops(T5Encoder, config, lambda m: m(*meta(ids)), DTYPE)

        def ours():
            model = load_component(comp, DTYPE, DEVICE)
            return lambda: model(ids)

        def peer():
            ref = transformers_t5(config, read(comp)).to(DEVICE)
            return lambda: ref(input_ids=ids).last_hidden_state

        return "T5-XXL encode, 77 tokens", ours, peer, flops, 20, False
    comps = [components["clip_l"], components["clip_g"]]
    configs = [infer_config(c) for c in comps]
    ids = torch.randint(0, 49406, (1, 77), generator=g, device=DEVICE)
    flops = sum(count_flops(CLIPTextModel, c, lambda m: m(*meta(ids)), DTYPE) for c in configs)

    def ours():
        models = [load_component(c, DTYPE, DEVICE) for c in comps]
        return lambda: [m(ids)[0] for m in models]

    def peer():
        refs = [
            transformers_clip(c, read(comp), with_projection=c.project_pooled).to(DEVICE, DTYPE)
            for c, comp in zip(configs, comps, strict=True)
        ]
        return lambda: [r(ids, output_hidden_states=True).hidden_states[-2] for r in refs]

    return "CLIP-L + CLIP-G encode, 77 tokens", ours, peer, flops, 20, False


def generation_rows(components: dict, which: str, compiled: bool):
    name, steps, cfg = GENERATIONS[which]
    configs = {
        n: infer_config(components[n]) for n in ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")
    }
    flops = generation_flops(configs, steps, SIZE, DTYPE)
    size = dict(width=SIZE, height=SIZE, num_inference_steps=steps, guidance_scale=cfg)

    def ours():
        pipe = Pipeline.from_components(
            components, Tokenizers.default(), DTYPE, DEVICE, low_memory=False, model_name=name,
            compile=COMPILE_MODE if compiled else False,
        )  # fmt: skip
        return lambda: pipe(
            PROMPT, sampler="euler", shift=3.0, seed=0, t5_length=77, skip_layer_guidance=False,
            **size,
        )  # fmt: skip

    def peer():
        pipe = diffusers_pipeline(components, configs, DTYPE).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer = maybe_compile(pipe.transformer, compiled)
        generator = torch.Generator(DEVICE)
        return lambda: (
            pipe(PROMPT, max_sequence_length=77, generator=generator.manual_seed(0), **size).images
        )

    title = "Medium" if which == "medium" else "Large"
    what = f"SD3.5 {title} {SIZE}², {steps} euler steps, CFG {cfg}, text + decode"
    return what + compiled_note(compiled), ours, peer, flops, 2, True


def compiled_note(compiled: bool) -> str:
    return f", MMDiT under torch.compile (mode {COMPILE_MODE})" if compiled else ""


def maybe_compile(module: torch.nn.Module, compiled: bool):
    return torch.compile(module, dynamic=False, mode=COMPILE_MODE) if compiled else module


# --- the driver ------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu.md"))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip rows that start after it")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for the compiled rows, both sides")  # fmt: skip
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    args = p.parse_args()
    global COMPILE_MODE
    COMPILE_MODE = args.compile_mode
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    print("making random weights on the GPU ...", flush=True)
    medium = random_components({"mmdit": (MMDiT, MEDIUM)} | ENCODERS, seed=0)
    large = medium | random_components({"mmdit": (MMDiT, LARGE)}, seed=1)
    peaks = matmul_peak()
    peak = max(peaks.values())
    header = [
        f"machine: {torch.cuda.get_device_name()}, {platform.machine()}; torch {torch.__version__}; "
        f"dtype bf16; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        "measured bf16 matmul peak: "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items())
        + f"; % peak is against {peak:.0f}",
        "",
        "| row | what | sd3 s | peer s | speed-up | sd3 TFLOP/s (% peak) | peer TFLOP/s (% peak) "
        "| sd3 first call s | peer first call s | sd3 working GB | peer working GB | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    args.out.write_text("\n".join(header) + "\n")
    print("\n".join(header), flush=True)
    rows: dict[str, Callable] = {  # in order of what matters most, should the budget run out
        "mmdit-512": lambda: mmdit_rows(medium, SIZE // 2, False, False),
        "mmdit-1024": lambda: mmdit_rows(medium, SIZE, False, False),
        "mmdit-large-1024": lambda: mmdit_rows(large, SIZE, True, False),
        "generate-1024": lambda: generation_rows(medium, "medium", False),
        "generate-large-1024": lambda: generation_rows(large, "large", False),
        "vae-decode-1024": lambda: vae_rows(medium, True),
        "vae-encode-1024": lambda: vae_rows(medium, False),
        "clip": lambda: text_rows(medium, False),
        "t5": lambda: text_rows(medium, True),
    }
    if not args.no_compile:
        rows |= {
            "generate-1024-compiled": lambda: generation_rows(medium, "medium", True),
            "generate-large-1024-compiled": lambda: generation_rows(large, "large", True),
            "mmdit-1024-compiled": lambda: mmdit_rows(medium, SIZE, False, True),
        }
    chosen = args.rows.split(",") if args.rows else list(rows)
    results = {"peaks": peaks}
    for name in chosen:
        if time.perf_counter() - started > args.budget_s:
            line = f"| {name} | skipped: past the {args.budget_s:.0f} s budget |"
        else:
            line = run_row(name, rows[name], peak, results)
        with open(args.out, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


def run_row(name: str, row: Callable, peak: float, results: dict) -> str:
    try:
        what, ours, peer, flops, repeats, wall = row()
    except Exception:
        traceback.print_exc()
        return f"| {name} | failed to set up: {traceback.format_exc().splitlines()[-1]} |"
    sides, outs = {}, {}
    for side, build in (("ours", ours), ("peer", peer)):
        try:
            sides[side], outs[side] = measure(build, repeats, wall)
        except Exception:
            traceback.print_exc()
            sides[side] = {"error": traceback.format_exc().splitlines()[-1]}
            gc.collect()
            torch.cuda.empty_cache()
    results[name] = sides | {"flops": flops}
    a, b = outs.get("ours"), outs.get("peer")
    err = f"{max_rel_err(a, b):.1e}" if a is not None and b is not None else "–"
    cells = []
    for key, fmt in (("median_s", "{:.4f}"), ("rate", ""), ("first_s", "{:.2f}"),
                     ("working_gb", "{:.2f}")):  # fmt: skip
        for side in ("ours", "peer"):
            r = sides[side]
            if "error" in r:
                cells.append("error: " + r["error"][:80] if key == "median_s" else "–")
            elif key == "rate":
                tflops = flops / r["median_s"] / 1e12
                cells.append(f"{tflops:.0f} ({100 * tflops / peak:.0f}%)")
            else:
                cells.append(fmt.format(r[key]))
    ours_s, peer_s = (sides[s].get("median_s") for s in ("ours", "peer"))
    speedup = f"{peer_s / ours_s:.2f}x" if ours_s and peer_s else "–"
    if wall and ours_s:
        what += f" ({1 / ours_s:.2f} images/s sd3" + (
            f", {1 / peer_s:.2f} peer)" if peer_s else ")"
        )
    return (
        f"| {name} | {what} | {cells[0]} | {cells[1]} | {speedup} | {cells[2]} | {cells[3]} "
        f"| {cells[4]} | {cells[5]} | {cells[6]} | {cells[7]} | {err} |"
    )


if __name__ == "__main__":
    main()
