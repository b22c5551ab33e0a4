"""How well the bundled canny ControlNet makes the bundled model follow a control image.

    python scripts/controlnet_eval.py --scenes 60 --json runs/controlnet-eval.json

Held-out scenes: evenly spaced prompts of the benchmark's 224 held-out prompts
(`heldout_prompts`: combinations never drawn in training), each laid out with a fixed seed and
rendered; its edges (`render_edges`) are the control image and its caption the prompt. Each is
generated with and without the ControlNet (same seed, the model's preset), and scored by the
shapes checker (`sd3.shapes.evaluation`):

- foreground IoU: pixels the checker reads as object (alpha >= 0.5) in the generated image
  against those of the control scene's rendering;
- object IoU: for each object of the control scene, the best box IoU with an object the checker
  detects in the generated image (any colour and shape), averaged over objects; and the same
  counting only detections of the object's own colour and shape (0 where there is none);
- prompt adherence: the share of images that pass the checker's test of their prompt.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd3.pipeline import Pipeline
from sd3.shapes.evaluation import check, classify_pixels, detect_objects
from sd3.shapes.scenes import heldout_prompts, layout, render, render_edges

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "sd3" / "assets" / "default"


def box_iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def foreground(image) -> np.ndarray:
    _, alpha = classify_pixels(np.asarray(image.convert("RGB")))
    return alpha >= 0.5


def scores(image, scene, prompt, size: int) -> dict[str, float]:
    found = detect_objects(image)
    want, got = foreground(render(scene, size)), foreground(image)
    any_iou, same_iou = [], []
    for o in scene.objects:
        box = tuple(v * size for v in o.bbox)
        ious = [(box_iou(box, d.bbox), (d.colour, d.shape) == (o.colour, o.shape)) for d in found]
        any_iou.append(max((i for i, _ in ious), default=0.0))
        same_iou.append(max((i for i, same in ious if same), default=0.0))
    return {
        "foreground_iou": float((want & got).sum() / max(1, (want | got).sum())),
        "object_iou": float(np.mean(any_iou)),
        "object_iou_same_kind": float(np.mean(same_iou)),
        "passed": float(check(image, prompt).passed),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ASSETS / "sd3_shapes.safetensors")
    p.add_argument(
        "--controlnet", type=Path, default=ASSETS / "sd3_shapes_controlnet_canny.safetensors"
    )
    p.add_argument("--scenes", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="of the layouts and the generations")
    p.add_argument("--strengths", default="0,1", help="ControlNet strengths (0: the base model)")
    p.add_argument("--json", type=Path, help="write the per-strength means here")
    p.add_argument("--save-images", type=Path, help="folder for control/generated images")
    args = p.parse_args()

    prompts = heldout_prompts()
    chosen = [prompts[i * len(prompts) // args.scenes] for i in range(args.scenes)]
    pipe = Pipeline.from_single_file(args.model, controlnets=[args.controlnet])
    size = pipe.preset.size
    scenes = [
        layout(prompt.spec, np.random.default_rng([args.seed, 7919, i]))
        for i, prompt in enumerate(chosen)
    ]
    results = {}
    for strength in [float(s) for s in args.strengths.split(",")]:
        started, rows = time.perf_counter(), []
        for i, (prompt, scene) in enumerate(zip(chosen, scenes, strict=True)):
            edges = render_edges(scene, size)
            image = pipe(
                prompt.text, seed=args.seed + i, control_images=[edges], control_strength=strength
            )[0]
            rows.append(scores(image, scene, prompt, size))
            if args.save_images:
                args.save_images.mkdir(parents=True, exist_ok=True)
                edges.save(args.save_images / f"{i:03d}_edges.png")
                image.save(args.save_images / f"{i:03d}_strength{strength:g}.png")
        means = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
        means["seconds"] = round(time.perf_counter() - started)
        results[f"strength {strength:g}"] = means
        print(f"strength {strength:g}: {means}", file=sys.stderr, flush=True)
    record = {
        "scenes": args.scenes, "seed": args.seed, "threads": torch.get_num_threads(),
        "preset": pipe.preset.name, "steps": pipe.preset.steps, "results": results,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
