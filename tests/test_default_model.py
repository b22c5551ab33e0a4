"""The bundled default model (scripts/train_default_model.py): a small model in the full SD3.5
architecture that `sd3 generate` uses when no --model is given."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3.checkpoints import find_components, infer_config, open_controlnet
from sd3.cli import DEFAULT_MODEL, main
from sd3.pipeline import Pipeline
from sd3.shapes.evaluation import detect_objects
from sd3.shapes.scenes import render_edges, sample_scene


def test_bundled_model_is_a_complete_sd35_family():
    components = find_components(DEFAULT_MODEL)
    assert set(components) >= {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    mmdit = infer_config(components["mmdit"])
    assert mmdit.qk_norm and mmdit.attn2_layers == (0, 1, 2)  # MMDiT-X, as SD3.5 Medium
    assert (mmdit.hidden_size, mmdit.depth) == (192, 6)
    assert infer_config(components["clip_g"]).project_pooled
    assert not infer_config(components["clip_l"]).project_pooled
    pipe = Pipeline.from_single_file(DEFAULT_MODEL)
    p = pipe.preset
    assert (p.size, p.steps, p.cfg, p.sampler, p.t5_length) == (128, 20, 2.0, "euler", 24)
    assert p.clip_length == 24  # the model reads 24 CLIP positions: a 48-token context
    context, pooled = pipe.text_encoders(t5_length=p.t5_length).encode("a red circle")
    assert context.shape == (1, 48, 128) and pooled.shape == (1, 128)


def test_generate_without_model_draws_the_named_colour(tmp_path, capsys):
    out = tmp_path / "default.png"
    assert (
        main(["generate", "a yellow triangle", "--seed", "3", "--dtype", "fp32", "--out", str(out)])
        == 0
    )
    image = Image.open(out)
    assert image.size == (128, 128)
    assert json.loads(image.info["sd3"])["settings"]["prompt"] == "a yellow triangle"
    found = detect_objects(image.convert("RGB"))  # the eval checker, independent of the model
    assert "yellow" in {o.colour for o in found}, found
    assert np.asarray(image).std() > 5  # not a flat image
    assert capsys.readouterr().err.startswith("sd3 shapes (bundled), fp32")


def test_a_copy_of_the_bundled_file_is_not_called_bundled(tmp_path, capsys):
    copy = tmp_path / "mine.safetensors"
    copy.write_bytes(DEFAULT_MODEL.read_bytes())
    args = ["generate", "a red circle", "--steps", "1", "--model", str(copy)]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().err.startswith("sd3 shapes, ")


def test_recipe_without_any_mmdit_stage_or_init_is_one_argument_error(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "train_one_stage.py"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "run"), "--steps", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2  # argparse's usage error, before any folder or training
    assert "--steps and --base-steps are both 0 and there is no --init" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()


def test_relation_order_probe_captions_and_run():
    """The probe's false captions, by hand, and one run on the bundled model (4 scenes)."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "probe_relation_order.py"
    spec = importlib.util.spec_from_file_location("probe_relation_order", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.false_captions("a red circle above a blue square") == (
        "a blue square above a red circle",
        "a red circle above a purple square",  # blue -> the next palette colour, purple
    )
    assert probe.false_captions("a black square to the left of a purple circle") == (
        "a purple circle to the left of a black square",
        "a black square to the left of a red circle",  # past black, from the start; red is free
    )
    run = subprocess.run(
        [sys.executable, str(path), "--scenes", "4"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[1:]]
    assert [float(r[0]) for r in rows] == list(probe.SIGMAS)
    for r in rows:  # loss, swapped %, control %, share in [0, 1] (a multiple of 1/12)
        assert float(r[1]) > 0 and r[2].endswith("%") and r[3].endswith("%")
        assert abs(float(r[4]) * 12 - round(float(r[4]) * 12)) < 0.01  # printed to 3 places


def test_reinit_mmdit_keeps_the_init_files_encoders_and_vae(tmp_path):
    """--init FILE --reinit-mmdit: the export's VAE and text encoders are FILE's, tensor for tensor,
    and its MMDiT is a fresh one of --hidden/--depth; without --init it is one argument error."""
    from safetensors.torch import load_file

    script = Path(__file__).parents[1] / "scripts" / "train_one_stage.py"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "no"), "--reinit-mmdit"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "--reinit-mmdit needs --init" in run.stderr
    assert not (tmp_path / "no").exists()
    out = tmp_path / "model.safetensors"
    args = ["--out", str(tmp_path / "run"), "--init", str(DEFAULT_MODEL), "--reinit-mmdit",
            "--hidden", "64", "--depth", "2", "--scenes", "8", "--batch-size", "4",
            "--base-steps", "2", "--steps", "0", "--warmup", "1", "--export", str(out)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    before, after = load_file(str(DEFAULT_MODEL)), load_file(str(out))
    kept = [k for k in before if not k.startswith("model.diffusion_model.")]
    assert kept and all(before[k].equal(after[k]) for k in kept)
    mmdit = infer_config(find_components(out)["mmdit"])
    assert (mmdit.hidden_size, mmdit.depth) == (64, 2)


def test_relation_order_probe_size_must_fit_the_latent_grid():
    path = Path(__file__).parents[1] / "scripts" / "probe_relation_order.py"
    run = subprocess.run(
        [sys.executable, str(path), "--size", "72"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "--size must be a multiple of 16" in run.stderr
    assert "Traceback" not in run.stderr


def _recipe(*args: str) -> subprocess.CompletedProcess:
    script = Path(__file__).parents[1] / "scripts" / "train_default_model.py"
    return subprocess.run(
        [sys.executable, str(script), "--quick", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_recipe_stopped_and_resumed_exports_what_one_run_does(tmp_path):
    """The whole recipe (--quick: a few steps per stage) run once, and run again stopped after a
    middle stage and resumed from what a kept run holds (its records and the latest weights of
    each kind), exports the same weights bit for bit (CPU, fp32); changed settings are one clear
    error; record.json holds one record per stage."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    whole = _recipe("--out", str(tmp_path / "whole"), "--export", str(one))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "position-1" in whole.stderr and "total" in whole.stderr  # the budget table, up front
    assert "stage 8/8 controlnet" in whole.stderr  # the one progress bar

    run = tmp_path / "run"
    missing = _recipe("--out", str(run), "--export", str(two), "--resume")
    assert missing.returncode == 2 and "holds no run to continue" in missing.stderr
    part = _recipe("--out", str(run), "--export", str(two), "--stop-after", "mixed-1")
    assert part.returncode == 0, part.stderr[-2000:]
    assert (run / "mixed-1" / "done.json").is_file() and not (run / "position-2").exists()
    assert not two.exists()  # a partial run exports nothing
    done = json.loads((run / "record.json").read_text())["stages"]
    assert [r["stage"] for r in done] == ["text", "vae", "position-1", "mixed-1"]
    kept = {"recipe.json", "record.json", "done.json", "log.jsonl", "text_encoders.safetensors",
            "vae.safetensors"}  # fmt: skip
    latest = {"mixed-1": "mmdit.safetensors"}  # position-1's weights go: mixed-1's replace them
    for path in run.rglob("*"):
        if path.is_file() and path.name not in kept and latest.get(path.parent.name) != path.name:
            path.unlink()

    changed = _recipe("--out", str(run), "--export", str(two), "--seed", "1")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "seed=0" in changed.stderr and "seed=1" in changed.stderr, changed.stderr
    assert not (run / "position-2").exists()

    # the recipe edited after the run started: in a stage begun, refused; in one not begun, taken
    recipe = json.loads((run / "recipe.json").read_text())
    edited = json.loads(json.dumps(recipe))
    edited["stages"][2]["steps"] += 1
    (run / "recipe.json").write_text(json.dumps(edited))
    begun = _recipe("--out", str(run), "--export", str(two), "--resume")
    assert begun.returncode == 2 and "stage 3 (position-1, started) has steps=" in begun.stderr
    edited = json.loads(json.dumps(recipe))
    edited["stages"][5]["steps"] += 1
    (run / "recipe.json").write_text(json.dumps(edited))

    rest = _recipe("--out", str(run), "--export", str(two), "--resume")
    assert "stages changed" in rest.stderr
    assert json.loads((run / "recipe.json").read_text()) == recipe
    assert rest.returncode == 0, rest.stderr[-2000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    cn_one, cn_two = (p.with_name(f"{p.stem}_controlnet_canny.safetensors") for p in (one, two))
    a, b = load_file(str(cn_one)), load_file(str(cn_two))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    component = open_controlnet(cn_one)  # a canny ControlNet that fits the model it was made for
    assert component.control_type == "canny"
    assert json.loads(component.metadata["sd3_preset"])["size"] == 128
    pipe = Pipeline.from_single_file(one, dtype=torch.float32, controlnets=[cn_one])
    edges = render_edges(sample_scene(7, 0), 64)
    pipe("a red circle", seed=0, num_inference_steps=1, width=64, height=64,
         control_images=[edges])  # fmt: skip

    record = json.loads((run / "record.json").read_text())
    stages = record["stages"]
    assert [r["stage"] for r in stages] == [
        "text", "vae", "position-1", "mixed-1", "position-2", "mixed-2", "decoder", "controlnet"
    ]  # fmt: skip
    measured = stages[-2]["reconstruction_after"]
    assert set(measured) == {"64", "128"} and measured["128"]["images"] == 4
    assert stages[:4] == done  # the stages done before the stop were not run again
    for r in stages:
        assert r["seconds"] > 0 and r["loss"] > 0 and r["budget_minutes"] >= 0
        assert r["images_per_s"] is None if r["kind"] == "text" else r["images_per_s"] > 0
        assert r["precision"] == "fp32"
        assert {"cpu", "bf16", "amx", "avx2", "torch", "threads"} <= r["machine"].keys()
