"""Sharded training (`sd3 train --shard`): the networks under FSDP2, and checkpoints, sharded too.

`shard_mmdit` makes each joint block one FSDP unit and the rest of the MMDiT (embedders, final
layer) the root unit: every rank holds 1/N of each parameter, its gradient and its AdamW state,
and a block's full weights exist only while that block runs (all-gathered before its forward and
again before its backward; gradients reduce-scattered after it). With bf16 the gathered weights
are bf16 and gradients reduce in fp32; the sharded master weights and AdamW state stay fp32.
With LoRA the units are the same: the frozen base weights are sharded and gathered alike, and
only the adapters get gradients and AdamW state. `shard_controlnet_training` shards a ControlNet
and its frozen MMDiT (one unit per block of each) under one root unit.

A checkpoint is the folder `checkpoint.sharded`, in sd3's own format (nothing in it is pickled,
so resuming a tampered folder cannot run code):

- `rank00000.safetensors`, `rank00001.safetensors`, ...: what each rank holds, under the tensors'
  full names: `model.NAME` (the trained weights: the MMDiT's state dict, a LoRA's adapters alone
  or the ControlNet's state dict; `Trainer.trained_weights`), `ema.mmdit.NAME` (or
  `ema.controlnet.NAME`), `optimizer.NAME.KEY` (AdamW's `exp_avg`, `exp_avg_sq`, `step`). FSDP2 shards dim 0 as `torch.chunk` does, so each
  file holds one range of rows of each sharded tensor; a tensor that is not sharded (a buffer,
  AdamW's 0-dim `step`) is in rank 0's file, whole.
- `layout.json`: the world size, each file's size in bytes, and for each tensor its full shape,
  its dtype (safetensors' name) and which rank's file holds which rows [start, stop).
- `state.json`: step, config, the run's options.

`load` validates the layout against the files (present, sizes, shapes, dtypes) and against this
run's model before it changes anything, and each rank then reads, memory-mapped, just the rows
of its own shards; so a run resumes on any number of ranks. `read_full` assembles whole tensors
the same way, for `sd3 train export`.

It is written as `.checkpoint.sharded.tmp-N` beside it and swapped in by renames (the previous
one is moved aside first and removed after), so a kill leaves the previous checkpoint or the new
one; `find_checkpoint` also finds a previous one moved aside by a kill between the two renames.
"""

import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sd3.checkpoints import DTYPES, CheckpointError
from sd3.models.controlnet import ControlNet
from sd3.models.mmdit import MMDiT

from .checkpoint import write_safetensors

SHARDED = "checkpoint.sharded"
STATE = "state.json"
LAYOUT = "layout.json"
FORMAT = "sd3 sharded checkpoint"
VERSION = 1
TEMPORARY = f".{SHARDED}.tmp-"
ASIDE = f".{SHARDED}.previous"
DTYPE_OF = {dtype: name for name, dtype in DTYPES.items()}


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def single_process_group() -> None:
    """A process group of one (FSDP needs one), where torchrun started none."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def precision(bf16: bool, cast_inputs: bool = True) -> MixedPrecisionPolicy:
    """`bf16`: bf16 weights in forward and backward, fp32 gradient reduction."""
    if not bf16:
        return MixedPrecisionPolicy(cast_forward_inputs=cast_inputs)
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs
    )


def shard_mmdit(mmdit: MMDiT, bf16: bool) -> None:
    """FSDP2 over the MMDiT: one unit per joint block, the rest in the root unit."""
    for block in mmdit.joint_blocks:
        fully_shard(block, mp_policy=precision(bf16))
    fully_shard(mmdit, mp_policy=precision(bf16))


def shard_controlnet_training(
    objective: nn.Module, mmdit: MMDiT, controlnet: ControlNet, bf16: bool
) -> None:
    """FSDP2 over a ControlNet and its frozen MMDiT: one unit per block of each, the rest of both
    (embedders, final layer) in the root unit, `objective`, the module that runs them. One root
    around both because the ControlNet reads the MMDiT's patch embedder and positional table
    before the MMDiT runs. The root leaves its inputs in fp32 (the loss's target stays exact) and
    frozen text encoders it holds unsharded (they run once per step, outside any block)."""
    for block in (*mmdit.joint_blocks, *controlnet.transformer_blocks):
        fully_shard(block, mp_policy=precision(bf16))
    encoders = getattr(objective, "text_encoders", None)
    ignored = set(encoders.parameters()) if encoders is not None else None
    fully_shard(objective, mp_policy=precision(bf16, cast_inputs=False), ignored_params=ignored)


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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: no readable {STATE} ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / STATE}: corrupt training state (no step)")
    return state


# --- what a rank holds ------------------------------------------------------------------------


def rows_held(t: Tensor) -> tuple[int, int, bool]:
    """(start, stop, sharded): the rows of dim 0 of `t` (1 row for a 0-dim tensor) this rank
    holds, and whether the other ranks hold other rows (else every rank holds all of it)."""
    rows = t.shape[0] if t.dim() else 1
    if not isinstance(t, DTensor):
        return 0, rows, False
    if t.device_mesh.ndim != 1 or not isinstance(t.placements[0], Shard | Replicate):
        raise ValueError(f"cannot save a DTensor placed {t.placements} on {t.device_mesh}")
    if isinstance(t.placements[0], Replicate) or t.device_mesh.size() == 1:
        return 0, rows, False
    if t.placements[0] != Shard(0):
        raise ValueError(f"cannot save a DTensor sharded {t.placements}: only on dim 0")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t.to_local().shape):  # FSDP2 shards as torch.chunk: checked here
        raise ValueError(f"DTensor local shape {t.to_local().shape}, expected {shape}")
    return offset[0], offset[0] + shape[0], True


def named_tensors(
    weights: dict[str, Tensor], optimizer: torch.optim.Optimizer, ema: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Everything a checkpoint holds, by its name in the files (DTensors where sharded)."""
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors |= {f"ema.{k}": v for k, v in ema.items()}
    names = param_names(weights, optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimizer state {key} of {names[id(p)]} is not a tensor")
                tensors[f"optimizer.{names[id(p)]}.{key}"] = value
    return tensors


def param_names(weights: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id(parameter) -> its name in `weights`, for each parameter the optimizer trains."""
    names = {id(p): n for n, p in weights.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer trains a parameter the checkpoint does not hold")
    return names


# --- save ------------------------------------------------------------------------------------


def save(
    out: Path, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer, ema: dict, state: dict
) -> Path:
    """Write the sharded checkpoint of the trained `weights` (by name; DTensors where FSDP shards
    them, with every parameter the optimizer trains), the optimizer's state and the EMA; every
    rank calls this. Returns the folder."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = out / f"{TEMPORARY}{state['step']}"  # the same name in every rank
    if rank == 0:
        remove_temporaries(out)
        tmp.mkdir()
    dist.barrier()
    held, rows, described = {}, {}, {}
    for name, t in named_tensors(weights, optimizer, ema).items():
        start, stop, spread = rows_held(t)
        if t.dtype not in DTYPE_OF:
            raise ValueError(f"cannot save {name}: dtype {t.dtype}")
        described[name] = {"shape": list(t.shape), "dtype": DTYPE_OF[t.dtype]}
        if stop > start and (spread or rank == 0):
            held[name] = local(t).detach()
            rows[name] = [start, stop]
    file = tmp / rank_file(rank)
    write_safetensors(file, held)
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
    mine = (rows, file.stat().st_size)
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    final = out / SHARDED
    if rank == 0:
        for name, entry in described.items():
            entry["shards"] = [
                [r, *everyone[r][0][name]] for r in range(world) if name in everyone[r][0]
            ]
        layout = {
            "format": FORMAT,
            "version": VERSION,
            "world_size": world,
            "files": [{"name": rank_file(r), "bytes": everyone[r][1]} for r in range(world)],
            "tensors": described,
        }
        _write_json(tmp / LAYOUT, layout)
        _write_json(tmp / STATE, state)
        _sync_folder(tmp)
        if final.exists():
            shutil.rmtree(out / ASIDE, ignore_errors=True)
            os.rename(final, out / ASIDE)
        os.rename(tmp, final)
        shutil.rmtree(out / ASIDE, ignore_errors=True)
        _sync_folder(out)
    dist.barrier()
    return final


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())


# --- read ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    shards: tuple[tuple[int, int, int], ...]  # (rank, start, stop), in order of rows


class Checkpoint:
    """A sharded checkpoint folder, its layout validated against its files on opening (every
    error a CheckpointError naming the file and what is wrong); tensors read memory-mapped, row
    range by row range. Use as a context manager (it keeps the files open)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.layout_path = self.path / LAYOUT
        self._stack = ExitStack()
        self.files: list = []
        try:
            self.world, self.tensors, sizes = self._read_layout()
            self._open_files(sizes)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.layout_path}: {what}")

    def _read_layout(self) -> tuple[int, dict[str, Entry], list[int]]:
        try:
            layout = json.loads(self.layout_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.layout_path}: missing (not a checkpoint of this sd3 version: "
                "sharded checkpoints hold rank*.safetensors and layout.json)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"not readable JSON ({e})") from None
        if not isinstance(layout, dict) or layout.get("format") != FORMAT:
            raise self._bad(f'not an sd3 sharded checkpoint layout (no "format": "{FORMAT}")')
        if layout.get("version") != VERSION:
            raise self._bad(f"version {layout.get('version')!r}; this sd3 reads {VERSION}")
        world = layout.get("world_size")
        if not _count(world) or world < 1:
            raise self._bad(f"world_size must be a whole number >= 1, got {world!r}")
        files = layout.get("files")
        if not isinstance(files, list) or len(files) != world:
            raise self._bad(f'"files" must list {world} files (one per rank)')
        sizes = []
        for r, f in enumerate(files):
            if (
                not isinstance(f, dict)
                or f.get("name") != rank_file(r)
                or not _count(f.get("bytes"))
            ):
                raise self._bad(f'"files"[{r}] must be {{"name": "{rank_file(r)}", "bytes": N}}')
            sizes.append(f["bytes"])
        described = layout.get("tensors")
        if not isinstance(described, dict):
            raise self._bad('"tensors" must be an object')
        tensors = {}
        for name, d in described.items():
            tensors[name] = self._entry(name, d, world)
        return world, tensors, sizes

    def _entry(self, name: str, d: object, world: int) -> Entry:
        if not isinstance(d, dict):
            raise self._bad(f"{name}: not an object")
        shape, dtype, shards = d.get("shape"), d.get("dtype"), d.get("shards")
        if not isinstance(shape, list) or not all(_count(n) for n in shape):
            raise self._bad(f"{name}: shape must be a list of whole numbers, got {shape!r}")
        if dtype not in DTYPES:
            raise self._bad(f"{name}: unknown dtype {dtype!r}")
        rows = shape[0] if shape else 1
        if not isinstance(shards, list) or not all(
            isinstance(s, list) and len(s) == 3 and all(_count(n) for n in s) for s in shards
        ):
            raise self._bad(f"{name}: shards must be a list of [rank, start, stop]")
        at = 0
        for rank, start, stop in shards:
            if rank >= world or start != at or stop <= start:
                raise self._bad(f"{name}: shards {shards} do not cover rows 0..{rows} in order")
            at = stop
        if at != rows:
            raise self._bad(f"{name}: shards {shards} do not cover rows 0..{rows} in order")
        return Entry(tuple(shape), DTYPES[dtype], tuple(tuple(s) for s in shards))

    def _open_files(self, sizes: list[int]) -> None:
        for r, size in enumerate(sizes):
            file = self.path / rank_file(r)
            if not file.is_file():
                raise CheckpointError(f"{file}: missing ({LAYOUT} lists it)")
            if file.stat().st_size != size:
                raise CheckpointError(
                    f"{file}: {file.stat().st_size} bytes, {LAYOUT} says {size} (cut short or "
                    "replaced)"
                )
            try:
                self.files.append(self._stack.enter_context(safe_open(str(file), "pt")))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        for r, handle in enumerate(self.files):
            held = set(handle.keys())
            wanted = {n for n, e in self.tensors.items() for s in e.shards if s[0] == r}
            if held != wanted:
                odd = sorted(held ^ wanted)[:3]
                raise CheckpointError(
                    f"{self.path / rank_file(r)}: its tensors are not those {LAYOUT} puts in it "
                    f"(e.g. {odd})"
                )
        for name, entry in self.tensors.items():
            for rank, start, stop in entry.shards:
                part = self.files[rank].get_slice(name)
                shape = tuple(part.get_shape())
                expected = (stop - start, *entry.shape[1:]) if entry.shape else ()
                if shape != expected or DTYPES.get(part.get_dtype()) != entry.dtype:
                    raise CheckpointError(
                        f"{self.path / rank_file(rank)}: {name} is {part.get_dtype()} "
                        f"{list(shape)}, {LAYOUT} says {DTYPE_OF[entry.dtype]} {list(expected)}"
                    )

    def check(self, name: str, target: Tensor) -> None:
        """CheckpointError unless the checkpoint has `name` with `target`'s shape and dtype."""
        entry = self.tensors.get(name)
        if entry is None:
            raise self._bad(f"no {name} (a checkpoint of a different model or settings)")
        if entry.shape != tuple(target.shape) or entry.dtype != target.dtype:
            raise self._bad(
                f"{name} is {DTYPE_OF[entry.dtype]} {list(entry.shape)}, this run's is "
                f"{DTYPE_OF.get(target.dtype, target.dtype)} {list(target.shape)} (a different "
                "model or settings)"
            )

    def read(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of `name` (a 0-dim tensor: rows 0..1 are all of it)."""
        entry = self.tensors[name]
        if not entry.shape:
            return self.files[entry.shards[0][0]].get_tensor(name)
        parts = []
        for rank, begin, end in entry.shards:
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                parts.append(self.files[rank].get_slice(name)[lo - begin : hi - begin])
        if not parts:
            return torch.empty((0, *entry.shape[1:]), dtype=entry.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_full(self, name: str) -> Tensor:
        entry = self.tensors[name]
        return self.read(name, 0, entry.shape[0] if entry.shape else 1)

    def fill(self, name: str, target: Tensor) -> None:
        """Copy into `target` (a DTensor: its local shard) the rows it holds."""
        start, stop, _ = rows_held(target)
        with torch.no_grad():
            local(target).copy_(self.read(name, start, stop).reshape(local(target).shape))


def _count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


# --- load ------------------------------------------------------------------------------------


def load(
    path: Path, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer, ema: dict
) -> dict:
    """Load a checkpoint written by `save` (on any number of ranks) into the trained `weights`
    (as `save` takes them), the optimizer (whose state it creates) and the EMA tensors, in place;
    returns its state. Every check runs before anything changes."""
    state = read_state(path)
    with Checkpoint(path) as ckpt:
        targets = {f"model.{k}": v for k, v in weights.items()}
        targets |= {f"ema.{k}": v for k, v in ema.items()}
        names = param_names(weights, optimizer)
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        prefixes = {f"optimizer.{names[id(p)]}.": p for p in trained}
        keys: dict[int, list[str]] = {id(p): [] for p in trained}
        for name in ckpt.tensors:
            if name.startswith("optimizer."):
                head, _, key = name.rpartition(".")
                p = prefixes.get(head + ".")
                if p is None:
                    raise ckpt._bad(f"{name}: optimizer state of no parameter this run trains")
                keys[id(p)].append(key)
            elif name not in targets:
                raise ckpt._bad(f"{name}: not in this run's model (a different model or settings)")
        first = sorted(keys[id(trained[0])]) if trained else []
        for p in trained:
            if sorted(keys[id(p)]) != first:
                raise ckpt._bad(
                    f"optimizer state of {names[id(p)]}: {sorted(keys[id(p)])}, of "
                    f"{names[id(trained[0])]}: {first} (every parameter has the same)"
                )
        for name, target in targets.items():
            ckpt.check(name, target)
        states = {}
        for p in trained:
            entry = states[id(p)] = {}
            for key in keys[id(p)]:
                name = f"optimizer.{names[id(p)]}.{key}"
                stored = ckpt.tensors[name]
                if stored.shape == ():  # AdamW's step: a plain CPU tensor on every rank
                    entry[key] = torch.zeros((), dtype=stored.dtype)
                else:
                    entry[key] = torch.zeros_like(p, dtype=stored.dtype)
                ckpt.check(name, entry[key])
        # everything checked: now fill
        for name, target in targets.items():
            ckpt.fill(name, target)
        for p in trained:
            for key, t in states[id(p)].items():
                ckpt.fill(f"optimizer.{names[id(p)]}.{key}", t)
        optimizer.state.clear()
        for p in trained:
            if states[id(p)]:
                optimizer.state[p] = states[id(p)]
    return state


def gather(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole tensors of `weights` on the CPU, in rank 0 (empty in the others), gathered one
    at a time; every rank calls this."""
    whole = {}
    for name, t in weights.items():
        t = full(t.detach()).cpu()
        if dist.get_rank() == 0:
            whole[name] = t
    return whole


def load_for_export(path: Path, weights: dict[str, Tensor], ema_prefix: str, ema: bool) -> None:
    """The checkpoint's trained weights into the plain tensors `weights` (by their `model.*`
    names; the EMA, `ema.{ema_prefix}NAME`, where it has one and `ema`), in one process, without
    a process group; whole tensors assembled from the shards, one at a time, memory-mapped."""
    with Checkpoint(path) as ckpt:
        chosen = {}
        for name, t in weights.items():
            key = f"ema.{ema_prefix}{name}"
            key = key if ema and key in ckpt.tensors else f"model.{name}"
            ckpt.check(key, t)
            chosen[name] = key
        with torch.no_grad():
            for name, t in weights.items():
                t.copy_(ckpt.read_full(chosen[name]))


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
