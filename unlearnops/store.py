"""A store that workers on different hosts share: chunk outputs under content keys, input files by md5.

Any fsspec URL (https://filesystem-spec.readthedocs.io): a plain path is a local folder (the
default, on one machine or a shared mount), `s3://bucket/prefix` or `gs://...` in production
(the matching fsspec backend must be installed, as for a DVC remote). Layout under the URL:

  chunks/<key>/         one chunk's files (models.pt, logits.npz, meta.json) and `.complete`
  files/<md5>           an input file (split images, forget set, target), named by its content
  tmp/<uuid>/           uploads in progress

Writes are atomic for readers: a chunk is uploaded to tmp/, its files are moved under its key, and
the `.complete` marker is moved last; `has` looks only at the marker, so an interrupted upload
leaves no visible key (on a local folder every move is a rename). Keys are hashes of everything
that determines their content (unlearnops/chunks.py), so a key already present is left as it is:
two workers that raced wrote the same result.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from unlearnops.files import atomic_path, file_md5

COMPLETE = ".complete"


class StoreError(RuntimeError):
    """The store cannot be opened or reached (one line; exit code 4, internal)."""


class NotInStore(FileNotFoundError):
    """The store lacks a chunk or file asked for (one line naming what makes it; exit code 2)."""


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


class Store:
    """Chunk outputs and input files in the folder or bucket at `url`."""

    def __init__(self, url: str):
        if not url or not isinstance(url, str):
            raise StoreError(f"store URL must be a non-empty string, got {url!r}")
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except Exception as err:  # unknown protocol, backend not installed, bad credentials
            raise StoreError(f"store {url} cannot be opened: {_first_line(err)}") from None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _call(self, what: str, operation, *args):
        try:
            return operation(*args)
        except (StoreError, NotInStore):
            raise
        except Exception as err:  # network, permissions, a vanished mount: one line naming the store
            raise StoreError(f"store {self.url} unreachable while {what}: {_first_line(err)}") from None

    # ------------------------------------------------------------ chunk outputs

    def has(self, key: str) -> bool:
        """Whether the chunk `key` is stored completely (asked afresh: another worker may have put it)."""
        marker = self._join("chunks", key, COMPLETE)
        self.fs.invalidate_cache(self._join("chunks", key))
        return self._call(f"looking up {key}", self.fs.exists, marker)

    def put(self, key: str, local_dir: str | Path) -> None:
        """Upload the files of `local_dir` as chunk `key` (flat: no sub-folders); a key already
        present is left as it is."""
        if self.has(key):
            return
        files = sorted(p for p in Path(local_dir).iterdir() if p.is_file())
        tmp = self._join("tmp", uuid.uuid4().hex)
        final = self._join("chunks", key)

        def upload() -> None:
            self.fs.makedirs(tmp, exist_ok=True)
            for path in files:
                self.fs.put_file(str(path), f"{tmp}/{path.name}")
            self.fs.pipe_file(f"{tmp}/{COMPLETE}", key.encode())
            self.fs.makedirs(final, exist_ok=True)
            for name in [p.name for p in files] + [COMPLETE]:  # the marker last: `has` sees a whole chunk or none
                self.fs.mv(f"{tmp}/{name}", f"{final}/{name}")
            self.fs.rm(tmp, recursive=True)

        self._call(f"uploading {key}", upload)

    def get(self, key: str, local_dir: str | Path, what: str = "") -> Path:
        """Download chunk `key` into `local_dir` (created); `what` names the chunk in the error
        if the store lacks it."""
        if not self.has(key):
            raise NotInStore(f"store {self.url} has no chunk {key}{f' ({what})' if what else ''}: "
                             "run it first (unlearnops.chunks.run_chunk or `python -m unlearnops.chunks run`)")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        source = self._join("chunks", key)

        def download() -> None:
            for entry in self.fs.ls(source, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name != COMPLETE:
                    with atomic_path(local_dir / name) as tmp:
                        self.fs.get_file(entry, str(tmp))

        self._call(f"downloading {key}", download)
        return local_dir

    # ------------------------------------------------------------ input files, by content

    def put_file(self, path: str | Path) -> str:
        """Upload one input file under its md5 (unless the store holds it); return the md5."""
        md5 = file_md5(path)
        final = self._join("files", md5)

        def upload() -> None:
            if self.fs.exists(final):
                return
            tmp = self._join("tmp", uuid.uuid4().hex)
            self.fs.makedirs(self._join("tmp"), exist_ok=True)
            self.fs.makedirs(self._join("files"), exist_ok=True)
            self.fs.put_file(str(path), tmp)
            self.fs.mv(tmp, final)

        self._call(f"uploading {path}", upload)
        return md5

    def get_file(self, md5: str, dest: str | Path) -> Path:
        """Write the stored file `md5` to `dest` atomically, checking its md5 first."""
        dest = Path(dest)
        source = self._join("files", md5)
        if not self._call(f"looking up file {md5}", self.fs.exists, source):
            raise NotInStore(f"store {self.url} has no file {md5} (for {dest}): publish the inputs first (unlearnops.chunks.publish_inputs)")
        with atomic_path(dest, suffix=dest.suffix) as tmp:
            self._call(f"downloading file {md5}", self.fs.get_file, source, str(tmp))
            if (got := file_md5(tmp)) != md5:
                raise StoreError(f"store {self.url}: file {md5} arrived with md5 {got} (corrupt store or transfer)")
        return dest
