"""sd3 against diffusers (and transformers for the text encoders) on this machine, side by side,
with the machine's own limits; writes benchmarks/RESULTS.md.

    python benchmarks/run.py [--rows mmdit-512,vae-decode-1024,...] [--repeats 3] [--threads N]

Every row runs ours and the peer in separate worker processes (so each gets its own peak RSS), on
the same full-size random weights in the official single-file layout, with the same threads and
dtype (bf16 where the CPU has it). Weights are generated once and cached in `--weights`.
FLOPs are counted from each of our modules' operations on the meta device (torch's FlopCounterMode,
attention included), so they cost no compute; "% peak" is achieved FLOP/s as a share of the bf16
(or fp32) matmul throughput measured at the start of the same run. Row list: `ROWS`.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the peers are built as the parity tests build them

from helpers import (  # noqa: E402
    diffusers_mmdit_from,
    diffusers_vae_from,
    transformers_clip,
    transformers_t5,
)

from sd3.checkpoints import find_components, infer_config, load_component  # noqa: E402
from sd3.models.clip import CLIPConfig, CLIPTextModel  # noqa: E402
from sd3.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from sd3.models.t5 import T5Config, T5Encoder  # noqa: E402
from sd3.models.vae import AutoEncoder, VAEConfig  # noqa: E402

MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm=True, attn2_layers=tuple(range(13)))
LARGE = MMDiTConfig(hidden_size=2432, depth=38, mlp_hidden=9728, qk_norm=True)
ENCODERS = {
    "vae": (AutoEncoder, VAEConfig()),
    "clip_l": (CLIPTextModel, CLIPConfig()),
    "clip_g": (
        CLIPTextModel,
        CLIPConfig(width=1280, layers=32, heads=20, mlp_width=5120, hidden_act="gelu", project_pooled=True),
    ),
    "t5xxl": (T5Encoder, T5Config()),
}  # fmt: skip
CONTEXT_TOKENS = 154  # 77 CLIP + 77 T5, the reference's prompt length
WEIGHTS_NAME = "sd35_{which}_random_bf16_v2.safetensors"  # v2: T5's q at its own init scale


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    file: str  # the cached weights it needs: "medium" or "large"
    max_repeats: int = 10  # long rows are timed fewer times
    warmup: bool = True  # False: the one timed run is the first (rows that measure memory)
    peer: bool = True  # False where the peer cannot run here (said in `what`)
    int8: bool = False  # ours loads with int8=True (the peer in the plain dtype)
    int4: bool = False  # ours loads with int4=True


ROWS = {
    r.name: r
    for r in [
        Row("mmdit-512", "SD3.5 Medium MMDiT forward, 512², batch 1", "medium"),
        Row("mmdit-1024", "SD3.5 Medium MMDiT forward, 1024², batch 1", "medium"),
        Row("mmdit-large-1024", "SD3.5 Large MMDiT forward, 1024², batch 1", "large", 1),
        Row(
            "mmdit-512-int8",
            "SD3.5 Medium MMDiT forward, 512², batch 1, sd3 with --int8 (int8 GEMMs in fp32, "
            "weight-only in bf16; % of the plain dtype's peak)",
            "medium",
            int8=True,
        ),
        Row(
            "mmdit-1024-int8",
            "SD3.5 Medium MMDiT forward, 1024², batch 1, sd3 with --int8",
            "medium",
            int8=True,
        ),  # fmt: skip
        Row("vae-decode-1024", "VAE decode, 1024²", "medium"),
        Row("vae-encode-1024", "VAE encode, 1024²", "medium"),
        Row("clip", "CLIP-L + CLIP-G encode, 77 tokens", "medium"),
        Row("t5", "T5-XXL encode, 77 tokens", "medium"),
        Row("generate-512", "SD3.5 Medium 512², 4 euler steps, CFG 5, text + decode", "medium", 1),
        Row(
            "generate-large-1024",
            "SD3.5 Large 1024², 2 euler steps, CFG 4.5, all three "
            "encoders, low-memory mode (diffusers not run: its 27 GB of weights exceed this machine)",
            "large",
            1,
            warmup=False,
            peer=False,
        ),
        Row(
            "generate-large-1024-int4",
            "SD3.5 Large 1024², 2 euler steps, CFG 4.5, all three encoders, low-memory mode, "
            "sd3 with --int4 (T5-XXL's and the MMDiT's block linears in 4 bits)",
            "large",
            1,
            warmup=False,
            peer=False,
            int4=True,
        ),
    ]
}
DEFAULT_ROWS = [n for n in ROWS if "large" not in n and n != "mmdit-1024-int8"]


# --- weights ---------------------------------------------------------------------------------


def weights_file(folder: Path, which: str) -> Path:
    """The cached full-size random checkpoint (official single-file layout, bf16), made once:
    "medium" holds the SD3.5 Medium MMDiT, VAE and all three encoders (as
    sd3.5_medium_incl_clips_t5xxlfp8 does), "large" the SD3.5 Large MMDiT alone (as sd3.5_large)."""
    path = folder / WEIGHTS_NAME.format(which=which)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating {path} (once) ...", file=sys.stderr)
    modules = {"mmdit": (MMDiT, MEDIUM if which == "medium" else LARGE)}
    if which == "medium":
        modules |= ENCODERS
    write_random_checkpoint(path, modules)
    return path


def write_random_checkpoint(path: Path, modules: dict) -> None:
    """Random bf16 weights (`random_tensor`) for {component: (class, config)}, streamed to `path`
    one tensor at a time (an 8B model never sits in memory); written to a temporary name and
    renamed."""
    from sd3.checkpoints import SINGLE_FILE_PREFIXES

    shapes = {}
    for name, (cls, config) in modules.items():
        with torch.device("meta"):
            state = cls(config).state_dict()
        shapes |= {
            SINGLE_FILE_PREFIXES[name] + k: (tuple(v.shape), config) for k, v in state.items()
        }
    header, offset = {}, 0
    for key, (shape, _) in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key, (shape, config) in shapes.items():
            t = random_tensor(key, shape, config, generator)
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    os.replace(tmp, path)


def random_tensor(
    key: str, shape: tuple[int, ...], config, generator: torch.Generator
) -> torch.Tensor:
    """One random weight (fp32, on the generator's device) at a scale that keeps activations O(1)
    and T5's attention logits O(1), so an output error, e.g. int8's, is not amplified by a chaotic
    network; `pos_embed` is SD3's fixed sin-cos table."""
    from sd3.training.fresh import sincos_table

    device = generator.device
    if key.endswith("pos_embed"):
        return sincos_table(config.pos_embed_max_size, config.hidden_size).reshape(shape).to(device)
    if len(shape) > 1:
        t = torch.randn(shape, generator=generator, device=device)
        t *= torch.Size(shape[1:]).numel() ** -0.5
        if key.endswith("SelfAttention.q.weight"):  # T5 attention has no 1/sqrt(d): its
            t /= 8  # q carries it (d_kv 64), else the random T5 is chaotic
        return t
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator, device=device)
    return 0.02 * torch.randn(shape, generator=generator, device=device)


# --- one side of one row, in its own process -----------------------------------------------


def worker(row: str, side: str, file: Path, repeats: int, dtype: torch.dtype) -> dict:
    """Build ours or the peer for `row`, time `repeats` calls after a warm-up, and count FLOPs."""
    torch.manual_seed(0)
    started = time.perf_counter()
    fn, flops = build(row, side, file, dtype)
    load_s = time.perf_counter() - started
    with torch.no_grad():
        if ROWS[row].warmup:
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    peak_gb = peak_rss_bytes() / 2**30
    stages = out if isinstance(out, dict) else None  # a generation's Pipeline.timings
    return {"median_s": statistics.median(times), "times": times, "load_s": load_s,
            "peak_rss_gb": peak_gb, "flops": flops, "stages": stages}  # fmt: skip


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec
    from the parent, which may have held the weights it generated)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def build(row: str, side: str, file: Path, dtype: torch.dtype) -> tuple[Callable, float]:
    components = find_components(file)
    if row.startswith("mmdit"):
        size = int(next(part for part in row.split("-") if part.isdigit()))
        comp = components["mmdit"]
        config = infer_config(comp)
        x = torch.randn(1, 16, size // 8, size // 8, dtype=dtype)
        t = torch.tensor([500.0])
        ctx = torch.randn(1, CONTEXT_TOKENS, config.context_dim, dtype=dtype)
        y = torch.randn(1, config.pooled_dim, dtype=dtype)
        flops = count_flops(MMDiT, config, lambda m: m(*meta(x, t, ctx, y)), dtype)
        if side == "ours":
            model = load_component(comp, dtype, int8=ROWS[row].int8)
            return lambda: model(x, t, ctx, y), flops
        ref = diffusers_mmdit_from(config, read(comp), dtype)
        return lambda: ref(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
            return_dict=False,
        )[0], flops  # fmt: skip
    if row.startswith("vae"):
        comp = components["vae"]
        config = infer_config(comp)
        if row.startswith("vae-decode"):
            z = torch.randn(1, 16, 128, 128, dtype=dtype)
            plain = side != "ours"  # diffusers upsamples, then convolves: 1.17x sd3's FLOPs
            flops = count_flops(AutoEncoder, config, lambda m: m.decode(*meta(z)), dtype, plain)
            if side == "ours":
                vae = load_component(comp, dtype)
                return lambda: vae.decode(z), flops
            ref = diffusers_vae_from(config, read(comp), dtype)
            return lambda: ref.decode(z / 1.5305 + 0.0609).sample, flops
        image = torch.rand(1, 3, 1024, 1024, dtype=dtype) * 2 - 1
        flops = count_flops(AutoEncoder, config, lambda m: m.encode(*meta(image)), dtype)
        if side == "ours":
            vae = load_component(comp, dtype)
            return lambda: vae.encode(image), flops
        ref = diffusers_vae_from(config, read(comp), dtype)
        return lambda: ref.encode(image).latent_dist.mean, flops
    ids = torch.randint(0, 49406, (1, 77))
    if row == "clip":
        comps = [components["clip_l"], components["clip_g"]]
        configs = [infer_config(c) for c in comps]
        flops = sum(count_flops(CLIPTextModel, c, lambda m: m(*meta(ids)), dtype) for c in configs)
        if side == "ours":
            models = [load_component(c, dtype) for c in comps]
            return lambda: [m(ids) for m in models], flops
        refs = [
            transformers_clip(c, read(comp), with_projection=c.project_pooled)
            for c, comp in zip(configs, comps, strict=True)
        ]
        refs = [r.to(dtype) for r in refs]
        return lambda: [r(ids, output_hidden_states=True) for r in refs], flops
    if row == "t5":
        comp = components["t5xxl"]
        config = infer_config(comp)
        ids = torch.randint(0, 32000, (1, 77))
        flops = count_flops(T5Encoder, config, lambda m: m(*meta(ids)), dtype)
        if side == "ours":
            model = load_component(comp, dtype)
            return lambda: model(ids), flops
        ref = transformers_t5(config, read(comp, dtype))
        return lambda: ref(input_ids=ids).last_hidden_state, flops
    if row == "generate-512":
        return build_generation(side, file, components, dtype)
    if row.startswith("generate-large-1024"):
        return build_generation(side, file, components, dtype, large=True, int4=ROWS[row].int4)
    raise SystemExit(f"unknown row {row!r}; choose from {list(ROWS)}")


def build_generation(
    side: str, file: Path, components, dtype, large: bool = False, int4: bool = False
) -> tuple[Callable, float]:
    """Tokenize, encode (CLIP-L, CLIP-G, T5), euler steps with CFG (batch 2), decode: SD3.5 Medium
    at 512² with 4 steps, or (`large`) the SD3.5 Large MMDiT of `file` with the medium file's
    encoders and VAE at 1024² with 2 steps, in low-memory mode."""
    prompt, steps, cfg, size = "a photo of a cat on a red sofa", 4, 5.0, 512
    medium = file.with_name(WEIGHTS_NAME.format(which="medium"))
    if large:
        steps, cfg, size = 2, 4.5, 1024
        components = find_components(file, clip_l=medium, clip_g=medium, t5xxl=medium, vae=medium)
    configs = {
        name: infer_config(components[name])
        for name in ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")
    }
    flops = generation_flops(configs, steps, size, dtype)
    if side == "ours":
        from sd3.pipeline import Pipeline

        if large:
            pipe = Pipeline.from_single_file(file, clip_l=medium, clip_g=medium, t5xxl=medium,
                                             vae=medium, dtype=dtype, low_memory=True,
                                             int4=int4)  # fmt: skip
        else:
            pipe = Pipeline.from_single_file(file, dtype=dtype, low_memory=False)
        return lambda: (pipe(
            prompt, num_inference_steps=steps, guidance_scale=cfg, sampler="euler", shift=3.0,
            width=size, height=size, seed=0, t5_length=77,
        ), dict(pipe.timings))[1], flops  # fmt: skip
    pipe = diffusers_pipeline(components, configs, dtype)
    generator = torch.Generator()
    return lambda: pipe(
        prompt, num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
        max_sequence_length=77, generator=generator.manual_seed(0),
    ).images, flops  # fmt: skip


def generation_flops(configs: dict, steps: int, size: int, dtype: torch.dtype) -> float:
    """FLOPs of one generation at size² for {component: config}: `steps` MMDiT passes with CFG as
    a batch of 2, one decode, and the prompt and negative prompt through CLIP-L, CLIP-G and T5."""
    mmdit, latent = configs["mmdit"], size // 8
    ids = torch.zeros(2, 77, dtype=torch.long)
    return (
        steps * count_flops(MMDiT, mmdit, lambda m: m(*meta(
            torch.zeros(2, 16, latent, latent, dtype=dtype), torch.ones(2),
            torch.zeros(2, CONTEXT_TOKENS, mmdit.context_dim, dtype=dtype),
            torch.zeros(2, mmdit.pooled_dim, dtype=dtype))), dtype)
        + count_flops(AutoEncoder, configs["vae"], lambda m: m.decode(*meta(torch.zeros(1, 16, latent, latent, dtype=dtype))), dtype)
        + sum(count_flops(CLIPTextModel, configs[n], lambda m: m(*meta(ids)), dtype) for n in ("clip_l", "clip_g"))
        + count_flops(T5Encoder, configs["t5xxl"], lambda m: m(*meta(ids)), dtype)
    )  # fmt: skip


def diffusers_pipeline(components, configs, dtype):
    import gzip
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    assets = ROOT / "src" / "sd3" / "assets" / "tokenizers"
    folder = Path(tempfile.mkdtemp())
    for sub, names in [("clip", ["vocab.json", "merges.txt"]), ("t5", ["tokenizer.json"])]:
        for name in names:
            (folder / name).write_bytes(gzip.decompress((assets / sub / f"{name}.gz").read_bytes()))
    clip_tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )
    clip_g_tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="!"
    )
    return StableDiffusion3Pipeline(
        transformer=diffusers_mmdit_from(configs["mmdit"], read(components["mmdit"]), dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae_from(configs["vae"], read(components["vae"]), dtype),
        text_encoder=transformers_clip(configs["clip_l"], read(components["clip_l"]), True).to(dtype),
        tokenizer=clip_tokenizer,
        text_encoder_2=transformers_clip(configs["clip_g"], read(components["clip_g"]), True).to(dtype),
        tokenizer_2=clip_g_tokenizer,
        text_encoder_3=transformers_t5(configs["t5xxl"], read(components["t5xxl"], dtype)),
        tokenizer_3=T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json")),
    )  # fmt: skip


def read(component, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A component's tensors (official names, no prefix), memory-mapped."""
    return {
        k: t.read() if dtype is None else t.read().to(dtype) for k, t in component.tensors.items()
    }


def meta(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to("meta") for t in tensors]


def count_flops(
    cls, config, call: Callable, dtype: torch.dtype = torch.bfloat16, plain: bool = False
) -> float:
    """FLOPs of `call(cls(config))` counted on the meta device: no memory, no compute. Inference
    paths that do less arithmetic than the reference (the VAE's sub-pixel upsampling) are
    counted as run, unless `plain`: then as the reference computes (gradients on)."""
    with torch.device("meta"):
        module = cls(config).to(dtype)
    mode = torch.enable_grad() if plain else torch.no_grad()
    with FlopCounterMode(display=False) as counter, mode:
        call(module)
    return float(counter.get_total_flops())


# --- the driver ------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of the MMDiT's MLP-shaped GEMM (2356x1536 @ 1536x6144): the machine's usable peak."""
    a = torch.randn(2356, 1536, dtype=dtype)
    b = torch.randn(1536, 6144, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2356 * 1536 * 6144 / min(times)


def run_side(row: str, side: str, file: Path, args) -> dict:
    repeats = min(args.repeats, ROWS[row].max_repeats)
    cmd = [sys.executable, __file__, "--worker", row, side, str(file), "--repeats", str(repeats),
           "--threads", str(args.threads), "--dtype", args.dtype]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {list(ROWS)}"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 where native"
    )
    p.add_argument(
        "--weights", type=Path, default=Path.home() / ".cache" / "sd3" / "benchmark-weights"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--worker", nargs=3, metavar=("ROW", "SIDE", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.dtype is None:
        from sd3.pipeline import default_dtype

        args.dtype = "bf16" if default_dtype(torch.device("cpu")) == torch.bfloat16 else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.worker:
        row, side, file = args.worker
        print(json.dumps(worker(row, side, Path(file), args.repeats, dtype)))
        return

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    peak = matmul_peak(dtype)
    header = (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads; torch {torch.__version__}; dtype {args.dtype}; "
        f"median of {args.repeats} after a warm-up; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"measured {args.dtype} matmul peak (2356x1536 @ 1536x6144): {peak / 1e9:.0f} GFLOP/s"
    )
    print(header)
    table = [
        "| row | what | sd3 s | peer s | speed-up | sd3 GFLOP/s (% peak) | peer GFLOP/s (% peak) | sd3 peak RSS GB | peer peak RSS GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name in rows:
        row = ROWS[name]
        weights_file(args.weights, "medium")  # every row's encoders and VAE
        file = weights_file(args.weights, row.file)
        sides = ("ours", "peer") if row.peer else ("ours",)
        result = {side: run_side(name, side, file, args) for side in sides}
        table.append(format_row(row, result, peak))
        print(table[-1], flush=True)
    import diffusers
    import transformers

    peers = (
        f"Peer: diffusers {diffusers.__version__} (MMDiT, VAE, pipeline) and transformers "
        f"{transformers.__version__} (CLIP, T5), same weights, threads and dtype. FLOPs counted on "
        "the meta device."
    )
    text = "\n".join(
        ["# sd3 benchmarks", "", header.replace("\n", "  \n"), "", peers, "", *table, ""]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")


def format_row(row: Row, result: dict, peak: float) -> str:
    ours, peer = result["ours"], result.get("peer")
    if not row.peer and "error" not in ours:
        per_step = ours["stages"]["per_step"] if ours.get("stages") else None
        return (
            f"| {row.name} | {row.what} | {ours['median_s']:.3f}"
            + (f" ({per_step:.1f} per step)" if per_step else "")
            + f" | – | – | {rate_of(ours, peak)} | – | {ours['peak_rss_gb']:.1f} | – |"
        )
    if "error" in ours or "error" in peer:
        return (
            f"| {row.name} | {row.what} | error: {ours.get('error', '')} {peer.get('error', '')} |"
        )

    per_step = f" ({ours['stages']['per_step']:.2f} per step)" if ours.get("stages") else ""
    return (
        f"| {row.name} | {row.what} | {ours['median_s']:.3f}{per_step} | {peer['median_s']:.3f} | "
        f"{peer['median_s'] / ours['median_s']:.2f}x | {rate_of(ours, peak)} | {rate_of(peer, peak)} | "
        f"{ours['peak_rss_gb']:.1f} | {peer['peak_rss_gb']:.1f} |"
    )


def rate_of(r: dict, peak: float) -> str:
    gflops = r["flops"] / r["median_s"] / 1e9
    return f"{gflops:.0f} ({100 * gflops * 1e9 / peak:.0f}%)"


if __name__ == "__main__":
    main()
