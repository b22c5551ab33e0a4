"""A GenEval-style prompt-adherence benchmark (SD3 paper, table 5) for the model trained on the
procedural shapes dataset (`sd3.shapes.scenes`), with a deterministic, learning-free checker.

GenEval runs an object detector over each generated image and checks the objects, counts, colours
and positions the prompt asks for. Our objects are flat shapes on a known background, so the
detector is a few lines of geometry:

1. Pixels. Anti-aliasing and blur mix an object's colour with the background, so each pixel is
   explained as the nearest point on a segment from the background to a palette colour (in sRGB,
   where the renderer and blur mix). The mix fraction alpha >= 0.5 marks the object (the edge sits
   where it was drawn); a pixel far from every segment and from the background is "unknown".
2. Objects. 4-connected components of the object pixels (min-label propagation with pointer
   jumping, in numpy); components under 0.4% of the image are noise. A component's colour is the
   alpha-weighted vote of its pixels, so noisy pixels are outvoted by the interior; a component whose
   runner-up colour holds >= 35% of the vote is two touching objects and is split by colour.
3. Shape: the component is compared with an apex-up triangle (as trained) and with squares whose
   corners are rounded from none to a circle, all of its own area and centroid; the best overlap
   (IoU) names it, if it reaches 0.6; it is a circle only if a circle fits about as well as the
   best rounded square, a square only if that square's corner radius is <= 35% of its side.

Rules, as GenEval's: every named object must be present at least `count` times with its colour;
position holds if some pair of matching objects satisfies GenEval's relation rule (`relations`);
extra objects are ignored, except in counting prompts, whose images must show exactly n objects
of the named colour and shape and nothing else (a counting scene in training shows nothing else).
The overall score is the mean of the per-category accuracies, as GenEval's. Each failed image is
also given one kind (`FAILURES`): an object missing, extra objects in a counting image, the two
objects of a position prompt swapped (the opposite relation holds), or otherwise misplaced.

Cleanliness, beside the score (`Cleanliness`): how wide the objects' edges are and how much of
the picture is "ghost", faint blobs off the background away from every object, read from the same
per-pixel mix fractions; the renders the model learns from have edges about 0.7 pixels wide (the
anti-aliasing) and no ghosts.

Seeds: each image has its own noise seed, a hash of (seed round, prompt), so it does not depend on
the batch it is made in, on the torchrun rank that makes it, or on which other prompts are chosen.
The rounds come in two splits (`SPLITS`): "val" for every choice made by looking at scores (recipes,
checkpoints, settings), "test" only for reporting a chosen model, so the reported score is not
inflated by the choosing.
"""

import argparse
import hashlib
import io
import json
import math
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from sd3 import distributed
from sd3.outputs import check_new_file, write_new
from sd3.shapes.scenes import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    EvalPrompt,
    heldout_prompts,
    layout,
    parse_caption,
    relations,
    render,
)

# (prompts, one noise seed per prompt) -> one image each, image i made from seeds[i] alone
Generate = Callable[[list[str], list[int]], list[Image.Image]]

# Seed rounds: "val" for choosing (models, checkpoints, settings), "test" only for reporting.
# Six rounds each, so choosing and reporting measure with the same noise (the overall score's
# standard error is about 0.016 at six rounds, 0.022 at three).
SPLITS: dict[str, tuple[int, ...]] = {"val": tuple(range(6)), "test": tuple(range(100, 106))}

_NAMES = list(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_BG = np.array(BACKGROUND, dtype=np.float32)
_UNKNOWN = len(_NAMES)  # label of object pixels of no palette colour
_MAX_RESIDUAL = 60.0  # sRGB distance to the nearest colour/background mix; half the palette spacing
_MIN_UNKNOWN_DISTANCE = 60.0  # from the background, for a pixel of no palette colour to count
_MIN_AREA_FRACTION = 0.004
_SPLIT_FRACTION = 0.35
_SUBSAMPLES = 4
_MIN_SHAPE_IOU = 0.6
# Corner radius / side of the rounded squares an object is matched with (0 square, 0.5 circle),
# and where a fit counts as a circle or a square (`classify_shape`).
_ROUNDNESS = np.linspace(0, 0.5, 11)
# IoU a circle may trail the best fit by: pixel steps cost a drawn circle of n pixels up to about
# 2.5/n (0.022 at 13 pixels across), blur and noise up to 0.003; squares rounded by a quarter of
# the side trail by 0.03 or more at 128x128
_CIRCLE_MARGIN_PIXELS = 3.0
_MIN_CIRCLE_MARGIN = 0.004
_MAX_SQUARE_ROUNDNESS = 0.35
_TRANSITION = (0.1, 0.9)  # the alpha range of an edge's 10-90% rise
_GHOST_LEVELS = 16.0  # the least sRGB distance from the background a ghost pixel has
_NEAR = 3  # pixels (Chebyshev) from an object pixel: within, an edge's rise; beyond, a ghost


@dataclass(frozen=True)
class DetectedObject:
    colour: str | None  # None: no palette colour
    shape: str | None  # None: none of circle / square / triangle
    bbox: tuple[int, int, int, int]  # pixels, x0, y0, x1, y1 (exclusive)
    area: int


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str
    found: list[DetectedObject]
    failure: str | None = None  # None when passed, else one of FAILURES


# Why an image failed: an asked-for object missing (or too few of it), objects beyond the asked
# count (counting prompts), both objects there but the asked relation reversed, or another layout.
FAILURES = ("missing", "extra", "swapped", "misplaced")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# --- detection ----------------------------------------------------------------------------


def classify_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of [H, W, 3] sRGB: the palette index whose mix with the background explains it
    best (`_UNKNOWN` for none), and that mix's fraction alpha in [0, 1]."""
    p = rgb.reshape(-1, 3).astype(np.float32) - _BG
    d = _PALETTE - _BG
    dd = (d * d).sum(1)
    pd = p @ d.T  # [N, K]
    alpha = np.clip(pd / dd, 0, 1)
    residual2 = (p * p).sum(1, keepdims=True) - 2 * alpha * pd + alpha**2 * dd
    label = residual2.argmin(1)
    best = np.arange(len(p))
    alpha, residual2 = alpha[best, label], residual2[best, label]
    unknown = residual2 > _MAX_RESIDUAL**2
    label[unknown] = _UNKNOWN
    alpha[unknown] = np.linalg.norm(p[unknown], axis=-1) >= _MIN_UNKNOWN_DISTANCE
    h, w = rgb.shape[:2]
    return label.reshape(h, w), alpha.reshape(h, w)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean [H, W] mask: labels 0..n-1, and -1 off the mask."""
    h, w = mask.shape
    off = h * w
    labels = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, off).ravel()
        on = new < off
        new[on] = new[new[on]]  # pointer jumping: follow the label's own label
        new = new.reshape(h, w)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(h, w)
    n = len(roots) - (roots[-1] == off)
    return np.where(mask, inverse, -1), int(n)


def _coverage(inside, h: int, w: int) -> np.ndarray:
    """Coverage of an [h, w] pixel grid by the region `inside(xs, ys)` (4x4 samples per pixel)."""
    sub = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES
    ys = (np.arange(h)[:, None] + sub).reshape(-1, 1)
    xs = (np.arange(w)[:, None] + sub).reshape(1, -1)
    return inside(xs, ys).reshape(h, _SUBSAMPLES, w, _SUBSAMPLES).mean((1, 3))


def _rounded_square(cx: float, cy: float, area: float, roundness: float, h: int, w: int):
    """Coverage by a square of this area and centroid with corners of radius `roundness` * side:
    0 is a square, 0.5 a circle."""
    side = math.sqrt(area / (1 - (4 - math.pi) * roundness**2))
    straight, radius = side / 2 - roundness * side, roundness * side

    def inside(xs, ys):
        dx, dy = np.abs(xs - cx) - straight, np.abs(ys - cy) - straight
        corner = np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2 <= radius**2
        return (dx <= radius) & (dy <= radius) & corner

    return _coverage(inside, h, w)


def _triangle(cx: float, cy: float, area: float, h: int, w: int) -> np.ndarray:
    """Coverage by an apex-up triangle of this area and centroid, base = height = side (the
    centroid sits 2/3 of the way down)."""
    side = math.sqrt(2 * area)
    top = cy - 2 * side / 3
    return _coverage(
        lambda xs, ys: (ys >= top) & (ys <= top + side) & (np.abs(xs - cx) <= (ys - top) / 2), h, w
    )


def classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle (apex up) for an object's pixels, cropped to its box, or None.

    The object is matched (IoU) with an apex-up triangle and with squares whose corners are
    rounded from 0 (a square) to half the side (a circle), all of its own area and centroid; the
    best of them names it if its IoU is >= 0.6. It is a circle only if the circle's IoU is within
    max(0.004, 3 / area) of the best rounded square's, a square if the best rounding is <= 35% of
    the side, and neither otherwise: an IoU race between a square and a circle alone calls a
    square whose corners are rounded by a fifth of its side a circle. Matching the whole outline
    is steadier than the box's fill ratio, which a one-pixel error in the box of a 12-pixel
    object throws off by 15%."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx, area = ys.mean() + 0.5, xs.mean() + 0.5, float(len(ys))

    def iou(t: np.ndarray) -> float:
        return float(np.minimum(mask, t).sum() / np.maximum(mask, t).sum())

    fits = [iou(_rounded_square(cx, cy, area, r, h, w)) for r in _ROUNDNESS]
    best = int(np.argmax(fits))  # the least rounding among equal fits
    triangle = iou(_triangle(cx, cy, area, h, w))
    if max(fits[best], triangle) < _MIN_SHAPE_IOU:
        return None
    if triangle > fits[best]:
        return "triangle"
    if fits[-1] >= fits[best] - max(_MIN_CIRCLE_MARGIN, _CIRCLE_MARGIN_PIXELS / area):
        return "circle"
    return "square" if _ROUNDNESS[best] <= _MAX_SQUARE_ROUNDNESS else None


def _object(mask: np.ndarray, colour: int) -> DetectedObject:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape = classify_shape(mask[y0:y1, x0:x1])
    name = _NAMES[colour] if colour < _UNKNOWN else None
    return DetectedObject(name, shape, (int(x0), int(y0), int(x1), int(y1)), len(ys))


def detect_objects(image: Image.Image) -> list[DetectedObject]:
    """The objects in a generated image, left to right."""
    rgb = np.asarray(image.convert("RGB"))
    label, alpha = classify_pixels(rgb)
    min_area = max(6, _MIN_AREA_FRACTION * label.size)
    components, n = connected_components(alpha >= 0.5)
    areas = np.bincount(components[components >= 0], minlength=n)
    found = []
    for k in np.nonzero(areas >= min_area)[0]:
        mask = components == k
        votes = np.bincount(label[mask], weights=alpha[mask], minlength=_UNKNOWN + 1)
        order = np.argsort(votes)[::-1]
        if votes[order[1]] < _SPLIT_FRACTION * votes.sum():
            found.append(_object(mask, order[0]))
            continue
        for colour in np.nonzero(votes)[0]:  # touching objects of different colours
            parts, m = connected_components(mask & (label == colour))
            for j in range(m):
                if (parts == j).sum() >= min_area:
                    found.append(_object(parts == j, colour))
    return sorted(found, key=lambda o: (o.bbox[0], o.bbox[1]))


# --- cleanliness --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cleanliness:
    """Edge and ghost pixel counts of one or more pictures (`cleanliness`; `+` adds them).

    Edge width: the pixels with 0.1 < alpha < 0.9 within three pixels of an object pixel (alpha
    >= 0.5) are an edge's rise from background to object; an edge whose 10-90% rise spans w
    pixels has w of them across it, so their count over the outline's length (4-neighbour pixel
    pairs on either side of alpha = 0.5) is the mean 10-90% width, exact for edges along the pixel
    grid (up to about 6 pixels). Ghosts: pixels 16 or more sRGB levels off the background (paler
    or tinted) and farther than three pixels from every object pixel."""

    transition: int  # pixels with 0.1 < alpha < 0.9
    outline: int  # 4-neighbour pixel pairs split by alpha = 0.5
    ghost: int  # pixels
    pixels: int

    def __add__(self, other: "Cleanliness") -> "Cleanliness":
        a, b = astuple(self), astuple(other)
        return Cleanliness(*(x + y for x, y in zip(a, b, strict=True)))

    @property
    def edge_width(self) -> float:
        """Mean 10-90% edge width in pixels (nan where nothing has an outline)."""
        return self.transition / self.outline if self.outline else float("nan")

    @property
    def ghost_share(self) -> float:
        """The share of the pixels that are ghosts."""
        return self.ghost / self.pixels if self.pixels else float("nan")


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (Chebyshev distance) of a True pixel of `mask`."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def cleanliness(image: Image.Image) -> Cleanliness:
    """The edge and ghost counts of one picture (`Cleanliness`)."""
    rgb = np.asarray(image.convert("RGB"))
    _label, alpha = classify_pixels(rgb)
    low, high = _TRANSITION
    inside = alpha >= 0.5
    near = _near(inside, _NEAR)
    transition = int(((alpha > low) & (alpha < high) & near).sum())
    outline = int((inside[:, 1:] != inside[:, :-1]).sum() + (inside[1:] != inside[:-1]).sum())
    off = np.linalg.norm(rgb.astype(np.float32) - _BG, axis=-1) >= _GHOST_LEVELS
    ghost = int((off & ~near).sum())
    return Cleanliness(transition, outline, ghost, alpha.size)


def total_cleanliness(images: Sequence[Image.Image]) -> Cleanliness:
    """The counts of several pictures together (the edge width is then outline-weighted)."""
    total = Cleanliness(0, 0, 0, 0)
    for image in images:
        total += cleanliness(image)
    return total


# --- checking -----------------------------------------------------------------------------


def _describe(o: DetectedObject) -> str:
    return f"{o.colour or 'unknown-colour'} {o.shape or 'unknown-shape'}"


def check(image: Image.Image, prompt: EvalPrompt) -> CheckResult:
    """Whether the image shows what the prompt asks for, with the reason and the objects found."""
    found = detect_objects(image)
    spec = prompt.spec
    matches = [
        [o for o in found if (o.colour, o.shape) == (want.colour, want.shape)]
        for want in spec.objects
    ]
    seen = ", ".join(_describe(o) for o in found) or "nothing"
    for want, got in zip(spec.objects, matches, strict=True):
        if len(got) < want.count:
            reason = f"{len(got)}/{want.count} {want.colour} {want.shape}; saw {seen}"
            return CheckResult(False, reason, found, "missing")
    if prompt.category == "counting" and len(found) != spec.objects[0].count:
        reason = f"expected {prompt.text} and nothing else; saw {seen}"
        return CheckResult(False, reason, found, "extra")
    if spec.relation is not None:
        held = set().union(*(relations(a.bbox, b.bbox) for a in matches[0] for b in matches[1]))
        if spec.relation not in held:
            failure = "swapped" if _OPPOSITE[spec.relation] in held else "misplaced"
            reason = f"no pair is {spec.relation!r}; saw {seen}"
            return CheckResult(False, reason, found, failure)
    return CheckResult(True, "ok", found)


# --- the benchmark ------------------------------------------------------------------------


def image_seed(round_: int, prompt: str) -> int:
    """The noise seed of one evaluated image: a hash of (seed round, prompt text), below 2**63. The
    text, not the prompt's place in a list, so `--limit` and `--categories` keep every seed."""
    digest = hashlib.sha256(f"{round_}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def split_rounds(split: str, count: int | None = None) -> tuple[int, ...]:
    """The first `count` seed rounds of `split` (all of them for None)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rounds = SPLITS[split]
    if count is not None and not 1 <= count <= len(rounds):
        raise ValueError(
            f"seeds_per_prompt must be 1 to {len(rounds)} (the {split} split's rounds), got {count}"
        )
    return rounds if count is None else rounds[:count]


@dataclass
class Report:
    overall: float  # mean of the per-category accuracies, GenEval's overall score
    per_category: dict[str, float]
    counts: dict[str, tuple[int, int]]  # category -> (passed, total)
    results: list[tuple[int, int, CheckResult]] = field(repr=False)  # (prompt index, round, result)
    split: str = "val"
    rounds: tuple[int, ...] = SPLITS["val"]
    clean: Cleanliness = Cleanliness(0, 0, 0, 0)  # the generated images'
    rendered: Cleanliness = Cleanliness(0, 0, 0, 0)  # renders of the same prompts and seeds

    def to_dict(self) -> dict:
        """The report as data (what `--json` writes): split, rounds, scores, failure kinds."""
        passed = sum(p for p, _ in self.counts.values())
        total = sum(n for _, n in self.counts.values())
        failures = Counter(r.failure for *_, r in self.results if not r.passed)
        return {
            "split": self.split,
            "rounds": list(self.rounds),
            "overall": round(self.overall, 4),
            "all_images": f"{passed}/{total}",
            **{c: round(a, 4) for c, a in self.per_category.items()},
            "failed": {kind: failures[kind] for kind in FAILURES},
            "edge_width": round(self.clean.edge_width, 3),
            "edge_width_renders": round(self.rendered.edge_width, 3),
            "ghost_share": round(self.clean.ghost_share, 5),
        }


def perfect_generator(size: int) -> Generate:
    """A generator that draws every prompt correctly with the dataset's renderer (it parses the
    caption): the benchmark's ceiling, and a check of the checker."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for text, seed in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
            images.append(render(layout(parse_caption(text), rng), size))
        return images

    return generate


def evaluate(
    generate: Generate,
    prompts: Sequence[EvalPrompt],
    seeds_per_prompt: int | None = None,
    contact_sheet: Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
    split: str = "val",
) -> Report:
    """Generate one image per prompt for each of the first `seeds_per_prompt` seed rounds of
    `split` (all of them for None), check each, print the report, and optionally save a contact
    sheet. `generate` gets up to `batch_size` prompts at a time with each image's own seed
    (`image_seed`); `progress` shows a bar over the images with the share passed so far."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rounds = split_rounds(split, seeds_per_prompt)
    # under torchrun each rank makes every world-th batch; all ranks then hold every result
    rank, world = distributed.rank_and_world()
    batches = [(round_, start) for round_ in rounds
               for start in range(0, len(prompts), batch_size)]  # fmt: skip
    mine = distributed.share(batches, rank, world)
    found = []  # (round, prompt index, result, image or None)
    total = len(rounds) * len(prompts)
    with tqdm(total=total, desc="eval", unit="image", disable=not progress or rank != 0) as bar:
        for k in range(math.ceil(len(batches) / world)):
            made = []
            if k < len(mine):
                round_, start = mine[k]
                batch = prompts[start : start + batch_size]
                seeds = [image_seed(round_, p.text) for p in batch]
                images = generate([p.text for p in batch], seeds)
                if len(images) != len(batch):
                    raise ValueError(
                        f"generate returned {len(images)} images for {len(batch)} prompts"
                    )
                renders = perfect_generator(images[0].size[0])([p.text for p in batch], seeds)
                for i, (prompt, image) in enumerate(zip(batch, images, strict=True)):
                    keep = image if contact_sheet is not None else None
                    clean = (cleanliness(image), cleanliness(renders[i]))
                    made.append((round_, start + i, check(image, prompt), clean, keep))
            for part in distributed.gather(made):
                found += part
                bar.update(len(part))
            bar.set_postfix(passed=f"{sum(r.passed for *_, r, _, _ in found) / len(found):.3f}")
    found.sort(key=lambda entry: entry[:2])  # the order one process makes them in
    results = [(i, round_, result) for round_, i, result, _, _ in found]
    sheet = [(im, f"p{i} r{round_}: {prompts[i].text}", r.passed)
             for round_, i, r, _, im in found if im is not None]  # fmt: skip
    clean = sum((c for *_, (c, _), _ in found), Cleanliness(0, 0, 0, 0))
    rendered = sum((c for *_, (_, c), _ in found), Cleanliness(0, 0, 0, 0))
    counts = {}
    for category in CATEGORIES:
        passed = [r.passed for i, _, r in results if prompts[i].category == category]
        if passed:
            counts[category] = (sum(passed), len(passed))
    per_category = {c: p / n for c, (p, n) in counts.items()}
    overall = sum(per_category.values()) / len(per_category)
    report = Report(overall, per_category, counts, results, split, rounds, clean, rendered)
    if rank == 0:
        print(format_report(report))
        if contact_sheet is not None:
            save_contact_sheet(sheet, contact_sheet)
    return report


def format_report(report: Report) -> str:
    rounds = ", ".join(map(str, report.rounds))
    lines = [f"split {report.split}, seed rounds {rounds} ({len(report.rounds)} images per prompt)"]
    lines.append(f"{'category':<16}{'passed':>8}{'total':>8}{'accuracy':>10}")
    for category, (passed, total) in report.counts.items():
        lines.append(f"{category:<16}{passed:>8}{total:>8}{report.per_category[category]:>10.3f}")
    passed = sum(p for p, _ in report.counts.values())
    total = sum(n for _, n in report.counts.values())
    lines.append(f"{'all images':<16}{passed:>8}{total:>8}{passed / total:>10.3f}")
    lines.append(f"{'overall (mean of categories)':<32}{report.overall:>10.3f}")
    failures = Counter(r.failure for *_, r in report.results if not r.passed)
    if failures:
        why = ", ".join(f"{kind} {failures[kind]}" for kind in FAILURES if failures[kind])
        lines.append(f"failed images: {why}")
    if report.clean.pixels:
        clean, rendered = report.clean, report.rendered
        edges = f"{clean.edge_width:.2f} px wide" if clean.outline else "none found"
        lines.append(
            f"edges {edges} (renders {rendered.edge_width:.2f}), ghosts {100 * clean.ghost_share:.2f}"
            f"% of the pixels (renders {100 * rendered.ghost_share:.2f}%)"
        )
    return "\n".join(lines)


def save_contact_sheet(
    cells: Sequence[tuple[Image.Image, str, bool]], path: Path, columns: int = 16
) -> None:
    """A grid of (image, label, passed): each image framed green (pass) or red (fail), with its
    label ("p<prompt index> r<seed round>: <prompt>") underneath, wrapped to the cell's width."""
    largest = max(max(im.size) for im, _, _ in cells)
    scale = math.ceil(96 / largest)  # whole-number upscale of small images keeps pixels sharp
    cell = largest * scale
    border, line = 4, 11
    font = ImageFont.load_default()
    labels = [wrap_label(text, font, cell + 2 * border) for _, text, _ in cells]
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    width = cell + 2 * border
    height = cell + 2 * border + line * max(len(lines) for lines in labels) + 3
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, ((image, _, passed), lines) in enumerate(zip(cells, labels, strict=True)):
        x, y = (n % columns) * width, (n // columns) * height
        draw.rectangle((x, y, x + width - 1, y + cell + 2 * border - 1), fill=_MARK[passed])
        size = (image.width * scale, image.height * scale)
        thumb = image.convert("RGB").resize(size, Image.Resampling.NEAREST)
        sheet.paste(thumb, (x + border, y + border))
        for k, text in enumerate(lines):
            draw.text((x + 1, y + cell + 2 * border + k * line), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    written = write_new(path, buffer.getvalue(), "--contact-sheet")
    if written != Path(path):
        print(f"--contact-sheet {path} was taken meanwhile: wrote {written}", file=sys.stderr)


_MARK = {True: (0, 170, 0), False: (210, 0, 0)}


def wrap_label(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines of whole words no wider than `width` pixels (a longer word alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width - 2:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


# --- command line -------------------------------------------------------------------------


def select_prompts(
    prompts: Sequence[EvalPrompt], categories: Sequence[str] | None = None, limit: int | None = None
) -> list[EvalPrompt]:
    """The prompts of the given categories, taken round-robin across categories, so that a limit
    still samples every category."""
    categories = list(CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    groups = [[p for p in prompts if p.category == c] for c in categories]
    depth = max((len(g) for g in groups), default=0)
    chosen = [g[i] for i in range(depth) for g in groups if i < len(g)]
    return chosen[:limit]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only N prompts, taken round-robin over the categories",
    )
    parser.add_argument(
        "--split",
        choices=list(SPLITS),
        default="val",
        help="seed rounds: val (0-5) for every choice among models, checkpoints and settings; "
        "test (100-105) only to report a chosen model",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="images per prompt: the split's first K seed rounds (default: all 6; val 3 gives "
        "rounds 0-2, those of earlier records)",
    )
    parser.add_argument("--contact-sheet", type=Path, default=None, help="save a PNG grid here")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument(
        "--categories",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=None,
        help=f"comma-separated subset of {','.join(CATEGORIES)}",
    )
    parser.add_argument(
        "--oracle",
        type=int,
        default=None,
        metavar="SIZE",
        help="draw the prompts with the dataset renderer at SIZE px instead of a model",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """One ValueError naming the option, before any image is made."""
    select_prompts(heldout_prompts(), args.categories, args.limit)
    rounds = SPLITS[args.split]
    if args.seeds is not None and not 1 <= args.seeds <= len(rounds):
        raise ValueError(
            f"--seeds must be 1 to {len(rounds)} for --split {args.split} "
            f"(rounds {', '.join(map(str, rounds))}), got {args.seeds}"
        )
    if args.oracle is not None and args.oracle < 16:
        raise ValueError(f"--oracle must be at least 16 pixels, got {args.oracle}")
    if args.contact_sheet is not None:
        if args.contact_sheet.suffix.lower() != ".png":
            raise ValueError(f"--contact-sheet {args.contact_sheet}: must be a .png file")
        check_new_file(args.contact_sheet, "--contact-sheet")
    if args.json is not None:
        if args.json.suffix.lower() != ".json":
            raise ValueError(f"--json {args.json}: must be a .json file")
        check_new_file(args.json, "--json")


def run(args: argparse.Namespace, generate: Generate | None = None) -> int:
    """`sd3 eval`: the held-out prompts through `generate` (or the oracle), then the report."""
    if generate is None:
        if args.oracle is None:
            print("sd3 eval: no model to evaluate (pass one, or --oracle SIZE)", file=sys.stderr)
            return 2
        generate = perfect_generator(args.oracle)
    check_arguments(args)
    prompts = select_prompts(heldout_prompts(), args.categories, args.limit)
    report = evaluate(
        generate, prompts, args.seeds, args.contact_sheet, progress=True, split=args.split
    )
    if args.json is not None and distributed.rank_and_world()[0] == 0:
        data = json.dumps(report.to_dict(), indent=1) + "\n"
        written = write_new(args.json, data.encode(), "--json")
        if written != Path(args.json):
            print(f"--json {args.json} was taken meanwhile: wrote {written}", file=sys.stderr)
    return 0
