"""`sd3 generate` and `sd3 eval` used as a hostile user would: every case ends in one line that
names the option or file, the documented exit status, and no file created, changed or left
half-written; checks that can run before the weights load do."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import png_header, save_single_file, tiny_models
from PIL import Image, PngImagePlugin

from sd3 import outputs
from sd3.cli import main
from sd3.pipeline import Pipeline, load_image

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_models(seed=4))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line; progress bars and warnings aside, nothing else may be printed."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused_before_loading(capsys, *argv) -> str:
    """Runs argv, asserts exit 2 with one error line and no weights loaded; returns the line."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, err
    assert "loaded in" not in err and out == ""
    return error_line(err)


def test_bad_settings_devices_seeds_and_formats_are_refused_before_the_weights_load(
    model_file, tmp_path, capsys
):
    base = ["generate", "a red circle", "--model", model_file, *FAST]
    cases = {
        ("--device", "banana"): "--device 'banana' is not a device name",
        ("--device", "cuda"): "--device cuda: this machine has no cuda device",
        ("--seed", str(2**70)): f"seed {2**70} is out of range: seeds run from 0 to 2**63 - 1",
        ("--seed", "-1"): "seed -1 is out of range",
        ("--width", "33"): "width 33 must be a positive multiple of 16",
        ("--steps", "0"): "steps must be a whole number >= 1",
        ("--cfg", "inf"): "cfg (guidance scale) must be a finite number",
        ("--out", tmp_path / "x.gif"): "--out " + str(tmp_path / "x.gif") + ": sd3 writes .png",
        ("--out", tmp_path / "no" / "x.png"): "folder " + str(tmp_path / "no") + " does not exist",
        ("--save-latent", tmp_path / "no" / "l.safetensors"): "--save-latent",
    }
    for extra, message in cases.items():
        line = refused_before_loading(capsys, *base, *extra)
        assert message in line, (extra, line)
    assert files_in(tmp_path) == []


def test_existing_outputs_are_never_replaced(model_file, tmp_path, capsys):
    out, latent = tmp_path / "a.png", tmp_path / "a.safetensors"
    out.write_bytes(b"mine")
    latent.write_bytes(b"mine too")
    line = refused_before_loading(capsys, "generate", "x", "--model", model_file, "--out", out)
    assert f"--out {out} exists already" in line
    other = tmp_path / "b.png"
    line = refused_before_loading(
        capsys, "generate", "x", "--model", model_file, "--out", other, "--save-latent", latent
    )
    assert f"--save-latent {latent} exists already" in line
    assert out.read_bytes() == b"mine" and latent.read_bytes() == b"mine too"
    assert files_in(tmp_path) == ["a.png", "a.safetensors"]


def test_eval_never_replaces_a_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"mine")
    rc, _, err = run(capsys, "eval", "--oracle", "64", "--limit", "2", "--contact-sheet", sheet)
    assert rc == 2 and f"--contact-sheet {sheet} exists already" in error_line(err)
    assert sheet.read_bytes() == b"mine"


def test_a_full_or_read_only_file_system_leaves_no_file(model_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.png"

    def no_space(fd, data):
        os.write(fd, data[: len(data) // 2])  # part of the file, then the disk is full
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "_write_all", no_space)
    rc, printed, err = run(capsys, "generate", "x", "--model", model_file, *FAST, "--out", out)
    assert rc == 2 and printed == ""  # no file name printed: nothing was written
    assert f"--out {out}: cannot write it (No space left on device)" in error_line(err)
    assert files_in(tmp_path) == []  # neither the image nor a temporary file

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    line = refused_before_loading(capsys, "generate", "x", "--model", model_file, "--out", out)
    assert f"cannot write in {tmp_path} (Read-only file system)" in line
    assert files_in(tmp_path) == []


def test_two_writers_of_one_name_both_keep_their_file(tmp_path):
    """Two real processes write the same new name at the same moment: one gets it, the other
    the next free name; neither file is lost or mixed."""
    script = (
        "import sys, time; from pathlib import Path; from sd3.outputs import write_new\n"
        "go = Path(sys.argv[2])\n"
        "while not go.exists(): time.sleep(0.001)\n"
        "print(write_new(sys.argv[1], sys.argv[3].encode() * 100000, '--out'))\n"
    )
    target, go = tmp_path / "same.png", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(target), str(go), tag],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for tag in "AB"
    ]
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    written = sorted(out.strip() for out, _ in results)
    assert written == sorted([str(target), str(tmp_path / "same_1.png")])
    contents = {Path(w).read_bytes() for w in written}
    assert contents == {b"A" * 100000, b"B" * 100000}
    assert files_in(tmp_path) == ["go", "same.png", "same_1.png"]


def test_two_generate_processes_with_default_names_both_write(model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "sd3", "generate", "a blue square", "--model", model_file]
    procs = [
        subprocess.Popen(
            list(map(str, [*command, *FAST])),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    printed = sorted(out.strip() for out, _ in results)
    assert printed == ["sd3_0.png", "sd3_0_1.png"]
    first, second = (np.asarray(Image.open(tmp_path / name)) for name in printed)
    assert np.array_equal(first, second)  # the same seed: two whole copies of one image
    assert files_in(tmp_path) == printed


def png_with_sd3_chunk(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("sd3", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_tampered_png_metadata_is_one_error_naming_the_field(model_file, tmp_path, capsys):
    out = tmp_path / "src.png"
    assert main(["generate", "x", "--model", str(model_file), *FAST, "--out", str(out)]) == 0
    with Image.open(out) as image:
        good = json.loads(image.text["sd3"])
    capsys.readouterr()

    def tampered(change) -> dict:
        data = json.loads(json.dumps(good))
        change(data)
        return data

    cases = {
        "lacks the fields ['steps']": tampered(lambda d: d["settings"].pop("steps")),
        "field 'steps' must be int, got '4'": tampered(lambda d: d["settings"].update(steps="4")),
        "field 'seed' must be int, got True": tampered(lambda d: d["settings"].update(seed=True)),
        "has unknown fields ['colour']": tampered(lambda d: d["settings"].update(colour=1)),
        "files.dtype 'fp8' is not bf16, fp16 or fp32": tampered(
            lambda d: d["files"].update(dtype="fp8")
        ),
        "files.model must be": tampered(lambda d: d["files"].update(model={"name": "../x"})),
        "files lacks the field 'model'": tampered(lambda d: d["files"].pop("model")),
    }
    for n, (message, data) in enumerate(cases.items()):
        png = png_with_sd3_chunk(tmp_path / f"t{n}.png", json.dumps(data))
        line = refused_before_loading(capsys, "generate", "--from-png", png, "--model", model_file)
        assert message in line and str(png) in line, (message, line)
    not_json = png_with_sd3_chunk(tmp_path / "nj.png", "{settings")
    assert "not valid JSON" in refused_before_loading(capsys, "generate", "--from-png", not_json)
    jpeg = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    assert "not a PNG (JPEG file)" in refused_before_loading(capsys, "generate", "--from-png", jpeg)


def test_a_model_whose_embedded_preset_is_foreign_is_one_error(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    plain = save_single_file(tmp_path / "plain.safetensors", tiny_models(seed=4))
    preset = {"name": "x", "steps": 4, "cfg": 1.0, "shift": 3.0, "sampler": "euler", "turbo": 1}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(plain), bad, metadata={"sd3_preset": json.dumps(preset)})
    line = refused_before_loading(capsys, "generate", "x", "--model", bad)
    assert f"{bad}: its embedded preset (sd3_preset) has unknown fields ['turbo']" in line


def test_init_images_too_large_broken_or_absent_are_refused_before_loading(
    model_file, tmp_path, capsys
):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(60000, 60000))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    big = tmp_path / "big.png"
    big.write_bytes(png_header(9000, 9000))
    for path, message in [
        (bomb, "cannot read the image"),
        (broken, "cannot read the image"),
        (big, "cannot read the image (9000x9000 pixels is more than sd3 reads"),
        (tmp_path / "missing.png", "cannot read the image"),
    ]:
        line = refused_before_loading(
            capsys, "generate", "x", "--model", model_file, "--init-image", path
        )
        assert f"--init-image {path}: {message}" in line, line


def test_img2img_that_would_ignore_its_init_image_is_refused(model_file, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(init)
    base = ["generate", "x", "--model", model_file, "--init-image", init, "--width", "32"]
    line = refused_before_loading(capsys, *base, "--steps", "2", "--denoise", "0.6")
    assert "denoise 0.6 with 2 steps starts from pure noise" in line
    assert "use at least 3 steps or a lower denoise" in line
    line = refused_before_loading(capsys, *base, "--steps", "4", "--denoise", "1")
    assert "use a denoise below 1" in line


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # a 16-bit greyscale PNG
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # read back as 16-bit: the case that used to clip
    rgb = np.asarray(load_image(path))
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    from sd3.pipeline import to_rgb

    assert np.asarray(to_rgb(floats))[0, :, 1].tolist() == [0, 128, 255]


def test_jpeg_and_webp_outputs_keep_the_a1111_parameters(model_file, tmp_path, capsys):
    for suffix in (".jpg", ".webp"):
        out = tmp_path / f"a{suffix}"
        rc, printed, err = run(
            capsys, "generate", "a red circle", "--model", model_file, *FAST, "--out", out
        )
        assert rc == 0, err
        assert printed.strip() == str(out)
        with Image.open(out) as image:
            comment = image.getexif().get_ifd(0x8769).get(0x9286) or image.getexif().get(0x9286)
        text = comment[8:].decode("utf-16-be") if isinstance(comment, bytes) else comment
        assert text.startswith("a red circle\nNegative prompt: \nSteps: 2, Sampler:"), text


def test_an_unexpected_error_is_one_line_with_a_way_to_the_traceback(
    model_file, tmp_path, capsys, monkeypatch
):
    def boom(*args, **kwargs):
        raise RuntimeError("the unforeseen\nhappened")

    monkeypatch.setattr(Pipeline, "generate", boom)
    out = tmp_path / "a.png"
    rc, printed, err = run(capsys, "generate", "x", "--model", model_file, *FAST, "--out", out)
    assert rc == 1 and printed == ""
    line = error_line(err)
    assert "unexpected RuntimeError: the unforeseen happened" in line
    assert "run with SD3_DEBUG=1 for the traceback" in line and not out.exists()
    monkeypatch.setenv("SD3_DEBUG", "1")
    with pytest.raises(RuntimeError, match="unforeseen"):
        main(["generate", "x", "--model", str(model_file), *FAST, "--out", str(out)])
