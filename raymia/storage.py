"""Where the store (`store:`, default `output_dir`) keeps signals, caches and sweep state: a local path (a
node's disk or an NFS mount), or a URI that pyarrow.fs opens (s3://bucket/prefix, gs://bucket/prefix,
hdfs://..., file:///abs/path) or, failing that, fsspec (any protocol it has an implementation for, wrapped in
pyarrow's FileSystem interface).

Both kinds offer the same operations on paths relative to the root (read, write, size, delete, list,
subdirs, remove_tree); writes are atomic (a temporary name moved into place: an object store's PUT of a
whole object is atomic by itself). Local paths use the standard library only, so the compute core runs
where pyarrow is not installed.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from raymia.errors import SpecError, first_line


class _Files:
    location: str

    def __eq__(self, other: object) -> bool:  # two handles on one root are the same store
        return type(other) is type(self) and other.location == self.location

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.location))


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"  # in temporary names: who writes them


def _tmp_name(name: str) -> str:
    """The temporary name of a write of file `name`: hidden, and saying which host and process writes it."""
    return f".{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _dead_writes(name: str, siblings: list[str]) -> list[str]:
    """The temporary files among `siblings` of writes to `name` that a kill cut short: those of a process of
    this host that is gone (a store shared by several nodes may hold another host's write in progress, and a
    process of this host that lives may still be writing)."""
    prefix, dead = f".{name}.{_HOST}.", []
    for tmp in siblings:
        pid = tmp[len(prefix):].split(".")[0] if tmp.startswith(prefix) and tmp.endswith(".tmp") else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(tmp)
        except OSError:  # alive, another user's
            pass
    return dead


class LocalFiles(_Files):
    """Files under a local directory; each write is fsync'ed, then renamed into place."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)  # what another process on a node that mounts it opens

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(_tmp_name(path.name))
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        siblings = [p.name for p in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}.*.tmp")]
        for dead in _dead_writes(path.name, siblings):
            (path.parent / dead).unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        """The file's size, None when it does not exist."""
        try:
            return (self.root / rel).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def list(self, rel: str = "") -> list[str]:
        """The names of the files (not folders) directly in folder `rel`, sorted; [] when it is absent."""
        d = self.root / rel
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []

    def subdirs(self, rel: str = "") -> list[str]:
        d = self.root / rel
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def remove_tree(self, rel: str) -> None:
        import shutil

        shutil.rmtree(self.root / rel, ignore_errors=True)


OBJECT_STORES = {"s3", "s3a", "gcs", "gs", "abfs", "abfss", "az"}  # pyarrow's type names and fsspec's protocols


def writes_whole_objects(fs) -> bool:
    """Whether pyarrow FileSystem `fs` is an object store, which shows an object only once its upload
    completes: a direct write is then whole or absent. A filesystem's (file://, hdfs://, NFS through fsspec)
    is written aside and renamed; on an object store that rename would copy the whole object."""
    inner = getattr(getattr(fs, "handler", None), "fs", None)  # fsspec's, behind pyarrow's PyFileSystem
    protocols = getattr(inner, "protocol", ()) if inner is not None else fs.type_name
    protocols = {protocols} if isinstance(protocols, str) else set(protocols)
    return bool(protocols & OBJECT_STORES)


class ArrowFiles(_Files):
    """Files under a pyarrow FileSystem root (an object store, HDFS, or fsspec through pyarrow)."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        try:
            self.fs, self.base = pafs.FileSystem.from_uri(uri)
        except ValueError:  # pyarrow's ArrowInvalid: a scheme pyarrow has no filesystem for
            self.fs, self.base = _fsspec(uri)
        self.base = self.base.rstrip("/")
        self.location = uri
        self._whole_on_close = writes_whole_objects(self.fs)

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        if self._whole_on_close:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{folder}/{_tmp_name(name)}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)
        siblings = [n for n in self.list(rel.rpartition("/")[0]) if n.startswith(f".{name}.")]
        for dead in _dead_writes(name, siblings):
            self.fs.delete_file(f"{folder}/{dead}")

    def size(self, rel: str) -> int | None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(rel))
        return None if info.type == pafs.FileType.NotFound else info.size

    def delete(self, rel: str) -> None:
        if self.size(rel) is not None:
            self.fs.delete_file(self._path(rel))

    def list(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self._path(rel).rstrip("/"), allow_not_found=True))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.File)

    def subdirs(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self._path(rel).rstrip("/"), allow_not_found=True))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory)

    def remove_tree(self, rel: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self._path(rel)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(rel))


def _fsspec(uri: str):
    """A pyarrow FileSystem over fsspec's implementation of the URI's protocol, and the path inside it."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    protocol, _, rest = uri.partition("://")
    try:
        fs = fsspec.filesystem(protocol)
    except (ValueError, ImportError) as e:
        raise SpecError(f"no filesystem for {protocol}:// ({e}); accepted: a path, or a URI that pyarrow.fs or "
                        "fsspec opens (s3://, gs://, hdfs://, file://, ...)", where="store") from None
    return PyFileSystem(FSSpecHandler(fs)), rest


def join(where: str, *parts: str) -> str:
    """A path or URI with `parts` appended (a URI's `//` kept: pathlib would fold it)."""
    return "/".join([str(where).rstrip("/"), *parts]) if "://" in str(where) else str(Path(where, *parts))


def absolute(where: str | None) -> str | None:
    """A URI as it is, a local path made absolute (another process may run in another folder)."""
    if where is None or "://" in where:
        return where
    return str(Path(where).expanduser().resolve())


def open_root(where: str | Path) -> LocalFiles | ArrowFiles:
    """The files under `where`: a local path, or a URI (`scheme://...`)."""
    text = str(where)
    if "://" not in text:
        return LocalFiles(text)
    try:
        return ArrowFiles(text)
    except ImportError as e:
        raise SpecError(f"{text}: a URI needs pyarrow ({e})", where="store") from None


PROBE_TIMEOUT_S = 30.0  # a store that gives no answer in this time is refused (an object store's SDK retries for minutes)
_probed: set[str] = set()


def check_location(where: str | Path, field: str) -> None:
    """One SpecError naming `field` when `where` cannot hold raymia's files, before any work starts: a local
    path whose nearest existing folder is a file or not writable; a URI whose filesystem cannot be opened or
    does not answer a listing of its root within PROBE_TIMEOUT_S (no credentials, no network, no bucket).
    Leaves nothing behind (a local folder is probed with a temporary file). A URI is probed once per
    process."""
    text = str(where)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise SpecError(f"{path} cannot be created: {probe} is a file, not a folder", where=field)
        import tempfile

        try:  # a real write: permission bits say nothing for root, nor for /proc or a read-only mount
            with tempfile.TemporaryFile(dir=probe, prefix=".raymia-probe-"):
                pass
        except OSError as e:
            raise SpecError(f"{path} cannot be written: {e.strerror or e} in {probe}", where=field) from None
        return
    if text in _probed:
        return
    import threading

    outcome: list[BaseException | None] = []

    def probe_root() -> None:
        try:
            files = open_root(text)
            if isinstance(files, ArrowFiles):
                files.fs.get_file_info(files.base or "/")
            outcome.append(None)
        except BaseException as e:  # reported by the caller's thread
            outcome.append(e)

    # A daemon thread: an SDK stuck in its retries neither blocks Ctrl-C nor the exit.
    worker = threading.Thread(target=probe_root, name="raymia-store-probe", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S)
    if not outcome:
        raise SpecError(f"{text} gave no answer in {PROBE_TIMEOUT_S:.0f} s (network, credentials or bucket?)",
                        where=field)
    error = outcome[0]
    if isinstance(error, SpecError):
        raise error
    if error is not None:
        raise SpecError(f"{text} cannot be reached: {first_line(error)}", where=field) from None
    _probed.add(text)


def check_locations(spec, output_dir: str | Path | None = None) -> None:
    """`check_location` of the spec's output_dir (or the one given instead) and of its store."""
    check_location(output_dir or spec.output_dir, "output_dir")
    if spec.store is not None:
        check_location(spec.store, "store")


@dataclass(frozen=True)
class StoredFile:
    """One file of a store, by its path relative to the store's root: what caches name (`StoredDir / name`)."""

    files: LocalFiles | ArrowFiles
    rel: str

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    def with_name(self, name: str) -> StoredFile:
        head = self.rel.rsplit("/", 1)[0] if "/" in self.rel else ""
        return StoredFile(self.files, f"{head}/{name}" if head else name)

    def exists(self) -> bool:
        return self.files.size(self.rel) is not None

    is_file = exists

    def read_bytes(self) -> bytes:
        return self.files.read(self.rel)

    def write_bytes(self, data: bytes) -> None:
        """Atomic: a reader sees the old file or the new one, never part of it."""
        self.files.write(self.rel, data)

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.exists():
            raise FileNotFoundError(str(self))
        self.files.delete(self.rel)

    def __str__(self) -> str:
        return f"{self.files.location.rstrip('/')}/{self.rel}"


@dataclass(frozen=True)
class StoredDir:
    """A folder of a store (`cache`, `cache/inversion`): `dir / "name.pt"` is a StoredFile in it."""

    files: LocalFiles | ArrowFiles
    rel: str = ""

    def __truediv__(self, name: str) -> StoredFile:
        return StoredFile(self.files, f"{self.rel}/{name}" if self.rel else name)

    def sub(self, name: str) -> StoredDir:
        return StoredDir(self.files, f"{self.rel}/{name}" if self.rel else name)

    def __str__(self) -> str:
        return f"{self.files.location.rstrip('/')}/{self.rel}" if self.rel else self.files.location


def store_dir(where: str | Path | StoredDir, *sub: str) -> Path | StoredDir:
    """The folder `sub` of the store at `where`: a pathlib.Path when the store is local (so local code and
    tools keep pathlib's whole interface), a StoredDir for a URI (`/`, and its files' exists, read_bytes,
    write_bytes, with_name, unlink: the part of pathlib the caches use)."""
    if isinstance(where, Path | StoredDir):
        d = where
    else:
        files = open_root(where)
        d = files.root if isinstance(files, LocalFiles) else StoredDir(files)
    for part in sub:
        d = d / part if isinstance(d, Path) else d.sub(part)
    return d


_DIGESTS: dict[tuple, str] = {}  # per process: (path, its files' names, sizes and mtimes) -> content digest


def content_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a local file's bytes, or of a folder's files (relative names and bytes, in
    name order): the same on every node that holds the same data. Kept per process while no file's size or
    mtime changes, so a spec's fingerprint, taken many times in a run, reads the data once."""
    import hashlib

    path = Path(path).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = []
    for p in files:
        st = p.stat()
        stats.append((p.relative_to(path).as_posix() if path.is_dir() else "", st.st_size, st.st_mtime_ns))
    key = (str(path), tuple(stats))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p, (name, size, _) in zip(files, stats, strict=True):
            h.update(f"{name}\0{size}\0".encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]
