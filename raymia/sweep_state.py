"""What a sweep keeps so that running it again resumes it, and the Optuna study's storage.

`state.json` in the sweep's state folder holds the spec's resume hash (`resume_key`: a re-run continues
only a sweep of the same spec), the MLflow parent run and whether the sweep finished (`read_state`,
`write_state`). `tune-state.zip` is the one copy of Ray Tune's state a resume puts back (`backup_tune_state`,
`restore_tune_state`): Tune unpickles those files, so the copy is signed with the user's key and taken only
from this driver. The study lives in `sweep.storage` or an SQLite file beside the state, refused on a
network filesystem (`check_study_storage`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raymia.errors import DataError, SpecError, first_line
from raymia.spec import SweepSpec, changed_fields, hashed_dump
from raymia.storage import join, open_root


def resume_key(spec: SweepSpec) -> dict[str, Any]:
    """What must match for a re-run to continue a sweep (the tracking and output locations may move, an
    objective's hypervolume `reference` only changes the report, and the final audit follows the search; a
    renamed parameter is read under its old name, `hashed_dump`, so either spelling continues the sweep)."""
    d = hashed_dump(spec.model_dump(mode="json"))
    for k in ("tracking", "output_dir", "store"):
        d.pop(k, None)
    # the final audit runs after the search, which it does not change (None, not left out: the key of a sweep
    # without one stays what it was)
    d["sweep"]["final_audit"] = None
    for o in d["sweep"]["objectives"]:
        o.pop("reference", None)
    return d


def resume_hash(spec: SweepSpec) -> str:
    """The hash `state.json` keeps: a re-run continues the sweep only when its spec hashes the same."""
    return hashlib.sha256(json.dumps(resume_key(spec), sort_keys=True).encode()).hexdigest()[:16]


def read_state(spec: SweepSpec, keep, resume: bool) -> dict[str, Any] | None:
    """The sweep's saved state in `keep` (spec hash, MLflow parent run, finished), None for a new sweep; a
    different spec under the same name, or --resume with nothing to resume, is a SpecError."""
    state = None
    if keep.size("state.json") is not None:
        try:
            state = json.loads(keep.read("state.json"))
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict):
            raise DataError("is not a sweep state raymia wrote (cut short or edited); --fresh (fresh=True) starts "
                            "the sweep again, reusing every stored bank", where=join(keep.location, "state.json"))
    if state is not None and state.get("spec_hash") != resume_hash(spec):
        changed = changed_fields(state.get("resume_key"), resume_key(spec))
        said = f" ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed)" if changed else ""
        raise SpecError(f"a sweep named {spec.name!r} with a different spec exists in {keep.location}{said}; a "
                        "sweep continues only under its own spec (its search and trials depend on all of it): give "
                        "this one another name, or use --fresh (run_sweep(..., fresh=True)) to discard the old one",
                        where="name")
    if resume and state is None:
        raise SpecError(f"nothing to resume in {keep.location}", where="--resume (resume=True)")
    return state


def write_state(spec: SweepSpec, keep, parent_id: str | None, finished: bool) -> None:
    """`state.json` in `keep`, as `read_state` reads it (the resume key too: a changed spec's error names the
    fields that changed)."""
    keep.write("state.json", json.dumps({"spec_hash": resume_hash(spec), "parent_run_id": parent_id,
                                         "tracking_uri": spec.tracking.uri if parent_id else None,
                                         "finished": finished, "resume_key": resume_key(spec)}).encode())


# What Tune's restore reads (every one holds pickles): the Tuner, the newest experiment state (its trials,
# pickled inside the JSON), the search generator's and the Optuna searcher's state.
_TUNE_STATE = ("tuner.pkl", "experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
BACKUP = "tune-state.zip"  # in the sweep's state folder: one file, so one atomic write on any store
_SIGNATURE = "raymia-signature"  # the zip's member holding `signing.sign` of the others
_BACKUP_MAX = 1 << 30  # bytes, unpacked: Tune's state of a sweep is a few MB; a bigger zip is not raymia's


def _state_names(names: list[str]) -> list[str]:
    """The newest file of each kind of Tune state among `names` (Tune's names sort by time)."""
    import fnmatch

    return [m[-1] for m in ([n for n in names if fnmatch.fnmatch(n, p)] for p in _TUNE_STATE) if m]


def damaged(files: dict[str, bytes]) -> str | None:
    """Why one of Tune's state files is not intact (cut short by a kill while Tune wrote it), or None. A pickle
    is checked by its frame (protocol marker first, STOP opcode last), not loaded; anything else must parse
    as JSON."""
    for name, data in files.items():
        if data[:1] == b"\x80":  # a pickle, whatever its name says (Tune's search_gen_state-*.json is one)
            if data[-1:] != b".":
                return f"{name} is cut short ({len(data)} bytes)"
            continue
        if name.endswith(".pkl"):
            return f"{name} is cut short ({len(data)} bytes)"
        try:
            json.loads(data)
        except ValueError:
            return f"{name} is neither intact JSON nor an intact pickle ({len(data)} bytes)"
    return None


def backup_tune_state(staging: str, tuner_pkl: bytes, state) -> None:
    """Copy Tune's newest state files, when intact, into one zip in the sweep's state folder (`state`, a
    `raymia.storage` folder handle), signed with the user's key, replacing the previous copy in one atomic
    write. A resume loads Tune's state only from this copy (`restore_tune_state`). What is signed never comes
    from the store, which others may write: the state files from Tune's staging folder on this driver (Tune
    writes them there, then uploads them), and `tuner_pkl` as this process pickled its Tuner."""
    import io
    import zipfile

    from raymia.signing import sign

    local = open_root(staging)
    files = {n: local.read(n) for n in _state_names(local.list()) if n != "tuner.pkl"}
    files["tuner.pkl"] = tuner_pkl
    if len(files) < len(_TUNE_STATE) or damaged(files) is not None:
        return
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(_SIGNATURE, sign(files))
    state.write(BACKUP, buf.getvalue())


def restore_tune_state(state, exp) -> str | None:
    """Make `exp` hold exactly the copy `backup_tune_state` kept, once its signature holds (Tune unpickles
    these files: what anyone else wrote into a shared store must not run here). None when done, else why not:
    no copy (no trial had finished), or one this user's key did not sign."""
    import io
    import zipfile

    from raymia.signing import KEY_ENV, key_file, verify

    if state.size(BACKUP) is None:
        return "no trial had finished"
    try:
        with zipfile.ZipFile(io.BytesIO(state.read(BACKUP))) as z:
            if len(z.infolist()) > 2 * len(_TUNE_STATE) or sum(i.file_size for i in z.infolist()) > _BACKUP_MAX:
                return f"its copy {BACKUP} is not one raymia wrote (too many or too large members)"
            files = {n: z.read(n) for n in z.namelist()}
    except (zipfile.BadZipFile, ValueError) as e:
        return f"its copy {BACKUP} is not a zip ({e})"
    signature = files.pop(_SIGNATURE, b"").decode("ascii", "replace")
    plain = all("/" not in n and "\\" not in n for n in files) and sorted(_state_names(list(files))) == sorted(files)
    if not plain or not verify(files, signature):
        return (f"its copy {BACKUP} is not signed with this user's key ({KEY_ENV}, or {key_file()}): it was "
                "written by another user or machine, or changed since")
    exp.remove_tree("")  # trial folders too: Tune loads a failed trial's pickled error from them
    for name, data in files.items():
        exp.write(name, data)
    return None


def optuna_storage(url: str):
    """An Optuna storage from a URL: journal files (journal:///path) or any RDB URL (sqlite, postgresql...)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-study INFO lines repeat raymia's

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    return optuna.storages.RDBStorage(url)


def study_storage(spec: SweepSpec, sweep_dir: Path):
    """The storage of the sweep's Optuna study (`sweep.storage`, or `optuna.db` in the sweep's folder); one
    line naming it when it cannot be opened (a server that does not answer, a file that is not a database)."""
    url = spec.sweep.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
    try:
        return optuna_storage(url)
    except Exception as e:  # noqa: BLE001  # SQLAlchemy's, the driver's and Optuna's own errors
        if spec.sweep.storage:
            raise SpecError(f"cannot open {url!r}: {first_line(e)}; accepted: an SQLAlchemy URL (postgresql://..., "
                            "mysql://..., sqlite:///...) or journal:///path", where="sweep.storage") from None
        raise DataError(f"the sweep's Optuna study cannot be opened ({first_line(e)}); --fresh (fresh=True) starts "
                        "the sweep again", where=str(sweep_dir / "optuna.db")) from None


def delete_study(spec: SweepSpec, sweep_dir: Path) -> None:
    """Remove the sweep's Optuna study, so a new search starts from the same seeded proposals."""
    import optuna

    storage = study_storage(spec, sweep_dir)
    try:
        optuna.delete_study(study_name=f"raymia-{spec.name}", storage=storage)
    except KeyError:  # no such study yet
        pass


_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "fuse.sshfs",
               "fuse.gcsfuse", "fuse.s3fs", "fuse.efs", "9p"}


def network_filesystem(path: Path, mounts: str | None = None) -> str | None:
    """The type of the network filesystem `path` is on (its longest mount point in /proc/mounts), or None."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts.splitlines():
        f = line.split()
        if len(f) >= 3 and (target == f[1] or target.startswith(f[1].rstrip("/") + "/")) and len(f[1]) > len(best):
            best, kind = f[1], f[2]
    return kind if kind in _NETWORK_FS else None


def check_study_storage(spec: SweepSpec, sweep_dir: Path) -> None:
    """SQLite's locking is not safe on a network filesystem: refuse the default study file there."""
    url = spec.sweep.storage
    path = (Path(url[len("sqlite:///"):]) if url and url.startswith("sqlite:///") else
            None if url else sweep_dir / "optuna.db")
    kind = network_filesystem(path.parent) if path is not None else None
    if kind:
        raise SpecError(f"the Optuna study would be SQLite at {path}, on {kind}, where SQLite's locking is not "
                        "safe; accepted: an RDB URL such as postgresql://user@host/db (clusters/README.md)",
                        where="sweep.storage")
