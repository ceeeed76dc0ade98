"""What `Tuner.restore` may read: the SHA-256 of every file of a saved sweep, recorded where only
this job writes, and checked before a restore.

`Tuner.restore` unpickles the experiment folder (tuner.pkl, the trials' cloudpickled state inside
experiment_state-*.json, the searcher's state, params.pkl, error.pkl). That folder is the Ray
storage path, which may be `s3://`: whoever can write there could run code on the driver. So the
driver records the hash of every file in it when `fit` returns (finished, interrupted or failed),
in the run folder (`train/sweep_state.json`), and a later driver restores only when the folder
holds exactly those files with those hashes.

    record(experiment_path, fs, run_dir)   # after Tuner.fit
    verify(experiment_path, fs, run_dir)   # before Tuner.restore: True, or False when nothing was recorded
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from softprompt.errors import SoftpromptError

RECORD = "train/sweep_state.json"
"""The record's path inside the run folder."""


class TamperedSweepError(SoftpromptError):
    """The saved sweep is not what this job left: a file changed, appeared or went missing."""


def record(experiment_path: str, fs: Any, run_dir: str | Path) -> Path:
    """Hash every file of the experiment folder into the run folder's record; returns the record's path."""
    out = Path(run_dir) / RECORD
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"experiment": experiment_path, "files": hashes(experiment_path, fs)}, indent=1, sort_keys=True))
    tmp.replace(out)
    return out


def verify(experiment_path: str, fs: Any, run_dir: str | Path, where: str) -> bool:
    """Check the experiment folder against the record before a restore.

    Returns:
        True when every file matches; False when there is no record (nothing can be trusted: the
        caller starts the sweep over instead of restoring).

    Raises:
        TamperedSweepError: a file's hash differs from the record, or a file was added or removed
            since the record; names the files and the fix.
    """
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TamperedSweepError(f"{path} is not a sweep-state record ({exc}); pass tune.resume=false to start the sweep over") from exc
    now = hashes(experiment_path, fs)
    changed = sorted(name for name in set(recorded) & set(now) if recorded[name] != now[name])
    added = sorted(set(now) - set(recorded))
    missing = sorted(set(recorded) - set(now))
    if changed or added or missing:
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("changed", changed), ("added", added), ("missing", missing)) if names]
        raise TamperedSweepError(
            f"the saved sweep in {where} is not what this job left ({'; '.join(parts)}); Tuner.restore would unpickle "
            f"these files, so it is refused. Check who writes {where}; pass tune.resume=false to start the sweep over"
        )
    return True


def forget(run_dir: str | Path) -> None:
    """Drop the record (the sweep starts over)."""
    (Path(run_dir) / RECORD).unlink(missing_ok=True)


def hashes(experiment_path: str, fs: Any) -> dict[str, str]:
    """SHA-256 of every file under `experiment_path` (a local folder when `fs` is None, else a
    path on that pyarrow filesystem), by path relative to it."""
    if fs is None:
        root = Path(experiment_path)
        return {p.relative_to(root).as_posix(): _sha256(p.open("rb")) for p in sorted(root.rglob("*")) if p.is_file()}
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(experiment_path, recursive=True, allow_not_found=True))
    prefix = experiment_path.rstrip("/") + "/"
    return {info.path[len(prefix):]: _sha256(fs.open_input_stream(info.path)) for info in infos if info.type == pafs.FileType.File}


def _sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    with stream as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
