"""What a ControlNet costs per step: an SD3.5 Large-shaped ControlNet (19 self-attention blocks,
width 2432, as the official blur/canny/depth files) on the SD3.5 Large MMDiT, ours against
diffusers' SD3ControlNetModel + SD3Transformer2DModel on the same random weights. Appends its table
to benchmarks/RESULTS.md (or prints it with --no-write).

    python benchmarks/controlnet.py [--size 1024] [--repeats 1]

Each side runs in its own worker process (its own peak RSS): the MMDiT forward alone, then the
ControlNet's forward plus the MMDiT forward with its residuals (one denoiser call, batch 1), each
timed `--repeats` times after a warm-up of each. The MMDiT weights are `run.py`'s
cached "large" file; the ControlNet's are made once beside it, in Stability's single-file layout
(ours reads that) and as a diffusers folder (diffusers reads that), from the same tensors.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the parity tests' helpers
from helpers import controlnet_to_stability  # noqa: E402
from run import (  # noqa: E402
    CONTEXT_TOKENS,
    ROOT,
    peak_rss_bytes,
    random_tensor,
    read,
    weights_file,
)

from sd3.checkpoints import find_components, infer_config, load_component, open_controlnet  # noqa: E402
from sd3.pipeline import default_dtype  # noqa: E402

SIDES = ("sd3", "diffusers")
LARGE_CONTROLNET = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=19, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=None, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=None, pos_embed_type=None,
    use_pos_embed=False, force_zeros_for_pooled_projection=False,
)  # fmt: skip


def controlnet_files(folder: Path) -> tuple[Path, Path]:
    """(Stability single file, diffusers folder) of one random SD3.5 Large-shaped ControlNet."""
    single, diffusers_dir = (
        folder / "controlnet_large_random_bf16.safetensors",
        folder / "cn_diffusers",
    )
    if single.is_file() and (diffusers_dir / "config.json").is_file():
        return single, diffusers_dir
    from diffusers import SD3ControlNetModel
    from safetensors.torch import save_file

    print("generating the ControlNet weights (once) ...", file=sys.stderr)
    with torch.device("meta"):
        net = SD3ControlNetModel(**LARGE_CONTROLNET)
    g = torch.Generator().manual_seed(1)
    state = {
        k: random_tensor(k, tuple(v.shape), None, g).to(torch.bfloat16)
        for k, v in net.state_dict().items()
    }
    net.load_state_dict(state, assign=True)
    net.save_pretrained(diffusers_dir)
    out = controlnet_to_stability(state, LARGE_CONTROLNET["num_layers"])
    out["control_type"] = torch.tensor([1], dtype=torch.int32)
    save_file(out, str(single))
    return single, diffusers_dir


def worker(side: str, base_file: Path, single: Path, folder: Path, size: int, repeats: int) -> dict:
    dtype = default_dtype(torch.device("cpu"))
    comp = find_components(base_file)["mmdit"]
    config = infer_config(comp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(dtype)
    control = torch.randn(1, 16, size // 8, size // 8, generator=g).to(dtype)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, CONTEXT_TOKENS, config.context_dim, generator=g).to(dtype)
    y = torch.randn(1, config.pooled_dim, generator=g).to(dtype)
    if side == "sd3":
        base = load_component(comp, dtype)
        net = load_component(open_controlnet(single), dtype)

        def plain():
            return base(x, t, ctx, y)

        def controlled():
            return base(x, t, ctx, y, controlnet_residuals=[net(base, x, t, ctx, y, control)])
    else:
        from diffusers import SD3ControlNetModel
        from helpers import diffusers_mmdit_from

        base = diffusers_mmdit_from(config, read(comp), dtype)
        net = SD3ControlNetModel.from_pretrained(folder).to(dtype).eval()
        net.pos_embed = net._get_pos_embed_from_transformer(base).to(dtype)
        kw = dict(hidden_states=x, pooled_projections=y, timestep=t, return_dict=False)

        def plain():
            return base(**kw, encoder_hidden_states=ctx)[0]

        def controlled():
            residuals = net(**kw, controlnet_cond=control, conditioning_scale=1.0)[0]
            return base(**kw, encoder_hidden_states=ctx, block_controlnet_hidden_states=residuals)[
                0
            ]

    times = {"plain": [], "controlled": []}
    with torch.no_grad():
        plain(), controlled()  # warm-ups: first calls read memory-mapped weights and allocate
        for _ in range(repeats):
            for name, fn in (("plain", plain), ("controlled", controlled)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()} | {
        "peak_rss_gb": peak_rss_bytes() / 2**30
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--weights", type=Path, default=Path.home() / ".cache" / "sd3" / "benchmark-weights"
    )
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, base, single, folder = args.worker
        result = worker(side, Path(base), Path(single), Path(folder), args.size, args.repeats)
        print(json.dumps(result))
        return
    base = weights_file(args.weights, "large")
    single, folder = controlnet_files(args.weights)
    results = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--worker", side, str(base), str(single), str(folder),
               "--size", str(args.size), "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{side}: {done.stderr.strip().splitlines()[-1]}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(side, results[side], file=sys.stderr)
    import platform

    import diffusers

    dtype = "bf16" if default_dtype(torch.device("cpu")) == torch.bfloat16 else "fp32"
    lines = [
        "",
        f"## ControlNet per step ({time.strftime('%Y-%m-%d', time.gmtime())})",
        "",
        f"`benchmarks/controlnet.py --size {args.size} --repeats {args.repeats}`: an SD3.5 "
        f"Large-shaped ControlNet (19 blocks, width 2432) on the SD3.5 Large MMDiT, {args.size}², "
        f"batch 1, {dtype}, random weights; diffusers {diffusers.__version__}. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.",
        "",
        "| | MMDiT step s | with ControlNet s | ControlNet overhead | peak RSS GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        r = results[side]
        overhead = r["controlled"] - r["plain"]
        lines.append(
            f"| {side} | {r['plain']:.1f} | {r['controlled']:.1f} | {overhead:.1f} s "
            f"({100 * overhead / r['plain']:.0f}%) | {r['peak_rss_gb']:.1f} |"
        )
    ratio = results["diffusers"]["controlled"] / results["sd3"]["controlled"]
    lines += ["", f"sd3 vs diffusers with the ControlNet: {ratio:.2f}×.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
