"""The GenEval-style checker: it passes every correctly drawn held-out prompt and fails every
corrupted one, with and without noise and blur; evaluate/report/contact sheet/CLI."""

import argparse
import dataclasses
import json
import zlib
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sd3.shapes.evaluation import (
    SPLITS,
    CheckResult,
    add_arguments,
    check,
    check_arguments,
    classify_pixels,
    cleanliness,
    connected_components,
    detect_objects,
    evaluate,
    format_report,
    image_seed,
    perfect_generator,
    run,
    select_prompts,
    total_cleanliness,
    wrap_label,
)
from sd3.shapes.scenes import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    EvalPrompt,
    ObjectSpec,
    Scene,
    SceneSpec,
    heldout_prompts,
    layout,
    render,
    sample_scene,
)

PROMPTS = heldout_prompts()
# (noise std in 0-255 units, Gaussian blur radius in pixels) per image size: "mild" degradation.
DEGRADE = {64: (8.0, 0.8), 128: (12.0, 1.0)}


def degrade(image: Image.Image, sigma: float, blur: float, seed: int) -> Image.Image:
    image = image.filter(ImageFilter.GaussianBlur(blur))
    noise = np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).round().astype(np.uint8))


def tint(image: Image.Image, amount: float, seed: int) -> Image.Image:
    """A colour cast, as an undertrained model makes: per-channel gain and offset."""
    rng = np.random.default_rng(seed)
    gain, offset = rng.uniform(1 - amount, 1 + amount, 3), rng.uniform(-100, 100, 3) * amount
    return Image.fromarray(np.clip(np.asarray(image) * gain + offset, 0, 255).astype(np.uint8))


def _rng(prompt: EvalPrompt, k: int) -> np.random.Generator:
    return np.random.default_rng([k, zlib.crc32(prompt.text.encode())])


def _variants(image: Image.Image, size: int, seed: int) -> list[tuple[str, Image.Image]]:
    degraded = degrade(image, *DEGRADE[size], seed)
    return [("clean", image), ("degraded", degraded), ("tinted", tint(degraded, 0.08, seed))]


@pytest.mark.parametrize("size", [64, 128])
def test_perfect_renders_of_every_heldout_prompt_pass(size):
    prompts = PROMPTS if size == 64 else PROMPTS[::3]
    images = perfect_generator(size)([p.text for p in prompts], [0] * len(prompts))
    failures = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        for name, im in _variants(image, size, seed=i):
            result = check(im, prompt)
            if not result.passed:
                failures.append((name, prompt.text, result.reason))
    print(f"{size}px: {3 * len(prompts) - len(failures)}/{3 * len(prompts)} pass")
    assert failures == []


def _corruptions(prompt: EvalPrompt, rng: np.random.Generator) -> dict[str, Scene]:
    """Scenes that must fail the prompt, each with one thing wrong."""
    spec = prompt.spec
    scene = layout(spec, rng)
    first = scene.objects[0]
    other_colour = next(c for c in COLOURS if c != first.colour)
    other_shape = next(s for s in SHAPES if s != first.shape)
    bad = {
        "wrong colour": dataclasses.replace(first, colour=other_colour),
        "wrong shape": dataclasses.replace(first, shape=other_shape),
    }
    out = {name: Scene((obj,) + scene.objects[1:], "") for name, obj in bad.items()}
    out["missing object"] = Scene(scene.objects[1:], "")
    if prompt.category == "counting":
        want = spec.objects[0]
        more = want.count + 1 if want.count < 4 else want.count - 1
        out["wrong count"] = layout(SceneSpec((dataclasses.replace(want, count=more),)), rng)
        if want.count < 4:
            extra = ObjectSpec(*next(i for i in _ITEMS if i != (want.colour, want.shape)))
            out["extra object"] = layout(SceneSpec((want, extra)), rng)
    if spec.relation is not None:
        a, b = scene.objects
        out["swapped positions"] = Scene(
            (dataclasses.replace(a, bbox=b.bbox), dataclasses.replace(b, bbox=a.bbox)), ""
        )
        turned = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}
        out["perpendicular"] = layout(
            dataclasses.replace(spec, relation=turned[spec.relation]), rng
        )
    out["blank"] = Scene((), "")
    return out


_ITEMS = [(c, s) for c in COLOURS for s in SHAPES]


@pytest.mark.parametrize("size", [64, 128])
def test_corrupted_renders_fail(size):
    prompts = PROMPTS if size == 64 else PROMPTS[1::4]
    # the reason must name the defect, not some detection accident
    reasons = {
        "swapped positions": "no pair is",
        "perpendicular": "no pair is",
        "extra object": "and nothing else",
        "blank": "saw nothing",
    }
    kinds = {"swapped positions": "swapped", "perpendicular": "misplaced", "extra object": "extra"}
    tried, passed_wrongly, wrong_reason = Counter(), [], []
    for i, prompt in enumerate(prompts):
        for name, scene in _corruptions(prompt, _rng(prompt, 1)).items():
            want = prompt.spec.objects[0].count
            kind = kinds.get(name, "missing")
            if name == "wrong count":  # one more, or one fewer than 4
                kind = "extra" if want < 4 else "missing"
            for variant, image in _variants(render(scene, size), size, seed=i)[::2]:
                tried[name] += 1
                result = check(image, prompt)
                if result.passed:
                    passed_wrongly.append((name, variant, prompt.text))
                elif reasons.get(name, "") not in result.reason or result.failure != kind:
                    wrong_reason.append((name, variant, prompt.text, result.reason, result.failure))
    print(f"{size}px corrupted renders, all must fail: {dict(tried)}")
    assert passed_wrongly == [] and wrong_reason == []
    assert tried["swapped positions"] > 0 and tried["wrong count"] > 0


def test_extra_objects_fail_only_counting_prompts():
    passed = Counter()
    for prompt in PROMPTS:
        if prompt.spec.relation is not None or sum(o.count for o in prompt.spec.objects) > 3:
            continue
        items = {(o.colour, o.shape) for o in prompt.spec.objects}
        extra = ObjectSpec(*next(i for i in _ITEMS if i not in items))
        scene = layout(
            dataclasses.replace(prompt.spec, objects=prompt.spec.objects + (extra,)),
            _rng(prompt, 2),
        )
        result = check(render(scene, 64), prompt)
        assert result.passed == (prompt.category != "counting"), (prompt.text, result.reason)
        passed[prompt.category] += 1
    assert set(passed) == {"single_object", "two_objects", "colour_attr", "counting"}


@pytest.mark.parametrize("size", [64, 128])
def test_detection_matches_the_scene(size):
    worst = [0.0, 0.0]  # clean, degraded (blur eats into the triangles' apex)
    for i in range(150):
        scene = sample_scene(3, i)
        image = render(scene, size)
        if i % 2:
            image = degrade(image, *DEGRADE[size], seed=i)
        found = detect_objects(image)
        assert len(found) == len(scene.objects), (scene.caption, found)
        for t in scene.objects:  # the detection whose box is nearest each true object
            box = np.array(t.bbox) * size
            errors = [np.abs(np.array(o.bbox) - box).max() for o in found]
            o = found[int(np.argmin(errors))]
            assert (o.colour, o.shape) == (t.colour, t.shape), (scene.caption, found)
            worst[i % 2] = max(worst[i % 2], min(errors))
    print(f"{size}px: worst bbox error {worst[0]:.2f} px clean, {worst[1]:.2f} px degraded")
    assert worst[0] <= 1.0 and worst[1] <= 2.5


def test_classify_pixels_on_pure_and_mixed_colours():
    bg = np.array(BACKGROUND, float)
    rows = []
    for rgb in COLOURS.values():
        c = np.array(rgb, float)
        rows.append([c, 0.75 * c + 0.25 * bg, 0.55 * c + 0.45 * bg, 0.45 * c + 0.55 * bg, bg])
    label, alpha = classify_pixels(np.array(rows).round().astype(np.uint8))
    assert (label[:, :3] == np.arange(len(COLOURS))[:, None]).all()
    np.testing.assert_allclose(
        alpha[:, :4], np.tile([1, 0.75, 0.55, 0.45], (len(COLOURS), 1)), atol=0.01
    )
    assert (alpha[:, 4] == 0).all()
    # far from every palette colour and from the background: "unknown", counted as an object
    label, alpha = classify_pixels(np.array([[[255, 150, 255], [255, 255, 255]]], np.uint8))
    assert (label == len(COLOURS)).all() and (alpha == 1).all()


def _bfs_components(mask: np.ndarray) -> list[frozenset]:
    seen, comps = set(), []
    for start in zip(*np.nonzero(mask), strict=True):
        if start in seen:
            continue
        comp, queue = set(), deque([start])
        seen.add(start)
        while queue:
            y, x = queue.popleft()
            comp.add((y, x))
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (
                    0 <= q[0] < mask.shape[0]
                    and 0 <= q[1] < mask.shape[1]
                    and mask[q]
                    and q not in seen
                ):
                    seen.add(q)
                    queue.append(q)
        comps.append(frozenset(comp))
    return comps


def test_connected_components_match_breadth_first_search():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 50)) < density
        labels, n = connected_components(mask)
        ours = {frozenset(zip(*np.nonzero(labels == k), strict=True)) for k in range(n)}
        assert ours == set(_bfs_components(mask)) and n == len(ours)
        assert (labels[~mask] == -1).all()
    spiral = np.zeros((9, 9), bool)  # a long winding path is still one component
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = True
    spiral[2:7, 6] = spiral[6, 2:7] = spiral[4:7, 2] = True
    assert connected_components(spiral)[1] == 1


def test_evaluate_reports_known_accuracy(tmp_path, capsys):
    prompts = select_prompts(PROMPTS, limit=20)
    perfect = perfect_generator(64)
    blank = Image.new("RGB", (64, 64), BACKGROUND)

    def half_right(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        # right for the prompts at even positions in the list, in the first seed round only
        good = perfect(texts, seeds)
        return [
            g if s == image_seed(0, t) and texts.index(t) % 2 == 0 else blank
            for t, s, g in zip(texts, seeds, good, strict=True)
        ]

    sheet = tmp_path / "sheet.png"
    report = evaluate(half_right, prompts, seeds_per_prompt=2, contact_sheet=sheet, batch_size=4)
    expected = Counter()
    totals = Counter()
    for i, p in enumerate(prompts):
        expected[p.category] += i % 2 == 0  # batches of 4 keep list parity
        totals[p.category] += 2
    assert report.counts == {c: (expected[c], totals[c]) for c in totals}
    assert report.per_category == {c: expected[c] / totals[c] for c in totals}
    assert report.overall == pytest.approx(np.mean([expected[c] / totals[c] for c in totals]))
    assert len(report.results) == 40 and all(
        isinstance(r, CheckResult) for _, _, r in report.results
    )
    out = capsys.readouterr().out
    assert out.strip() == format_report(report) and "position" in out and "overall" in out
    # the blank images fail for a missing object; perfect ones have no failure kind
    failed = 40 - sum(expected.values())
    assert out.strip().splitlines()[-2] == f"failed images: missing {failed}"
    assert all((r.failure is None) == r.passed for *_, r in report.results)
    # cleanliness: the blank images add pixels only; the renders are those of every image's seed
    good = [perfect([p.text], [image_seed(0, p.text)])[0] for p in prompts[::2]]
    edges = total_cleanliness(good)
    assert report.clean == dataclasses.replace(edges, pixels=40 * 64 * 64)
    every = [perfect([p.text], [image_seed(r, p.text)])[0] for r in (0, 1) for p in prompts]
    assert report.rendered == total_cleanliness(every) and report.rendered.ghost == 0
    assert out.strip().splitlines()[-1] == (
        f"edges {edges.edge_width:.2f} px wide (renders {report.rendered.edge_width:.2f}), "
        "ghosts 0.00% of the pixels (renders 0.00%)"
    )
    assert report.to_dict()["edge_width"] == round(edges.edge_width, 3)
    grid = np.asarray(Image.open(sheet).convert("RGB"))
    cell_w = 2 * 64 + 8  # 64 px images shown at 2x, framed by 4 px
    assert grid.shape[1] == 16 * cell_w  # 40 cells, 16 columns, 3 rows
    assert tuple(grid[1, 1]) == (0, 170, 0)  # prompt 0, round 0: passed -> green frame
    assert tuple(grid[1, cell_w + 1]) == (210, 0, 0)  # prompt 1: blank -> red frame
    row = grid.shape[0] // 3  # under each image its label: the prompt, wrapped to the cell
    assert grid.shape[0] == 3 * row and row > cell_w
    assert (grid[cell_w:row, :cell_w].sum(axis=2) < 200).any()
    font = ImageFont.load_default()
    text = "p0 r0: " + max((p.text for p in prompts), key=len)
    lines = wrap_label(text, font, cell_w)
    assert " ".join(lines) == text and len(lines) > 1
    assert all(font.getlength(line) <= cell_w for line in lines)
    with pytest.raises(ValueError, match="returned 1 images"):
        evaluate(lambda texts, seeds: [blank], prompts[:2])
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        evaluate(perfect, prompts, seeds_per_prompt=0)


def test_select_prompts_round_robin_and_errors():
    chosen = select_prompts(PROMPTS, ["position", "counting"], limit=7)
    assert [p.category for p in chosen] == ["position", "counting"] * 3 + ["position"]
    assert len(select_prompts(PROMPTS)) == len(PROMPTS)
    with pytest.raises(ValueError, match="colours"):
        select_prompts(PROMPTS, ["colours"])
    with pytest.raises(ValueError, match="limit"):
        select_prompts(PROMPTS, limit=0)


def test_run_with_oracle_and_with_a_generator(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sheet = tmp_path / "out" / "sheet.png"
    sheet.parent.mkdir()  # sd3 writes into existing folders only
    args = parser.parse_args(
        [
            "--oracle",
            "64",
            "--limit",
            "10",
            "--categories",
            "position,counting",
            "--contact-sheet",
            str(sheet),
        ]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "position" in out and "counting" in out and "single_object" not in out
    assert "1.000" in out.splitlines()[-2] and sheet.exists()
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    args = parser.parse_args(["--limit", "5", "--seeds", "2"])
    calls = []

    def generate(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append((len(texts), seeds))
        return [blank] * len(texts)

    assert run(args, generate) == 0
    texts = [p.text for p in select_prompts(PROMPTS, limit=5)]
    assert calls == [(5, [image_seed(r, t) for t in texts]) for r in (0, 1)]
    lines = capsys.readouterr().out.splitlines()
    assert "0.000" in lines[-3] and lines[-2] == "failed images: missing 10"
    assert lines[-1].startswith("edges none found (renders ") and "ghosts 0.00%" in lines[-1]
    assert run(parser.parse_args([])) == 2


def test_each_image_has_its_own_seed_whatever_the_batching():
    # a deterministic generator that draws some seeds right and leaves the others blank
    prompts = select_prompts(PROMPTS, limit=23)
    perfect, blank = perfect_generator(64), Image.new("RGB", (64, 64), BACKGROUND)
    given = []

    def some_right(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        given.append(list(zip(texts, seeds, strict=True)))
        good = perfect(texts, seeds)
        return [g if s % 3 else blank for s, g in zip(seeds, good, strict=True)]

    reports = [evaluate(some_right, prompts, 2, batch_size=b) for b in (16, 5)]
    assert reports[0].results == reports[1].results
    assert 0 < sum(r.passed for *_, r in reports[0].results) < 46
    by_batch = [[pair for batch in given[:4] for pair in batch], [p for b in given[4:] for p in b]]
    assert by_batch[0] == by_batch[1] and len(by_batch[0]) == 46
    seeds = [s for _, s in by_batch[0]]
    assert len(set(seeds)) == 46  # no two images of the eval share their noise
    # a subset of the prompts keeps each prompt's seeds
    assert image_seed(1, prompts[7].text) in seeds
    sub = evaluate(some_right, [prompts[7]], 2)
    assert [(r.passed, r.reason) for *_, r in sub.results] == [
        (r.passed, r.reason) for i, _, r in reports[0].results if i == 7
    ]


def test_val_and_test_splits_use_disjoint_seeds(tmp_path, capsys):
    assert SPLITS == {"val": (0, 1, 2, 3, 4, 5), "test": (100, 101, 102, 103, 104, 105)}
    seeds = {
        split: {image_seed(r, p.text) for r in rounds for p in PROMPTS}
        for split, rounds in SPLITS.items()
    }
    assert len(seeds["val"]) == 6 * 224 and len(seeds["test"]) == 6 * 224
    assert not seeds["val"] & seeds["test"]
    assert all(0 <= s < 2**63 for s in seeds["val"] | seeds["test"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "report.json"
    argv = ["--oracle", "64", "--limit", "3", "--split", "test", "--seeds", "4", "--json", str(out)]
    assert run(parser.parse_args(argv)) == 0
    report = capsys.readouterr().out
    assert (
        report.splitlines()[0] == "split test, seed rounds 100, 101, 102, 103 (4 images per prompt)"
    )
    data = json.loads(out.read_text())
    assert data["split"] == "test" and data["rounds"] == [100, 101, 102, 103]
    assert data["all_images"] == "12/12" and data["overall"] == 1.0
    for bad, message in (
        (["--split", "val", "--seeds", "7"], "--seeds must be 1 to 6 for --split val"),
        (["--split", "test", "--seeds", "0"], "--seeds must be 1 to 6 for --split test"),
        (["--json", str(tmp_path / "r.txt")], "--json"),
    ):
        with pytest.raises(ValueError, match=message):
            check_arguments(parser.parse_args(bad))
    with pytest.raises(SystemExit):
        parser.parse_args(["--split", "train"])
    assert "argument --split: invalid choice: 'train'" in capsys.readouterr().err


def _one_object(shape: str, size: int, side: float, corner: float, blur: float) -> Image.Image:
    """One cyan circle or square (corners rounded by `corner` * side) at the centre, drawn at 4x
    and box-downsampled as `render` draws, then blurred as a generated image is soft."""
    big = size * 4
    image = Image.new("RGB", (big, big), BACKGROUND)
    s = side * big
    x0 = (big - s) / 2 + 1.5  # off the pixel grid, as a generated object is
    box = (x0, x0, x0 + s - 1, x0 + s - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS["cyan"])
    else:
        draw.rounded_rectangle(box, radius=corner * s, fill=COLOURS["cyan"])
    image = image.reduce(4)
    return image.filter(ImageFilter.GaussianBlur(blur)) if blur else image


@pytest.mark.parametrize("size", [64, 128])
def test_circles_and_squares_are_told_from_squares_with_rounded_corners(size):
    blurs = {64: (0, 0.8), 128: (0, 1.0, 2.0)}[size]
    sides = (0.17, 0.22, 0.28, 0.34)
    shapes = Counter()
    for side in sides:
        for blur in blurs:
            for shape, corner in (("circle", 0), ("square", 0), ("square", 0.1)):
                found = detect_objects(_one_object(shape, size, side, corner, blur))
                assert [o.shape for o in found] == [shape], (shape, corner, side, blur, found)
            if size == 128:  # at 64x64 an 11-pixel square rounded by a quarter is a blob
                for corner in (0.25, 0.3, 0.35):
                    found = detect_objects(_one_object("square", size, side, corner, blur))
                    shapes[found[0].shape] += 1
                    assert found[0].shape != "circle", (corner, side, blur)
    assert size == 64 or shapes["square"] > 0 and shapes[None] > 0


def _mix(colour: str, alpha: np.ndarray) -> np.ndarray:
    """Pixels that are `alpha` of the way from the background to `colour`, as 8-bit sRGB."""
    bg, c = np.array(BACKGROUND, float), np.array(COLOURS[colour], float)
    return (bg + alpha[..., None] * (c - bg)).round().astype(np.uint8)


def test_edge_width_is_the_ten_to_ninety_percent_rise():
    # a red half-plane on the left, its edge a linear ramp of r pixels: alpha steps of 1/(r + 1)
    # lie inside (0.1, 0.9) r times per row for r <= 7, and every row crosses alpha = 0.5 once
    for ramp in (0, 1, 4):
        alpha = np.zeros((30, 40))
        alpha[:, :15] = 1
        alpha[:, 15 : 15 + ramp] = 1 - np.arange(1, ramp + 1) / (ramp + 1)
        clean = cleanliness(Image.fromarray(_mix("red", alpha)))
        assert (clean.transition, clean.outline, clean.ghost) == (30 * ramp, 30, 0)
        assert clean.edge_width == ramp
    # a square's four sides along the grid: one outline pair per pixel of side, each way
    alpha = np.zeros((40, 40))
    alpha[10:20, 10:20] = 1
    alpha[9, 10:20] = alpha[20, 10:20] = alpha[10:20, 9] = alpha[10:20, 20] = 0.5 - 0.1
    clean = cleanliness(Image.fromarray(_mix("blue", alpha)))
    assert (clean.transition, clean.outline) == (40, 40) and clean.edge_width == 1


def test_ghosts_are_off_background_pixels_away_from_objects():
    alpha = np.zeros((40, 60))
    alpha[5:15, 5:15] = 1  # an object
    alpha[30:34, 40:45] = 0.2  # a faint blob far from it: 20 pixels
    alpha[5:15, 16:18] = 0.2  # a faint band 2-3 pixels from it: part of its edge, not a ghost
    image = _mix("blue", alpha)
    image[0, 59] = (220, 220, 220)  # paler than the background by 20 sRGB levels per channel
    image[39, 0] = (205, 205, 205)  # by 8.7: within the background's noise
    clean = cleanliness(Image.fromarray(image))
    assert clean.ghost == 20 + 1 and clean.pixels == 40 * 60
    assert clean.ghost_share == 21 / 2400
    assert clean.transition == 2 * 10  # the band; the blob is not an edge
    # renders: every anti-aliased pixel lies next to its object
    renders = total_cleanliness([render(sample_scene(3, i), 128) for i in range(20)])
    assert renders.ghost == 0 and 0.4 < renders.edge_width < 1
