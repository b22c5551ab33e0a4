"""`sd3 train` used as a hostile user would (issue #31): every case ends in one line that names
the option or file, the documented exit status (2: a setting or file to fix; 1: the run failed;
130/143: interrupted), and no file created, changed or left half-written; checks that can run
before the models load do. Tiny models, four 32x32 images."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png_header, save_single_file, tiny_models
from PIL import Image

import sd3.training.checkpoint as checkpoint_module
import sd3.training.command as command
import sd3.training.trainer as trainer_module
from sd3 import outputs
from sd3.checkpoints import SafetensorsFile
from sd3.cli import main
from sd3.models.clip import CLIPConfig, CLIPTextModel
from sd3.training.checkpoint import load_checkpoint, read_state
from sd3.training.data import load_image
from sd3.training.trainer import Trainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_models(seed=2))


def square(colour) -> Image.Image:
    pixels = np.full((32, 32, 3), 200, np.uint8)
    pixels[8:24, 8:24] = colour
    return Image.fromarray(pixels)


def make_data(folder: Path, extra: dict | None = None) -> Path:
    """Four captioned squares, plus `extra` {name: bytes | str | Image} (a str is a caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (40, 70, 210))] * 2):
        square(rgb).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {name} square")
    for name, content in (extra or {}).items():
        path = folder / name
        if isinstance(content, Image.Image):
            content.save(path)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def args(model_file, data, out, *extra) -> list:
    return [
        "--model", model_file, "--data", data, "--out", out, "--resolution", 32,
        "--batch-size", 2, "--lr", "1e-3", "--quiet", *extra,
    ]  # fmt: skip


def train(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(["train", *map(str, argv)])
    except SystemExit as e:  # argparse's own errors: usage, then one error line
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line; progress, warnings and usage aside, nothing else may be printed."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def no_loading(monkeypatch):
    """A run that gets as far as loading a model's weights fails with 'unexpected' (exit 1)."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(command, "load_component", refuse)


def refused(capsys, tmp_path, *argv) -> str:
    """Runs argv: exit 2, one error line, no weights loaded (with `no_loading`), nothing under
    tmp_path created or changed. Returns the line."""
    before = snapshot(tmp_path)
    rc, out, err = train(capsys, *argv)
    assert rc == 2, err
    line = error_line(err)
    assert snapshot(tmp_path) == before, line
    return line


def test_bad_settings_name_their_option_before_anything_runs(
    model_file, data_dir, tmp_path, capsys, no_loading
):
    out = tmp_path / "out"
    parse_time = {
        ("--lr", "inf"): "argument --lr: must be a finite number, got inf",
        ("--lr", "nan"): "argument --lr: must be a finite number, got nan",
        ("--lr", "0"): "argument --lr: must be in (0, inf), got 0.0",
        ("--lr", "fast"): "argument --lr: must be a number, got 'fast'",
        ("--steps", "0"): "argument --steps: must be >= 1, got 0",
        ("--steps", "1.5"): "argument --steps: must be a whole number, got '1.5'",
        ("--batch-size", "0"): "argument --batch-size: must be >= 1",
        ("--checkpoint-every", "-3"): "argument --checkpoint-every: must be >= 1",
        ("--warmup-steps", "-1"): "argument --warmup-steps: must be >= 0",
        ("--weight-decay", "nan"): "argument --weight-decay: must be a finite number",
        ("--ema-decay", "1"): "argument --ema-decay: must be in [0, 0.999999]",
        ("--grad-clip", "inf"): "argument --grad-clip: must be a finite number",
        ("--text-dropout", "1.5"): "argument --text-dropout: must be in [0, 1]",
        ("--logit-mean", "nan"): "argument --logit-mean: must be a finite number",
        ("--logit-std", "0"): "argument --logit-std: must be in (0, inf)",
        ("--mode-scale", "3"): "argument --mode-scale: must be in [-1, 1.75]",
        ("--shift", "inf"): "argument --shift: must be a finite number",
        ("--pair-contrast", "-1"): "argument --pair-contrast: must be in [0, inf)",
        ("--lora-rank", "-1"): "argument --lora-rank: must be >= 0",
        ("--lora-alpha", "inf"): "argument --lora-alpha: must be a finite number",
        ("--text-encoder-lr", "1e400"): "argument --text-encoder-lr: must be a finite number",
        ("--t5-length", "0"): "argument --t5-length: must be >= 1",
        ("--threads", "0"): "argument --threads: must be >= 1",
        ("--resolution", "8"): "argument --resolution: must be >= 16",
        ("--seed", "-1"): "argument --seed: must be in [0, 2**63 - 1], got -1",
        ("--seed", str(2**63)): f"argument --seed: must be in [0, 2**63 - 1], got {2**63}",
    }
    for extra, message in parse_time.items():
        line = refused(capsys, tmp_path, *args(model_file, data_dir, out, *extra))
        assert message in line, (extra, line)
    run_time = {
        ("--resolution", "24"): "--resolution must be a multiple of 16, got 24",
        ("--resolution", "512"): "--resolution 512: image size 512x512 is larger than this "
        "model's positional table",
        ("--text-encoder-lr", "1e-5"): "--text-encoder-lr needs --train-text-encoders",
        ("--lora-alpha", "8"): "--lora-alpha applies to LoRA training (--lora-rank R) only",
        ("--lora-rank", "2", "--lora-targets", "attn.qvk"): "--lora-targets attn.qvk: LoRA "
        "targets ['attn.qvk'] match no linear layer",
        ("--lora-rank", "2", "--train-text-encoders"): "keeps the text encoders frozen",
        ("--device", "banana"): "--device 'banana' is not a device name",
        ("--device", "cuda:99"): "--device cuda:99: this machine has",
        ("--shapes-mix", "single=1"): "--shapes-mix applies to --shapes N only",
    }
    for extra, message in run_time.items():
        line = refused(capsys, tmp_path, *args(model_file, data_dir, out, *extra))
        assert message in line, (extra, line)
    shapes = ["--shapes", 4, "--out", out, "--resolution", 32, "--quiet"]
    line = refused(capsys, tmp_path, "--init-config", "tiny", *shapes, "--clip-l", model_file)
    assert "--clip-l applies to --model only" in line
    line = refused(capsys, tmp_path, "--model", model_file, *shapes, "--skip-bad-images")
    assert "--skip-bad-images applies to --data FOLDER only" in line
    line = refused(capsys, tmp_path, "--model", model_file, "--shapes", 4, "--out", out,
                   "--resolution", 16)  # fmt: skip
    assert "--shapes 4 at --resolution 16: size must be >= 32" in line
    assert not out.exists()


def test_a_data_folder_that_cannot_be_used_names_the_folder_or_file(
    model_file, tmp_path, capsys, no_loading
):
    out = tmp_path / "out"
    good = np.asarray(square((1, 2, 3)))
    png = tmp_path / "whole.png"
    Image.fromarray(good).save(png)
    cases = {
        "missing": (None, "data folder {d} does not exist or is not a folder"),
        "empty": ({}, "data folder {d} holds no images"),
        "not images": ({"notes.txt": "hello", "anim.gif": b"GIF89a"}, "holds no images"),
        "uncaptioned": ({"lonely.png": square((0, 0, 0))}, "1 of 5 images in {d} have no caption"),
        "latin-1 caption": (
            {"x.png": square((0, 0, 0)), "x.txt": "caf\xe9".encode("latin-1")},
            "caption file {d}/x.txt is not UTF-8 text",
        ),
        "text as png": (
            {"bad.png": b"not an image", "bad.txt": "x"},
            "--data {d}/bad.png: cannot read the image (",
        ),
        "truncated png": (
            {"cut.png": png.read_bytes()[:60], "cut.txt": "x"},
            "--data {d}/cut.png: cannot read the image (",
        ),
        "bomb": (
            {"bomb.png": png_header(60000, 60000), "bomb.txt": "x"},
            "--data {d}/bomb.png: cannot read the image (",
        ),
        "too large": (
            {"big.png": png_header(9000, 9000), "big.txt": "x"},
            "9000x9000 pixels is more than sd3 reads",
        ),
    }
    for name, (extra, message) in cases.items():
        folder = tmp_path / name
        if name in ("empty", "not images"):
            folder.mkdir()
            for file, content in extra.items():
                (folder / file).write_bytes(
                    content.encode() if isinstance(content, str) else content
                )
        elif extra is not None:
            make_data(folder, extra)
        line = refused(capsys, tmp_path, *args(model_file, folder, out))
        assert message.format(d=folder) in line, (name, line)
        if name in ("text as png", "truncated png", "bomb"):
            assert "or pass --skip-bad-images to leave such files out" in line
    line = refused(capsys, tmp_path, *args(model_file, png, out))
    assert f"data folder {png} does not exist or is not a folder" in line
    assert not out.exists()


def test_skip_bad_images_leaves_them_out_and_says_how_many(model_file, tmp_path, capsys):
    data = make_data(
        tmp_path / "data",
        {"bad.png": b"not an image", "bad.txt": "x", "cut.webp": b"RIFF", "cut.txt": "y"},
    )
    out = tmp_path / "out"
    rc, _, err = train(capsys, *args(model_file, data, out, "--steps", 1, "--skip-bad-images"))
    assert rc == 0, err
    warning = "sd3 train: warning: --skip-bad-images: left out 2 of 6 images that cannot be read"
    assert f"{warning}: bad.png, cut.webp" in err
    cache = SafetensorsFile(out / "latents.safetensors")
    assert len(json.loads(cache.metadata["captions"])) == 4
    # none readable: one error, even when skipping
    only_bad = make_data(tmp_path / "bad", {})
    for p in only_bad.glob("*.png"):
        p.write_bytes(b"junk")
    line = refused(
        capsys, tmp_path, *args(model_file, only_bad, tmp_path / "o", "--skip-bad-images")
    )
    assert f"data folder {only_bad}: none of its 4 images can be read" in line


def test_empty_captions_train_with_a_warning_naming_them(model_file, tmp_path, capsys):
    """Decision: an empty caption file trains that image unconditionally (as kohya-ss and
    diffusers do with an empty caption), with one warning giving the count and the first names."""
    data = make_data(tmp_path / "data")
    (data / "img1.txt").write_text("")
    (data / "img3.txt").write_text("  \n")
    rc, _, err = train(capsys, *args(model_file, data, tmp_path / "out", "--steps", 1))
    assert rc == 0, err
    assert (
        "sd3 train: warning: 2 of 4 caption files are empty (img1.txt, img3.txt): those images "
        "train unconditionally" in err
    )


def test_16_bit_training_images_are_scaled_not_clipped(tmp_path):
    eight = np.array([[0, 64, 128, 255]] * 4, dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as raw:
        assert raw.mode.startswith("I")  # read back as 16-bit: the case that used to clip
    assert torch.equal(load_image(tmp_path / "16.png", 16), load_image(tmp_path / "8.png", 16))


def test_model_files_that_are_not_models_are_refused_before_loading(
    model_file, data_dir, tmp_path, capsys, no_loading
):
    out = tmp_path / "out"
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes")
    picture = tmp_path / "photo.safetensors"
    square((1, 2, 3)).save(picture, format="PNG")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    folder = tmp_path / "folder"
    folder.mkdir()
    parts = tiny_models(seed=2)
    no_vae = save_single_file(
        tmp_path / "no_vae.safetensors", {k: v for k, v in parts.items() if k != "vae"}
    )
    clip = save_single_file(
        tmp_path / "clip.safetensors", {"clip_l": parts["clip_l"]}, prefixed=False
    )
    wide = CLIPTextModel(CLIPConfig(width=128, layers=1, heads=2, mlp_width=128))  # not tiny's
    wide = save_single_file(tmp_path / "wide.safetensors", {"clip_l": wide}, prefixed=False)
    cases = [
        (["--model", tmp_path / "nope.safetensors"], "--model {t}/nope.safetensors: no such file"),
        (["--model", text], "--model {t}/notes.safetensors: not a safetensors file"),
        (["--model", picture], "--model {t}/photo.safetensors: not a safetensors file"),
        (["--model", pickle], "--model {t}/model.ckpt: this is a pickle"),
        (["--model", folder], "--model {t}/folder: not a diffusers SD3 folder"),
        (["--model", no_vae], "--model {t}/no_vae.safetensors: no vae found"),
        (["--model", model_file, "--vae", clip], "vae (--vae) {t}/clip.safetensors: unknown model"),
        (["--model", model_file, "--clip-g", text], "clip_g (--clip-g) {t}/notes.safetensors"),
        (["--model", model_file, "--clip-l", wide], "the text encoders do not fit the MMDiT"),
    ]
    for model, message in cases:
        argv = ["--data", data_dir, "--out", out, "--resolution", 32, "--quiet", *model]
        line = refused(capsys, tmp_path, *argv)
        assert message.format(t=tmp_path) in line, line
    assert not out.exists()


def test_an_out_that_cannot_take_the_run_is_refused_before_loading(
    model_file, data_dir, tmp_path, capsys, no_loading, monkeypatch
):
    file = tmp_path / "file"
    file.write_bytes(b"mine")
    line = refused(capsys, tmp_path, *args(model_file, data_dir, file))
    assert f"--out {file} is a file, not a folder" in line
    line = refused(capsys, tmp_path, *args(model_file, data_dir, file / "run"))
    assert f"--out {file / 'run'}: {file} is a file, not a folder" in line
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text("my own notes\n")
    line = refused(capsys, tmp_path, *args(model_file, data_dir, foreign))
    assert f"--out {foreign} holds log.jsonl that sd3 train did not write" in line
    (foreign / "log.jsonl").unlink()
    (foreign / "latents.safetensors").write_bytes(b"my latents")
    line = refused(capsys, tmp_path, *args(model_file, data_dir, foreign))
    assert "holds latents.safetensors that sd3 train did not write" in line

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    for out in (tmp_path / "new" / "run", foreign):
        line = refused(capsys, tmp_path, *args(model_file, data_dir, out))
        assert f"--out {out}" in line and "(Read-only file system)" in line
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def finished_run(model_file, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    argv = args(model_file, data_dir, out, "--steps", 2, "--checkpoint-every", 1)
    assert main(["train", *map(str, argv)]) == 0
    return out


def test_resume_of_what_is_not_a_resumable_run_is_refused(
    finished_run, model_file, tmp_path, capsys, no_loading
):
    def copy() -> Path:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished_run, target)
        return target

    line = refused(capsys, tmp_path, "--out", tmp_path / "nowhere", "--resume")
    assert (
        f"--resume: no checkpoint.safetensors or checkpoint.sharded in {tmp_path / 'nowhere'}"
        in line
    )
    not_a_run = tmp_path / "pictures"
    not_a_run.mkdir()
    (not_a_run / "cat.png").write_bytes(b"meow")
    line = refused(capsys, tmp_path, "--out", not_a_run, "--resume")
    assert f"--resume: no checkpoint.safetensors or checkpoint.sharded in {not_a_run}" in line
    garbage = copy()
    (garbage / "checkpoint.safetensors").write_bytes(b"\0" * 100)
    line = refused(capsys, tmp_path, "--out", garbage, "--resume")
    assert f"{garbage}/checkpoint.safetensors: not a safetensors file" in line
    foreign = copy()
    shutil.copy(model_file, foreign / "checkpoint.safetensors")
    line = refused(capsys, tmp_path, "--out", foreign, "--resume")
    assert "checkpoint.safetensors: not an sd3 training checkpoint" in line
    run = copy()
    line = refused(capsys, tmp_path, "--out", run, "--resume")
    assert f"--resume: the run in {run} is finished (step 2 of 2); pass a higher --steps" in line
    line = refused(capsys, tmp_path, "--out", run, "--resume", "--steps", 1)
    assert f"--steps 1 is below step 2, which {run}/checkpoint.safetensors holds" in line
    line = refused(capsys, tmp_path, "--out", run, "--resume", "--steps", 3, "--lr", "1e-5")
    assert "--lr 1e-05: a resumed run keeps its settings (--lr 0.001 in" in line
    line = refused(capsys, tmp_path, "--out", run, "--resume", "--steps", 3, "--model", tmp_path)
    assert f"--model {tmp_path}: a resumed run keeps its settings" in line
    # a checkpoint whose stored settings were edited into nonsense
    tampered = copy()
    path = tampered / "checkpoint.safetensors"
    tensors, state = load_checkpoint(path)
    state["metadata"]["args"]["lr"] = float("inf")
    from safetensors.torch import save_file

    save_file(tensors, str(path), {"sd3_training": json.dumps(state)})
    line = refused(capsys, tmp_path, "--out", tampered, "--resume", "--steps", 3)
    assert f"--resume: {path} holds settings sd3 cannot use: --lr must be a finite number" in line


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    real = trainer_module.flow_loss
    calls = []

    def nan_from_the_third_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(trainer_module, "flow_loss", nan_from_the_third_step)
    out = tmp_path / "out"
    argv = args(model_file, data_dir, out, "--steps", 6, "--checkpoint-every", 2)
    rc, _, err = train(capsys, *argv)
    assert rc == 1, err
    line = error_line(err)
    assert "step 3: the loss is nan and the gradient norm nan; stopped before this step" in line
    assert f"{out}/checkpoint.safetensors still holds step 2" in line
    assert read_state(out / "checkpoint.safetensors")["step"] == 2
    tensors, _ = load_checkpoint(out / "checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())

    def strict(constant):
        raise AssertionError(f"{constant} in log.jsonl")

    log = [
        json.loads(s, parse_constant=strict) for s in (out / "log.jsonl").read_text().splitlines()
    ]
    assert [entry["step"] for entry in log] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "latents.safetensors", "log.jsonl",
    ]  # fmt: skip


def test_weights_that_stop_being_finite_are_never_saved(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    real = Trainer.train_step

    def poisoned(self):
        result = real(self)
        if self.step == 2:
            with torch.no_grad():
                next(iter(self.params.values()))[0] = float("inf")
        return result

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "out"
    rc, _, err = train(
        capsys, *args(model_file, data_dir, out, "--steps", 4, "--checkpoint-every", 1)
    )
    assert rc == 1, err
    line = error_line(err)
    assert "step 2: 1 weight tensors are no longer finite" in line
    assert f"not saved ({out}/checkpoint.safetensors still holds step 1" in line
    assert read_state(out / "checkpoint.safetensors")["step"] == 1
    assert not list(out.glob("model*"))


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, also where pytest was started with
    SIGINT ignored (a background job of a non-interactive shell), where a second Ctrl-C would
    otherwise fall through to the ignored disposition and abort nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT, times: int = 1):
    """Deliver `signum` to this process `times` times as training step `step` runs (as Ctrl-C
    would: twice under torchrun, from the terminal and from torchrun)."""
    real = Trainer.train_step

    def step_then_signal(self):
        result = real(self)
        if self.step == step:
            for _ in range(times):  # raised in this thread: handled before the call returns
                signal.raise_signal(signum)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


def test_ctrl_c_saves_exits_130_and_says_how_to_resume_without_exporting(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 2)
    rc, _, err = train(
        capsys, *args(model_file, data_dir, out, "--steps", 4, "--checkpoint-every", 10)
    )
    assert rc == 130, err
    assert (
        f"sd3 train: interrupted at step 2 of 4, saved in {out}/checkpoint.safetensors; "
        f"resume with: sd3 train --out {out} --resume" in err
    )
    assert read_state(out / "checkpoint.safetensors")["step"] == 2
    assert not list(out.glob("model*")) and "error:" not in err
    monkeypatch.undo()
    rc, _, err = train(capsys, "--out", out, "--resume", "--quiet")  # the command it printed
    assert rc == 0, err
    assert read_state(out / "checkpoint.safetensors")["step"] == 4
    assert (out / "model.safetensors").is_file()
    # asked to export on Ctrl-C: the model of that step, named so; SIGTERM says 143
    other = tmp_path / "other"
    interrupt_at(monkeypatch, 1, signal.SIGTERM)
    argv = args(model_file, data_dir, other, "--steps", 4, "--export-on-interrupt")
    rc, _, err = train(capsys, *argv)
    assert rc == 143, err
    assert f"saved {other}/model-step1.safetensors (EMA weights)" in err
    assert sorted(p.name for p in other.glob("model*")) == ["model-step1.safetensors"]


def test_a_second_ctrl_c_during_the_save_leaves_the_last_checkpoint_whole(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(trainer_module, "SAME_SIGNAL_S", 0.0)  # every repeat is a new Ctrl-C
    interrupt_at(monkeypatch, 2)  # the first: finish step 2, save it, stop
    real = checkpoint_module.save_file
    saves = []

    def second_ctrl_c_halfway(tensors, filename, metadata=None):
        if Path(filename).name == "checkpoint.safetensors":
            saves.append(filename)
            if len(saves) == 2:  # the save of step 2: half written, then Ctrl-C again
                real(tensors, filename, metadata=metadata)
                with open(filename, "r+b") as f:
                    f.truncate(f.seek(0, 2) // 2)
                signal.raise_signal(signal.SIGINT)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", second_ctrl_c_halfway)
    out = tmp_path / "out"
    rc, _, err = train(
        capsys, *args(model_file, data_dir, out, "--steps", 4, "--checkpoint-every", 1)
    )
    assert rc == 130, err
    assert (
        f"sd3 train: interrupted; {out}/checkpoint.safetensors holds step 1; resume with: "
        f"sd3 train --out {out} --resume" in err
    )
    tensors, state = load_checkpoint(out / "checkpoint.safetensors")  # whole, and readable
    assert state["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "latents.safetensors", "log.jsonl",
    ]  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_removes_the_temporary_files_of_a_killed_run_and_no_others(
    finished_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    dead = run / f".checkpoint.safetensors.tmp-{dead_pid()}"
    dead.mkdir()
    (dead / "checkpoint.safetensors").write_bytes(b"\0" * 1000)  # as a kill mid-save leaves it
    old_style = run / f".latents.safetensors.tmp-{dead_pid()}"
    old_style.write_bytes(b"\0" * 1000)
    export = run / ".model.safetensors.k2j4h5g6.tmp"
    export.mkdir()
    alive = run / f".checkpoint.safetensors.tmp-{os.getppid()}"  # another process is writing
    alive.mkdir()
    users = [run / ".notes.tmp", run / ".checkpoint.safetensors.tmp-mine", run / "x.tmp"]
    for path in users:
        path.write_text("mine")
    rc, _, err = train(capsys, "--out", run, "--resume", "--steps", 3, "--quiet")
    assert rc == 0, err
    for path in (dead, old_style, export):
        assert not path.exists() and f"removed {path}, left by a run that was killed" in err
    assert alive.is_dir() and all(p.read_text() == "mine" for p in users)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_it_made(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    def disk_error(component, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(model_file))

    monkeypatch.setattr(command, "load_component", disk_error)
    out = tmp_path / "new" / "run"
    rc, _, err = train(capsys, *args(model_file, data_dir, out, "--steps", 1))
    assert rc == 1 and f"sd3 train: error: {model_file}: Input/output error" in error_line(err)
    assert list(tmp_path.iterdir()) == []  # neither run/ nor new/
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rc, _, err = train(capsys, *args(model_file, data_dir, mine, "--steps", 1))
    assert rc == 1 and snapshot(mine) == {"notes.txt": b"mine"}  # a folder that was there stays
    monkeypatch.undo()

    # failing after the images are encoded: the finished latent cache stays for the next try
    def boom(self):
        raise RuntimeError("the unforeseen\nhappened")

    monkeypatch.setattr(Trainer, "train_step", boom)
    rc, _, err = train(capsys, *args(model_file, data_dir, out, "--steps", 1))
    assert rc == 1
    line = error_line(err)
    assert "unexpected RuntimeError: the unforeseen happened (run with SD3_DEBUG=1" in line
    assert sorted(p.name for p in out.iterdir()) == ["latents.safetensors"]
    cache = (out / "latents.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    rc, _, err = train(capsys, *args(model_file, data_dir, out, "--steps", 1))
    assert rc == 0, err
    assert (out / "latents.safetensors").stat().st_mtime_ns == cache  # reused, not re-encoded


def test_exports_never_replace_a_file_nor_leave_a_partial_one(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my model")
    rc, _, err = train(capsys, *args(model_file, data_dir, out, "--steps", 1))
    assert rc == 0, err
    assert (out / "model.safetensors").read_bytes() == b"my model"
    assert f"saved {out}/model_1.safetensors (EMA weights)" in err
    real = checkpoint_module.save_file

    def disk_full_on_export(tensors, filename, metadata=None):
        if Path(filename).parent.name.startswith(".model"):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_on_export)
    full = tmp_path / "full"
    rc, _, err = train(capsys, *args(model_file, data_dir, full, "--steps", 1))
    assert rc == 2
    line = error_line(err)
    assert f"--out {full}/model.safetensors: cannot write it (No space left on device)" in line
    assert sorted(p.name for p in full.iterdir()) == [
        "checkpoint.safetensors", "latents.safetensors", "log.jsonl",
    ]  # fmt: skip


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_partial_file(
    model_file, data_dir, tmp_path, capsys, monkeypatch
):
    real = checkpoint_module.save_file
    saves = []

    def full_at_the_second_checkpoint(tensors, filename, metadata=None):
        if Path(filename).name == "checkpoint.safetensors":
            saves.append(filename)
            if len(saves) == 2:
                with open(filename, "wb") as f:
                    f.write(b"\0" * 100)  # part of the file, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", full_at_the_second_checkpoint)
    out = tmp_path / "out"
    rc, _, err = train(
        capsys, *args(model_file, data_dir, out, "--steps", 3, "--checkpoint-every", 1)
    )
    assert rc == 1
    assert f"sd3 train: error: {out}/checkpoint.safetensors: No space left on device" in error_line(
        err
    )
    assert read_state(out / "checkpoint.safetensors")["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "latents.safetensors", "log.jsonl",
    ]  # fmt: skip


def test_the_largest_seed_trains_and_a_warmup_longer_than_the_run_is_flagged(
    model_file, data_dir, tmp_path, capsys
):
    argv = args(model_file, data_dir, tmp_path / "out", "--steps", 1, "--seed", 2**63 - 1)
    rc, _, err = train(capsys, *argv, "--warmup-steps", 5)
    assert rc == 0, err
    assert "warning: --warmup-steps 5 >= --steps 1: the learning rate never reaches --lr" in err
