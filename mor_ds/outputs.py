"""Output files other people read: written with the permissions the umask allows (as checkpoints are), never
silently replaced, and named for what they hold."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, every file in it) the mode a plain `open()` would have given it:
    safetensors writes 0600 whatever the umask, which hides exports from the group on a shared cluster."""
    mode = 0o666 & ~current_umask()
    path = Path(path)
    for file in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        os.chmod(file, mode)


class OutputError(ValueError):
    """An output path that would be misnamed or would replace something; the message names it and the fix."""


def check_output(path: str | os.PathLike, *, suffix: str | None = None, force: bool = False,
                 flag: str = "--out") -> Path:
    """`path` if it may be written: it ends with `suffix` (when given) and does not exist yet (a file, or a
    directory with anything in it) unless `force`."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise OutputError(f"{flag} {path}: the file is {suffix[1:]}, name it *{suffix}")
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not force:
        raise OutputError(f"{flag} {path}: exists; pass --force to replace it")
    return path
