"""`sd3 train --shard`: FSDP2 over 2 gloo processes (CPU) trains like one unsharded process on the
same global batch, the MMDiT in full, a LoRA or a ControlNet; its sharded checkpoints resume on 2
ranks and on 1; `sd3 train export` writes the weights."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import noise_images, save_single_file, tiny_models
from helpers import torchrun as run_under_torchrun
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd3.training.command import export_run, main

LR = 1e-3
PREFIX = "model.diffusion_model."


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
    return noise_images(tmp_path_factory.mktemp("data"))


def args_for(model_file, data_dir, out, *extra) -> list[str]:
    return [
        "--model", str(model_file), "--data", str(data_dir), "--resolution", "32", "--out", str(out),
        "--batch-size", "4", "--checkpoint-every", "2", "--quiet", "--lr", str(LR),
        "--text-dropout", "0.3", *extra,
    ]  # fmt: skip


def torchrun(nproc: int, argv: list[str], **popen) -> subprocess.Popen:
    return run_under_torchrun(nproc, "sd3.training.command", argv, **popen)


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output


def log(out) -> dict[str, np.ndarray]:
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {k: np.array([e[k] for e in entries]) for k in ("step", "loss", "grad_norm")}


def mmdit(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.startswith(PREFIX)}


def weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sharded_training_matches_one_process_and_resumes(model_file, data_dir, tmp_path):
    """4 steps of batch 4. Per step the loss and gradient norm of FSDP on 2 ranks equal the
    unsharded single process's to float32 rounding; the weights to a small fraction of one AdamW
    step (Adam's g / (|g| + eps) turns the reduction-order rounding of near-zero gradient entries
    into up to a few percent of lr, as in the DDP test), while training moved them by whole steps.
    A run stopped after its checkpoint at step 2 resumes on 2 ranks to the uninterrupted run's
    weights, and on 1 rank (re-sharded) to them within the same bound."""
    one, two, half = tmp_path / "one", tmp_path / "two", tmp_path / "half"
    first = [torchrun(2, args_for(model_file, data_dir, two, "--steps", "4", "--shard")),
             torchrun(2, args_for(model_file, data_dir, half, "--steps", "2", "--shard"))]  # fmt: skip
    assert main(args_for(model_file, data_dir, one, "--steps", "4")) == 0
    finish(*first)
    assert (two / "checkpoint.sharded" / "state.json").is_file()
    assert not (two / "checkpoint.safetensors").exists()
    assert_no_pickles(two / "checkpoint.sharded", 2)

    a, b = log(one), log(two)
    for name in ("loss", "grad_norm"):
        rel = np.abs(a[name] / b[name] - 1)
        print(f"{name}: 1 process {a[name]}, FSDP on 2 {b[name]}, rel diff {rel}")
        # step 1 from the same weights; later steps from weights apart by Adam-scaled rounding
        assert len(rel) == 4 and rel[0] < 1e-6 and rel.max() < 1e-5

    raw = {run: tmp_path / f"{run.name}-raw.safetensors" for run in (one, two)}
    for run, path in raw.items():
        export_run(run, path, ema=False)
    worst = weight_diff(mmdit(raw[one]), mmdit(raw[two]))
    initial = mmdit(model_file)
    moved = weight_diff(mmdit(raw[one]), initial)
    print(f"weights: max abs diff {worst:.2e} = {worst / LR:.4f} lr; moved {moved / LR:.1f} lr")
    assert worst < 0.05 * LR and moved > 3 * LR

    # the export of the sharded checkpoint (EMA) is the file the run wrote at its end
    exported = tmp_path / "export.safetensors"
    assert main(["export", str(two), str(exported)]) == 0
    ours, end = load_file(exported), load_file(two / "model.safetensors")
    assert ours.keys() == end.keys() and all(torch.equal(ours[k], end[k]) for k in ours)
    assert main(["export", str(two), str(exported)]) == 2  # never over a file

    # resume the 2-step run on 2 ranks and (a copy) on 1 rank
    half1 = tmp_path / "half1"
    shutil.copytree(half, half1)
    resumed = torchrun(2, ["--out", str(half), "--resume", "--steps", "4", "--quiet"])
    assert main(["--out", str(half1), "--resume", "--steps", "4", "--quiet"]) == 0
    finish(resumed)
    reference = mmdit(two / "model.safetensors")
    for run, bound in ((half, 1e-3 * LR), (half1, 0.05 * LR)):  # 2 ranks: to float32 rounding
        assert list(log(run)["step"]) == [1, 2, 3, 4]
        # model.safetensors is the 2-step run's export; sd3 never overwrites a file
        diff = weight_diff(mmdit(run / "model_1.safetensors"), reference)
        print(f"resumed on {2 if run == half else 1} rank(s): max abs diff {diff:.2e}")
        assert diff <= bound
    assert json.loads((half1 / "checkpoint.sharded" / "state.json").read_text())["world_size"] == 1
    assert_no_pickles(half1 / "checkpoint.sharded", 1)
    assert_no_pickles(half / "checkpoint.sharded", 2)


def test_shard_rejects_what_it_does_not_train(model_file, data_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(args_for(model_file, data_dir, out, "--shard", "--compile")) == 2
    assert (
        "--shard trains eager, with the text encoders frozen: not with" in capsys.readouterr().err
    )
    assert main(["export", str(tmp_path), str(tmp_path / "m.safetensors")]) == 2
    assert "no checkpoint.safetensors or checkpoint.sharded" in capsys.readouterr().err


def assert_no_pickles(folder, world: int) -> None:
    """A sharded checkpoint is JSON and safetensors only: no file of it is ever unpickled."""
    names = sorted(p.name for p in folder.iterdir())
    ranks = [f"rank{r:05d}.safetensors" for r in range(world)]
    assert names == sorted(["layout.json", "state.json", *ranks])
    for path in folder.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"\x80"), f"{path} looks like a pickle"
        if path.suffix == ".json":
            json.loads(data)
        else:  # 8 bytes of header length, then a JSON header
            (size,) = np.frombuffer(data[:8], dtype="<u8")
            json.loads(data[8 : 8 + int(size)])
    layout = json.loads((folder / "layout.json").read_text())
    assert layout["world_size"] == world
    split = 0
    for name, entry in layout["tensors"].items():
        rows = entry["shape"][0] if entry["shape"] else 1
        if len(entry["shards"]) > 1:  # FSDP2 shards dim 0 as torch.chunk does
            bounds = np.cumsum([0] + [len(c) for c in torch.arange(rows).chunk(world)])
            chunks = [[r, int(bounds[r]), int(bounds[r + 1])] for r in range(world)]
            assert entry["shards"] == [c for c in chunks if c[2] > c[1]], name
            split += 1
        else:
            assert entry["shards"] == [[0, 0, rows]], name
    assert split > 0 if world > 1 else split == 0


def test_sharded_checkpoint_is_pickle_free_and_validated(model_file, data_dir, tmp_path, capsys):
    """A 1-rank sharded run's checkpoint holds JSON and safetensors only; a pickle dropped into it
    is never loaded; a tampered layout or a missing shard file is one error naming the file, for
    --resume and for export alike, before anything is trained or written."""
    run = tmp_path / "run"
    assert main(args_for(model_file, data_dir, run, "--steps", "2", "--shard")) == 0
    folder = run / "checkpoint.sharded"
    assert_no_pickles(folder, 1)
    capsys.readouterr()

    def fails(out, *expected) -> None:
        assert main(["--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sd3 train: error:"), err
        assert all(e in err[0] for e in expected), err[0]
        assert main(["export", str(out), str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(e in err[0] for e in expected), err
        assert list(log(out)["step"]) == [1, 2] and not (tmp_path / "x.safetensors").exists()

    def copy(name: str):
        shutil.copytree(run, tmp_path / name)
        return tmp_path / name, tmp_path / name / "checkpoint.sharded"

    wrong, ckpt = copy("wrong-shape")
    layout = json.loads((ckpt / "layout.json").read_text())
    name = next(n for n, e in layout["tensors"].items() if n.startswith("model.") and e["shape"])
    layout["tensors"][name]["shape"][0] += 1
    (ckpt / "layout.json").write_text(json.dumps(layout))
    fails(wrong, str(ckpt / "layout.json"), name, "do not cover rows")
    # files and layout agree, the model does not: one more row in the file and the layout
    tensors = load_file(ckpt / "rank00000.safetensors")
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, ckpt / "rank00000.safetensors")
    layout["tensors"][name]["shards"] = [[0, 0, layout["tensors"][name]["shape"][0]]]
    layout["files"][0]["bytes"] = (ckpt / "rank00000.safetensors").stat().st_size
    (ckpt / "layout.json").write_text(json.dumps(layout))
    fails(wrong, str(ckpt / "layout.json"), name, "this run's is")

    missing, ckpt = copy("missing")
    (ckpt / "rank00000.safetensors").unlink()
    fails(missing, f"{ckpt / 'rank00000.safetensors'}: missing")

    cut, ckpt = copy("cut")
    with open(ckpt / "rank00000.safetensors", "rb+") as f:
        f.truncate(1000)
    fails(cut, f"{ckpt / 'rank00000.safetensors'}: 1000 bytes, layout.json says")

    # DCP's pickled metadata, planted: never read (unpickling it would write `marker`)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / ".metadata").write_bytes(__import__("pickle").dumps(Payload()))
    assert main(["--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 0
    assert main(["export", str(run), str(tmp_path / "y.safetensors")]) == 0
    assert not marker.exists() and list(log(run)["step"]) == [1, 2, 3]


# --- LoRA and ControlNet ------------------------------------------------------------------------

# the options, the trained network's name, the file the run's end writes and the bound on the
# weights' difference, in lr: Adam's g / (|g| + eps) turns the rounding of gradient entries near
# zero into a fraction of lr (the ControlNet's blocks get their first gradients at step 2, from
# zero outputs: measured 0.072 and 0.54 lr on two CPUs whose kernels round differently, where a
# flipped sign costs up to one lr; LoRA 0.002 lr), while training moves them by whole steps
ADAPTERS = {
    "lora": (["--lora-rank", "4"], "mmdit.", "lora.safetensors", 0.02),
    "controlnet": (["--controlnet"], "controlnet.", "controlnet.safetensors", 1.0),
}


def adapter_args(kind, model_file, data_dir, out, *extra) -> list[str]:
    argv = args_for(model_file, data_dir, out, *ADAPTERS[kind][0], *extra)
    if kind == "controlnet":  # trained on the shapes scenes' edges
        at = argv.index("--data")
        argv[at : at + 2] = ["--shapes", "8"]
    return argv


def sharded_name(name: str, prefix: str) -> str:
    """A tensor's name in a sharded checkpoint, from its name in the unsharded one: the trained
    network's weights and AdamW state by their names in it, the EMA as it is."""
    part, _, rest = name.partition(".")
    if part == "ema":
        return name
    return f"{'model' if part == 'params' else part}.{rest.removeprefix(prefix)}"


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter_runs(request, model_file, data_dir, tmp_path_factory):
    """One kind's runs: unsharded 4 steps (`one`); sharded on 2 ranks 4 steps (`two`) and 2 steps,
    then resumed to 4 on 2 ranks (`half`) and, a copy, on 1 rank (`half1`)."""
    kind, root = request.param, tmp_path_factory.mktemp(request.param)
    one, two, half, half1 = (root / name for name in ("one", "two", "half", "half1"))
    first = [
        torchrun(2, adapter_args(kind, model_file, data_dir, two, "--steps", "4", "--shard")),
        torchrun(2, adapter_args(kind, model_file, data_dir, half, "--steps", "2", "--shard")),
    ]
    assert main(adapter_args(kind, model_file, data_dir, one, "--steps", "4")) == 0
    finish(*first)
    shutil.copytree(half, half1)
    resumed = torchrun(2, ["--out", str(half), "--resume", "--steps", "4", "--quiet"])
    assert main(["--out", str(half1), "--resume", "--steps", "4", "--quiet"]) == 0
    finish(resumed)
    return kind, root, {"one": one, "two": two, "half": half, "half1": half1}


def test_sharded_adapters_match_one_process_resume_and_export(adapter_runs, model_file):
    """LoRA and ControlNet: the sharded checkpoint holds what the unsharded one does (the trained
    weights, their EMA and AdamW state, nothing of the frozen MMDiT), by the same names; FSDP on
    2 ranks trains as one process does (loss and gradient norm to float32 rounding, the weights
    to a small fraction of one AdamW step, as for the full MMDiT); resumed on 2 ranks it ends
    where the uninterrupted run ends and on 1 rank, both within the same bound; `sd3 train
    export` writes the file the run's end writes, sharded or not."""
    kind, root, runs = adapter_runs
    _, prefix, end_file, bound = ADAPTERS[kind]
    one, two, half, half1 = (runs[n] for n in ("one", "two", "half", "half1"))
    folder = two / "checkpoint.sharded"
    assert_no_pickles(folder, 2)
    with safe_open(str(one / "checkpoint.safetensors"), "pt") as f:
        unsharded = {sharded_name(name, prefix) for name in f.keys()}
    held = set(json.loads((folder / "layout.json").read_text())["tensors"])
    assert held == unsharded, sorted(held ^ unsharded)[:4]
    if kind == "lora":
        assert all("lora_" in name for name in held)

    a, b = log(one), log(two)
    for name in ("loss", "grad_norm"):
        rel = np.abs(a[name] / b[name] - 1)
        print(f"{kind} {name}: 1 process {a[name]}, FSDP on 2 {b[name]}, rel diff {rel}")
        assert len(rel) == 4 and rel[0] < 1e-6 and rel.max() < 1e-5

    raw = {run: root / f"{run.name}-raw.safetensors" for run in (one, two)}
    for run, path in raw.items():
        export_run(run, path, ema=False)
    ones, twos = load_file(raw[one]), load_file(raw[two])
    worst = weight_diff(ones, twos)
    # LoRA's B and the ControlNet's output projections start at zero
    moved = max(
        v.abs().max().item() for k, v in ones.items() if "lora_B" in k or "controlnet_b" in k
    )
    print(
        f"{kind} weights: max abs diff {worst:.2e} = {worst / LR:.4f} lr; moved {moved / LR:.1f} lr"
    )
    assert worst < bound * LR and moved > 2 * LR

    # `sd3 train export` (EMA) is the file the run wrote at its end, sharded or not
    for run in (one, two):
        exported = root / f"{run.name}-export.safetensors"
        assert main(["export", str(run), str(exported)]) == 0
        ours, end = load_file(exported), load_file(run / end_file)
        assert ours.keys() == end.keys() and all(torch.equal(ours[k], end[k]) for k in ours)
        with safe_open(str(exported), "pt") as f, safe_open(str(run / end_file), "pt") as g:
            assert f.metadata() == g.metadata()
    assert weight_diff(load_file(one / end_file), load_file(two / end_file)) < bound * LR

    reference = load_file(two / end_file)
    stem = end_file.removesuffix(".safetensors")
    for run, limit in ((half, bound * LR), (half1, bound * LR)):  # rounding, amplified as above
        assert list(log(run)["step"]) == [1, 2, 3, 4]
        diff = weight_diff(load_file(run / f"{stem}_1.safetensors"), reference)
        print(f"{kind} resumed on {2 if run == half else 1} rank(s): max abs diff {diff:.2e}")
        assert diff <= limit
    assert_no_pickles(half1 / "checkpoint.sharded", 1)
