"""Small file helpers: atomic writes (a killed process never leaves a file half-written) and
reading user YAML with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file (or a folder's entries) to the disk: after this a crash of the
    machine, not only of the process, leaves it as written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` in one step.
    The file is on the disk before the rename and the rename after it, so even a power cut
    leaves either the old file or the new one whole (never an empty file under the name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the same suffix: some writers (torch.export.save, TVM's export_library) go by it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, _write)


def read_yaml(path: str | os.PathLike, *, what: str, option: str) -> Any:
    """Parse a user's YAML file; a missing file or bad syntax is a one-line `UserError` naming
    the file (``what``), the line and the option that passed it."""
    import yaml

    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} not found; check `{option}`")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {str(path)!r} is not valid YAML{where}; fix its syntax") from e
