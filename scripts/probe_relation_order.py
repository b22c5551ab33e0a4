"""Does a model's denoiser read which object a relation names first?

    python scripts/probe_relation_order.py [--model FILE] [--scenes 128] [--size PX]

For position scenes of the shapes training distribution (data seed 999, at the model's preset size
or --size), the rectified-flow loss (fp32, fixed noise levels, three fixed noise draws) under three
captions:
- the true one, "A <relation> B";
- the swapped one, "B <relation> A": the same words in the other order, false for the image;
- a control, the true one with B's colour changed: false about what is drawn, not about order.
It prints, per noise level, how much higher the swapped and the control captions' losses are, and
the share of scenes whose true caption has the lower loss than the swapped one (a diffusion
classifier of word order: 0.5 means order is ignored). `docs/default-model-record.json`'s `order_probe` holds the
bundled model's numbers.
"""

import argparse
import sys
from pathlib import Path

import torch

from sd3.pipeline import Pipeline
from sd3.shapes.scenes import (
    COLOURS,
    ObjectSpec,
    SceneSpec,
    ShapesDataset,
    caption,
    parse_caption,
)
from sd3.training.flow import noisy_latent

SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.97)
DRAWS = 3


def false_captions(text: str) -> tuple[str, str]:
    """(swapped, control) for a position caption: "B <rel> A", and "A <rel> B'" with B's colour
    the next palette colour that neither object has."""
    spec = parse_caption(text)
    if spec.relation is None:
        raise ValueError(f"not a position caption: {text!r}")
    a, b = spec.objects
    colours = list(COLOURS)
    after = colours[colours.index(b.colour) + 1 :] + colours
    other = next(c for c in after if c not in (a.colour, b.colour))
    swapped = caption(SceneSpec((b, a), spec.relation))
    control = caption(SceneSpec((a, ObjectSpec(other, b.shape)), spec.relation))
    return swapped, control


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="default: the bundled model")
    p.add_argument("--scenes", type=int, default=128)
    p.add_argument("--size", type=int, help="image size in pixels (default: the model's preset)")
    args = p.parse_args()
    if args.scenes < 1:
        p.error(f"--scenes must be >= 1, got {args.scenes}")
    if args.size is not None and (args.size < 16 or args.size % 16):
        p.error(f"--size must be a multiple of 16 and at least 16, got {args.size}")
    from sd3.cli import DEFAULT_MODEL

    pipe = Pipeline.from_single_file(args.model or DEFAULT_MODEL, dtype=torch.float32)
    data = ShapesDataset(
        size=args.size or pipe.preset.size, length=args.scenes, seed=999, mix={"position": 1}
    )
    images, captions = zip(*(data[i] for i in range(args.scenes)), strict=True)
    swapped, control = zip(*(false_captions(c) for c in captions), strict=True)
    text = pipe.text_encoders(True, pipe.preset.t5_length)
    with torch.no_grad():
        x0 = pipe.vae.encode(torch.stack(images)).float()
        conditions = [text.encode(list(c)) for c in (captions, swapped, control)]
        print(f"{'sigma':>6} {'loss':>8} {'swapped':>9} {'control':>9} {'true lower':>11}")
        for sigma in SIGMAS:
            s = torch.full((len(x0),), sigma)
            losses = torch.zeros(3, len(x0))
            lower = 0.0
            for draw in range(DRAWS):
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(draw))
                x = noisy_latent(x0, noise, s)
                each = torch.stack([
                    (pipe.mmdit(x, 1000 * s, ctx, pooled) - (noise - x0)).square().mean((1, 2, 3))
                    for ctx, pooled in conditions
                ])  # fmt: skip
                losses += each / DRAWS
                lower += (each[0] < each[1]).float().mean().item() / DRAWS
            true, swap, ctrl = losses.mean(1).tolist()
            print(
                f"{sigma:>6} {true:>8.4f} {100 * (swap / true - 1):>+8.2f}% "
                f"{100 * (ctrl / true - 1):>+8.1f}% {lower:>11.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
