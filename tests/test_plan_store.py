"""Membership plan balance, the signal store's integrity checks, query augmentations, eval-mode inference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raymia.data import load_dataset
from raymia.data.plan import make_plan, paired_keep
from raymia.defenses import build_defense
from raymia.seeding import derive_seed
from raymia.store import SignalStore
from raymia.train.infer import augment, query_logits

ROOT = Path(__file__).resolve().parents[1]


def test_keep_matrix_is_balanced_and_seeded():
    plan = make_plan(1000, 16, 600, [0, 3], seed=7)
    assert plan.keep.shape == (16, 600)
    assert (plan.keep.sum(axis=0) == 8).all()  # every point IN for exactly half the models
    assert len(np.unique(plan.population)) == 600 and plan.population.max() < 1000
    # each model trains on half of the population, its pair (m xor 1) on the other half
    assert (plan.keep.sum(axis=1) == 300).all()
    assert all(np.array_equal(plan.keep[m ^ 1], ~plan.keep[m]) for m in range(16))
    again = make_plan(1000, 16, 600, [0, 3], seed=7)
    assert np.array_equal(plan.keep, again.keep) and np.array_equal(plan.population, again.population)
    assert not np.array_equal(plan.keep, make_plan(1000, 16, 600, [0], seed=8).keep)
    # the pairs' halves are drawn independently: 600 columns show most of the 2^8 possible patterns
    assert len({tuple(c) for c in plan.keep.T}) > 200
    with pytest.raises(ValueError):
        paired_keep(5, 10, np.random.default_rng(0))


def test_derive_seed_is_stable():
    assert derive_seed(0, "model", 3) == derive_seed(0, "model", 3)
    assert derive_seed(0, "model", 3) != derive_seed(0, "model", 4)
    assert derive_seed(0, "model", 3) != derive_seed(1, "model", 3)
    assert 0 <= derive_seed(123, "x") < 2**63


def _arrays(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    return {"logits": rng.normal(size=(k, 2, 5, 3)).astype(np.float32),
            "models": np.arange(k, dtype=np.int64)}


@pytest.mark.parametrize("backend", ["path", "file-uri", "fsspec-memory"])
def test_store_roundtrip_and_corruption_is_detected(tmp_path, caplog, backend):
    """The same checks on every kind of store root: a local path, a URI through pyarrow.fs (file://, the
    interface s3:// and gs:// share), and fsspec's in-memory filesystem through pyarrow's wrapper."""
    root = {"path": tmp_path, "file-uri": f"file://{tmp_path}",
            "fsspec-memory": f"memory://raymia-test-{tmp_path.name}"}[backend]
    store = SignalStore(root, "abc", pack_size=4, num_models=6)
    files = store.files
    assert store.num_packs == 2 and store.pack_models(1) == [4, 5]
    assert store.missing_packs() == [0, 1]
    a0 = _arrays(4)
    store.write_pack(0, a0)
    assert store.check_pack(0) is None
    assert store.missing_packs() == [1]
    back = store.read_pack(0)
    assert np.array_equal(back["logits"], a0["logits"]) and back["logits"].dtype == np.float32
    if backend != "fsspec-memory":  # the URI and the path name the same files
        assert (tmp_path / "signals" / "abc" / "k4-pack-00000.npz").is_file()

    data, manifest = "signals/abc/k4-pack-00000.npz", "signals/abc/k4-pack-00000.json"
    # a manifest that parses but is no manifest (edited by hand, or another program's)
    good = files.read(manifest)
    for edited in (b"[]", b"null", b'{"pack": 0}'):
        files.write(manifest, edited)
        assert store.check_pack(0) == "corrupt manifest"
    files.write(manifest, good)
    assert store.check_pack(0) is None
    # a manifest of other models, or one whose arrays disagree with the data file, is not this pack
    import json as _json

    info = _json.loads(good)
    files.write(manifest, _json.dumps({**info, "models": [4, 5, 6, 7]}).encode())
    assert store.check_pack(0).startswith("holds models [4, 5, 6, 7]")
    shape = {k: {**v, "shape": [1, *v["shape"][1:]]} for k, v in info["arrays"].items()}
    files.write(manifest, _json.dumps({**info, "arrays": shape}).encode())
    with pytest.raises(ValueError, match="does not match its manifest"):
        store.read_pack(0)
    files.write(manifest, good)
    # flip one byte: checksum mismatch -> reported, removed, rebuilt
    raw = bytearray(files.read(data))
    raw[len(raw) // 2] ^= 0xFF
    files.write(data, bytes(raw))
    assert "checksum" in store.check_pack(0)
    with pytest.raises(ValueError, match="checksum"):
        store.read_pack(0)
    assert store.missing_packs() == [0, 1]
    assert files.size(data) is None
    assert "rebuilding" in caplog.text

    # truncation -> size mismatch
    store.write_pack(0, a0)
    files.write(data, files.read(data)[:100])
    assert "truncated" in store.check_pack(0)

    # a data file without its manifest (a write interrupted before the commit marker) is not reused
    store.write_pack(0, a0)
    files.delete(manifest)
    assert store.check_pack(0) == "no manifest (interrupted write)"

    # a different pack layout never reads another layout's files
    other = SignalStore(root, "abc", pack_size=2, num_models=6)
    store.write_pack(0, a0)
    assert other.missing_packs() == [0, 1, 2]


@pytest.mark.parametrize("where", ["path", "file://", "fsspec"])
def test_a_write_cut_short_by_a_kill_leaves_no_temporary_file_after_the_next(tmp_path, where):
    """A kill during a write leaves its temporary file; the next write of that file removes it when the
    process that wrote it is gone, and keeps those of a live process and of another host. The same in a URI
    store on a filesystem (pyarrow's, and fsspec's through pyarrow: "local" is fsspec's name of it)."""
    import subprocess
    import sys

    from raymia.storage import _HOST, open_root

    files = open_root({"path": str(tmp_path), "file://": f"file://{tmp_path}", "fsspec": f"local://{tmp_path}"}[where])
    assert type(files).__name__ == ("LocalFiles" if where == "path" else "ArrowFiles")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / "signals" / f".k2-pack-00001.npz.{_HOST}.{dead}.0badc0de.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a pack")
    live = stale.with_name(f".k2-pack-00001.npz.{_HOST}.{os.getppid()}.12345678.tmp")
    elsewhere = stale.with_name(f".k2-pack-00001.npz.another-host.{dead}.87654321.tmp")
    other_file = stale.with_name(f".k2-pack-00002.npz.{_HOST}.{dead}.0badc0de.tmp")
    for f in (live, elsewhere, other_file):
        f.write_bytes(b"x")
    files.write("signals/k2-pack-00001.npz", b"whole")
    assert sorted(p.name for p in stale.parent.iterdir()) == sorted(
        ["k2-pack-00001.npz", live.name, elsewhere.name, other_file.name])
    assert (stale.parent / "k2-pack-00001.npz").read_bytes() == b"whole"


def test_an_object_store_is_written_directly_and_a_filesystem_through_a_renamed_file(tmp_path):
    """An object store shows an object only once its upload completes: no temporary copy to rename (on S3 a
    rename is a copy and a delete of the whole object)."""
    from fsspec.implementations.memory import MemoryFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from raymia.storage import open_root, writes_whole_objects

    class Bucket(MemoryFileSystem):  # an object store's protocol, over memory
        protocol = ("s3", "s3a")

    class Moves:  # the filesystem, counting its renames
        def __init__(self, fs):
            self.fs, self.moved = fs, []

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def move(self, src, dest):
            self.moved.append(src)
            self.fs.move(src, dest)

    assert writes_whole_objects(PyFileSystem(FSSpecHandler(Bucket())))
    for where in (f"file://{tmp_path}/a", f"local://{tmp_path}/b", "memory://raymia-test/c"):
        files = open_root(where)
        assert not writes_whole_objects(files.fs), where
        files.fs = Moves(files.fs)
        files.write("x/y.json", b"1")
        assert files.read("x/y.json") == b"1" and files.list("x") == ["y.json"] and len(files.fs.moved) == 1, where
    files._whole_on_close, files.fs.moved = True, []  # as an object store's
    files.write("x/z.json", b"2")
    assert files.read("x/z.json") == b"2" and files.list("x") == ["y.json", "z.json"] and files.fs.moved == []


def test_store_uri_nobody_opens_is_one_line_naming_the_field():
    from raymia.errors import SpecError

    with pytest.raises(SpecError, match=r"^store: no filesystem for nosuch://"):
        SignalStore("nosuch://bucket/x", "abc", pack_size=4, num_models=6)


def test_a_store_or_output_dir_that_cannot_hold_files_is_one_line_before_any_work(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import raymia.storage as storage
    from raymia.errors import SpecError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SpecError, match=r"^output_dir: .*a_file/runs cannot be created: .*a_file is a file"):
        storage.check_location(tmp_path / "a_file" / "runs", "output_dir")
    with pytest.raises(SpecError, match=r"^output_dir: /proc/raymia-runs cannot be written: "):
        storage.check_location("/proc/raymia-runs", "output_dir")
    storage.check_location(tmp_path / "new" / "deeper", "output_dir")  # to be created: fine, and not created yet
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["a_file"]
    storage.check_location("memory://bucket/prefix", "store")

    def unreachable(uri):  # as pyarrow's S3 reports a bucket it cannot resolve: several lines
        raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION\ncurl details")

    monkeypatch.setattr(storage, "open_root", unreachable)
    with pytest.raises(SpecError, match=r"^store: s3://b/p cannot be reached: When resolving region for bucket 'b': "
                                        r"AWS Error NETWORK_CONNECTION$"):
        storage.check_location("s3://b/p", "store")
    monkeypatch.setattr(storage, "open_root", lambda uri: time.sleep(5))  # an SDK retrying for minutes
    monkeypatch.setattr(storage, "PROBE_TIMEOUT_S", 0.2)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"^store: gs://b/p gave no answer in 0 s"):
        storage.check_location("gs://b/p", "store")
    assert time.perf_counter() - t0 < 2
    # The CLI: one line, the spec error's exit code, before any data is read or model trained
    spec = ROOT / "sweeps" / "quickstart.yaml"
    out = subprocess.run([sys.executable, "-m", "raymia", "audit", str(spec), "--set",
                          f"output_dir={tmp_path / 'a_file' / 'x'}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"raymia: error: output_dir: {tmp_path / 'a_file' / 'x'} cannot be created: {tmp_path / 'a_file'} is a file, "
        "not a folder"], out.stderr


def test_query_augmentations():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(augment(x, "identity"), x)
    assert torch.equal(augment(x, "hflip")[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    right = augment(x, "shift:1:0")[0, 0]
    assert torch.equal(right[:, 1:], x[0, 0, :, :3]) and torch.equal(right[:, 0], x[0, 0, :, 0])
    up = augment(x, "shift:0:-1")[0, 0]
    assert torch.equal(up[:3], x[0, 0, 1:]) and torch.equal(up[3], x[0, 0, 3])
    with pytest.raises(ValueError, match="needs image inputs"):
        augment(torch.zeros(2, 5), "hflip")


def test_inference_runs_in_eval_mode_and_restores_mode():
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
    model.train()
    defense = build_defense("none", {}, data.info)
    x = data.x_test[:50]
    a = query_logits(model, defense, x, ["identity", "hflip"], torch.Generator().manual_seed(0))
    b = query_logits(model, defense, x, ["identity", "hflip"], torch.Generator().manual_seed(1))
    assert a.shape == (2, 50, 10) and a.dtype == torch.float32
    assert torch.equal(a, b)  # no dropout noise, BN running stats: eval mode
    model.eval()
    with torch.no_grad():
        assert torch.allclose(a[0], model(x), atol=1e-6)
    model.train()
    query_logits(model, defense, x, ["identity"], torch.Generator())
    assert model.training  # the caller's mode is restored


def test_digits_dataset():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert abs(d.x_test.shape[0] - 450) <= 1
    assert set(d.y_train.unique().tolist()) == set(range(10))
    assert abs(float(torch.cat([d.x_train, d.x_test]).mean())) < 0.01  # normalised


def test_data_behind_an_unchanged_path_changes_the_fingerprint(tmp_path):
    """An npz rewritten at the same path (or an image folder, or TL-DMI's weights) is other data: its stored
    signals must not be reused for it (they were: the old logits scored against the new labels)."""
    from raymia.spec import AuditSpec

    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 2)), y_train=np.array([0, 1, 0, 1]))
    spec = AuditSpec.model_validate({"data": {"name": "npz", "params": {"path": str(path)}}})
    first = spec.fingerprint()
    assert spec.fingerprint() == first and "data.params.path" in spec.bank_dict()["inputs"]
    np.savez(path, x_train=np.zeros((4, 2)), y_train=np.array([1, 1, 0, 1]))  # one label changed
    assert spec.fingerprint() != first
    folder = tmp_path / "images" / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(b"one")
    spec = AuditSpec.model_validate({"data": {"name": "imagefolder", "params": {"root": str(tmp_path / "images")}}})
    before = spec.fingerprint()
    (folder / "1.png").write_bytes(b"two")
    assert spec.fingerprint() != before
    # a param that names no file, or the defaults, fingerprint as before
    assert "inputs" not in AuditSpec.model_validate({"data": {"params": {"test_fraction": 0.25}}}).bank_dict()
