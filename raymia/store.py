"""Content-addressed storage of bank signals: one entry per (spec fingerprint, pack), written once.

Layout under the store root:  signals/<fingerprint>/k8-pack-00003.npz + k8-pack-00003.json (manifest),
for pack 3 of packs of K=8 models (the pack size changes the layout, not the numbers: model m is seeded by m
alone, so the fingerprint leaves it out and the file names carry it).
The .npz is written to a temporary name and renamed; the manifest, written last, records its size,
SHA-256 and array shapes and is the commit marker. An entry whose manifest is missing, or whose file
does not match it, is reported as invalid and rebuilt, never reused. Arrays load with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("raymia")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def num_packs(num_models: int, pack_size: int) -> int:
    """How many packs of `pack_size` models hold a bank of `num_models` (the last one may be smaller)."""
    return -(-num_models // pack_size)


def pack_models(pack: int, pack_size: int, num_models: int) -> list[int]:
    """The bank models of pack p: the consecutive models [p*K, (p+1)*K), the last pack cut at M. The one
    definition of the partition (the bank trains, the store names and the spec keys packs by it)."""
    return list(range(pack * pack_size, min((pack + 1) * pack_size, num_models)))

class SignalStore:
    def __init__(self, root: str | Path, fingerprint: str, pack_size: int, num_models: int,
                 pack_fingerprints: dict[int, str] | None = None):
        """`pack_fingerprints` overrides the key of single packs: a non-adaptive bank's packs of undefended
        shadows are the same as an undefended bank's, so they are stored (and shared) under its key."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.pack_size = pack_size
        self.num_models = num_models
        self.pack_fingerprints = {int(k): v for k, v in (pack_fingerprints or {}).items()}
        self.dir = self.root / "signals" / fingerprint

    def fingerprint_of(self, pack: int) -> str:
        return self.pack_fingerprints.get(pack, self.fingerprint)

    @property
    def num_packs(self) -> int:
        return num_packs(self.num_models, self.pack_size)

    def pack_models(self, pack: int) -> list[int]:
        return pack_models(pack, self.pack_size, self.num_models)

    def _paths(self, pack: int) -> tuple[Path, Path]:
        stem = f"k{self.pack_size}-pack-{pack:05d}"
        d = self.root / "signals" / self.fingerprint_of(pack)
        return d / f"{stem}.npz", d / f"{stem}.json"

    def write_pack(self, pack: int, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        data, manifest = self._paths(pack)
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
        info = {
            "fingerprint": self.fingerprint_of(pack),
            "pack": pack,
            "models": self.pack_models(pack),
            "size": data.stat().st_size,
            "sha256": _sha256(data),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
            **(meta or {}),
        }
        tmp_m = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
        with tmp_m.open("w") as f:
            f.write(json.dumps(info, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_m, manifest)

    def check_pack(self, pack: int) -> str | None:
        """None when the entry is complete and intact, else the reason it is not."""
        data, manifest = self._paths(pack)
        if not manifest.exists():
            return "absent" if not data.exists() else "no manifest (interrupted write)"
        try:
            info = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "corrupt manifest"
        if not data.exists():
            return "data file missing"
        if info.get("fingerprint") != self.fingerprint_of(pack) or info.get("pack") != pack:
            return "manifest belongs to another entry"
        if info.get("models") != self.pack_models(pack):
            return f"holds models {info.get('models')}, expected {self.pack_models(pack)}"
        if data.stat().st_size != info.get("size"):
            return f"size {data.stat().st_size} != recorded {info.get('size')} (truncated?)"
        if _sha256(data) != info.get("sha256"):
            return "checksum mismatch (corrupt)"
        return None

    def read_pack(self, pack: int) -> dict[str, np.ndarray]:
        problem = self.check_pack(pack)
        if problem is not None:
            raise ValueError(f"signals {self.fingerprint} pack {pack}: {problem}")
        data, manifest = self._paths(pack)
        info = json.loads(manifest.read_text())
        with np.load(data, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for k, spec in info["arrays"].items():
            if k not in arrays or list(arrays[k].shape) != spec["shape"] or str(arrays[k].dtype) != spec["dtype"]:
                raise ValueError(f"signals {self.fingerprint} pack {pack}: array {k!r} does not match its manifest")
        if "models" in arrays and arrays["models"].tolist() != self.pack_models(pack):
            raise ValueError(f"signals {self.fingerprint} pack {pack}: holds models {arrays['models'].tolist()}")
        return arrays

    def read_meta(self, pack: int) -> dict[str, Any]:
        """The manifest of a pack (what was recorded beside its arrays: device, seconds, defense reports)."""
        return json.loads(self._paths(pack)[1].read_text())

    def missing_packs(self) -> list[int]:
        """Packs that must be (re)built; invalid entries are logged and removed."""
        missing = []
        for p in range(self.num_packs):
            problem = self.check_pack(p)
            if problem is None:
                continue
            if problem != "absent":
                log.warning("signals %s pack %d: %s; rebuilding it", self.fingerprint, p, problem)
                for path in self._paths(p):
                    path.unlink(missing_ok=True)
            missing.append(p)
        return missing

    def write_spec(self, bank_dict: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bank.json").write_text(json.dumps(bank_dict, indent=1, sort_keys=True))
