"""Shared fixtures: one real local Ray instance per test session, one intra-op thread for modules of tiny
models, the digits data set, a tiny digits audit spec."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by every test that needs Ray (start-up costs ~5 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one intra-op thread: more only add barriers, which make the tests several
    times slower on a busy 2-core machine. Modules of tiny models use it for all their tests (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from raymia.data import load_dataset

    return load_dataset("digits")


def tiny_spec_dict(tmp_path, **over) -> dict:
    """An overfitting digits audit that trains in seconds: 8 wide MLPs on ~150 members each."""
    d = {
        "name": "tiny",
        "seed": 0,
        "plan": {"num_models": 8, "population": 300},
        "model": {"name": "mlp", "params": {"hidden": [256]}},
        "train": {"epochs": 40, "batch_size": 64, "lr": 0.002},
        "queries": ["identity", "hflip"],
        "bank": {"pack_size": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "raymia-tests"},
        "output_dir": str(tmp_path / "runs"),
    }
    for k, v in over.items():
        d[k] = v
    return d
