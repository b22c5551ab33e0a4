"""Two choices of the default-model recipe compared at the same training budget, scored alike.

    python scripts/compare_recipes.py timestep-sampling [--steps 800]   (after train_one_stage.py --out runs/one)
    python scripts/compare_recipes.py text-encoders [--steps 1500]

- `timestep-sampling`: uniform vs logit-normal(0, 1) (SD3 paper, section 5.1, where logit-normal
  came out best), each MMDiT trained from scratch at 64x64.
- `text-encoders`: CLIP-L, CLIP-G and T5 frozen at their random initialisation vs trained jointly
  with the MMDiT (SD3 freezes pretrained encoders; there are none here), at 128x128 as the bundled
  model.
- `batch-size`: the bundled recipe (batch 64) vs batch 32 for twice the steps (the same images).
- `learning-rate`: the bundled recipe (peak lr 5e-4) vs 1e-3.

Each side runs `train_one_stage.py` in `runs/compare_<side>_<steps>/` from the same VAE,
latents (hard links to the default run's), seed and step count, with a full cosine schedule.
Both are scored on the 224 held-out prompts: the flow loss of their perfectly rendered scenes at
8 fixed noise levels (fixed noise; the mean estimates the loss under uniform t), and `sd3 eval`
(the validation split's first 2 seed rounds, as this is a choice). Writes
`runs/compare_<choice>_<steps>.json` and prints a markdown table.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sd3.pipeline import Pipeline, to_image_tensor
from sd3.shapes.evaluation import heldout_prompts, perfect_generator
from sd3.training.flow import validation_loss

ROOT = Path(__file__).resolve().parents[1]
BATCH_32 = ["--batch-size", "32", "--warmup", "400"]
CHOICES = {  # choice: (image size, the latents' folder in a run, {side: (recipe args, x steps)})
    "timestep-sampling": (
        64,
        ".",
        {
            "uniform": (["--timestep-sampling", "uniform"], 1),
            "logit_normal": (["--timestep-sampling", "logit_normal"], 1),
        },
    ),
    "text-encoders": (128, "hires", {"frozen": ([], 1), "joint": (["--train-text-encoders"], 1)}),
    # the same images seen: half the batch, twice the steps (and the warm-up)
    "batch-size": (128, "hires", {"frozen": ([], 1), "batch32": (BATCH_32, 2)}),
    "learning-rate": (128, "hires", {"frozen": ([], 1), "lr1e-3": (["--lr", "1e-3"], 1)}),
}


def train(
    side: str, recipe: list[str], size: int, latents: str, steps: int, budget: int, base: Path
) -> Path:
    """Train one side (`steps` optimizer steps) in runs/compare_<side>_<budget>, unless done."""
    out = ROOT / "runs" / f"compare_{side}_{budget}"
    (out / latents).mkdir(parents=True, exist_ok=True)
    for name in ("vae.safetensors", f"{latents}/latents.safetensors"):
        if not (out / name).exists() and (base / name).exists():
            try:
                os.link(base / name, out / name)
            except OSError:  # another file system
                shutil.copy(base / name, out / name)
    model = out / "model.safetensors"
    if not model.exists():
        budget = (
            ["--base-steps", str(steps), "--steps", "0"] if size == 64 else ["--steps", str(steps)]
        )
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_one_stage.py"), "--out", str(out),
             "--export", str(model), *budget, *recipe],
            check=True,
        )  # fmt: skip
    return model


@torch.no_grad()
def held_out_loss(model: Path, size: int) -> list[float]:
    pipe = Pipeline.from_single_file(model, dtype=torch.float32)
    prompts = [p.text for p in heldout_prompts()]
    images = perfect_generator(size)(prompts, [0] * len(prompts))
    x0 = torch.cat([pipe.vae.encode(to_image_tensor(im, size, size)) for im in images])
    context, pooled = pipe.text_encoders(True, pipe.preset.t5_length).encode(prompts)
    return validation_loss(pipe.mmdit, x0, context, pooled)


def eval_score(model: Path) -> tuple[float, str]:
    cmd = ["sd3", "eval", "--model", str(model), "--split", "val", "--seeds", "2"]
    report = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    overall = float(re.search(r"overall \(mean of categories\)\s+([0-9.]+)", report).group(1))
    return overall, report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("choice", choices=sorted(CHOICES))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--base", type=Path, default=ROOT / "runs" / "one",
                   help="the train_one_stage.py run whose VAE and latents are reused")  # fmt: skip
    args = p.parse_args()
    size, latents, sides = CHOICES[args.choice]
    results = {}
    for side, (recipe, factor) in sides.items():
        model = train(side, recipe, size, latents, factor * args.steps, args.steps, args.base)
        scores = model.with_name("scores.json")  # a side shared by two comparisons is scored once
        if not scores.is_file():
            losses = held_out_loss(model, size)
            overall, report = eval_score(model)
            scores.write_text(json.dumps({"held_out_loss": losses,
                "mean_loss": sum(losses) / len(losses), "eval_overall": overall,
                "eval_report": report}))  # fmt: skip
        results[side] = json.loads(scores.read_text())
        print(results[side]["eval_report"])
    (ROOT / "runs" / f"compare_{args.choice}_{args.steps}.json").write_text(
        json.dumps(results, indent=1)
    )
    levels = len(next(iter(results.values()))["held_out_loss"])
    print(f"| {args.choice} ({args.steps} steps, {size}x{size}) | held-out loss, mean | "
          + " | ".join(f"sigma {(k + 0.5) / levels:.3g}" for k in range(levels))
          + " | sd3 eval overall |")  # fmt: skip
    print("|---" * (levels + 3) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{x:.4f}" for x in r["held_out_loss"])
        print(f"| {name} | {r['mean_loss']:.4f} | {cells} | {r['eval_overall']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
