"""Data set loaders: tiny files written in each real on-disk format, read back through `load_dataset`."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from raymia.data import DATASETS, load_dataset
from raymia.data import cifar as cifar_mod
from raymia.data import mnist as mnist_mod
from raymia.errors import DataError

NEW_ENTRIES = (
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "purchase100",
    "texas100",
    "location30",
    "npz",
    "imagefolder",
    "synthetic",
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def expect(v, mean, std):
    """What a uint8 pixel value must become: (v / 255 - mean) / std."""
    return (np.asarray(v, dtype=np.float64) / 255.0 - mean) / std


def assert_one_line_error(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert exc.value.where == str(path)
    return msg


@pytest.fixture(scope="module", autouse=True)
def cli_listing():
    """`python -m raymia list datasets`, started with the module's first test: importing torch and every
    registry takes seconds, which then overlap with the other tests."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "raymia", "list", "datasets"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# --- writers of the real formats -------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings (SHORT_BINSTRING / BINSTRING), as cPickle did for the
    original CIFAR release; read back with encoding="bytes" every one of them is bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        b = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = save_py2str
    dispatch[bytes] = save_py2str


def dump_pickle(obj, path: Path, style: str) -> None:
    if style == "py2":  # the original release: protocol 2, numpy 1.x module names, byte strings
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump({k.decode(): v for k, v in obj.items()})
        data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy._core" not in data
        path.write_bytes(data)
    else:  # what Python 3 tools write (e.g. shared/tools/cifar10_jpeg.py): pickle.dump, default protocol
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=style if isinstance(style, int) else pickle.DEFAULT_PROTOCOL)


def write_cifar10_py(root: Path, rng: np.random.Generator, style="default", per_batch=4, n_test=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        dump_pickle(batch, folder / f"data_batch_{b}", style)
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in rng.integers(0, 10, n_test)]
    dump_pickle(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": yt,
            b"data": xt,
            b"filenames": [b"t.png"] * n_test,
        },
        folder / "test_batch",
        style,
    )
    dump_pickle(
        {
            b"label_names": [b"c%d" % i for i in range(10)],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        },
        folder / "batches.meta",
        style,
    )
    return np.concatenate(xs), np.asarray(ys), xt, np.asarray(yt)


def write_cifar100_py(root: Path, rng: np.random.Generator, n_train=12, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        dump_pickle(
            {
                b"filenames": [b"f.png"] * n,
                b"batch_label": name.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": x,
            },
            folder / name,
            "py2",
        )
        out += [x, np.asarray(fine)]
    return out


def write_cifar10_bin(root: Path, rng: np.random.Generator, per_batch=3, n_test=4):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    xs, ys = [], []
    names = [f"data_batch_{b}.bin" for b in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        n = n_test if name.startswith("test") else per_batch
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_cifar100_bin(root: Path, rng: np.random.Generator, n_train=7, n_test=3):
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        fine = rng.integers(0, 100, n).astype(np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([coarse[:, None], fine[:, None], x], axis=1).tobytes())
        out += [x, fine]
    return out


def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, rng: np.random.Generator, folder="MNIST", n_train=20, n_test=10, gz=("train",)):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = []
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = raw / f"{prefix}-{kind}-ubyte"
            if split in gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(idx_bytes(arr))
            else:
                name.write_bytes(idx_bytes(arr))
        out += [x, y]
    return out


# --- CIFAR ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["default", "py2", 2])
def test_cifar10_python_layout(tmp_path, style):
    x, y, xt, yt = write_cifar10_py(tmp_path, np.random.default_rng(0), style=style)
    d = load_dataset("cifar10", {"root": str(tmp_path)})
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()
    assert d.info.num_classes == 10 and d.info.input_shape == (3, 32, 32) and d.info.kind == "image"
    assert d.info.mean == CIFAR10_MEAN and d.info.std == CIFAR10_STD
    # CIFAR rows are channel-major: byte c*1024 + h*32 + w is pixel (c, h, w).
    i, c, h, w = 7, 2, 5, 30
    v = x[i, c * 1024 + h * 32 + w]
    assert d.x_train[i, c, h, w].item() == pytest.approx(expect(v, CIFAR10_MEAN[c], CIFAR10_STD[c]), abs=1e-6)
    mean = np.asarray(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(d.x_train.numpy(), expect(x.reshape(-1, 3, 32, 32), mean, std), atol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(), expect(xt.reshape(-1, 3, 32, 32), mean, std), atol=1e-5)


def test_cifar10_binary_layout_and_limits(tmp_path):
    x, y, xt, yt = write_cifar10_bin(tmp_path, np.random.default_rng(1))
    d = load_dataset("cifar10", {"root": str(tmp_path)})
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()
    v = xt[3, 1 * 1024 + 31 * 32 + 0]
    assert d.x_test[3, 1, 31, 0].item() == pytest.approx(expect(v, CIFAR10_MEAN[1], CIFAR10_STD[1]), abs=1e-6)

    # limit: the first N, class-balanced, in file order.
    lim = load_dataset("cifar10", {"root": str(tmp_path), "limit_train": 4, "limit_test": 2})
    # 4 // 10 = 0 per class, plus one for classes 0..3: the first example of each of those classes.
    want = [int(np.flatnonzero(y == c)[0]) for c in range(4) if (y == c).any()]
    assert lim.y_train.tolist() == y[sorted(want)].tolist()
    torch.testing.assert_close(lim.x_train, d.x_train[sorted(want)])
    assert len(lim.y_test) <= 2


def test_balanced_limit_takes_first_of_each_class(tmp_path):
    rng = np.random.default_rng(2)
    write_mnist(tmp_path, rng, n_train=40, n_test=10)  # labels i % 10
    d = load_dataset("mnist", {"root": str(tmp_path), "limit_train": 20, "limit_test": 5})
    assert d.y_train.tolist() == list(range(10)) * 2  # the first 20 are exactly 2 per class
    assert d.y_test.tolist() == [0, 1, 2, 3, 4]
    assert torch.bincount(d.y_train, minlength=10).tolist() == [2] * 10


def test_cifar100_python_and_binary(tmp_path):
    rng = np.random.default_rng(3)
    x, y, xt, yt = write_cifar100_py(tmp_path / "py", rng)
    d = load_dataset("cifar100", {"root": str(tmp_path / "py")})
    assert d.x_train.shape == (12, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    assert d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()  # fine labels
    assert d.info.num_classes == 100 and d.info.mean == CIFAR100_MEAN and d.info.std == CIFAR100_STD
    v = x[11, 0 * 1024 + 0 * 32 + 17]
    assert d.x_train[11, 0, 0, 17].item() == pytest.approx(
        expect(v, CIFAR100_MEAN[0], CIFAR100_STD[0]), abs=1e-6
    )

    xb, yb, xbt, ybt = write_cifar100_bin(tmp_path / "bin", rng)
    d = load_dataset("cifar100", {"root": str(tmp_path / "bin")})
    assert d.y_train.tolist() == yb.tolist() and d.y_test.tolist() == ybt.tolist()  # fine, not coarse
    v = xbt[2, 2 * 1024 + 9 * 32 + 4]
    assert d.x_test[2, 2, 9, 4].item() == pytest.approx(
        expect(v, CIFAR100_MEAN[2], CIFAR100_STD[2]), abs=1e-6
    )


_CALLS: list[str] = []


def _record(note):
    _CALLS.append(note)
    return note


class EvilClass:
    def __reduce__(self):
        return (_record, ("executed",))


class EvilSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_numpy_scalar_labels_loads(tmp_path):
    # a batch written by numpy code: labels as list(y) of an int64 array, one of them an object array's
    x, *_ = write_cifar10_py(tmp_path, np.random.default_rng(5))
    labels = list(np.array([3, 1, 4, 1], dtype=np.int64))
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": x[:4], b"labels": labels, b"extra": np.array([1, "a"], dtype=object)}, f)
    d = load_dataset("cifar10", {"root": str(tmp_path)})
    assert d.y_train[4:8].tolist() == [3, 1, 4, 1]


@pytest.mark.parametrize("evil", ["class", "os.system", "eval"])
def test_cifar_pickle_with_forbidden_global_is_refused_and_not_run(tmp_path, evil):
    x, *_ = write_cifar10_py(tmp_path, np.random.default_rng(4))
    marker = tmp_path / "pwned"
    payload = {
        "class": EvilClass(),
        "os.system": EvilSystem(marker),
        "eval": _EvalReduce(f"open({str(marker)!r}, 'w')"),
    }[evil]
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(target, "wb") as f:
        pickle.dump({b"data": x[:4], b"labels": [0, 1, 2, 3], b"extra": payload}, f)
    _CALLS.clear()
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(tmp_path)})
    msg = assert_one_line_error(exc, target)
    assert "refused to unpickle" in msg
    assert _CALLS == [] and not marker.exists()


class _EvalReduce:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_cifar_missing_partial_truncated(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(tmp_path / "nowhere")})
    msg = assert_one_line_error(exc, tmp_path / "nowhere" / "cifar-10-batches-py")
    assert "not found" in msg and "download: true" in msg and "docs/data.md" in msg
    assert "cifar-10-batches-bin" in msg

    with pytest.raises(DataError) as exc:
        load_dataset("cifar100", {"root": str(tmp_path / "nowhere")})
    assert_one_line_error(exc, tmp_path / "nowhere" / "cifar-100-python")

    rng = np.random.default_rng(5)
    py = tmp_path / "py"
    write_cifar10_py(py, rng)
    (py / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(py)})
    assert "missing" in assert_one_line_error(exc, py / "cifar-10-batches-py" / "data_batch_3")

    trunc = tmp_path / "trunc"
    write_cifar10_py(trunc, rng)
    f = trunc / "cifar-10-batches-py" / "test_batch"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(trunc)})
    assert "not a readable pickle" in assert_one_line_error(exc, f)

    bin_root = tmp_path / "bin"
    write_cifar10_bin(bin_root, rng)
    f = bin_root / "cifar-10-batches-bin" / "data_batch_4.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(bin_root)})
    assert "3073-byte records" in assert_one_line_error(exc, f)

    # A label out of range in a binary record.
    bad = tmp_path / "badlabel"
    write_cifar10_bin(bad, rng)
    f = bad / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(f.read_bytes())
    raw[0] = 12
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(bad)})
    assert "expected 0..9" in assert_one_line_error(exc, f)


def test_cifar_wrong_shape_in_pickle(tmp_path):
    write_cifar10_py(tmp_path, np.random.default_rng(6))
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(target, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", {"root": str(tmp_path)})
    assert "uint8 [N, 3072]" in assert_one_line_error(exc, target)


def test_cifar_download_fetches_then_parses(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(layout, root):
        calls.append((layout.title, root))
        write_cifar10_py(root, np.random.default_rng(7))

    monkeypatch.setattr(cifar_mod, "fetch", fake_fetch)
    d = load_dataset("cifar10", {"root": str(tmp_path / "dl"), "download": True})
    assert calls == [("CIFAR-10", tmp_path / "dl")] and d.x_train.shape[0] == 20
    load_dataset("cifar10", {"root": str(tmp_path / "dl"), "download": True})
    assert len(calls) == 1  # present files are not fetched again


def test_cifar_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise URLError("no network\nat all")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar100", {"root": str(tmp_path), "download": True})
    assert "download of" in assert_one_line_error(exc, tmp_path)


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,folder,mean,std",
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_idx_plain_and_gz(tmp_path, name, folder, mean, std):
    x, y, xt, yt = write_mnist(tmp_path, np.random.default_rng(8), folder=folder, gz=("train",))
    d = load_dataset(name, {"root": str(tmp_path)})
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()
    assert d.info.mean == (mean,) and d.info.std == (std,) and d.info.input_shape == (1, 28, 28)
    assert d.x_train[13, 0, 27, 3].item() == pytest.approx(expect(x[13, 27, 3], mean, std), abs=1e-6)
    np.testing.assert_allclose(d.x_test.numpy()[:, 0], expect(xt, mean, std), atol=1e-5)


def test_mnist_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("fashion_mnist", {"root": str(tmp_path)})
    msg = assert_one_line_error(exc, tmp_path / "FashionMNIST" / "raw")
    assert "download: true" in msg and "t10k-images-idx3-ubyte" in msg

    rng = np.random.default_rng(9)
    write_mnist(tmp_path, rng, gz=())
    raw = tmp_path / "MNIST" / "raw"

    f = raw / "t10k-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(good[:-7])
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", {"root": str(tmp_path)})
    assert "truncated" in assert_one_line_error(exc, f)

    f.write_bytes(b"\x00\x00\x08\x01" + good[4:])  # labels' magic on an image file
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", {"root": str(tmp_path)})
    assert "magic number 0x00000801, expected 0x00000803" in assert_one_line_error(exc, f)
    f.write_bytes(good)

    lab = raw / "train-labels-idx1-ubyte"
    lab.unlink()
    with gzip.open(f"{lab}.gz", "wb") as g:
        g.write(idx_bytes(np.arange(20) % 10))
    Path(f"{lab}.gz").write_bytes(Path(f"{lab}.gz").read_bytes()[:-12])  # truncated gzip
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", {"root": str(tmp_path)})
    assert "gzip" in assert_one_line_error(exc, f"{lab}.gz")

    with gzip.open(f"{lab}.gz", "wb") as g:
        g.write(idx_bytes(np.arange(19) % 10))  # one label short
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", {"root": str(tmp_path)})
    assert "19 labels for 20 images" in assert_one_line_error(exc, f"{lab}.gz")

    Path(f"{lab}.gz").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", {"root": str(tmp_path)})
    assert "missing" in assert_one_line_error(exc, lab)


def test_mnist_download(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(layout, root):
        calls.append(layout.folder)
        write_mnist(root, np.random.default_rng(10), folder=layout.folder)

    monkeypatch.setattr(mnist_mod, "fetch", fake_fetch)
    d = load_dataset("mnist", {"root": str(tmp_path), "download": True})
    assert calls == ["MNIST"] and d.x_train.shape == (20, 1, 28, 28)

    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\nno network"
        )

    monkeypatch.undo()
    monkeypatch.setattr(tvd, "FashionMNIST", offline)
    with pytest.raises(DataError) as exc:
        load_dataset("fashion_mnist", {"root": str(tmp_path), "download": True})
    assert "download failed" in assert_one_line_error(exc, tmp_path)


# --- Purchase100 / Texas100 / Location30 ---------------------------------------------------------------

TABULAR = [("purchase100", 600, 100), ("texas100", 6169, 100), ("location30", 446, 30)]


@pytest.mark.parametrize("name,features,classes", TABULAR)
def test_tabular_npz(tmp_path, name, features, classes):
    rng = np.random.default_rng(11)
    n = 2 * classes + 3
    f = rng.integers(0, 2, (n, features), dtype=np.uint8)
    f[:, :12] = (np.arange(n)[:, None] >> np.arange(12)) & 1  # every row unique
    y = np.arange(n) % classes
    path = tmp_path / f"{name}.npz"
    np.savez(path, features=f, labels=y)
    d = load_dataset(name, {"path": str(path)})
    n_test = math.ceil(0.2 * n)
    assert len(d.y_test) == n_test and len(d.y_train) == n - n_test
    assert d.x_train.shape == (n - n_test, features) and d.x_train.dtype == torch.float32
    assert d.info.kind == "tabular" and d.info.input_shape == (features,) and d.info.num_classes == classes
    assert d.info.mean is None and d.info.std is None
    rows = {(r.astype(np.uint8).tobytes(), int(lab)) for r, lab in zip(f, y)}
    got = {(r.numpy().astype(np.uint8).tobytes(), int(lab)) for r, lab in zip(d.x_train, d.y_train)}
    got |= {(r.numpy().astype(np.uint8).tobytes(), int(lab)) for r, lab in zip(d.x_test, d.y_test)}
    assert got == rows  # a partition of the file's rows, labels kept with their rows
    again = load_dataset(name, {"path": str(path)})
    torch.testing.assert_close(again.y_test, d.y_test)
    other = load_dataset(name, {"path": str(path), "split_seed": 1})
    assert not torch.equal(other.y_test, d.y_test) or not torch.equal(other.x_test, d.x_test)


def test_tabular_stratified_split(tmp_path):
    rng = np.random.default_rng(12)
    y = np.repeat(np.arange(30), 10)
    path = tmp_path / "loc.npz"
    np.savez(path, features=rng.integers(0, 2, (300, 446)).astype(np.float64), labels=y)
    d = load_dataset("location30", {"path": str(path), "test_fraction": 0.2, "split_seed": 3})
    assert torch.bincount(d.y_test, minlength=30).tolist() == [2] * 30
    assert torch.bincount(d.y_train, minlength=30).tolist() == [8] * 30


def test_tabular_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("purchase100", {"path": str(tmp_path / "none.npz")})
    msg = assert_one_line_error(exc, tmp_path / "none.npz")
    assert "not found" in msg and "docs/data.md" in msg and "[N, 600]" in msg

    rng = np.random.default_rng(13)
    path = tmp_path / "p.npz"
    np.savez(path, features=rng.integers(0, 2, (10, 599)), labels=np.arange(10))
    with pytest.raises(DataError) as exc:
        load_dataset("purchase100", {"path": str(path)})
    msg = assert_one_line_error(exc, path)
    assert "599 columns" in msg and "expected 600" in msg

    np.savez(path, features=rng.integers(0, 2, (10, 6169)), labels=np.arange(10))
    with pytest.raises(DataError) as exc:
        load_dataset("purchase100", {"path": str(path)})  # a Texas file given as Purchase
    assert "6169 columns; expected 600" in assert_one_line_error(exc, path)

    np.savez(path, features=rng.integers(0, 2, (40, 446)), labels=np.arange(1, 41) % 30 + 1)
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    assert "subtract 1" in assert_one_line_error(exc, path)

    np.savez(path, features=rng.integers(0, 2, (40, 446)), labels=np.arange(40))
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    assert "labels span 0..39 (40 distinct); expected 30 classes" in assert_one_line_error(exc, path)

    np.savez(path, features=np.full((4, 446), 2), labels=np.arange(4))
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    assert "must be 0/1" in assert_one_line_error(exc, path)

    np.savez(path, x=np.zeros((4, 446)), y=np.arange(4))
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    assert "no array 'features' (found: x, y)" in assert_one_line_error(exc, path)

    np.savez(path, features=np.zeros((4, 446)), labels=np.array([object(), 1, 2, 3], dtype=object))
    with pytest.raises(DataError) as exc:  # object arrays need pickle: refused
        load_dataset("location30", {"path": str(path)})
    assert_one_line_error(exc, path)

    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    assert_one_line_error(exc, path)

    path.write_text("label,f1,f2\n1,0,1\n")  # a CSV saved as .npz: numpy read it as a pickle and said so
    with pytest.raises(DataError) as exc:
        load_dataset("location30", {"path": str(path)})
    said = assert_one_line_error(exc, path)
    assert "not an .npz archive (numpy.savez writes a zip file" in said and "pickle" not in said


# --- generic npz --------------------------------------------------------------------------------------


def test_npz_hwc_uint8_images(tmp_path):
    rng = np.random.default_rng(14)
    x = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    y, yt = np.arange(12) % 4, np.array([0, 1, 2, 3])
    path = tmp_path / "imgs.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    d = load_dataset("npz", {"path": str(path)})
    assert d.x_train.shape == (12, 3, 6, 5) and d.x_test.shape == (4, 3, 6, 5)
    assert d.info.kind == "image" and d.info.num_classes == 4 and d.info.input_shape == (3, 6, 5)
    scaled = x.astype(np.float64) / 255.0
    mean, std = scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))
    np.testing.assert_allclose(d.info.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(d.info.std, std, rtol=1e-6)
    v = xt[2, 4, 1, 2]  # HWC pixel (h=4, w=1, c=2) -> NCHW [2, 2, 4, 1]
    assert d.x_test[2, 2, 4, 1].item() == pytest.approx(expect(v, mean[2], std[2]), abs=1e-5)
    assert d.y_train.tolist() == y.tolist() and d.y_test.dtype == torch.int64
    # Standardised train split: per-channel mean 0, std 1.
    np.testing.assert_allclose(d.x_train.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-5)

    none = load_dataset("npz", {"path": str(path), "normalize": "none", "num_classes": 10})
    assert none.info.mean is None and none.info.num_classes == 10
    assert none.x_test[2, 2, 4, 1].item() == pytest.approx(v / 255.0, abs=1e-7)


def test_npz_mnist_style_grey_and_tabular(tmp_path):
    rng = np.random.default_rng(15)
    path = tmp_path / "mnist.npz"  # like shared/data/mnist.npz: x_train uint8 [N, 28, 28]
    np.savez(
        path,
        x_train=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        y_train=np.arange(8, dtype=np.int64),
        x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        y_test=np.array([9, 0, 1]),
    )
    d = load_dataset("npz", {"path": str(path)})
    assert d.x_train.shape == (8, 1, 28, 28) and d.info.num_classes == 10 and len(d.info.mean) == 1

    floats = tmp_path / "float_imgs.npz"
    xf = rng.random((5, 1, 4, 4)).astype(np.float32)
    np.savez(floats, x_train=xf, y_train=np.array([0, 1, 0, 1, 0]), x_test=xf[:2], y_test=np.array([1, 0]))
    d = load_dataset("npz", {"path": str(floats)})
    assert d.info.mean is None and torch.equal(d.x_train, torch.from_numpy(xf))  # float images as they are

    tab = tmp_path / "tab.npz"
    xt = rng.normal(3.0, 2.0, (50, 7))
    np.savez(tab, x_train=xt, y_train=np.arange(50) % 3, x_test=xt[:5], y_test=np.arange(5) % 3)
    d = load_dataset("npz", {"path": str(tab)})
    assert d.info.kind == "tabular" and d.info.input_shape == (7,) and d.info.num_classes == 3
    np.testing.assert_allclose(d.x_train.numpy(), xt.astype(np.float32))  # kept as is
    s = load_dataset("npz", {"path": str(tab), "normalize": "standardize"})
    np.testing.assert_allclose(s.x_train.numpy().mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.x_train.numpy().std(0), 1, atol=1e-4)


def test_npz_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(tmp_path / "x.npz")})
    assert "not found" in assert_one_line_error(exc, tmp_path / "x.npz")
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.arange(4))
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(path)})
    assert "no array 'x_test'" in assert_one_line_error(exc, path)
    np.savez(
        path, x_train=np.zeros((4, 3)), y_train=np.arange(3), x_test=np.zeros((2, 3)), y_test=np.arange(2)
    )
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(path)})
    assert "3 labels" in assert_one_line_error(exc, path)
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.arange(4), x_test=np.zeros((2, 3)), y_test=[0, 7])
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(path), "num_classes": 4})
    assert "y_test span 0..7" in assert_one_line_error(exc, path)
    np.savez(
        path,
        x_train=np.zeros((4, 5, 5, 5)),
        y_train=np.arange(4),
        x_test=np.zeros((2, 5, 5, 5)),
        y_test=[0, 1],
    )
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(path)})
    assert "1 or 3 channels" in assert_one_line_error(exc, path)
    # NaN inputs diverged the training, and the error blamed the learning rate; a stray huge label made
    # as many classes (an 8 PB allocation in `raymia check`)
    x = np.ones((6, 3))
    x[4, 1] = np.nan
    np.savez(path, x_train=x, y_train=[0, 1, 0, 1, 0, 1], x_test=np.ones((2, 3)), y_test=[0, 1])
    with pytest.raises(DataError, match=r"^data npz: 1 train input\(s\) hold NaN or inf once normalised \(row 4"):
        load_dataset("npz", {"path": str(path), "normalize": "none"})
    np.savez(path, x_train=np.ones((4, 3)), y_train=[0, 1, 0, 2**40], x_test=np.ones((2, 3)), y_test=[0, 1])
    with pytest.raises(DataError) as exc:
        load_dataset("npz", {"path": str(path)})
    assert "would make 1099511627777 classes for 3 distinct labels" in assert_one_line_error(exc, path)


# --- imagefolder --------------------------------------------------------------------------------------


def write_imagefolder(
    root: Path, rng: np.random.Generator, classes=("cat", "dog"), per_class=(3, 2), size=4, mode="RGB"
):
    pixels = {}
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode=mode).save(root / split / c / f"{i}.png")
                pixels[(split, c, i)] = a
    return pixels


def test_imagefolder(tmp_path):
    px = write_imagefolder(tmp_path, np.random.default_rng(16))
    d = load_dataset("imagefolder", {"root": str(tmp_path), "image_size": 4})
    assert d.x_train.shape == (6, 3, 4, 4) and d.x_test.shape == (4, 3, 4, 4)
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 0, 1, 1]
    train = np.stack([px[("train", c, i)] for c in ("cat", "dog") for i in range(3)]).astype(np.float64) / 255
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(d.info.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(d.info.std, std, rtol=1e-6)
    v = px[("test", "dog", 1)][3, 0, 1]  # HWC (h=3, w=0, c=1) of test image 4 (dog #1)
    assert d.x_test[3, 1, 3, 0].item() == pytest.approx(expect(v, mean[1], std[1]), abs=1e-5)
    small = load_dataset("imagefolder", {"root": str(tmp_path), "image_size": 2, "grayscale": True})
    assert small.x_train.shape == (6, 1, 2, 2) and len(small.info.mean) == 1


def test_imagefolder_grey_pixels_exact(tmp_path):
    px = write_imagefolder(tmp_path, np.random.default_rng(17), mode="L")
    d = load_dataset("imagefolder", {"root": str(tmp_path), "image_size": 4, "grayscale": True})
    train = np.stack([px[("train", c, i)] for c in ("cat", "dog") for i in range(3)]).astype(np.float64) / 255
    v = px[("train", "cat", 2)][1, 2]
    assert d.x_train[2, 0, 1, 2].item() == pytest.approx(expect(v, train.mean(), train.std()), abs=1e-5)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", {"root": str(tmp_path)})
    assert "not found" in assert_one_line_error(exc, tmp_path / "train")
    write_imagefolder(tmp_path, np.random.default_rng(18))
    (tmp_path / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", {"root": str(tmp_path)})
    assert "extra: bird" in assert_one_line_error(exc, tmp_path / "test")
    bad = tmp_path / "train" / "cat" / "9.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as exc:
        load_dataset("imagefolder", {"root": str(tmp_path)})
    assert "not a readable image" in assert_one_line_error(exc, bad)


# --- synthetic ----------------------------------------------------------------------------------------


def test_synthetic_deterministic_per_seed():
    a = load_dataset(
        "synthetic", {"seed": 1, "num_train": 103, "num_test": 50, "num_classes": 5, "num_features": 7}
    )
    b = load_dataset(
        "synthetic", {"seed": 1, "num_train": 103, "num_test": 50, "num_classes": 5, "num_features": 7}
    )
    c = load_dataset(
        "synthetic", {"seed": 2, "num_train": 103, "num_test": 50, "num_classes": 5, "num_features": 7}
    )
    assert a.x_train.shape == (103, 7) and a.x_test.shape == (50, 7) and a.info.kind == "tabular"
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    torch.testing.assert_close(a.x_train, b.x_train)
    torch.testing.assert_close(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    counts = torch.bincount(a.y_train, minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103

    img = load_dataset("synthetic", {"kind": "image", "num_train": 20, "num_test": 10})
    assert (
        img.x_train.shape == (20, 1, 8, 8) and img.info.input_shape == (1, 8, 8) and img.info.kind == "image"
    )
    img = load_dataset("synthetic", {"kind": "image", "image_size": 5, "num_train": 20, "num_test": 10})
    assert img.x_test.shape == (10, 1, 5, 5)


def test_synthetic_separation_controls_difficulty():
    def nearest_mean_accuracy(sep):
        d = load_dataset("synthetic", {"separation": sep, "num_train": 2000, "num_test": 1000, "seed": 4})
        means = torch.stack([d.x_train[d.y_train == k].mean(0) for k in range(10)])
        pred = torch.cdist(d.x_test, means).argmin(1)
        return (pred == d.y_test).float().mean().item()

    assert nearest_mean_accuracy(12.0) > 0.95
    assert nearest_mean_accuracy(0.0) < 0.25


# --- registry and CLI ---------------------------------------------------------------------------------


def test_every_entry_registered_and_listed(cli_listing):
    for name in NEW_ENTRIES:
        assert name in DATASETS
    stdout, stderr = cli_listing.communicate(timeout=120)
    assert cli_listing.returncode == 0, stderr
    for name in NEW_ENTRIES:
        assert f"dataset {name}:" in stdout


# ----------------------------------------------------------------------------------------------- digits
def test_digits_read_and_split_as_sklearn():
    """The digits loader reads sklearn's file and splits it without importing sklearn; both must give
    what sklearn's load_digits and stratified train_test_split give."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    from raymia.data.digits import read_digits, stratified_split

    pixels, y = read_digits()
    d = sk_load()
    np.testing.assert_array_equal(pixels, d.data)
    np.testing.assert_array_equal(y, d.target)
    for fraction, seed in [(0.25, 0), (0.25, 7), (0.1, 3), (0.5, 11), (0.333, 2), (0.0056, 5), (0.99, 1)]:
        want = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y)
        for got, ref in zip(stratified_split(y, fraction, seed), want, strict=True):
            np.testing.assert_array_equal(got, ref)
    data = load_dataset("digits", {"test_fraction": 0.25, "split_seed": 0})
    idx_tr, _ = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    np.testing.assert_array_equal(data.y_train.numpy(), y[idx_tr])


def test_digits_without_the_bundled_file_asks_sklearn(monkeypatch):
    """A scikit-learn whose package does not hold digits.csv.gz where it used to: its own loader reads it."""
    from raymia.data import digits as digits_mod

    pixels, y = digits_mod.read_digits()
    monkeypatch.setattr(digits_mod.importlib.util, "find_spec", lambda name: None)
    again, y_again = digits_mod.read_digits()
    np.testing.assert_array_equal(again, pixels)
    np.testing.assert_array_equal(y_again, y)
    assert y.dtype == y_again.dtype == np.int64


def test_digits_split_too_small_is_one_line():
    from raymia.errors import SpecError

    with pytest.raises(SpecError, match=r"test_fraction 0\.001 leaves 1795 training and 2 test images") as e:
        load_dataset("digits", {"test_fraction": 0.001})
    assert e.value.where == "data.params.test_fraction"
