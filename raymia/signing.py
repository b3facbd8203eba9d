"""Signatures on saved state that holds pickles (Tune's experiment state, which a resumed sweep loads).

A sweep's state lives in its store, which on a cluster is a shared folder or bucket: whoever can write there
must not be able to run code in the next driver that resumes the sweep. raymia signs the copy of Tune's state
it keeps with a key of the user's own and loads only a copy whose signature holds.

The key: `RAYMIA_STATE_KEY` (hex; give a cluster's drivers the same one from a secret, so that a new head
node can resume), else `~/.config/raymia/state.key`, created on first use and readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from raymia.errors import RaymiaError

KEY_ENV = "RAYMIA_STATE_KEY"


def key_file() -> Path:
    return Path.home() / ".config" / "raymia" / "state.key"


def state_key() -> bytes:
    """This user's signing key (see the module's docstring)."""
    given = os.environ.get(KEY_ENV)
    if given:
        try:
            key = bytes.fromhex(given.strip())
        except ValueError:
            raise RaymiaError("is not hex (e.g. the output of `python -c 'import secrets; "
                              "print(secrets.token_hex(32))'`)", where=KEY_ENV) from None
        if len(key) < 16:
            raise RaymiaError(f"is {len(key)} bytes; give at least 16 (32 hex digits)", where=KEY_ENV)
        return key
    path = key_file()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise RaymiaError("is not a hex key; delete it to make a new one (saved sweeps then start their "
                          "search again)", where=str(path)) from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32)
    try:  # created readable by its owner only; a second process making one at the same time keeps the first
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return bytes.fromhex(key)


def sign(files: dict[str, bytes], key: bytes | None = None) -> str:
    """HMAC-SHA256 (hex) over the files' names and contents, in name order."""
    mac = hmac.new(key if key is not None else state_key(), digestmod=hashlib.sha256)
    for name in sorted(files):
        data = files[name]
        mac.update(f"{name}\0{len(data)}\0".encode())
        mac.update(data)
    return mac.hexdigest()


def verify(files: dict[str, bytes], signature: str, key: bytes | None = None) -> bool:
    return hmac.compare_digest(sign(files, key), signature)
