"""How well the bundled model inpaints and outpaints held-out shapes scenes.

    python scripts/inpaint_eval.py [--scenes 100] [--contact-sheet docs/inpainting.png]

Inpainting: a rendered two-object scene ("A <relation> B"), B masked (its box grown by a few
pixels), the caption changed to ask for B in another colour (half the scenes) or another shape
(the other half; another colour where the training items have no other shape of that colour). A
scene passes when the shapes checker finds exactly two objects: the requested
one with its centre inside the mask, and A where it was; and every pixel outside the mask equals
the input. Outpainting: a scene "A left of B" cut to its left half, which holds A, is extended to
the right by half its width with the full caption; it passes when the checker finds A left of B.
Scenes come from seeds no training run uses.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd3.pipeline import Pipeline
from sd3.shapes.evaluation import check, detect_objects
from sd3.shapes.scenes import (
    RELATIONS,
    TRAIN_ITEMS,
    EvalPrompt,
    ObjectSpec,
    SceneSpec,
    caption,
    layout,
    render,
)

SIZE = 128
SEED = 900_000  # far from the seeds of training and evaluation
GROW = 6  # pixels around the masked object's box


def two_object_scene(rng: np.random.Generator, relation: str):
    a, b = (TRAIN_ITEMS[i] for i in rng.choice(len(TRAIN_ITEMS), size=2, replace=False))
    spec = SceneSpec((ObjectSpec(*a), ObjectSpec(*b)), relation)
    return spec, layout(spec, rng)


def inpaint_case(pipe: Pipeline, k: int) -> tuple[bool, Image.Image, Image.Image]:
    rng = np.random.default_rng(SEED + k)
    spec, scene = two_object_scene(rng, RELATIONS[k % len(RELATIONS)])
    a, b = spec.objects
    others = [
        item for item in TRAIN_ITEMS if item not in ((a.colour, a.shape), (b.colour, b.shape))
    ]
    same_shape = [item for item in others if item[1] == b.shape]  # another colour
    same_colour = [item for item in others if item[0] == b.colour]  # another shape
    choices = (same_colour if k % 2 and same_colour else same_shape) or others
    wanted = ObjectSpec(*choices[rng.integers(len(choices))])
    image = render(scene, SIZE)
    x0, y0, x1, y1 = (round(v * SIZE) for v in scene.objects[1].bbox)
    box = (max(x0 - GROW, 0), max(y0 - GROW, 0), min(x1 + GROW, SIZE) - 1, min(y1 + GROW, SIZE) - 1)
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    prompt = caption(SceneSpec((a, wanted), spec.relation))
    (out,) = pipe(prompt, init_image=image, mask_image=mask, seed=k, width=SIZE, height=SIZE)
    found = detect_objects(out)
    m = np.asarray(mask) > 0
    unchanged = np.array_equal(np.asarray(image)[~m], np.asarray(out)[~m])

    def inside(o) -> bool:
        cx, cy = (o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2
        return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]

    ok = (
        unchanged
        and len(found) == 2
        and any((o.colour, o.shape) == (wanted.colour, wanted.shape) and inside(o) for o in found)
        and any((o.colour, o.shape) == (a.colour, a.shape) and not inside(o) for o in found)
    )
    return ok, image, out


def outpaint_case(pipe: Pipeline, k: int) -> tuple[bool, Image.Image, Image.Image]:
    rng = np.random.default_rng(SEED + 10_000 + k)
    while True:
        spec, scene = two_object_scene(rng, "left of")
        if scene.objects[0].bbox[2] < 0.47 and scene.objects[1].bbox[0] > 0.53:
            break
    image = render(scene, SIZE)
    left = image.crop((0, 0, SIZE // 2, SIZE))
    (out,) = pipe(caption(spec), init_image=left, outpaint=(0, 0, SIZE // 2, 0), seed=k)
    result = check(out, EvalPrompt(caption(spec), "position", spec))
    return result.passed, image, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenes", type=int, default=100, help="inpainting scenes (outpainting: a half)"
    )
    p.add_argument("--contact-sheet", type=Path, help="PNG of the first 16 of each")
    args = p.parse_args()
    pipe = Pipeline.from_single_file(
        Path(__file__).resolve().parents[1] / "src/sd3/assets/default/sd3_shapes.safetensors"
    )
    rows = {"inpaint": [], "outpaint": []}
    for k in range(args.scenes):
        rows["inpaint"].append(inpaint_case(pipe, k))
        if k < args.scenes // 2:
            rows["outpaint"].append(outpaint_case(pipe, k))
    for name, results in rows.items():
        passed = sum(ok for ok, _, _ in results)
        print(f"{name}: {passed} of {len(results)} scenes pass ({passed / len(results):.0%})")
    if args.contact_sheet:
        cells = [(im, out, ok) for name in rows for ok, im, out in rows[name][:16]]
        sheet = Image.new("RGB", (16 * (2 * SIZE + 8), 2 * (SIZE + 8)), (255, 255, 255))
        for n, (image, out, ok) in enumerate(cells):
            x, y = (n % 16) * (2 * SIZE + 8), (n // 16) * (SIZE + 8)
            sheet.paste((0, 170, 0) if ok else (210, 0, 0), (x, y, x + 2 * SIZE + 4, y + SIZE + 4))
            sheet.paste(image.resize((SIZE, SIZE)), (x + 2, y + 2))
            sheet.paste(out.resize((SIZE, SIZE)), (x + SIZE + 2, y + 2))
        sheet.save(args.contact_sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
