"""Writing the user's files: checked before the work starts, never over an existing file, never
left half-written.

Every file sd3 writes for a user (images, latents, contact sheets, exported models) goes through
`write_new`: the bytes go to a hidden temporary file in the target folder, which is then linked
to its name with no-replace semantics (`os.link` fails where the name exists), so a reader never
sees a partial file and two writers never share one name. Where a name is taken in the meantime
(another process won the race), the file moves to the next free name and the caller is told.
"""

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(ValueError):
    """A file cannot be written where the user asked: one line naming the option and the path."""


def describe(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def check_new_file(path: str | Path, option: str) -> Path:
    """`path` as a new file the user asked for with `option`: it must not exist, and its folder
    must exist and take a new file (checked by creating and removing one)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputError(f"{option} {path} exists already; sd3 never overwrites a file")
    check_folder(path.parent, option, path)
    return path


def check_folder(folder: Path, option: str, path: Path | None = None) -> None:
    """The folder exists and a file can be created in it, or one OutputError."""
    what = f"{option} {path if path is not None else folder}"
    if not folder.is_dir():
        raise OutputError(f"{what}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sd3-", suffix=".probe", dir=folder)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {folder} ({describe(e)})") from None
    os.close(fd)
    os.unlink(probe)


def next_free(path: Path, taken: set[Path] = frozenset()) -> Path:
    """`path`, or `stem_1.ext`, `stem_2.ext`, ... whichever neither exists nor is in `taken`."""
    candidate, k = path, 1
    while candidate.exists() or candidate.is_symlink() or candidate in taken:
        candidate, k = path.with_name(f"{path.stem}_{k}{path.suffix}"), k + 1
    return candidate


def write_new(
    path: str | Path,
    data: bytes | Callable[[Path], None],
    option: str,
    move_if_taken: bool = True,
) -> Path:
    """Write `data` as the new file `path` and return where it went: `path`, or with
    `move_if_taken` the next free name when another writer took `path` first (else one
    OutputError). No partial file is ever visible under either name. `data` is the bytes, or a
    function that writes the file at the path it is given (for files too large to hold twice in
    memory): that path is in a hidden folder of its own beside `path`, so whatever temporary files
    the function makes stay in there too."""
    path = Path(path)
    folder = path.parent
    writer = data if callable(data) else None
    try:
        if writer is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        else:
            scratch = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            tmp = os.path.join(scratch, path.name)
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {folder} ({describe(e)})") from None
    try:
        try:
            if writer is None:
                _write_all(fd, data)
            else:
                writer(Path(tmp))
                _sync(tmp)
        except OSError as e:
            raise OutputError(f"{option} {path}: cannot write it ({describe(e)})") from None
        target = path
        while True:
            try:
                _link_new(tmp, target)
                return target
            except FileExistsError:
                if not move_if_taken:
                    raise OutputError(
                        f"{option} {target} was created by someone else meanwhile; sd3 never "
                        "overwrites a file"
                    ) from None
                target = next_free(path)
            except OSError as e:
                raise OutputError(f"{option} {target}: cannot write it ({describe(e)})") from None
    finally:
        if writer is None:
            if os.path.exists(tmp):
                os.unlink(tmp)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _sync(path: str) -> None:
    """Give a file another function wrote the mode a plain open() would, and sync it to disk."""
    os.chmod(path, 0o666 & ~_UMASK)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write, flush and sync `data` to the open file `fd`, then close it."""
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as a plain open() would (mkstemp gives 0600)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_new(tmp: str, target: Path) -> None:
    """Give the finished temporary file the name `target`, failing where `target` exists."""
    try:
        os.link(tmp, target)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EXDEV,
        ):
            raise
        # a file system without hard links: create the name exclusively, then copy the bytes in
        # (a crash in between could leave a partial file, which linking avoids where it can)
        with open(tmp, "rb") as src:
            data = src.read()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError:
            os.unlink(target)
            raise
