"""The bundled model's training step, as the recipe runs it: attention written out (the default for
short sequences with gradients on a CPU) against torch's SDPA and its backward, side by side.

    python benchmarks/train_step.py [--sizes 64 128] [--steps 150] [--threads N]

The MMDiT of `src/sd3/assets/default/sd3_shapes.safetensors` at batch 64, bf16 autocast where the
CPU computes bf16 (fp32 elsewhere), a compiled step, on random latents and the curriculum's kind of
captions; images/s is the median over the steps after the first third (compiling and warm-up
excluded). There is no peer here: both rows are sd3's trainer, differing only in attention.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sd3.kernels import flash_attention
from sd3.kernels.hardware import cpu_has_bf16
from sd3.pipeline import Pipeline
from sd3.shapes.bundled import T5_LENGTH
from sd3.training.trainer import TrainConfig, Trainer

MODEL = Path(__file__).resolve().parents[1] / "src/sd3/assets/default/sd3_shapes.safetensors"
COLOURS, SHAPES = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle")


def images_per_s(size: int, steps: int, written_out: bool) -> tuple[float, float]:
    """(median images/s after the first third of the steps, seconds in all with compiling)."""
    torch._dynamo.reset()
    saved = flash_attention.MATMUL_MAX_KEYS
    flash_attention.MATMUL_MAX_KEYS = saved if written_out else 0
    try:
        pipe = Pipeline.from_single_file(MODEL, dtype=torch.float32)
        mmdit, text = pipe.module("mmdit"), pipe.text_encoders(t5_length=T5_LENGTH)
        n = 4096
        latents = torch.randn(
            n, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
        )
        captions = [f"a {COLOURS[i % 4]} {SHAPES[i % 3]} above a {COLOURS[i // 4 % 4]} "
                    f"{SHAPES[i // 12 % 3]}" for i in range(n)]  # fmt: skip
        config = TrainConfig(
            steps=steps, batch_size=64, lr=5e-4, lr_schedule="cosine", warmup_steps=10,
            timestep_sampling="logit_normal", logit_mean=0.5, ema_decay=0.999, grad_clip=1.0,
            text_dropout=0.1, bf16=cpu_has_bf16(), compile=True, checkpoint_every=10**9, seed=0,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(config, mmdit, text, latents, captions, out, progress=False)
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
            log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    finally:
        flash_attention.MATMUL_MAX_KEYS = saved
    rates = [e["images_per_s"] for e in log[len(log) // 3 :]]
    return statistics.median(rates), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes")
    p.add_argument("--steps", type=int, default=150, help="training steps per row")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, bf16 {cpu_has_bf16()}, torch {torch.__version__}")
    print(f"{'size':>5} {'attention':>12} {'images/s':>9} {'seconds':>8}")
    for size in args.sizes:
        rows = {}
        for name, written_out in (("written out", True), ("torch SDPA", False)):
            rows[name], seconds = images_per_s(size, args.steps, written_out)
            print(f"{size:>5} {name:>12} {rows[name]:9.1f} {seconds:8.1f}", flush=True)
        print(f"{size:>5} {'ratio':>12} {rows['written out'] / rows['torch SDPA']:8.2f}x")


if __name__ == "__main__":
    main()
