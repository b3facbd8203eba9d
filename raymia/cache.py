"""Caches of fitted artefacts that every model or trial shares (a VAE, a pretrained backbone, GANs, the
inversion evaluator, LOMMA's students), under `<store>/cache/`: content-derived keys (`data_digest`,
`key_digest`), and state_dicts written atomically with their key and checksum (`save_state`) and read back
only when both hold (`load_state`, through `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from raymia.storage import LocalFiles, StoredFile

log = logging.getLogger("raymia")

CACHE_FORMAT = 1


def data_digest(data: Any, with_labels: bool = True) -> str:
    """Content hash of a Dataset's training split (name, shapes, bytes of x_train and y_train)."""
    h = hashlib.sha256()
    h.update(f"{data.name}:{tuple(data.x_train.shape)}:{tuple(data.y_train.shape)}".encode())
    h.update(data.x_train.detach().cpu().contiguous().numpy().tobytes())
    if with_labels:
        h.update(data.y_train.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def key_digest(fields: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able dict (the cache key)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(path: StoredFile | Path, key: str, state: dict[str, torch.Tensor]) -> None:
    """Write a state_dict with its key and checksum atomically (`raymia.storage`: a temporary name moved
    into place), so an interrupted write never leaves a half-written cache file under `path`, which is a
    file of a store (a path or a URI) or a local path."""
    cpu = {k: v.detach().cpu().clone() for k, v in state.items()}
    payload = {"format": str(CACHE_FORMAT), "key": key, "sha256": state_checksum(cpu), "state_dict": cpu}
    buf = io.BytesIO()
    torch.save(payload, buf)
    _stored(path).write_bytes(buf.getvalue())


def _stored(path: StoredFile | Path) -> StoredFile:
    return path if isinstance(path, StoredFile) else StoredFile(LocalFiles(Path(path).parent), Path(path).name)


def load_state(path: StoredFile | Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached state_dict at `path` if it exists, loads with weights_only=True, carries `key` and its
    checksum matches; None otherwise (a damaged or foreign file is reported and ignored)."""
    stored = _stored(path)
    if not stored.exists():
        return None
    try:
        payload = torch.load(io.BytesIO(stored.read_bytes()), map_location="cpu", weights_only=True)
        ok = (isinstance(payload, dict) and payload.get("key") == key
              and isinstance(payload.get("state_dict"), dict)
              and payload.get("sha256") == state_checksum(payload["state_dict"]))
    except Exception as e:  # a truncated or corrupted file: refit rather than fail or trust it
        log.warning("cache %s is unreadable (%s: %s); refitting", path, type(e).__name__, e)
        return None
    if not ok:
        log.warning("cache %s does not match its key or checksum; refitting", path)
        return None
    return payload["state_dict"]
