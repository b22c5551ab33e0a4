"""Procedural "shapes" dataset: the training data for sd3's small bundled SD3.5-architecture model,
and the held-out prompts of its GenEval-style prompt-adherence benchmark (SD3 paper, table 5).

A scene is 1-4 flat objects (circle, square, triangle with its apex up) in 8 named colours on a
light grey background, with a caption that is true of the image: colour, shape, count and, for
two-object scenes, relative position ("a red circle to the left of a blue square"). Objects never
overlap and keep a gap of at least 6% of the image side, so the checker in `sd3.shapes.evaluation` can
find them even at 64x64. Layouts live in unit coordinates, so one scene renders at any size;
`render` draws at 4x and box-downsamples, a light anti-aliasing that the checker models exactly
(an edge pixel is a mix of one palette colour and the background).

Relative position is GenEval's rule (`relations`): the offset between box centres, shrunk by 10% of
the two boxes' sizes, must point within 60 degrees of the named direction. Position scenes are laid
out more strictly, so that a caption is never a judgement call: exactly the captioned relation
holds by that rule, the boxes are 8% of the image apart along its axis, and the centres' offset is
within 27 degrees of it.

Train / held-out split (fixed forever; the training sampler rejects any scene that uses a reserved
combination anywhere in it, whatever its caption says):
- reserved items: 6 (colour, shape) pairs never drawn in training (`HELDOUT_ITEMS`), two per shape;
  the single-object prompts are exactly these, so "a red triangle" is only ever seen at test time.
- reserved counts: of the 18 remaining items in palette order, item k never appears exactly
  2 + k % 3 times in one training image; each gives one counting prompt.
- reserved pairs: an unordered pair of two remaining items is reserved when sha256 of
  "<colour> <shape> & <colour> <shape>" (items sorted) mod 100 is below 30 (`_pair_is_reserved`):
  40 of the 153 pairs, which never share a training image. Each gives an "A and B" prompt (category
  two_objects for different shapes, colour_attr for one shape in two colours) and four position
  prompts, A left of / right of / above / below B.
That makes 6 + 18 + 40 + 160 = 224 held-out prompts; every colour, shape, count and relation on its
own, and every item but the reserved six, is common in training. The categories are GenEval's,
except that its "single object" and "colours" are one here (every caption names a colour).
"""

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from sd3.training.data import check_pairs

# sRGB palette: far apart in hue or lightness, so a pixel's nearest mix with the background
# names its colour even after blur and noise (nearest full colours: orange-yellow, 83 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 210),
    "purple": (150, 50, 190),
    "black": (30, 30, 30),
}
BACKGROUND: tuple[int, int, int] = (200, 200, 200)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_objects", "colour_attr", "counting", "position")
MAX_OBJECTS = 4

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_RELATION_WORDS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# Object side (fraction of the image side) by the number of objects in the scene.
_SIDE_RANGE = {1: (0.24, 0.34), 2: (0.22, 0.30), 3: (0.19, 0.26), 4: (0.17, 0.23)}
_GAP = 0.06  # between any two objects
_RELATION_GAP = 0.08  # along the axis of a captioned relation
_MARGIN = 0.04  # to the image border
_SUPERSAMPLE = 4
_POSITION_THRESHOLD = 0.1  # GenEval's

Item = tuple[str, str]  # (colour, shape)
Box = tuple[float, float, float, float]  # x0, y0, x1, y1; y grows downwards
_PALETTE_ORDER = {item: k for k, item in enumerate(itertools.product(COLOURS, SHAPES))}

HELDOUT_ITEMS: frozenset[Item] = frozenset(
    {
        ("red", "triangle"),
        ("green", "triangle"),
        ("orange", "square"),
        ("blue", "square"),
        ("yellow", "circle"),
        ("purple", "circle"),
    }
)
TRAIN_ITEMS: tuple[Item, ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_ITEMS
)
HELDOUT_COUNTS: dict[Item, int] = {item: 2 + k % 3 for k, item in enumerate(TRAIN_ITEMS)}


def _pair_is_reserved(a: Item, b: Item) -> bool:
    a, b = sorted((a, b))
    digest = hashlib.sha256(f"{a[0]} {a[1]} & {b[0]} {b[1]}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < 30


HELDOUT_PAIRS: frozenset[frozenset[Item]] = frozenset(
    frozenset(p) for p in itertools.combinations(TRAIN_ITEMS, 2) if _pair_is_reserved(*p)
)


# --- scene structure ----------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """`count` objects of one colour and shape, as a caption names them."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says. With a relation: objects[0] <relation> objects[1], both count 1."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    bbox: Box  # unit coordinates


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    caption: str


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    category: str
    spec: SceneSpec


def _validate(spec: SceneSpec) -> None:
    for o in spec.objects:
        if o.colour not in COLOURS or o.shape not in SHAPES or not 1 <= o.count <= MAX_OBJECTS:
            raise ValueError(f"unknown colour/shape or bad count in {o}")
    items = [(o.colour, o.shape) for o in spec.objects]
    if not items or len(set(items)) != len(items):
        raise ValueError(f"a scene needs 1+ objects, each (colour, shape) once, got {items}")
    if sum(o.count for o in spec.objects) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects per scene, got {spec.objects}")
    if spec.relation is not None:
        if spec.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {spec.relation!r}")
        if len(spec.objects) != 2 or any(o.count != 1 for o in spec.objects):
            raise ValueError(f"a relation needs exactly two single objects, got {spec.objects}")


# --- captions -----------------------------------------------------------------------------


def _phrase(o: ObjectSpec) -> str:
    if o.count == 1:
        article = "an" if o.colour[0] in "aeiou" else "a"
        return f"{article} {o.colour} {o.shape}"
    return f"{_NUMBERS[o.count]} {o.colour} {o.shape}s"


def caption(spec: SceneSpec) -> str:
    _validate(spec)
    phrases = [_phrase(o) for o in spec.objects]
    if spec.relation is not None:
        return f"{phrases[0]} {_RELATION_WORDS[spec.relation]} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _parse_phrase(phrase: str, text: str) -> ObjectSpec:
    words = phrase.split(" ")
    counts = {"a": 1, "an": 1} | {w: n for n, w in _NUMBERS.items() if n > 1}
    if len(words) != 3 or words[0] not in counts or words[1] not in COLOURS:
        raise ValueError(f"cannot parse {phrase!r} in caption {text!r}")
    count = counts[words[0]]
    shape = words[2][:-1] if count > 1 and words[2].endswith("s") else words[2]
    if shape not in SHAPES or (count > 1) == (shape == words[2]):
        raise ValueError(f"cannot parse {phrase!r} in caption {text!r}")
    return ObjectSpec(words[1], shape, count)


def parse_caption(text: str) -> SceneSpec:
    """The inverse of `caption`: `parse_caption(caption(spec)) == spec`."""
    for relation, words in _RELATION_WORDS.items():
        if f" {words} " in text:
            a, b = text.split(f" {words} ", 1)
            spec = SceneSpec((_parse_phrase(a, text), _parse_phrase(b, text)), relation)
            break
    else:
        head, _, last = text.rpartition(" and ")
        phrases = (head.split(", ") if head else []) + [last]
        spec = SceneSpec(tuple(_parse_phrase(p, text) for p in phrases))
    _validate(spec)
    return spec


# --- the split ----------------------------------------------------------------------------


def reserved_combinations(counts: dict[Item, int]) -> list[str]:
    """The held-out combinations an image with these object counts would show; empty for every
    training scene."""
    found = [f"item {c} {s}" for (c, s) in counts if (c, s) in HELDOUT_ITEMS]
    found += [f"{n} x {c} {s}" for (c, s), n in counts.items() if HELDOUT_COUNTS.get((c, s)) == n]
    for a, b in itertools.combinations(sorted(counts), 2):
        if frozenset((a, b)) in HELDOUT_PAIRS:
            found.append(f"pair {a[0]} {a[1]} & {b[0]} {b[1]}")
    return found


def heldout_prompts() -> list[EvalPrompt]:
    """The 224 benchmark prompts, grouped by category in a fixed order."""
    prompts = []

    def add(category: str, spec: SceneSpec) -> None:
        prompts.append(EvalPrompt(caption(spec), category, spec))

    for c, s in sorted(HELDOUT_ITEMS, key=lambda i: _PALETTE_ORDER[i]):
        add("single_object", SceneSpec((ObjectSpec(c, s),)))
    pairs = sorted(
        (sorted(p, key=_PALETTE_ORDER.get) for p in HELDOUT_PAIRS),
        key=lambda p: (_PALETTE_ORDER[p[0]], _PALETTE_ORDER[p[1]]),
    )
    for a, b in pairs:
        category = "colour_attr" if a[1] == b[1] else "two_objects"
        add(category, SceneSpec((ObjectSpec(*a), ObjectSpec(*b))))
    for (c, s), n in HELDOUT_COUNTS.items():
        add("counting", SceneSpec((ObjectSpec(c, s, n),)))
    for a, b in pairs:
        for relation in RELATIONS:
            add("position", SceneSpec((ObjectSpec(*a), ObjectSpec(*b)), relation))
    return prompts


# --- layout -------------------------------------------------------------------------------


def relations(a: Box, b: Box) -> set[str]:
    """Where box a lies relative to box b, by GenEval's rule (any box units, y down)."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - _POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3 * max(dims.max(), 1e-9)):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _gap(a: Box, b: Box) -> float:
    """Separation of two boxes along the axis where they are furthest apart (< 0: overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _clearly(a: Box, b: Box, relation: str) -> bool:
    """a <relation> b with a gap along that axis, and the centres' offset within 27 degrees of it
    (GenEval's rule alone would also accept 60 degrees off)."""
    dx, dy = (a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2
    gap, along, across = {
        "left of": (b[0] - a[2], -dx, dy),
        "right of": (a[0] - b[2], dx, dy),
        "above": (b[1] - a[3], -dy, dx),
        "below": (a[1] - b[3], dy, dx),
    }[relation]
    return gap >= _RELATION_GAP and along >= 2 * abs(across)


def layout(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Random non-overlapping boxes for the objects of `spec`, satisfying its relation."""
    _validate(spec)
    items = [(o.colour, o.shape) for o in spec.objects for _ in range(o.count)]
    lo, hi = _SIDE_RANGE[len(items)]
    for _ in range(1000):
        boxes: list[Box] = []
        for _ in range(100 * len(items)):
            side = rng.uniform(lo, hi)
            x0, y0 = rng.uniform(_MARGIN, 1 - _MARGIN - side, size=2)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_gap(box, other) >= _GAP for other in boxes):
                boxes.append(box)
                if len(boxes) == len(items):
                    break
        if len(boxes) < len(items):
            continue
        if spec.relation is not None and not (
            relations(boxes[0], boxes[1]) == {spec.relation}
            and _clearly(boxes[0], boxes[1], spec.relation)
        ):
            continue
        objects = tuple(SceneObject(c, s, b) for (c, s), b in zip(items, boxes, strict=True))
        return Scene(objects, caption(spec))
    raise RuntimeError(f"no layout found for {spec}")  # unreachable with the sizes above


# --- the training distribution ------------------------------------------------------------


def _draw_items(rng: np.random.Generator, k: int) -> list[Item]:
    picks = rng.choice(len(TRAIN_ITEMS), size=k, replace=False)
    return [TRAIN_ITEMS[i] for i in picks]


# The training captions' kinds and their default shares: one object, one item counted ("three red
# circles"), "A and B", "A <relation> B", and mixed groups of 3-4 objects.
KINDS = ("single", "counting", "pair", "position", "group")
DEFAULT_MIX: dict[str, float] = {
    "single": 0.2, "counting": 0.2, "pair": 0.2, "position": 0.25, "group": 0.15,
}  # fmt: skip


def parse_mix(text: str) -> dict[str, float]:
    """A caption mix from "kind=weight,..." (e.g. "counting=3,position=4"): kinds left out get
    weight 0, and the weights are normalised to shares."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or kind not in KINDS or not value >= 0:
            raise ValueError(
                f"mix: {part.strip()!r} is not kind=weight with kind in {KINDS} and weight >= 0"
            )
        mix[kind] = value
    return check_mix(mix)


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """`mix` normalised to shares that sum to 1; a clear error for unknown kinds or bad weights."""
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"mix: unknown caption kinds {sorted(unknown)}; choose from {KINDS}")
    total = sum(mix.values())
    if any(not w >= 0 for w in mix.values()) or not total > 0:
        raise ValueError(f"mix: weights must be >= 0 with a positive sum, got {mix}")
    return {kind: mix.get(kind, 0.0) / total for kind in KINDS}


def sample_spec(rng: np.random.Generator, mix: dict[str, float] = DEFAULT_MIX) -> SceneSpec:
    """A training caption of a kind drawn from `mix` (shares by kind, `KINDS`); redrawn until it
    uses no held-out combination."""
    shares = [mix.get(kind, 0.0) for kind in KINDS]
    while True:
        kind = rng.choice(len(KINDS), p=shares)
        relation = None
        if kind == 0:
            objects = [ObjectSpec(*_draw_items(rng, 1)[0])]
        elif kind == 1:
            objects = [ObjectSpec(*_draw_items(rng, 1)[0], count=int(rng.integers(2, 5)))]
        elif kind in (2, 3):
            objects = [ObjectSpec(*item) for item in _draw_items(rng, 2)]
            relation = RELATIONS[rng.integers(4)] if kind == 3 else None
        else:
            total = int(rng.integers(3, MAX_OBJECTS + 1))
            k = int(rng.integers(2, total + 1))
            counts = np.ones(k, dtype=int)
            np.add.at(counts, rng.integers(k, size=total - k), 1)
            objects = [
                ObjectSpec(c, s, int(n))
                for (c, s), n in zip(_draw_items(rng, k), counts, strict=True)
            ]
        spec = SceneSpec(tuple(objects), relation)
        if not reserved_combinations({(o.colour, o.shape): o.count for o in objects}):
            return spec


def sample_scene(seed: int, index: int, mix: dict[str, float] = DEFAULT_MIX) -> Scene:
    """Training scene `index` of the dataset with this seed and caption mix: a function of
    (seed, index, mix) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    return layout(sample_spec(rng, mix), rng)


def mirror(scene: Scene) -> Scene:
    """The scene reflected across the axis of its relation (left-right for "left of"/"right of"
    and for scenes without one, top-bottom for "above"/"below"), each object redrawn upright in its
    reflected box, with the caption that is true of it. A position caption keeps its relation and
    swaps its objects: the mirror of "a red circle above a blue square" is "a blue square above a
    red circle", the same words in the other order, which is what a model has to read to lay the
    scene out. Captions without a relation do not depend on the layout and stay as they are."""
    spec = parse_caption(scene.caption)
    vertical = spec.relation in ("above", "below")

    def reflect(box: Box) -> Box:
        x0, y0, x1, y1 = box
        return (x0, 1 - y1, x1, 1 - y0) if vertical else (1 - x1, y0, 1 - x0, y1)

    objects = tuple(SceneObject(o.colour, o.shape, reflect(o.bbox)) for o in scene.objects)
    if spec.relation is not None:
        spec = SceneSpec(spec.objects[::-1], spec.relation)
    return Scene(objects, caption(spec))


# --- rendering ----------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, big: int, fill) -> None:
    x0, y0, x1, y1 = (v * big for v in o.bbox)
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=fill)


def _check_size(size: int) -> None:
    if size < 32:
        raise ValueError(f"size must be >= 32 for the objects to stay recognisable, got {size}")


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB image: drawn at 4x with hard edges, then box-downsampled."""
    _check_size(size)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw(draw, o, big, COLOURS[o.colour])
    return image.reduce(_SUPERSAMPLE)


def render_edges(scene: Scene, size: int) -> Image.Image:
    """The scene's outlines as Canny edges of `render(scene, size)` look (white, one pixel wide, on
    black), drawn from the geometry instead of detected: the control image of a canny ControlNet.

    A pixel belongs to an object where `render` covers it at least half (as the checker reads an
    anti-aliased edge). Where two neighbouring pixels differ in that, the edge pixel is the one
    above or to the left: OpenCV's non-maximum suppression keeps the first of two equal gradient
    peaks across a step. The result lies within a pixel of cv2.Canny(render(scene, size), 100, 200)
    (tests/test_controlnet_training.py states how close)."""
    _check_size(size)
    big = size * _SUPERSAMPLE
    labels = np.zeros((size, size), dtype=np.int16)
    for k, o in enumerate(scene.objects, start=1):
        mask = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(mask), o, big, 255)
        labels[np.asarray(mask.reduce(_SUPERSAMPLE)) >= 128] = k
    edges = np.zeros((size, size), dtype=bool)
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


class ShapesDataset(Dataset):
    """`length` captioned scenes, (image [3, size, size] in [-1, 1], caption); item i is a
    function of (seed, i) only, the same scene at every size. `mix` gives the caption kinds'
    shares (`KINDS`; default `DEFAULT_MIX`). With `mirror_pairs`, items 2k and 2k + 1 are scene k
    and its `mirror` (`length` must be even): a trainer that keeps such pairs together
    (`TrainConfig.paired`) sees every relation next to its swap."""

    def __init__(
        self,
        size: int,
        length: int,
        seed: int,
        mix: dict[str, float] | None = None,
        mirror_pairs: bool = False,
    ):
        if size < 32:
            raise ValueError(f"size must be >= 32, got {size}")
        if length < 0 or seed < 0:
            raise ValueError(f"length and seed must be >= 0, got length={length}, seed={seed}")
        if mirror_pairs:
            check_pairs("mirror pairs need", {"length": length})
        self.size, self.length, self.seed = size, length, seed
        self.mix = DEFAULT_MIX if mix is None else check_mix(mix)
        self.mirror_pairs = mirror_pairs

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        if self.mirror_pairs:
            scene = sample_scene(self.seed, index // 2, self.mix)
            return mirror(scene) if index % 2 else scene
        return sample_scene(self.seed, index, self.mix)

    def render(self, index: int) -> Image.Image:
        """Item `index`'s picture."""
        return render(self.scene(index), self.size)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        scene = self.scene(index)
        return to_tensor(render(scene, self.size)), scene.caption
