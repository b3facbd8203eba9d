"""Content-addressed storage of bank signals: one entry per (spec fingerprint, pack), written once.

The store root is a path or a URI (`raymia.storage`: s3://, gs://, file://, any fsspec protocol).
Layout under it:  signals/<fingerprint>/k8-pack-00003.npz + k8-pack-00003.json (manifest),
for pack 3 of packs of K=8 models (the pack size changes the layout, not the numbers: model m is seeded by m
alone, so the fingerprint leaves it out and the file names carry it).
The .npz is written to a temporary name and moved into place; the manifest, written last, records its size,
SHA-256 and array shapes and is the commit marker. An entry whose manifest is missing, or whose file
does not match it, is reported as invalid and rebuilt, never reused. Arrays load with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("raymia")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



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
        from raymia.storage import open_root

        self.files = open_root(root)
        self.root = self.files.location  # an absolute path or the URI: what a worker elsewhere opens
        self.fingerprint = fingerprint
        self.pack_size = pack_size
        self.num_models = num_models
        self.pack_fingerprints = {int(k): v for k, v in (pack_fingerprints or {}).items()}

    def fingerprint_of(self, pack: int) -> str:
        return self.pack_fingerprints.get(pack, self.fingerprint)

    @property
    def num_packs(self) -> int:
        return num_packs(self.num_models, self.pack_size)

    def pack_models(self, pack: int) -> list[int]:
        return pack_models(pack, self.pack_size, self.num_models)

    def stored_files(self) -> list[str]:
        """Every stored file of the bank, relative to the store's root: each pack's data and manifest (under
        its own fingerprint: a non-adaptive bank shares packs with an undefended one) and each fingerprint's
        bank.json where there is one."""
        rels = [rel for p in range(self.num_packs) for rel in self._paths(p)]
        banks = {f"signals/{self.fingerprint_of(p)}/bank.json" for p in range(self.num_packs)}
        return rels + sorted(b for b in banks if self.files.size(b) is not None)

    def _paths(self, pack: int) -> tuple[str, str]:
        stem = f"signals/{self.fingerprint_of(pack)}/k{self.pack_size}-pack-{pack:05d}"
        return f"{stem}.npz", f"{stem}.json"

    def write_pack(self, pack: int, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        data, manifest = self._paths(pack)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
        self.files.write(data, blob)
        info = {
            "fingerprint": self.fingerprint_of(pack),
            "pack": pack,
            "models": self.pack_models(pack),
            "size": len(blob),
            "sha256": _sha256(blob),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
            **(meta or {}),
        }
        self.files.write(manifest, json.dumps(info, indent=1).encode())

    def _entry(self, pack: int) -> tuple[dict[str, Any] | None, bytes | None, str | None]:
        """(manifest, data bytes, None) for an intact entry, else (.., .., the reason it is not)."""
        data, manifest = self._paths(pack)
        if self.files.size(manifest) is None:
            return None, None, "absent" if self.files.size(data) is None else "no manifest (interrupted write)"
        try:
            info = json.loads(self.files.read(manifest))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, None, "corrupt manifest"
        if not isinstance(info, dict) or not isinstance(info.get("arrays"), dict):
            return None, None, "corrupt manifest"
        size = self.files.size(data)
        if size is None:
            return info, None, "data file missing"
        if info.get("fingerprint") != self.fingerprint_of(pack) or info.get("pack") != pack:
            return info, None, "manifest belongs to another entry"
        if info.get("models") != self.pack_models(pack):
            return info, None, f"holds models {info.get('models')}, expected {self.pack_models(pack)}"
        if size != info.get("size"):
            return info, None, f"size {size} != recorded {info.get('size')} (truncated?)"
        blob = self.files.read(data)
        if _sha256(blob) != info.get("sha256"):
            return info, None, "checksum mismatch (corrupt)"
        return info, blob, None

    def check_pack(self, pack: int) -> str | None:
        """None when the entry is complete and intact, else the reason it is not."""
        return self._entry(pack)[2]

    def read_pack(self, pack: int) -> dict[str, np.ndarray]:
        info, blob, problem = self._entry(pack)
        if problem is not None:
            raise ValueError(f"signals {self.fingerprint} pack {pack}: {problem}")
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for k, spec in info["arrays"].items():
            if k not in arrays or list(arrays[k].shape) != spec["shape"] or str(arrays[k].dtype) != spec["dtype"]:
                raise ValueError(f"signals {self.fingerprint} pack {pack}: array {k!r} does not match its manifest")
        if "models" in arrays and arrays["models"].tolist() != self.pack_models(pack):
            raise ValueError(f"signals {self.fingerprint} pack {pack}: holds models {arrays['models'].tolist()}")
        return arrays

    def read_meta(self, pack: int) -> dict[str, Any]:
        """The manifest of a pack (what was recorded beside its arrays: device, seconds, defense reports)."""
        return json.loads(self.files.read(self._paths(pack)[1]))

    def trained_vectorized(self, missing: list[int]) -> bool | None:
        """Whether the bank's stored packs trained vectorised: the manifest of the first stored pack of at
        least two models (`missing`: the packs not stored); None when there is none."""
        for p in range(self.num_packs):
            if p not in missing and len(self.pack_models(p)) > 1:
                return bool(self.read_meta(p).get("vectorized"))
        return None

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
                    self.files.delete(path)
            missing.append(p)
        return missing

    def write_spec(self, bank_dict: dict[str, Any]) -> None:
        self.files.write(f"signals/{self.fingerprint}/bank.json",
                         json.dumps(bank_dict, indent=1, sort_keys=True).encode())
