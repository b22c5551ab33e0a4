"""Tiled VAE decode at 2048²: its extra memory and its difference from the untiled decode.

    python benchmarks/tiled_decode.py [--size 2048] [--tile 64] [--threads N]

Each decode runs in its own process on the SD3.5 VAE of the cached full-size random weights (see
run.py), bf16 where the CPU has it. "extra GB" is the peak resident memory during the decode minus
the resident memory just before it (weights and latent loaded). The image is a random latent
decoded to 8-bit pixels; "max |Δ| vs untiled" compares each tiled decode's pixels with sd3's
untiled decode of the same latent. diffusers' `enable_tiling()` (blended overlapping tiles) is run
alike as the peer.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {
    "sd3 untiled": "the whole image at once",
    "sd3 tiled": "64² latent tiles, shared GroupNorm statistics (two passes)",
    "diffusers tiled": "AutoencoderKL.enable_tiling(), blended overlaps",
}


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(mode: str, size: int, tile: int, out: Path) -> dict:
    from helpers import diffusers_vae_from
    from run import read, weights_file

    from sd3.checkpoints import find_components, infer_config, load_component
    from sd3.pipeline import default_dtype, to_pil

    dtype = default_dtype("cpu")
    component = find_components(
        weights_file(Path.home() / ".cache/sd3/benchmark-weights", "medium")
    )["vae"]
    latent = torch.randn(
        1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
    ).to(dtype)
    tile_size = tile if mode == "sd3 tiled" else None
    if mode.startswith("sd3"):
        model = vae = load_component(component, dtype)

        def decode():
            return vae.decode(latent, tile_size=tile_size)
    else:
        model = ref = diffusers_vae_from(infer_config(component), read(component), dtype)
        ref.enable_tiling()

        def decode():
            return ref.decode(latent / 1.5305 + 0.0609).sample

    # touch every weight once so "before" counts them all
    for p in model.parameters():
        p.sum()
    before = rss("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        image = decode()
    seconds = time.perf_counter() - start
    peak = rss("VmHWM")
    np.save(out, np.asarray(to_pil(image)[0]))
    return {"seconds": seconds, "before_gb": before / 2**30, "extra_gb": (peak - before) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=64, help="latent pixels per tile side")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.size, args.tile, Path(args.worker[1]))))
        return
    folder = Path(tempfile.mkdtemp())
    results, images = {}, {}
    for mode in MODES:
        out = folder / f"{mode.replace(' ', '_')}.npy"
        cmd = [sys.executable, __file__, "--worker", mode, str(out), "--size", str(args.size),
               "--tile", str(args.tile), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            if done.returncode in (-9, 137):
                why = "killed (out of memory?)"
            raise SystemExit(f"{mode}: {why}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        images[mode] = np.load(out).astype(np.int16)
    print(f"VAE decode {args.size}², {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| decode | how | s | extra GB | max |Δ| vs untiled (0–255) | mean |Δ| | seam ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    edges = list(range(args.tile * 8, args.size, args.tile * 8))  # sd3's tile borders, in pixels
    for mode, r in results.items():
        diff = np.abs(images[mode] - images["sd3 untiled"])
        print(f"| {mode} | {MODES[mode]} | {r['seconds']:.1f} | {r['extra_gb']:.2f} | "
              f"{diff.max()} | {diff.mean():.4f} | {seam_ratio(images[mode], edges):.2f} |")  # fmt: skip
    print(
        "seam ratio: the mean jump between neighbouring pixels across sd3's tile borders over the "
        "mean jump elsewhere (about 1 for an image without seams; the untiled decode is the baseline)"
    )


def seam_ratio(image: np.ndarray, edges: list[int]) -> float:
    """Mean |pixel - left/upper neighbour| across the borders `edges` (rows and columns) divided by
    the mean over all other neighbour pairs: a seam shows as a ratio above the untiled image's."""
    jumps_x = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))  # per column boundary
    jumps_y = np.abs(np.diff(image, axis=0)).mean(axis=(1, 2))  # per row boundary
    at = [e - 1 for e in edges]
    on = np.concatenate([jumps_x[at], jumps_y[at]]).mean()
    off = np.concatenate([np.delete(jumps_x, at), np.delete(jumps_y, at)]).mean()
    return float(on / off)


if __name__ == "__main__":
    main()
