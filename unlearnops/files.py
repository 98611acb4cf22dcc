"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every store the pipeline or the ledger relies on goes through `atomic_path`: the content is
written to a unique temporary file beside the target (so two writers never share one), flushed
and fsynced, then renamed over the target, and the folder is fsynced so the rename survives a
power cut. A failed write removes its temporary file and leaves the old file as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; on a clean exit it is fsynced and renamed
    over `path`. `suffix` keeps the extension for writers that insist on one (np.savez: .npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> None:
    """Call `writer(tmp_path)` and move the result over `path` atomically."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a unique temporary file beside `path`, fsync it, then rename it over `path`."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    write_atomic(path, write)


def write_json(path: str | Path, payload: dict, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def write_csv(path: str | Path, frame, **options) -> None:
    """A pandas DataFrame as CSV, atomically (`options` go to DataFrame.to_csv)."""
    write_atomic(path, lambda tmp: frame.to_csv(tmp, **options))


def torch_save(path: str | Path, obj: Any) -> None:
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def savez(path: str | Path, **arrays) -> None:
    """np.savez, atomically (the temporary name ends in .npz so numpy adds nothing)."""
    import numpy as np

    write_atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes, read in blocks (DVC names files by the same hash)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
