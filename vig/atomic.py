"""Writing outputs so that nothing half-written ever looks complete: write under a temporary name, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temporary_sibling(path: Path) -> Path:
    # Hidden, in the same folder (so the rename is atomic), and never ending in the final suffix.
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block completes.

    Works for a file or a folder: a folder that already exists at `path` is swapped out and deleted
    after the new one is in place. On an exception the temporary path is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path)
    _remove(temporary)
    try:
        yield temporary
        if temporary.is_dir() and path.exists():
            previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
            _remove(previous)
            os.replace(path, previous)
            os.replace(temporary, path)
            _remove(previous)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON with sorted keys (stable bytes for equal content)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
