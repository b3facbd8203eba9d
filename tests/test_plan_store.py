"""Membership plan balance, the signal store's integrity checks, query augmentations, eval-mode inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymia.data import load_dataset
from raymia.data.plan import make_plan, paired_keep
from raymia.defenses import build_defense
from raymia.seeding import derive_seed
from raymia.store import SignalStore
from raymia.train.infer import augment, query_logits


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


def test_store_uri_nobody_opens_is_one_line_naming_the_field():
    from raymia.errors import SpecError

    with pytest.raises(SpecError, match=r"^store: no filesystem for nosuch://"):
        SignalStore("nosuch://bucket/x", "abc", pack_size=4, num_models=6)


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
