"""Train the bundled canny ControlNet for the bundled shapes model, with `sd3 train --controlnet`.

    python scripts/train_default_controlnet.py --out runs/controlnet

The base model (`assets/default/sd3_shapes.safetensors`) stays frozen. The ControlNet is of the
SD3.5 Large kind with 2 blocks, initialised from the MMDiT's first two (outputs at zero), and
trained with the base's rectified-flow objective on fresh shape scenes at 128x128, each with its
edges as the canny control image (`sd3.shapes.scenes.render_edges`). Re-running the same command
resumes the run. The EMA weights are exported in Stability's single-file layout (fp16,
control_type 1 = canny, the base model's preset in the metadata) to `--export`, by default
`assets/default/sd3_shapes_controlnet_canny.safetensors`.
"""

import argparse
import shutil
import sys
from pathlib import Path

from sd3.kernels.hardware import cpu_has_bf16
from sd3.training import command

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "sd3" / "assets" / "default"
BASE = ASSETS / "sd3_shapes.safetensors"
DEFAULT_EXPORT = ASSETS / "sd3_shapes_controlnet_canny.safetensors"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (checkpoint, logs)")
    p.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    p.add_argument("--scenes", type=int, default=2400)
    p.add_argument("--steps", type=int, default=1173)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=100, help="of the scenes and the run")
    args = p.parse_args()

    if (args.out / command.CHECKPOINT).is_file():
        argv = ["--out", str(args.out), "--resume", "--steps", str(args.steps)]
    else:
        argv = [
            "--model", str(BASE), "--shapes", str(args.scenes), "--resolution", "128",
            "--controlnet", "--controlnet-blocks", str(args.blocks), "--out", str(args.out),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup-steps", "30", "--ema-decay", "0.99",
            "--logit-mean", "0.5", "--t5-length", "24", "--checkpoint-every", "50",
            "--seed", str(args.seed), "--compile", *(["--bf16"] if cpu_has_bf16() else []),
        ]  # fmt: skip
    status = command.main([*argv, "--export-dtype", "fp16", "--export-on-interrupt"])
    exported = sorted(args.out.glob("controlnet*.safetensors"), key=lambda f: f.stat().st_mtime)
    if exported:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported[-1], args.export)
        print(f"copied {exported[-1]} to {args.export}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
