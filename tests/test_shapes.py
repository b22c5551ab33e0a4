"""The procedural shapes dataset: determinism, captions true of their images, the held-out split."""

import hashlib
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from sd3.shapes.objective import pair_contrast_loss
from sd3.shapes.scenes import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    HELDOUT_ITEMS,
    RELATIONS,
    SHAPES,
    TRAIN_ITEMS,
    ObjectSpec,
    Scene,
    SceneObject,
    SceneSpec,
    ShapesDataset,
    caption,
    heldout_prompts,
    mirror,
    parse_caption,
    parse_mix,
    render,
    reserved_combinations,
    sample_scene,
)
from sd3.training.flow import flow_loss

N_TRAIN = 5000
_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
_PHRASE = r"(a|an|two|three|four) (\w+) (circle|square|triangle)s?"


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return [sample_scene(0, i) for i in range(N_TRAIN)]


def _caption_counts(text: str) -> tuple[Counter, str | None]:
    """An independent reading of a caption: {(colour, shape): count} and the relation, if any."""
    m = re.fullmatch(rf"{_PHRASE} (to the left of|to the right of|above|below) {_PHRASE}", text)
    if m:
        g = m.groups()
        return Counter({(g[1], g[2]): 1, (g[5], g[6]): 1}), g[3].removeprefix("to the ")
    counts = Counter()
    for phrase in re.split(r", | and ", text):
        number, colour, shape = re.fullmatch(_PHRASE, phrase).groups()
        counts[(colour, shape)] += _WORDS[number]
    return counts, None


def test_items_are_deterministic_and_depend_only_on_seed_and_index():
    a, b = ShapesDataset(64, 50, seed=7), ShapesDataset(64, 1000, seed=7)
    for i in (0, 13, 49):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb and torch.equal(xa, xb)
        xa2, ca2 = ShapesDataset(64, 50, seed=7)[i]
        assert ca2 == ca and torch.equal(xa2, xa)
    assert ShapesDataset(128, 50, seed=7)[13][1] == a[13][1]  # same scene at every size
    other = [ShapesDataset(64, 50, seed=8)[i][1] for i in range(20)]
    assert other != [a[i][1] for i in range(20)]


def _kind(text: str) -> str:
    """The caption kind (`shapes.KINDS`) of a caption, read from its words alone."""
    counts, relation = _caption_counts(text)
    if relation is not None:
        return "position"
    if len(counts) == 1:
        return "single" if sum(counts.values()) == 1 else "counting"
    return "pair" if sum(counts.values()) == 2 else "group"


def test_default_mix_keeps_the_recorded_scenes():
    # Captions of data seed 4 (the bundled model's fourth continuation) before the mix was an
    # option: adding it must not change any recorded training set.
    assert [sample_scene(4, i).caption for i in range(3)] == [
        "a blue triangle",
        "a red square above a red circle",
        "a blue triangle to the left of a purple square",
    ]


def test_caption_mix_sets_the_kinds_shares():
    only = [ShapesDataset(64, 200, seed=3, mix={"position": 1.0}).scene(i) for i in range(200)]
    assert {_kind(s.caption) for s in only} == {"position"}
    assert all(len(s.objects) == 2 for s in only)
    # single and counting drawn equally; a counting caption is redrawn when its count is the
    # item's reserved one (1 of the 3 counts 2-4), a single one never: single = 0.5 / (0.5 + 1/3).
    data = ShapesDataset(64, 3000, seed=1, mix=parse_mix("single=1,counting=1"))
    kinds = Counter(_kind(data.scene(i).caption) for i in range(len(data)))
    assert set(kinds) == {"single", "counting"}
    share = kinds["single"] / len(data)
    print(f"single share {share:.3f}, expected 0.600")
    assert abs(share - 0.6) < 0.03  # 3.4 standard errors
    for bad, message in [
        ("single=1,circle=2", "'circle=2' is not kind=weight"),
        ("position", "'position' is not kind=weight"),
        ("single=-1,pair=2", "'single=-1' is not kind=weight"),
        ("single=0,pair=0", "weights must be >= 0 with a positive sum"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_mix(bad)
    with pytest.raises(ValueError, match="unknown caption kinds"):
        ShapesDataset(64, 3, seed=0, mix={"triangles": 1.0})


def test_item_format():
    image, text = ShapesDataset(64, 3, seed=0)[2]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1
    corner = image[:, 0, 0]  # the border is always background
    torch.testing.assert_close(corner, torch.tensor(BACKGROUND) / 127.5 - 1, rtol=0, atol=1e-6)
    assert isinstance(text, str) and text
    with pytest.raises(IndexError):
        ShapesDataset(64, 3, seed=0)[3]
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(16, 3, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(64, 3, seed=-1)


def test_palette_is_separable_and_background_is_not_a_colour():
    rgb = np.array(list(COLOURS.values()), float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + 1e9 * np.eye(len(rgb))
    print(f"closest palette colours: {distances.min():.1f} apart")
    assert distances.min() > 80
    assert np.linalg.norm(rgb - np.array(BACKGROUND), axis=-1).min() > 150


def test_render_draws_exact_colours_and_areas():
    square = SceneObject("blue", "square", (0.1, 0.1, 0.4, 0.4))
    circle = SceneObject("red", "circle", (0.5, 0.1, 0.9, 0.5))
    triangle = SceneObject("black", "triangle", (0.2, 0.55, 0.6, 0.95))
    size = 128
    rgb = np.asarray(render(Scene((square, circle, triangle), ""), size)).astype(float)
    assert tuple(rgb[32, 32]) == COLOURS["blue"]  # square centre
    assert tuple(rgb[38, 89]) == COLOURS["red"]  # circle centre
    assert tuple(rgb[112, 51]) == COLOURS["black"]  # low on the triangle's axis
    assert tuple(rgb[0, 0]) == BACKGROUND and tuple(rgb[75, 30]) == BACKGROUND
    # Anti-aliased coverage of each object = its analytic area (pixels).
    bg = np.array(BACKGROUND, float)
    for obj, area in [
        (square, (0.3 * size) ** 2),
        (circle, math.pi * (0.2 * size) ** 2),
        (triangle, (0.4 * size) ** 2 / 2),
    ]:
        x0, y0, x1, y1 = (round(v * size) for v in obj.bbox)
        patch = rgb[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2]
        d = np.array(COLOURS[obj.colour], float) - bg
        coverage = ((patch - bg) @ d / (d @ d)).sum()
        print(f"{obj.shape}: coverage {coverage:.1f} px, analytic {area:.1f} px")
        assert abs(coverage - area) / area < 0.015
    with pytest.raises(ValueError, match="size"):
        render(Scene((square,), ""), 31)


def test_captions_are_true_of_the_layout(train_scenes):
    for scene in train_scenes[:2000]:
        counts, relation = _caption_counts(scene.caption)
        assert Counter((o.colour, o.shape) for o in scene.objects) == counts, scene
        boxes = [o.bbox for o in scene.objects]
        for i, a in enumerate(boxes):
            assert 0.04 - 1e-9 <= min(a) and max(a) <= 0.96 + 1e-9
            assert abs((a[2] - a[0]) - (a[3] - a[1])) < 1e-9  # shapes are drawn in square boxes
            for b in boxes[i + 1 :]:  # separated by >= 0.06 along x or y
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 0.06 - 1e-9
        if relation is not None:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            dx = (ax0 + ax1 - bx0 - bx1) / 2
            dy = (ay0 + ay1 - by0 - by1) / 2
            gap, offset, other = {
                "left of": (bx0 - ax1, -dx, dy),
                "right of": (ax0 - bx1, dx, dy),
                "above": (by0 - ay1, -dy, dx),
                "below": (ay0 - by1, dy, dx),
            }[relation]
            # a clear gap along the named axis, and that axis dominates the offset
            assert gap >= 0.08 - 1e-9 and offset >= 2 * abs(other), scene


def test_mirror_pairs_swap_the_relation_in_image_and_caption(train_scenes):
    from sd3.shapes.evaluation import check
    from sd3.shapes.scenes import EvalPrompt

    kinds = Counter()
    for scene in train_scenes[:400]:
        m = mirror(scene)
        counts, relation = _caption_counts(scene.caption)
        m_counts, m_relation = _caption_counts(m.caption)
        assert m_counts == counts and m_relation == relation
        for o, r in zip(scene.objects, m.objects, strict=True):
            (x0, y0, x1, y1), (u0, v0, u1, v1) = o.bbox, r.bbox
            assert (o.colour, o.shape) == (r.colour, r.shape)
            if relation in ("above", "below"):  # reflected top to bottom
                assert (
                    (u0, u1) == (x0, x1) and math.isclose(v0, 1 - y1) and math.isclose(v1, 1 - y0)
                )
            else:  # left to right
                assert (
                    (v0, v1) == (y0, y1) and math.isclose(u0, 1 - x1) and math.isclose(u1, 1 - x0)
                )
        if relation is None:
            assert m.caption == scene.caption
        else:  # same words, objects swapped: "A rel B" -> "B rel A"
            words = {"left of": "to the left of", "right of": "to the right of"}
            a, b = scene.caption.split(f" {words.get(relation, relation)} ")
            assert m.caption == f"{b} {words.get(relation, relation)} {a}"
        # the checker, which reads only pixels, finds the mirror true of its caption
        spec = parse_caption(m.caption)
        category = "position" if relation else "two_objects"
        if len(spec.objects) <= 2 and all(o.count == 1 for o in spec.objects):
            assert check(render(m, 128), EvalPrompt(m.caption, category, spec)).passed, m
            kinds[relation] += 1
    assert all(kinds[r] > 20 for r in RELATIONS)
    pairs = ShapesDataset(64, 6, seed=3, mirror_pairs=True)
    for k in range(3):
        assert pairs.scene(2 * k) == sample_scene(3, k)
        assert pairs.scene(2 * k + 1) == mirror(sample_scene(3, k))
    with pytest.raises(ValueError, match="even length, got 5"):
        ShapesDataset(64, 5, seed=3, mirror_pairs=True)


def test_pair_contrast_by_hand():
    """Two pairs, the model predicting 0, x0 = 0: the errors are -noise. Pair 1 (1, 1) / (1, 1):
    |e1 - e2|^2 = 0. Pair 2 (1, 1) / (-1, -1): |e1 - e2|^2 = 8. Plain loss: mean e^2 = 1; the
    contrast term's mean of (e1 - e2)^2 / 2 over the 4 elements of the pairs' differences is
    (0 + 0 + 4 + 4) / 4 / 2 = 1, so at weight 0.5 the loss is 1.5."""
    noise = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]).reshape(4, 1, 1, 2)
    x0 = torch.zeros_like(noise)
    sigma = torch.full((4,), 0.5)
    context, pooled = torch.zeros(4, 3, 4), torch.zeros(4, 5)
    zero = lambda x, *_: torch.zeros_like(x)  # noqa: E731
    assert flow_loss(zero, x0, noise, sigma, context, pooled).item() == 1.0
    assert pair_contrast_loss(zero, x0, noise, sigma, context, pooled, weight=0.5).item() == 1.5
    # rows pair as (0, 1), (2, 3): the same rows with both pairs contrasting double the term
    assert (
        pair_contrast_loss(zero, x0, noise[[0, 3, 3, 1]], sigma, context, pooled, 0.5).item() == 2.0
    )


def test_training_covers_every_colour_shape_count_and_relation(train_scenes):
    items, counts, relations = Counter(), Counter(), Counter()
    for scene in train_scenes:
        c, relation = _caption_counts(scene.caption)
        items.update(c.keys())
        counts.update(c.values())
        relations[relation] += 1
    print(f"items seen {len(items)}, counts {dict(counts)}, relations {dict(relations)}")
    assert set(items) == set(TRAIN_ITEMS)
    assert min(items.values()) > 200
    assert set(counts) == {1, 2, 3, 4} and all(relations[r] > 200 for r in RELATIONS)
    assert {c for c, _ in items} == set(COLOURS) and {s for _, s in items} == set(SHAPES)


def test_no_heldout_combination_in_training(train_scenes):
    prompts = heldout_prompts()
    singles = {_item(p.spec.objects[0]) for p in prompts if p.category == "single_object"}
    counted = {
        (_item(p.spec.objects[0]), p.spec.objects[0].count)
        for p in prompts
        if p.category == "counting"
    }
    pairs = {
        frozenset(_item(o) for o in p.spec.objects)
        for p in prompts
        if p.category in ("two_objects", "colour_attr", "position")
    }
    train_captions = set()
    for scene in train_scenes:
        present = Counter((o.colour, o.shape) for o in scene.objects)
        assert not singles & set(present), scene.caption
        assert not counted & set(present.items()), scene.caption
        assert not any(pair <= set(present) for pair in pairs), scene.caption
        assert reserved_combinations(dict(present)) == []
        train_captions.add(scene.caption)
    assert not train_captions & {p.text for p in prompts}
    # ...and reserved_combinations does flag each held-out prompt's own scene
    for p in prompts:
        assert reserved_combinations({_item(o): o.count for o in p.spec.objects}), p.text


def _item(o: ObjectSpec) -> tuple[str, str]:
    return (o.colour, o.shape)


def test_heldout_prompts():
    prompts = heldout_prompts()
    counts = Counter(p.category for p in prompts)
    print(f"{len(prompts)} held-out prompts: {dict(counts)}")
    assert counts == {
        "single_object": 6,
        "two_objects": 26,
        "colour_attr": 14,
        "counting": 18,
        "position": 160,
    }
    assert set(counts) == set(CATEGORIES)
    assert len({p.text for p in prompts}) == len(prompts) == 224
    for p in prompts:
        assert parse_caption(p.text) == p.spec and caption(p.spec) == p.text
        items = {_item(o) for o in p.spec.objects}
        if p.category == "single_object":
            assert items <= HELDOUT_ITEMS and p.spec.objects[0].count == 1
        else:  # the other categories combine items that training does show
            assert items <= set(TRAIN_ITEMS)
        if p.category == "counting":
            assert len(items) == 1 and p.spec.objects[0].count in (2, 3, 4)
        if p.category in ("two_objects", "colour_attr"):
            shapes = {s for _, s in items}
            assert len(items) == 2 and (len(shapes) == 1) == (p.category == "colour_attr")
        assert (p.spec.relation is not None) == (p.category == "position")
    # The split is frozen: the reserved pairs are those whose hash falls under 30%.
    digest = hashlib.sha256(b"orange triangle & red circle").digest()  # names sorted
    assert int.from_bytes(digest[:4], "big") % 100 < 30
    assert "a red circle and an orange triangle" in {p.text for p in prompts}
    assert [p.text for p in prompts[:6]] == [
        "a red triangle",
        "an orange square",
        "a yellow circle",
        "a green triangle",
        "a blue square",
        "a purple circle",
    ]


def test_caption_grammar():
    spec = SceneSpec((ObjectSpec("orange", "circle"), ObjectSpec("blue", "triangle", 3)))
    assert caption(spec) == "an orange circle and three blue triangles"
    spec3 = SceneSpec(tuple(ObjectSpec(c, "square") for c in ("red", "green", "black")))
    assert caption(spec3) == "a red square, a green square and a black square"
    rel = SceneSpec((ObjectSpec("red", "circle"), ObjectSpec("cyan", "square")), "right of")
    assert caption(rel) == "a red circle to the right of a cyan square"
    for s in (spec, spec3, rel):
        assert parse_caption(caption(s)) == s
    for bad in ("a pink circle", "two red circle", "a red circles", "a red circle or a cube"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="at most 4"):
        caption(SceneSpec((ObjectSpec("red", "circle", 3), ObjectSpec("blue", "square", 2))))
    with pytest.raises(ValueError, match="relation"):
        caption(SceneSpec((ObjectSpec("red", "circle", 2), ObjectSpec("blue", "square")), "above"))
