"""`sd3 generate` and `sd3 inspect` end to end on a tiny checkpoint in the official layout."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import save_single_file, tiny_models
from PIL import Image
from safetensors.torch import load_file

from sd3.cli import main
from sd3.kernels import hardware
from sd3.models.vae import to_latent_format
from sd3.pipeline import Pipeline


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=4)


@pytest.fixture(scope="module")
def model_file(models, tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", models)


def generate(model_file, out, *extra):
    base = [
        "generate",
        "--model",
        str(model_file),
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "48",
    ]
    return main([*base, "--dtype", "fp32", "--out", str(out), *extra])


def image_text(path):
    with Image.open(path) as image:
        return "".join(image.text.values())


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_png_with_metadata_and_latent(model_file, models, tmp_path, capsys):
    out, latent_file = tmp_path / "a.png", tmp_path / "a.safetensors"
    rc = generate(
        model_file,
        out,
        "a red circle",
        "--seed",
        "11",
        "--cfg",
        "3.5",
        "--save-latent",
        str(latent_file),
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(r"denoising \d+\.\ds \(\d+\.\d\ds per step\)", err), err
    with Image.open(out) as image:
        assert image.size == (32, 48)
        params, stored = image.text["parameters"], json.loads(image.text["sd3"])
    assert params.startswith(
        "a red circle\nNegative prompt: \nSteps: 3, Sampler: euler, CFG scale: 3.5, Seed: 11"
    )
    assert "Size: 32x48" in params
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:10]
    assert stored["settings"]["seed"] == 11
    assert stored["files"]["model"] == {"name": model_file.name, "sha256": digest}  # no folder
    assert str(model_file.parent) not in image_text(out) and f"Model hash: {digest}" in params

    # The saved latent is what the VAE decodes into the PNG.
    latent = load_file(str(latent_file))["latent"]
    assert latent.shape == (1, 16, 6, 4)
    with torch.no_grad():
        decoded = models["vae"].decode(to_latent_format(latent))
    expected = (
        ((decoded[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )
    assert np.abs(expected.astype(int) - pixels(out).astype(int)).max() <= 1


def test_from_png_reproduces_bit_for_bit(model_file, tmp_path, capsys):
    first, again, other = tmp_path / "1.png", tmp_path / "2.png", tmp_path / "3.png"
    given = ["--seed", "5", "--negative", "blurry", "--cfg-end", "0.5"]
    assert generate(model_file, first, "two blue squares", *given) == 0
    # the PNG names the model file, not its folder: not beside the PNG, it must be given again
    assert main(["generate", "--from-png", str(first), "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the model file 'tiny.safetensors'" in err and "--model" in err and not again.exists()
    shutil.copy(model_file, tmp_path / model_file.name)  # beside the PNG: found by name and hash
    assert main(["generate", "--from-png", str(first), "--out", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    with Image.open(first) as a, Image.open(again) as b:
        assert a.text["sd3"] == b.text["sd3"]
        assert json.loads(a.text["sd3"])["settings"]["cfg_end"] == 0.5
        assert "CFG interval: 0.0-0.5" in a.text["parameters"]
    # a setting given on the command line overrides the stored one
    assert main(["generate", "--from-png", str(first), "--out", str(other), "--seed", "6"]) == 0
    assert not np.array_equal(pixels(first), pixels(other))


def test_empty_prompt_draws_unconditionally_and_no_prompt_is_an_error(model_file, tmp_path, capsys):
    out = tmp_path / "empty.png"
    assert generate(model_file, out, "", "--seed", "3") == 0
    with Image.open(out) as image:
        assert json.loads(image.text["sd3"])["settings"]["prompt"] == ""
    pipe = Pipeline.from_single_file(model_file, dtype=torch.float32)
    expected = pipe("", num_inference_steps=3, width=32, height=48, seed=3)[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert main(["generate", "--model", str(model_file), "--out", str(tmp_path / "x.png")]) == 2
    assert "give a prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, warned", [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False), (set(), False)]
)
def test_bf16_on_a_cpu_without_bf16_warns_in_one_line(
    model_file, tmp_path, capsys, monkeypatch, flags, warned
):
    """AVX2-only x86 CPUs emulate bf16 (~100x slower matmuls than fp32): asking for it warns;
    CPUs with AVX-512 BF16 and unknown ones (flags unread) do not."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert generate(model_file, tmp_path / "w.png", "a red circle", "--dtype", "bf16") == 0
    err = capsys.readouterr().err
    expected = "sd3 generate: warning: bf16 on the CPU: this CPU has no bf16 arithmetic"
    assert (expected in err) == warned
    assert "Warning" not in err  # not Python's two-line format with the source line


def test_low_memory_mode_draws_the_same_picture(model_file, tmp_path, capsys):
    plain, lean = tmp_path / "plain.png", tmp_path / "lean.png"
    assert generate(model_file, plain, "a red circle", "--no-low-memory") == 0
    assert "low-memory mode" not in capsys.readouterr().err
    assert generate(model_file, lean, "a red circle", "--low-memory") == 0
    assert "low-memory mode" in capsys.readouterr().err
    assert np.array_equal(pixels(plain), pixels(lean))


def test_batch_writes_one_file_per_seed(model_file, tmp_path):
    out = tmp_path / "b.png"
    assert generate(model_file, out, "a cat", "--seed", "2", "--batch", "2") == 0
    second = tmp_path / "b-1.png"
    with Image.open(second) as image:
        assert json.loads(image.text["sd3"])["settings"]["seed"] == 3
    alone = tmp_path / "alone.png"
    assert generate(model_file, alone, "a cat", "--seed", "3") == 0
    # The same image: a batch of 2 runs the MMDiT's GEMMs at twice the rows, whose fp32 sums may
    # round differently (latents within 2e-5), so a pixel may land one level off.
    diff = np.abs(pixels(second).astype(int) - pixels(alone).astype(int))
    print(
        f"batch image vs alone: max pixel difference {diff.max()}, {np.mean(diff > 0):.1%} differ"
    )
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.02


def test_img2img(model_file, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((48, 32, 3), 200, np.uint8)).save(init)
    out = tmp_path / "i.png"
    assert generate(model_file, out, "a cat", "--init-image", str(init), "--denoise", "0.5") == 0
    with Image.open(out) as image:
        assert "Denoising strength: 0.5" in image.text["parameters"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "1000"], "width 1000 must be a positive multiple of 16: try 992 or 1008"),
        (["--width", "1024"], "width 1024 is larger than this model allows \\(256\\)"),
        (["--steps", "0"], "steps must be a whole number >= 1"),
        (["--cfg", "nan"], "cfg \\(guidance scale\\) must be a finite number"),
        (["--denoise", "1.5", "--init-image", "INIT"], "denoise must be in \\(0, 1\\]"),
        (["--init-image", "nowhere.png"], "nowhere.png: cannot read the image"),
        (
            ["--clip-g", "nowhere.safetensors"],
            "clip_g \\(--clip-g\\) nowhere.safetensors: no such file",
        ),
        (["--slg-layers", "7,x"], "--slg-layers '7,x' must be comma-separated"),
    ],
)
def test_bad_input_one_clear_error_and_nothing_written(
    model_file, tmp_path, capsys, extra, message
):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 48)).save(init)
    extra = [str(init) if e == "INIT" else e for e in extra]
    out = tmp_path / "never.png"
    assert generate(model_file, out, "a cat", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def test_existing_output_is_never_overwritten(model_file, tmp_path, capsys):
    out = tmp_path / "taken.png"
    out.write_bytes(b"precious")
    assert generate(model_file, out, "a cat") == 2
    assert "taken.png exists already" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_unknown_sampler_is_rejected_by_name(model_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate(model_file, tmp_path / "x.png", "a cat", "--sampler", "ddim")
    assert e.value.code == 2
    assert "argument --sampler: invalid choice: 'ddim'" in capsys.readouterr().err


def test_inspect(model_file, models, tmp_path, capsys):
    assert main(["inspect", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert (
        "model: custom (depth 3, width 128, pos table 16, RMS qk-norm, attn2 in blocks 0-0)" in out
    )
    params = sum(p.numel() for p in models["mmdit"].parameters()) / 1e6
    assert f"mmdit   {params:10.1f} M params  float32" in out
    bare = save_single_file(tmp_path / "bare.safetensors", {"mmdit": models["mmdit"]})
    assert main(["inspect", str(bare)]) == 0
    out = capsys.readouterr().out
    assert "clip_l  missing (required: give it with --clip-l)" in out
    assert "t5xxl   missing (optional: give it with --t5xxl)" in out
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors: not a safetensors file" in capsys.readouterr().err


def test_eval_runs_a_batch_of_prompts_against_one_negative(model_file, capsys):
    # one batch of 5 prompts with CFG: the negative prompt's conditioning is shared by all rows
    argv = ["eval", "--model", str(model_file), "--steps", "2", "--width", "32", "--height", "32"]
    assert main([*argv, "--dtype", "fp32", "--cfg", "3", "--limit", "5", "--seeds", "1"]) == 0
    report = capsys.readouterr().out
    line = next(ln for ln in report.splitlines() if ln.startswith("all images"))
    assert (
        line.split()[-2] == "5"
    )  # passed / total / accuracy: every image was generated and scored
