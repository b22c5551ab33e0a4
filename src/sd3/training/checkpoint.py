"""Crash-safe safetensors files: training checkpoints and exports.

A file is written next to its destination under a temporary name, flushed to disk (fsync), and
renamed over the destination (`os.replace`, atomic on POSIX and Windows), then the folder entry is
synced. A process killed at any moment leaves either the old file or the new one, never a torn
one. Everything that is not a tensor (step, configuration) is JSON in the safetensors metadata:
nothing is ever pickled.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from sd3.checkpoints import CheckpointError, SafetensorsFile

METADATA_KEY = "sd3_training"


def save_atomic(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata or {}),
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files as 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, tensors: Mapping[str, Tensor], state: dict) -> Path:
    """Tensors plus a JSON-serialisable `state` (step, config, ...)."""
    return save_atomic(path, tensors, {METADATA_KEY: json.dumps(state)})


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, state) of a file written by `save_checkpoint`; CheckpointError if it is not one."""
    file = SafetensorsFile(path)
    if METADATA_KEY not in file.metadata:
        raise CheckpointError(
            f"{path}: not an sd3 training checkpoint (no {METADATA_KEY} metadata)"
        )
    try:
        state = json.loads(file.metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt training state in the metadata ({e})") from None
    tensors = {k: file.get(k).clone() for k in file.tensors}
    return tensors, state


def read_state(path: str | Path) -> dict:
    """Only the JSON state of a checkpoint (reads the header, no tensors)."""
    file = SafetensorsFile(path)
    if METADATA_KEY not in file.metadata:
        raise CheckpointError(
            f"{path}: not an sd3 training checkpoint (no {METADATA_KEY} metadata)"
        )
    return json.loads(file.metadata[METADATA_KEY])
