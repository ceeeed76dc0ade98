"""The saved sweep `Tuner.restore` would unpickle is checked against the hashes this job recorded
(local folders here; the same code reads `s3://` through pyarrow, covered by the Ray tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt.ray import sweep_state
from softprompt.ray.sweep_state import TamperedSweepError


def _sweep(root: Path) -> Path:
    exp = root / "ray" / "tune"
    (exp / "t_00000").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"\x80\x05pickled tuner")
    (exp / "experiment_state-1.json").write_text('{"trial_data": []}')
    (exp / "t_00000" / "params.pkl").write_bytes(b"\x80\x05params")
    return exp


def test_an_unchanged_sweep_verifies(tmp_path: Path) -> None:
    exp, run = _sweep(tmp_path), tmp_path / "run"
    sweep_state.record(str(exp), None, run)
    assert sweep_state.verify(str(exp), None, run, "here") is True


@pytest.mark.parametrize("damage", ["changed", "added", "missing"])
def test_a_changed_added_or_missing_file_refuses_the_restore(tmp_path: Path, damage: str) -> None:
    exp, run = _sweep(tmp_path), tmp_path / "run"
    sweep_state.record(str(exp), None, run)
    if damage == "changed":
        (exp / "tuner.pkl").write_bytes(b"\x80\x05os.system('evil')")
    elif damage == "added":
        (exp / "t_00000" / "error.pkl").write_bytes(b"\x80\x05evil")
    else:
        (exp / "experiment_state-1.json").unlink()
    with pytest.raises(TamperedSweepError, match=rf"{damage}: .*(tuner.pkl|error.pkl|experiment_state-1.json).*tune.resume=false"):
        sweep_state.verify(str(exp), None, run, "s3://bucket/ray/tune")


def test_without_a_record_nothing_is_trusted(tmp_path: Path) -> None:
    exp = _sweep(tmp_path)
    assert sweep_state.verify(str(exp), None, tmp_path / "elsewhere", "here") is False
    sweep_state.record(str(exp), None, tmp_path / "run")
    sweep_state.forget(tmp_path / "run")
    assert sweep_state.verify(str(exp), None, tmp_path / "run", "here") is False


def test_a_garbled_record_is_refused(tmp_path: Path) -> None:
    exp, run = _sweep(tmp_path), tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / sweep_state.RECORD).write_text("not json")
    with pytest.raises(TamperedSweepError, match="not a sweep-state record"):
        sweep_state.verify(str(exp), None, run, "here")
