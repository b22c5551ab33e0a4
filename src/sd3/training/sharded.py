"""Sharded training (`sd3 train --shard`): the MMDiT under FSDP2, checkpoints under
torch.distributed.checkpoint (DCP).

`shard_mmdit` makes each joint block one FSDP unit and the rest of the MMDiT (embedders, final
layer) the root unit: every rank holds 1/N of each parameter, its gradient and its AdamW state,
and a block's full weights exist only while that block runs (all-gathered before its forward and
again before its backward; gradients reduce-scattered after it). With bf16 the gathered weights
are bf16 and gradients reduce in fp32; the sharded master weights and AdamW state stay fp32.

A checkpoint is the folder `checkpoint.sharded`: DCP's files (one per rank, plus its metadata)
and `state.json` (step, config, the run's options). It is written as `.checkpoint.sharded.tmp-N`
beside it and swapped in by renames (the previous one is moved aside first and removed after), so
a kill leaves the previous checkpoint or the new one; `find_checkpoint` also finds a previous one
moved aside by a kill between the two renames. DCP re-shards on load, so a run resumes on any
number of ranks. DCP's metadata file is pickled by torch: load only checkpoints you wrote.
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sd3.checkpoints import CheckpointError
from sd3.models.mmdit import MMDiT

SHARDED = "checkpoint.sharded"
STATE = "state.json"
TEMPORARY = f".{SHARDED}.tmp-"
ASIDE = f".{SHARDED}.previous"


def single_process_group() -> None:
    """A process group of one (FSDP needs one), where torchrun started none."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard_mmdit(mmdit: MMDiT, bf16: bool) -> None:
    """FSDP2 over the MMDiT: one unit per joint block, the rest in the root unit. `bf16`: bf16
    weights in forward and backward, fp32 gradient reduction."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in mmdit.joint_blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(mmdit, mp_policy=policy)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), a plain one as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def find_checkpoint(out: Path) -> Path | None:
    """The run's sharded checkpoint folder: the current one, or the previous one moved aside by a
    save that was killed between its two renames; None if there is neither."""
    for path in (out / SHARDED, out / ASIDE):
        if (path / STATE).is_file():
            return path
    return None


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: no readable {STATE} ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / STATE}: corrupt training state (no step)")
    return state


def save(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict, state: dict
) -> Path:
    """Write the sharded checkpoint of `model` (FSDP), its optimizer and EMA; every rank calls
    this. Returns the folder."""
    rank = dist.get_rank()
    tmp = out / f"{TEMPORARY}{state['step']}"  # the same name in every rank
    if rank == 0:
        remove_temporaries(out)
        tmp.mkdir()
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state, "ema": ema}, checkpoint_id=tmp
    )  # returns once every rank's files and the metadata are written
    final = out / SHARDED
    if rank == 0:
        with open(tmp / STATE, "w") as f:
            f.write(json.dumps(state, allow_nan=False))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(out / ASIDE, ignore_errors=True)
            os.rename(final, out / ASIDE)
        os.rename(tmp, final)
        shutil.rmtree(out / ASIDE, ignore_errors=True)
        _sync_folder(out)
    dist.barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict) -> dict:
    """Load a checkpoint written by `save` (on any number of ranks) into `model` (FSDP), its
    optimizer and the EMA tensors (in place); returns its state."""
    state = read_state(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    everything = {"model": model_state, "optimizer": optimizer_state, "ema": ema}
    try:
        dcp.load(everything, checkpoint_id=path)
    except Exception as e:  # DCP raises its own kinds for missing keys and wrong shapes
        raise CheckpointError(
            f"{path}: does not fit this run (different model or settings): {e}"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=everything["model"],
        optim_state_dict=everything["optimizer"],
    )  # fmt: skip
    return state


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of an FSDP model, on the CPU, in rank 0 (empty in the others); every
    rank calls this."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_for_export(path: Path, mmdit: MMDiT, ema: bool) -> None:
    """The checkpoint's MMDiT weights (its EMA where it has one and `ema`) into a plain `mmdit`,
    in one process, without a process group."""
    weights = dict(mmdit.state_dict())
    everything = {"model": weights}
    if ema:
        read = dcp.FileSystemReader(path).read_metadata()
        names = {
            key.removeprefix("ema.mmdit.")
            for key in read.state_dict_metadata
            if key.startswith("ema.mmdit.")
        }
        everything["ema"] = {f"mmdit.{n}": torch.empty_like(weights[n]) for n in names}
    with (
        warnings.catch_warnings()
    ):  # "assuming the intent is to load in a single process": so it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(everything, checkpoint_id=path, no_dist=True)
    with torch.no_grad():
        for name, t in everything.get("ema", {}).items():
            weights[name.removeprefix("mmdit.")].copy_(t)


def remove_temporaries(out: Path) -> None:
    """Remove the folders of saves that were killed (a run saves one checkpoint at a time)."""
    for entry in out.iterdir():
        if entry.name.startswith(TEMPORARY) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
