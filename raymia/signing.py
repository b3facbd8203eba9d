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
MIN_KEY_BYTES = 16


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
        if len(key) < MIN_KEY_BYTES:
            raise RaymiaError(f"is {len(key)} bytes; give at least {MIN_KEY_BYTES} ({2 * MIN_KEY_BYTES} hex digits)",
                              where=KEY_ENV)
        return key
    path = key_file()
    if not path.exists():
        _make_key(path)
    return _read_key(path)



def _read_key(path: Path) -> bytes:
    fix = "delete it to make a new one (saved sweeps then start their search again)"
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RaymiaError(f"must be owned by you and readable by you only (chmod 600); else {fix}", where=str(path))
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise RaymiaError(f"is not a hex key; {fix}", where=str(path)) from None
    if len(key) < MIN_KEY_BYTES:
        raise RaymiaError(f"holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {fix}", where=str(path))
    return key


def _make_key(path: Path) -> None:
    """A new random key at `path`, readable by its owner only, put in place whole (written to a temporary
    file, then linked): a kill or a second process at the same moment never leaves a part of one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: its key it is
            pass
    finally:
        tmp.unlink(missing_ok=True)


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
