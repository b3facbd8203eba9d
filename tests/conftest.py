"""Shared fixtures: one real local Ray instance per test process, one intra-op thread for modules of tiny
models, the digits data set, a tiny digits audit spec; `run_cli`, the command in the test process; the
order in which the two test processes take the files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MLFLOW_LEFTOVERS = ("mlruns", "mlartifacts", "mlflow.db")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two test processes (pyproject: -n 2), which share the machine's cores: one intra-op
    # thread each, and in the commands they start, as more only add barriers (see `one_thread`). Set before
    # torch is imported, which reads it once.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Files with a slow test run first: each test process takes whole files (--dist loadfile), in this order
    (--no-loadscope-reorder: xdist's own puts the files with most tests first, and so the one-test files of
    a minute last), and the long ones started last would leave one process working alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file's own order is kept


def _mlflow_files() -> dict[str, int]:
    found = {}
    for name in MLFLOW_LEFTOVERS:
        root = REPO / name
        if root.exists():
            found.update({str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]})
    return found


@pytest.fixture(scope="session", autouse=True)
def no_mlflow_files_in_the_repository():
    """Tests write MLflow stores and artifacts under temporary folders only: the repository's mlruns/,
    mlartifacts/ and mlflow.db are as they were when the session started."""
    before = _mlflow_files()
    yield
    after = _mlflow_files()
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert not changed, f"tests wrote MLflow files into the repository: {changed[:5]}"


@pytest.fixture(autouse=True)
def raymias_logger_left_as_found():
    """A test that runs `raymia.cli.main` in this process puts raymia's logger back (`run_cli` does): one
    left with the command's own handler and no propagation hid the log lines of every later test on that
    test process from `caplog`, and those tests failed instead of the one that left it."""
    rlog = logging.getLogger("raymia")
    before = (rlog.handlers[:], rlog.propagate, rlog.level)
    yield
    after = (rlog.handlers[:], rlog.propagate, rlog.level)
    assert after == before, f"raymia's logger (handlers, propagate, level) was {before}, left {after}"


def _local_ray():
    ray = pytest.importorskip("ray")
    from ray.experimental.internal_kv import _internal_kv_initialized

    if not (ray.is_initialized() and _internal_kv_initialized()):  # ended, or left half-connected by a test
        ray.shutdown()
        # address "local": a new instance of the tests' own, never a cluster `ray start` left on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance with 2 CPUs, shared by the tests that need Ray (start-up costs ~5 s), ended
    with the session."""
    yield _local_ray()
    __import__("ray").shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The shared local Ray instance, started again where a test before this one ended it (the two-node
    test does): without it, Ray's auto-init would join whatever cluster the machine last ran."""
    return _local_ray()


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


# ---------------------------------------------------------------------------------------------------------
# model inversion on digits: private classes 0-4, public 5-9 (tests/test_inversion_attacks.py, _plgmi.py)

PRIVATE_CLASSES = [0, 1, 2, 3, 4]


def train_small(name: str, params: dict, info, x, y, epochs: int, seed: int):
    """A registry model trained by plain Adam (lr 1e-3, batches of 64, seeded order), in eval mode."""
    import torch
    import torch.nn.functional as F

    from raymia.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, params, info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def top1(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def inversion_setting(digits, one_thread):
    """(info of the private task, target, evaluator, public inputs); both models checked on the private
    test split."""
    from dataclasses import replace

    import torch

    k = len(PRIVATE_CLASSES)
    info = replace(digits.info, num_classes=k)
    train, test = digits.y_train < k, digits.y_test < k
    x, y = digits.x_train[train], digits.y_train[train]
    x_public = torch.cat([digits.x_train[~train], digits.x_test[~test]])  # classes 5-9: disjoint
    target = train_small("mlp", {"hidden": [64]}, info, x, y, epochs=20, seed=0)
    evaluator = train_small("cnn", {"channels": [16, 32], "hidden": 64}, info, x, y, epochs=10, seed=1)
    for model in (target, evaluator):
        assert top1(model, digits.x_test[test], digits.y_test[test]) > 0.9
    return info, target, evaluator, x_public


def inversion_ctx(setting, tmp_path, seed: int = 0):
    """The `InversionContext` of `inversion_setting` (its public inputs), caching under tmp_path/cache."""
    from raymia.inversion.registry import InversionContext

    info, _, _, x_public = setting
    return InversionContext(info=info, x_public=x_public, cache_dir=tmp_path / "cache", seed=seed)


# ---------------------------------------------------------------------------------------------------------
# headless Chromium (Debian's package, installed by .ci/run), driven by playwright


@contextlib.contextmanager
def chromium_page(path):
    """A headless Chromium tab showing the local file `path`; skips (saying why) where Chromium or
    playwright is missing."""
    with chromium_page_url(Path(path).resolve().as_uri()) as tab:
        yield tab


@contextlib.contextmanager
def chromium_page_url(url: str, width: int = 1600):
    """A headless Chromium tab (`width` x 1000) showing `url`; skips (saying why) where Chromium or
    playwright is missing."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives Chromium: pip install -e .[test]")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": width, "height": 1000})
            tab.goto(url)
            yield tab
        finally:
            browser.close()


def decoded_images(tab) -> list[tuple[str, int, int]]:
    """(alt, natural width, natural height) of every image of the page: 0 x 0 when it did not decode."""
    return [tuple(x) for x in tab.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight])")]


def run_cli(*args: str, cwd=None):
    """`raymia ARGS` in this process: `raymia.cli.main`, which the console script calls, with its exit code and
    output as `subprocess.run(capture_output=True, text=True)` gives them, without a new interpreter's seconds
    of imports. What main sets for its command (raymia's logger, the libraries' log levels) is put back.
    Tests of the process itself (signals, the exit) start a real `raymia` process."""
    import io
    import subprocess

    from raymia.cli import QUIETED_LOGGERS, main

    rlog = logging.getLogger("raymia")
    kept = (rlog.handlers[:], rlog.propagate, rlog.level)
    levels = {name: logging.getLogger(name).level for name in QUIETED_LOGGERS}
    env = os.environ.get("MLFLOW_LOGGING_LEVEL")
    here = os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        rlog.handlers[:], rlog.propagate = kept[0], kept[1]
        rlog.setLevel(kept[2])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if env is None:
            os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
        else:
            os.environ["MLFLOW_LOGGING_LEVEL"] = env
    return subprocess.CompletedProcess(["raymia", *args], code, out.getvalue(), err.getvalue())


def signal_on_file(proc, pattern: str, sig: int, *, group: bool = True, within: float = 240.0,
                   log: Path | None = None) -> float:
    """Send `sig` to a started `raymia` process (to its process group with `group`, as a terminal's Ctrl-C or
    Slurm's scancel do) as soon as a file matching the glob `pattern` appears; the seconds it then took to
    exit. A process still running 120 s after the signal fails here with every thread's stack (the command
    prints them on SIGUSR1) and the tail of `log`, and is killed with its group; one that ended before the
    file appeared fails here with the tail of `log`."""
    import glob
    import signal
    import subprocess
    import time

    try:
        t0 = time.time()
        while time.time() - t0 < within and not glob.glob(pattern) and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()[-3000:] if log is not None else proc.returncode
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        sent = time.time()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            raise AssertionError(f"still running 120 s after {signal.Signals(sig).name}; where it waits:\n"
                                 + (log.read_text()[-6000:] if log is not None else "(no log)")) from None
        return time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------
# progress bars on a terminal (raymia.progress)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a terminal's control sequences


@contextlib.contextmanager
def terminal_bars():
    """A terminal that draws into a buffer, bars enabled on it; raymia's logger writing to stderr (a buffer
    of its own) as the `raymia` command sets it up. Made in the test's body: pytest swaps sys.stderr
    between a fixture's setup and the test (tests/test_progress.py)."""
    buf, stderr = io.StringIO(), sys.stderr
    sys.stderr = io.StringIO()
    rlog = logging.getLogger("raymia")
    saved = rlog.handlers[:], rlog.level, rlog.propagate
    handler = logging.StreamHandler()  # holds sys.stderr as it is now, as the command's does
    handler.setFormatter(logging.Formatter("[raymia] %(message)s"))
    rlog.handlers[:], rlog.propagate = [handler], False
    rlog.setLevel(logging.INFO)
    from rich.console import Console

    from raymia import progress

    progress.enable(Console(file=buf, force_terminal=True, width=120))
    try:
        yield buf, handler
    finally:
        progress.disable()
        sys.stderr = stderr
        rlog.handlers[:] = saved[0]
        rlog.setLevel(saved[1])
        rlog.propagate = saved[2]
