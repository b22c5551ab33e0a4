"""`sd3 train` under torchrun: 2 data-parallel processes (DDP over gloo, on CPU) train like one."""

import json
import subprocess

import numpy as np
import pytest
import torch
from helpers import noise_images, save_single_file, tiny_models
from helpers import torchrun as run_under_torchrun

from sd3.training.checkpoint import load_checkpoint
from sd3.training.command import main


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
        "--batch-size", "4", "--checkpoint-every", "2", "--quiet", *extra,
    ]  # fmt: skip


def torchrun(nproc: int, argv: list[str], **popen) -> subprocess.Popen:
    return run_under_torchrun(nproc, "sd3.training.command", argv, **popen)


@pytest.mark.parametrize("variant", [[], ["--train-text-encoders", "--grad-clip", "0"]])
def test_two_processes_match_one(model_file, data_dir, tmp_path, variant):
    """DDP over 2 gloo processes, 2 samples each, trains like 1 process with batch 4: noise, sigma
    and dropout of every sample come from (seed, step), not from the process.

    Per step, the loss and the norm of the averaged gradient agree to float32 rounding, and so does
    AdamW's first moment (a linear function of every step's gradient). The weights agree to a
    small fraction of one AdamW step: Adam's g / (|g| + eps) turns the reduction-order rounding of
    near-zero gradient entries into up to ~2% of lr, while a wrong sample, noise or dropout mask
    would move entries by whole steps. (Trained CLIP's k_proj bias has an exactly-zero gradient,
    softmax being shift-invariant, so there Adam steps on rounding noise: weights are compared
    for the MMDiT-only run.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    lr = 1e-3
    extra = ["--steps", "3", "--text-dropout", "0.3", "--lr", str(lr), *variant]
    proc = torchrun(2, args_for(model_file, data_dir, two, *extra))
    assert main(args_for(model_file, data_dir, one, *extra)) == 0
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    log1, log2 = (
        [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        for out in (one, two)
    )
    for name in ("loss", "grad_norm"):
        a, b = np.array([e[name] for e in log1]), np.array([e[name] for e in log2])
        print(
            f"{name}: 1 process {a}, 2 processes {b}, max rel diff {np.max(np.abs(a / b - 1)):.1e}"
        )
        assert len(a) == 3 and np.allclose(a, b, rtol=1e-6, atol=0)
    a, _ = load_checkpoint(one / "checkpoint.safetensors")
    b, state = load_checkpoint(two / "checkpoint.safetensors")
    assert state["world_size"] == 2 and a.keys() == b.keys()
    # relative to the largest moment: some entries (CLIP's k_proj bias) are pure rounding noise
    # Token-embedding gradients sum over every occurrence of a token (T5's pad token fills most of
    # each sample), in an order that depends on the split, so they carry more rounding: measured
    # 8e-6 on a Sapphire Rapids-class CPU, 3e-7 for every other tensor.
    keys = [k for k in a if k.endswith(".exp_avg")]
    scale = max(a[k].abs().max().item() for k in keys)
    for embeddings, bound in ((False, 5e-6), (True, 3e-5)):
        group = [k for k in keys if ("embed_tokens" in k or "token_embedding" in k) == embeddings]
        moments = max(((b[k] - a[k]).abs().max().item() for k in group), default=0.0) / scale
        print(
            f"AdamW first moments{' (token embeddings)' * embeddings}: max abs diff / max abs value {moments:.1e}"
        )
        assert moments < bound
    if not variant:
        worst = max((b[k] - a[k]).abs().max().item() for k in a if k.startswith("params."))
        initial = {f"params.mmdit.{k}": v for k, v in tiny_models()["mmdit"].state_dict().items()}
        moved = max((a[k] - initial[k]).abs().max().item() for k in initial if k in a)
        print(f"weights: max abs diff {worst:.2e} = {worst / lr:.3f} lr; moved {moved / lr:.1f} lr")
        assert worst < 0.05 * lr and moved > 2.5 * lr
