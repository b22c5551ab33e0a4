"""`sd3 train` end to end on a tiny model: errors that name the argument, export, resume from the
command line, Ctrl-C, and a fresh model on the shapes dataset."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import save_single_file, tiny_models
from PIL import Image

from sd3.checkpoints import SafetensorsFile, find_components, load_component
from sd3.training.checkpoint import load_checkpoint
from sd3.training.command import add_arguments, main, run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", tiny_models())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "blue": (40, 70, 210), "green": (40, 170, 60)}
    for i in range(8):
        name, rgb = list(colours.items())[i % 3]
        pixels = np.full((40, 48, 3), 200, np.uint8)
        x, y = rng.integers(0, 24, 2)
        pixels[y : y + 16, x : x + 16] = rgb
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {name} square")
    return folder


def args_for(model_file, data_dir, out, *extra) -> list[str]:
    return [
        "--model", str(model_file), "--data", str(data_dir), "--resolution", "32", "--out", str(out),
        "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--quiet", *extra,
    ]  # fmt: skip


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_then_export_and_resume(model_file, data_dir, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(args_for(model_file, data_dir, whole, "--steps", "4")) == 0
    assert main(args_for(model_file, data_dir, part, "--steps", "3")) == 0
    assert main(["--out", str(part), "--resume", "--steps", "4", "--quiet"]) == 0
    # equal to float32 rounding: the CPU kernels may group sums differently after a restart
    assert np.allclose(losses(part), losses(whole), rtol=1e-6, atol=0) and len(losses(whole)) == 4
    a, state = load_checkpoint(whole / "checkpoint.safetensors")
    b, _ = load_checkpoint(part / "checkpoint.safetensors")
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-6, worst  # float32 rounding: an Adam step moves a weight by about lr, 1e-3
    assert state["step"] == 4 and state["config"]["batch_size"] == 4
    # the export is the EMA MMDiT with the untouched VAE and text encoders, readable by sd3
    found = find_components(whole / "model.safetensors")
    assert set(found) == {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    mmdit = load_component(found["mmdit"]).state_dict()
    for k, v in mmdit.items():
        assert torch.equal(v, a[f"ema.mmdit.{k}"] if f"ema.mmdit.{k}" in a else v)
    assert torch.equal(
        mmdit["joint_blocks.1.x_block.mlp.fc2.weight"],
        a["ema.mmdit.joint_blocks.1.x_block.mlp.fc2.weight"],
    )
    original = tiny_models()
    vae = load_component(found["vae"]).state_dict()
    assert all(torch.equal(vae[k], v) for k, v in original["vae"].state_dict().items())


def test_lora_run_writes_diffusers_lora(model_file, data_dir, tmp_path):
    out = tmp_path / "lora"
    extra = ["--steps", "2", "--lora-rank", "4", "--lora-targets", "attn.qkv,mlp.fc1", "--bf16"]
    # as `sd3 train` runs it: the surrounding CLI's namespace carries its handler too
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.set_defaults(run=run)
    args = parser.parse_args(args_for(model_file, data_dir, out, *extra))
    assert args.run(args) == 0
    from safetensors import safe_open

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight" in keys
    assert not (out / "model.safetensors").exists()


def parse(argv):
    parser = argparse.ArgumentParser(prog="sd3 train")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (
            ["--timestep-sampling", "lognorm"],
            "argument --timestep-sampling: invalid choice: 'lognorm'",
        ),
        (["--text-dropout", "2"], r"argument --text-dropout: must be in \[0, 1\], got 2.0"),
        (["--lr", "-1"], r"argument --lr: must be in \(0"),
        (["--init-config", "huge"], "argument --init-config: invalid choice: 'huge'"),
        (["--shapes-mix", "count=2"], r"argument --shapes-mix: mix: 'count=2' is not kind=weight"),
        (["--shapes-mix", "single=0"], r"argument --shapes-mix: mix: weights must be >= 0 with a"),
    ],
)
def test_bad_arguments_name_the_option(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path), *argv])
    assert re.search(message, capsys.readouterr().err)


def run_error(argv, capsys) -> str:
    assert run(parse(argv)) == 2
    return capsys.readouterr().err


def test_bad_runs_say_why(model_file, data_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    err = run_error(["--model", str(model_file), "--data", str(empty), "--out", out], capsys)
    assert f"data folder {empty} holds no images" in err
    err = run_error(["--out", out, "--resume"], capsys)
    assert f"--resume: no checkpoint.safetensors or checkpoint.sharded in {out}" in err
    err = run_error(["--data", str(data_dir), "--out", out], capsys)
    assert "give exactly one of --model FILE and --init-config NAME" in err
    err = run_error(
        ["--model", str(model_file), "--init-config", "tiny", "--shapes", "4", "--out", out], capsys
    )
    assert "give exactly one of --model FILE and --init-config NAME" in err
    err = run_error(["--model", str(model_file), "--out", out], capsys)
    assert "give exactly one of --data FOLDER and --shapes N" in err
    err = run_error(args_for(model_file, data_dir, out, "--shapes-mix", "position=1"), capsys)
    assert "--shapes-mix applies to --shapes N only" in err
    err = run_error(args_for(model_file, data_dir, out, "--shapes-mirror-pairs"), capsys)
    assert "--shapes-mirror-pairs applies to --shapes N only" in err
    shapes = ["--model", str(model_file), "--shapes", "5", "--out", out]
    err = run_error([*shapes, "--shapes-mirror-pairs"], capsys)
    assert "--shapes-mirror-pairs needs an even --shapes and --batch-size, got 5 and 8" in err
    err = run_error([*shapes, "--pair-contrast", "1"], capsys)
    assert "--pair-contrast needs --shapes-mirror-pairs" in err
    err = run_error(
        ["--model", str(tmp_path / "nope.safetensors"), "--data", str(data_dir), "--out", out],
        capsys,
    )
    assert "nope.safetensors: no such file" in err
    err = run_error(args_for(model_file, data_dir, out, "--resolution", "24"), capsys)
    assert "--resolution must be a multiple of 16, got 24" in err
    err = run_error(args_for(model_file, data_dir, out, "--resolution", "512"), capsys)
    assert "larger than this model's positional table" in err
    err = run_error(
        args_for(
            model_file,
            data_dir,
            out,
            "--batch-size",
            "3",
            "--lora-rank",
            "2",
            "--lora-targets",
            "attn.qvk",
        ),
        capsys,
    )
    assert "LoRA targets ['attn.qvk'] match no linear layer" in err
    assert main(args_for(model_file, data_dir, out, "--steps", "1")) == 0
    err = run_error(args_for(model_file, data_dir, out, "--steps", "1"), capsys)
    assert "already holds a checkpoint: pass --resume" in err


def test_ctrl_c_saves_and_stops(model_file, data_dir, tmp_path):
    out = tmp_path / "interrupted"
    argv = args_for(model_file, data_dir, out, "--steps", "100000", "--checkpoint-every", "100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sd3.training.command", *argv],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while not (log.is_file() and log.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    # issue #31: an interrupted run is told apart from a finished one (status 130, no export)
    assert proc.returncode == 130, output
    assert f"resume with: sd3 train --out {out} --resume" in output
    _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert 1 <= state["step"] < 100000
    assert f"interrupted at step {state['step']} of 100000" in output
    assert not (out / "model.safetensors").exists()
    # as after a kill -9 mid-write: a torn last log line is dropped on resume
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 99999, "lo')
    step = state["step"]
    assert main(["--out", str(out), "--resume", "--steps", str(step + 1), "--quiet"]) == 0
    assert [
        json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
    ] == list(range(1, step + 2))


def test_mirror_pairs_on_shapes(tmp_path):
    """--shapes-mirror-pairs trains on scene k and its mirror as examples 2k, 2k + 1."""
    from sd3.shapes.scenes import mirror, sample_scene

    out = tmp_path / "pairs"
    argv = ["--init-config", "tiny", "--shapes", "8", "--resolution", "32", "--out", str(out)]
    argv += ["--batch-size", "4", "--steps", "1", "--t5-length", "32", "--quiet"]
    assert main([*argv, "--shapes-mirror-pairs", "--pair-contrast", "1.5"]) == 0
    captions = json.loads(SafetensorsFile(out / "latents.safetensors").metadata["captions"])
    assert captions[2:4] == [sample_scene(0, 1).caption, mirror(sample_scene(0, 1)).caption]
    meta = json.loads(SafetensorsFile(out / "model.safetensors").metadata["sd3_training"])
    assert meta["args"]["shapes_mirror_pairs"] and meta["args"]["pair_contrast"] == 1.5
    assert len(losses(out)) == 1


def test_fresh_model_on_shapes(tmp_path, capsys):
    """--init-config saves the fresh family once (base.safetensors) and resumes from it;
    --t5-length fixes the context length (77 CLIP + 8 T5 tokens)."""
    pytest.importorskip("sd3.shapes.scenes")
    out = tmp_path / "fresh"
    argv = ["--init-config", "tiny", "--shapes", "8", "--resolution", "32", "--out", str(out)]
    argv += ["--batch-size", "4", "--steps", "1", "--t5-length", "8", "--quiet"]
    # warnings are one line each, as under `sd3 train` (issue #31)
    assert main(argv) == 0
    warning = r"sd3 train: warning: T5 keeps 7 tokens: \d+ of 8 distinct captions are cut"
    assert re.search(warning, capsys.readouterr().err)
    base = (out / "base.safetensors").read_bytes()
    first_export = (out / "model.safetensors").read_bytes()
    assert main(["--out", str(out), "--resume", "--steps", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "T5 keeps 7 tokens" in err  # the resumed run keeps t5_length
    assert (out / "base.safetensors").read_bytes() == base
    assert len(losses(out)) == 2
    # the step-1 export stays; the step-2 one takes the next free name (issue #31)
    assert (out / "model.safetensors").read_bytes() == first_export
    assert f"saved {out / 'model_1.safetensors'}" in err
    found = find_components(out / "model_1.safetensors")
    from sd3.text import TextEncoders

    text = TextEncoders(
        load_component(found["clip_l"]), load_component(found["clip_g"]),
        load_component(found["t5xxl"]), t5_length=8,
    )  # fmt: skip
    context, _ = text.encode(["a red circle"])
    assert context.shape[1] == 77 + 8
    meta = json.loads(SafetensorsFile(out / "model_1.safetensors").metadata["sd3_training"])
    assert meta["step"] == 2 and meta["args"]["t5_length"] == 8
    assert meta["args"]["out"] == "fresh"  # an exported file names folders, never their paths
