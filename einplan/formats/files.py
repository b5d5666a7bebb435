"""Writing files safely: atomic replacement with a plain file's mode, outputs that never
overwrite inputs, fsync, and content hashes."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from einplan.errors import EinplanError


class OutputError(EinplanError):
    """An output that cannot be written, or would destroy one of the command's inputs."""


def create_temp(path: Path) -> Path:
    """A new empty file beside ``path``, created as ``open(path, "w")`` would create it
    (mode 0666 less the umask, not mkstemp's 0600), so the renamed output reads as usual."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[str], None]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function writing the temporary path it is
    given) to a temporary file beside ``path`` (its folder made if missing), then rename it
    into place: a failed or interrupted write leaves the previous file as it was. Raises
    OutputError naming ``path`` when it cannot be written (read-only, disk full); returns
    ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp(path)
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse, before anything is written, an output path that is one of the inputs (the same
    file or folder, also through links): writing it would destroy the input."""
    out = Path(output)
    if not out.exists():
        return
    for source in inputs:
        if source is not None and Path(source).exists() and os.path.samefile(out, source):
            raise OutputError(
                f"output {str(out)!r} is also an input ({source}): writing it would destroy "
                "the input; choose another output path"
            )


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk, so a rename after it never exposes missing data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
