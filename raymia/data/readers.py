"""File-format readers and helpers shared by the data set loaders.

Every reader raises `DataError(message, where=path)` with a one-line message on a missing or malformed
file, so the CLI prints `raymia: error: <path>: <message>` and exits 2. Nothing here unpickles with
`pickle.load`: CIFAR's Python batches go through `RestrictedUnpickler`, which only rebuilds numpy arrays,
dicts, lists, bytes and numbers, and refuses every other global before it can run.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymia.data.registry import Dataset
from raymia.datainfo import DataInfo
from raymia.errors import DataError, not_found


def one_line(text: object) -> str:
    """Collapse whitespace (and newlines) of an exception text so a DataError stays on one line."""
    return " ".join(str(text).split())


# --- restricted unpickling ------------------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import _codecs

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of bytes / bytearray at protocol < 3.
        ("_codecs", "encode"): _codecs.encode,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x writes the first
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        # numpy scalars (labels written as list(y) of an array): a dtype and its bytes, or for the object
        # dtype an object this unpickler has already rebuilt, so nothing new can run
        allowed[(mod, "scalar")] = multiarray.scalar
    if hasattr(numeric, "_frombuffer"):  # protocol-5 pickles of arrays
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, scalars, dtypes and builtin containers: what CIFAR's Python batches hold.

    Any other global (a class, `os.system`, `builtins.eval`, ...) raises DataError from `find_class`,
    before the pickle can call it. Persistent ids are refused too.
    """

    def __init__(self, file: io.BufferedIOBase, where: str):
        super().__init__(file, encoding="bytes")
        self._where = where
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataError(
                f"refused to unpickle the global {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists and bytes, so this file is not one (or was tampered with)",
                where=self._where,
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refused to unpickle a persistent id: not a CIFAR batch", where=self._where)


def load_restricted_pickle(path: Path) -> Any:
    """Load a pickle with `RestrictedUnpickler` (encoding="bytes", as Python 2 wrote CIFAR)."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, where).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(not_found(path), where=where) from None
    except Exception as e:  # truncated or corrupt: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"not a readable pickle ({type(e).__name__}: {one_line(e)})", where=where) from None


# --- raw files ------------------------------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    """The bytes of a file, gunzipped when its name ends in .gz."""
    where = str(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(not_found(path), where=where) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"truncated or corrupt gzip file ({type(e).__name__}: {one_line(e)})", where=where
        ) from None
    except OSError as e:
        raise DataError(f"cannot read ({one_line(e)})", where=where) from None


IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST's format): magic 0x0000080N, N big-endian int32 sizes,
    then the data. The magic number and the data length are checked."""
    where = str(path)
    data = read_bytes(path)
    magic = (IDX_UBYTE << 8) | ndim
    if len(data) < 4:
        raise DataError(f"truncated: {len(data)} bytes, too short for an IDX header", where=where)
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(
            f"not an IDX file of {ndim}-D unsigned bytes: magic number 0x{got:08x}, expected 0x{magic:08x}",
            where=where,
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated: {len(data)} bytes, the IDX header needs {header}", where=where)
    dims = struct.unpack(f">{ndim}i", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count:
        what = "truncated" if len(data) - header < count else "trailing bytes"
        raise DataError(
            f"{what}: the IDX header promises {count} data bytes for shape {list(dims)}, the file has "
            f"{len(data) - header}",
            where=where,
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def read_records(path: Path, record: int, what: str) -> np.ndarray:
    """A binary file of fixed-size records (CIFAR's binary version) as uint8 [n, record]."""
    where = str(path)
    data = read_bytes(path)
    if len(data) == 0 or len(data) % record:
        raise DataError(
            f"truncated or not a {what} file: {len(data)} bytes is not a whole number of {record}-byte records",
            where=where,
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, record)


# --- checks and conversions ----------------------------------------------------------------------------


def as_labels(y: Any, where: str, what: str = "labels") -> np.ndarray:
    """int64 labels from an integer (or integral float) 1-D array."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what} must be 1-D [N]; got shape {list(y.shape)}", where=where)
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise DataError(f"{what} must be integers; got dtype {y.dtype}", where=where)


def check_label_range(y: np.ndarray, num_classes: int, where: str, what: str = "labels") -> None:
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{what} span {lo}..{hi}; expected 0..{num_classes - 1} ({num_classes} classes)", where=where
        )


def balanced_first(y: np.ndarray, limit: int | None, num_classes: int) -> np.ndarray:
    """Indices of the first `limit` examples taken class-balanced, in file order.

    Each class keeps its first limit // num_classes examples (the first limit % num_classes classes one
    more); a class with fewer keeps all it has. No limit, or one at least the split's size, keeps all.
    """
    n = len(y)
    if limit is None or limit >= n:
        return np.arange(n)
    quota = np.full(num_classes, limit // num_classes, dtype=np.int64)
    quota[: limit % num_classes] += 1
    keep = np.zeros(n, dtype=bool)
    for c in range(num_classes):
        keep[np.flatnonzero(y == c)[: quota[c]]] = True
    return np.flatnonzero(keep)


def normalise_images(u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 (x / 255 - mean[c]) / std[c]."""
    x = u8.astype(np.float32)
    x /= 255.0
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    x -= m
    x /= s
    return x


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population, float64 accumulation) of float images [N, C, H, W];
    a constant channel gets std 1 so that normalising never divides by zero."""
    c = x.shape[1]
    mean, std = [], []
    for i in range(c):
        ch = x[:, i]
        m = float(ch.mean(dtype=np.float64)) if ch.size else 0.0
        s = float(ch.std(dtype=np.float64)) if ch.size else 1.0
        mean.append(m)
        std.append(s if s > 0 else 1.0)
    return tuple(mean), tuple(std)


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    info: DataInfo,
) -> Dataset:
    """Wrap numpy arrays as a Dataset (float32 inputs, int64 labels; copies only when needed)."""

    def tx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def ty(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset(
        name=name, x_train=tx(x_train), y_train=ty(y_train), x_test=tx(x_test), y_test=ty(y_test), info=info
    )


def numpy_file(path: str | Path) -> bool:
    """Whether a file starts as numpy writes one: a .npy array or a zip file (.npz). np.load reads any other
    bytes as a pickle, and with allow_pickle=False calls them "pickled (object) data", advising pickles."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06"))


def load_npz(path: Path, hint: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read without pickle (object arrays are refused).

    `hint` says what the file should hold and how to obtain it; it ends the 'not found' message.
    """
    import zipfile

    where = str(path)
    if not path.is_file():
        raise DataError(f"not found; {hint}", where=where)
    if not numpy_file(path):
        raise DataError(f"not an .npz archive (numpy.savez writes a zip file of .npy arrays; this file is none); "
                        f"{hint}", where=where)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(
                f"not an .npz archive of named arrays (a single .npy array?); {hint}", where=where
            )
        with z:
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except ValueError as e:  # object arrays need pickle: refused
        raise DataError(f"unreadable array ({one_line(e)}); {hint}", where=where) from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"not a readable .npz ({type(e).__name__}: {one_line(e)}); {hint}", where=where
        ) from None
