"""`sd3 generate --prompts FILE --out-dir DIR`: one image per prompt and seed, resumable, and the
same files, byte for byte, from 2 torchrun processes (gloo, CPU) as from one."""

import json
import subprocess

import pytest
import torch
from helpers import save_single_file, tiny_models
from helpers import torchrun as run_under_torchrun

from sd3.cli import main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the same thread count in every process: CPU reductions may split by thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_models(seed=4))


@pytest.fixture
def prompt_file(tmp_path):
    lines = [
        {"prompt": "a red circle", "seeds": [3, 9]},
        {"prompt": "two blue squares", "width": 48, "cfg": 2.0},
        {"prompt": "a green triangle", "negative": "blurry", "sampler": "heun", "steps": 2},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2])
    path = tmp_path / "prompts.jsonl"
    path.write_text(text + "\n")
    return path


def argv(model_file, prompts, out_dir, *extra) -> list[str]:
    return [
        "generate", "--model", str(model_file), "--dtype", "fp32", "--steps", "3", "--width", "32",
        "--height", "32", "--prompts", str(prompts), "--out-dir", str(out_dir), "--batch", "2",
        "--seed", "5", *extra,
    ]  # fmt: skip


def torchrun(nproc: int, args: list[str], **popen) -> subprocess.Popen:
    return run_under_torchrun(nproc, "sd3", args, **popen)


def contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


EXPECTED = [
    "00001_3.png",
    "00001_9.png",
    "00002_5.png",
    "00002_6.png",
    "00004_5.png",
    "00004_6.png",
]


def test_two_processes_write_the_files_one_writes(model_file, prompt_file, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = torchrun(2, argv(model_file, prompt_file, two))
    assert main(argv(model_file, prompt_file, one)) == 0
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    a, b = contents(one), contents(two)
    assert list(a) == EXPECTED
    assert a == b  # names and bytes
    assert "6 to make on 2 processes" in output

    # resume: only the missing files are made, the others are left as they are
    (one / "00002_6.png").unlink()
    (one / "00004_5.png").unlink()
    before = {p.name: p.stat().st_ino for p in one.iterdir()}
    capsys.readouterr()
    assert main(argv(model_file, prompt_file, one)) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(one / "00002_6.png"), str(one / "00004_5.png")]
    assert "4 in" in captured.err and "2 to make" in captured.err
    assert contents(one) == b
    assert all((one / name).stat().st_ino == ino for name, ino in before.items())


@pytest.mark.parametrize(
    "text, suffix, error",
    [
        ('{"prompt": "a"}\n{"prompt": "b", "steps": "many"}\n', ".jsonl",
         'line 2: "steps" must be a whole number'),
        ('{"prompt": "a"}\n\n{"prompt": "b", "colour": 1}\n', ".jsonl", "line 3: unknown key 'colour'"),
        ('{"prompt": "a"}\n{"prompt": "b",\n', ".jsonl", "line 2: not JSON"),
        ('{"negative": "x"}\n', ".jsonl", 'line 1: no "prompt"'),
        ('{"prompt": "a", "seeds": [1, 1]}\n', ".jsonl", "line 1: \"seeds\" lists a seed twice"),
        ('{"prompt": "a"}\n{"prompt": "b", "width": 40}\n', ".jsonl",
         "line 2: width 40 must be a positive multiple of 16"),
        ('{"prompt": "a", "sampler": "fast"}\n', ".jsonl", "line 1: unknown sampler 'fast'"),
        ("\n  \n", ".txt", "no prompts in it"),
    ],
)  # fmt: skip
def test_bad_prompt_file_is_one_error_naming_the_line(
    model_file, tmp_path, capsys, text, suffix, error
):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(argv(model_file, path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("sd3 generate: error: --prompts ") and error in err[0]
    ), err
    assert not out.exists()


def test_text_file_and_conflicting_options(model_file, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n{not json, a prompt}\n")
    out = tmp_path / "out"
    assert main(argv(model_file, path, out, "--batch", "1", "--steps", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00001_5.png", "00003_5.png"]
    capsys.readouterr()
    assert main(argv(model_file, path, out, "--out", "x.png")) == 2
    assert "--out does not apply to --prompts" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(path)]) == 2
    assert "--prompts FILE and --out-dir DIR go together" in capsys.readouterr().err


def test_eval_on_two_processes_reports_what_one_does(model_file, tmp_path, capsys):
    """3 batches (1 prompt batch x 3 seeds) over 2 ranks: the same report and contact sheet."""
    args = ["eval", "--model", str(model_file), "--dtype", "fp32", "--steps", "1", "--width", "32",
            "--height", "32", "--limit", "5", "--seeds", "3"]  # fmt: skip
    proc = torchrun(2, [*args, "--contact-sheet", str(tmp_path / "two.png")])
    assert main([*args, "--contact-sheet", str(tmp_path / "one.png")]) == 0
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    report = capsys.readouterr().out.strip()
    assert "all images" in report and report in output and output.count("all images") == 1
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
