"""Crash-safe safetensors files: training checkpoints and exports.

A run's own files (checkpoint, latent cache, fresh base model) are written in a hidden scratch
folder beside their destination, `.NAME.tmp-PID`, flushed to disk (fsync), and renamed over the
destination (`os.replace`, atomic on POSIX and Windows), then the folder entry is synced. A
process killed at any moment leaves either the old file or the new one, never a torn one; the
scratch folder it leaves (with whatever temporary file safetensors was writing) is removed by
`remove_stale_temporaries` when a later run starts in that folder. Files for the user (exported
models, LoRA files) go through `sd3.outputs.write_new` instead (`save_new`): never over an
existing file. Everything that is not a tensor (step, configuration) is JSON in the safetensors
metadata: nothing is ever pickled.
"""

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from sd3.checkpoints import CheckpointError, SafetensorsFile
from sd3.outputs import write_new

METADATA_KEY = "sd3_training"


def write_safetensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write the file (no atomicity of its own: the callers' temporary names give that). An I/O
    failure is an OSError naming `path`, whatever safetensors calls it."""
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(path),
            metadata=dict(metadata or {}),
        )
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def scratch_name(name: str, pid: int | None = None) -> str:
    """The scratch folder of a run's file `name`, written by process `pid` (default: this one)."""
    return f".{name}.tmp-{os.getpid() if pid is None else pid}"


def save_atomic(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `path`, replacing any file of that name in one step (a run's own files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(scratch_name(path.name))
    _remove(scratch)  # a dead process of the same number left it
    scratch.mkdir()
    try:
        tmp = scratch / path.name
        write_safetensors(tmp, tensors, metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files as 0600
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: name the file the user knows, not the scratch one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def save_new(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    option: str = "--out",
) -> Path:
    """Write a new file for the user (`sd3.outputs.write_new`): never over an existing file; the
    next free name (`model_1.safetensors`) if `path` is taken. Returns where it went."""
    return write_new(path, lambda tmp: write_safetensors(tmp, tensors, metadata), option)


def remove_stale_temporaries(folder: Path, names: Iterable[str], exports: str) -> list[Path]:
    """Remove what killed sd3 processes left in `folder`: the scratch folders of the run files
    `names` whose process is gone, and `write_new`'s temporaries of exported files (their names
    match the regular expression `exports`, e.g. `model|lora`). Nothing else is touched."""
    own = re.compile(rf"^\.({'|'.join(map(re.escape, names))})\.tmp-(\d+)$")
    exported = re.compile(rf"^\.({exports})(-step\d+)?(_\d+)?\.safetensors\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for entry in sorted(folder.iterdir()):
        match = own.match(entry.name)
        if (match and not _alive(int(match[2]))) or exported.match(entry.name):
            _remove(entry)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether another process of this number runs (assumed on Windows, which has no harmless
    probe). This process's own number means a dead one's leftover: a run cleans up at its start."""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], state: dict) -> Path:
    """Tensors plus a JSON-serialisable `state` (step, config, ...)."""
    return save_atomic(path, tensors, {METADATA_KEY: json.dumps(state, allow_nan=False)})


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, state) of a file written by `save_checkpoint`; CheckpointError if it is not one."""
    file = SafetensorsFile(path)
    state = _state(file)
    tensors = {k: file.get(k).clone() for k in file.tensors}
    return tensors, state


def read_state(path: str | Path) -> dict:
    """Only the JSON state of a checkpoint (reads the header, no tensors)."""
    return _state(SafetensorsFile(path))


def _state(file: SafetensorsFile) -> dict:
    if METADATA_KEY not in file.metadata:
        raise CheckpointError(
            f"{file.path}: not an sd3 training checkpoint (no {METADATA_KEY} metadata)"
        )
    try:
        state = json.loads(file.metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file.path}: corrupt training state in the metadata ({e})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file.path}: corrupt training state in the metadata (no step)")
    return state
