"""A registry version is trusted only after it is verified, whatever form its reference takes.

1. predict and serve verify a local registry folder (`REGISTRY/task/model/VERSION`, a pulled folder,
   `file://`, `NAME=DIR`), not only the `champion` alias and `s3://` URIs.
2. A version's id is re-derived from its files: rewriting a file and MANIFEST.json together is refused.
3. A malformed champion pointer or history record is a clear error, and `rollback --to` and
   `promote --force` replace it.
4. `registry list` skips a bad manifest (warning, exit 1); `pull` is all-or-nothing with normal
   file modes; the repair command that the errors name works.

The same behaviour on S3 (and the local store, side by side) is in
tests/integration/test_registry_integrity_s3.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import types
from pathlib import Path

import pytest

from softprompt import predict
from softprompt.cli import main
from softprompt.config import config_from_dict, to_dict
from softprompt.errors import IntegrityError
from softprompt.registry import compute_version, promote, publish, pull, verify_folder
from softprompt.registry.store import LocalStore

TASK, MODEL = "intent", "tiny-model"
CONFIG = {
    "task": {"name": TASK, "labels": ["a", "b"], "verbalizer": {"a": [" a"], "b": [" b"]}},
    "data": {"train": "x.csv"},
    "model": {"name": MODEL},
}


def make_run(folder: Path, *, accuracy: float = 0.8, seed: str = "") -> Path:
    """A run folder publish accepts and predict can resolve (its adapter bytes need not be real)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00" + hashlib.sha256(seed.encode()).digest())
    provenance = {"git": {"sha": "x"}, "packages": {"softprompt": "0"}, "dataset": {"fingerprint": "d"}, "train": {"steps": 1}}
    manifest = {"task": TASK, "base_model": {"name": MODEL, "weights_sha256": "ab" * 32}, "config": to_dict(config_from_dict(CONFIG)), **provenance}
    (folder / "run_manifest.json").write_text(json.dumps(manifest))
    metrics = {"primary_metric": "accuracy", "split": "test", "eval_fingerprint": "e", "tuned": {"accuracy": accuracy}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "report.html").write_text(f"<html>{accuracy}</html>")
    return folder


@pytest.fixture()
def reg(tmp_path: Path) -> tuple[Path, str]:
    """A local registry with one published, promoted version: (registry root, version)."""
    root = tmp_path / "registry"
    version = publish(LocalStore(root), make_run(tmp_path / "run")).version
    promote(LocalStore(root), TASK, MODEL, version)
    return root, version


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a file of a version folder and record its new hash in MANIFEST.json: a consistent forgery."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


# ------------------------------------------------------------------------------- 1. every form is verified


@pytest.mark.parametrize("form", ["version folder", "file:// URI", "NAME=folder", "pulled folder"])
def test_predict_verifies_a_registry_folder_whatever_form_its_reference_takes(
    form: str, reg: tuple[Path, str], tmp_path: Path
) -> None:
    root, version = reg
    folder = root / TASK / MODEL / version
    if form == "pulled folder":
        folder = pull(LocalStore(root), TASK, MODEL, version, tmp_path / "pulled")
    spec = {"file:// URI": f"file://{folder}", "NAME=folder": f"mine={folder}"}.get(form, str(folder))
    assert predict.resolve_prompts([spec])[0].folder.resolve() == folder.resolve()  # intact: accepted
    (folder / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors does not match MANIFEST\.json"):
        predict.resolve_prompts([spec])


def test_predict_cli_refuses_a_tampered_version_folder(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, version = reg
    folder = root / TASK / MODEL / version
    rewrite(folder, "adapter_model.safetensors", b"forged")
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    code, _, err = cli(capsys, "predict", "--artifact", str(folder), "--input", str(tmp_path / "in.jsonl"))
    assert code == 2 and f"claims version {version} but the files it lists hash to version" in err


def test_a_prompt_table_verifies_a_registry_folder_before_reading_it(reg: tuple[Path, str]) -> None:
    root, version = reg
    folder = root / TASK / MODEL / version
    (folder / "adapter_model.safetensors").write_bytes(b"tampered")
    table = predict.PromptTable(types.SimpleNamespace())  # type: ignore[arg-type]  # refused before the model is used
    with pytest.raises(IntegrityError, match=r"does not match MANIFEST\.json"):
        table.add("intent", folder)


def test_a_version_folder_without_its_manifest_is_not_taken_for_a_run_folder(reg: tuple[Path, str]) -> None:
    root, version = reg
    (root / TASK / MODEL / version / "MANIFEST.json").unlink()
    with pytest.raises(IntegrityError, match=r"named like a registry version but has no MANIFEST\.json"):
        predict.resolve_prompts([str(root / TASK / MODEL / version)])


# ----------------------------------------------------------------------------- 2. the id is re-derived


def test_rewriting_a_file_and_the_manifest_together_is_refused(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, version = reg
    folder = root / TASK / MODEL / version
    rewrite(folder, "adapter_model.safetensors", b"forged prompt")
    claim = f"claims version {version} but the files it lists hash to version"
    with pytest.raises(IntegrityError, match=claim):
        verify_folder(folder)
    with pytest.raises(IntegrityError, match=claim):
        pull(LocalStore(root), TASK, MODEL, version, tmp_path / "out")
    code, out, err = cli(capsys, "registry", "pull", TASK, MODEL, "champion", "--dest", str(tmp_path / "out2"), "--registry", str(root))
    assert code == 2 and "verified" not in out and claim in err
    assert f"softprompt registry repair {TASK} {MODEL} {version} --from RUN_FOLDER" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_manifest_moved_under_another_version_id_is_refused(reg: tuple[Path, str], tmp_path: Path) -> None:
    root, version = reg
    other = publish(LocalStore(root), make_run(tmp_path / "run2", seed="2")).version
    (root / TASK / MODEL / version / "MANIFEST.json").write_bytes((root / TASK / MODEL / other / "MANIFEST.json").read_bytes())
    with pytest.raises(IntegrityError, match=f"describes version {other}, but .* holds version {version}"):
        verify_folder(root / TASK / MODEL / version)


def test_a_manifest_figure_edited_to_pass_the_gate_is_refused_and_repaired(
    reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The id covers the files, not the manifest's figures; the gate reads the manifest's metric, so
    it is checked against the hashed metrics.json (same files, same id, a better number)."""
    root, champion = reg
    v2 = publish(LocalStore(root), make_run(tmp_path / "run2", accuracy=0.5, seed="2")).version
    path = root / TASK / MODEL / v2 / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    manifest["metric"]["value"] = 0.99
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"its metric\.value differ from metrics\.json's"):
        verify_folder(root / TASK / MODEL / v2)
    code, _, err = cli(capsys, "promote", TASK, MODEL, v2, "--force", "--reason", "test", "--registry", str(root))
    assert code == 2 and f"refusing to promote {v2}" in err and "metric.value" in err, err
    assert json.loads((root / TASK / MODEL / "champion.json").read_text())["version"] == champion
    code, out, _ = cli(capsys, "registry", "repair", TASK, MODEL, v2, "--from", str(tmp_path / "run2"), "--registry", str(root))
    assert code == 0 and "MANIFEST.json" in out
    assert verify_folder(root / TASK / MODEL / v2)["metric"]["value"] == 0.5


def test_the_version_id_rule_is_the_one_publish_used() -> None:
    legacy = Path(__file__).resolve().parents[1] / "data" / "registry-98c578d" / "support-intent" / "model" / "254902551fd5a39f"
    manifest = json.loads((legacy / "MANIFEST.json").read_text())
    assert compute_version([(f["name"], f["sha256"]) for f in manifest["files"]]) == "254902551fd5a39f"


# ------------------------------------------------------------------ 3. malformed pointer and history


BAD_POINTERS = {"not JSON": b"{oops", "no version": b'{"foo": 1}', "a list": b"[1]", "bad id": b'{"version": "../../x"}'}


@pytest.mark.parametrize("body", sorted(BAD_POINTERS))
def test_a_malformed_pointer_is_named_and_the_repair_commands_replace_it(
    body: str, reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, version = reg
    pointer = root / TASK / MODEL / "champion.json"
    pointer.write_bytes(BAD_POINTERS[body])
    where = ["--registry", str(root)]
    for argv in (["registry", "show", TASK, MODEL], ["rollback", TASK, MODEL], ["promote", TASK, MODEL, version]):
        code, _, err = cli(capsys, *argv, *where)
        assert code == 2 and f"{pointer} is not a valid champion pointer" in err, argv
        assert f"softprompt rollback {TASK} {MODEL} --to VERSION" in err and "--force" in err
    code, out, _ = cli(capsys, "rollback", TASK, MODEL, "--to", version, *where)
    assert code == 0 and f"from an unreadable pointer to {version}" in out
    assert json.loads(pointer.read_text())["version"] == version

    pointer.write_bytes(BAD_POINTERS[body])
    code, out, _ = cli(capsys, "promote", TASK, MODEL, version, "--force", "--reason", "fix pointer", *where)
    assert code == 0 and out.startswith(f"promoted {version}")
    assert json.loads(pointer.read_text())["forced"] is True
    code, out, _ = cli(capsys, "registry", "list", *where)
    assert code == 0 and f"* {TASK}/{MODEL} {version}" in out


def test_a_corrupt_history_record_is_named_and_rollback_to_works_past_it(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, v1 = reg
    store = LocalStore(root)
    v2 = publish(store, make_run(tmp_path / "run2", accuracy=0.9, seed="2")).version
    promote(store, TASK, MODEL, v2)
    (record,) = [p for p in (root / TASK / MODEL / "history").iterdir() if p.name.endswith(f"-{v1}.json")]
    record.write_text('{"version": 7}')
    code, _, err = cli(capsys, "rollback", TASK, MODEL, "--registry", str(root))
    assert code == 2 and f"{record} is not a valid champion history record: key 'version' is 7" in err
    assert "--to VERSION" in err
    code, out, _ = cli(capsys, "rollback", TASK, MODEL, "--to", v1, "--registry", str(root))
    assert code == 0 and f"from {v2} to {v1}" in out


# ---------------------------------------------------------------- 4. list, promote, pull and repair


def test_list_skips_a_bad_manifest_names_it_and_exits_non_zero(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, good = reg
    bad = publish(LocalStore(root), make_run(tmp_path / "run2", seed="2")).version
    (root / TASK / MODEL / bad / "MANIFEST.json").write_text("{}")
    code, out, err = cli(capsys, "registry", "list", "--registry", str(root))
    assert code == 1 and f"* {TASK}/{MODEL} {good}" in out and bad not in out
    assert f"warning: skipped: {root / TASK / MODEL / bad / 'MANIFEST.json'} is not a valid" in err


def test_promote_refuses_a_version_whose_stored_files_are_damaged(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, champion = reg
    v2 = publish(LocalStore(root), make_run(tmp_path / "run2", accuracy=0.9, seed="2")).version
    (root / TASK / MODEL / v2 / "report.html").write_text("damaged")
    code, _, err = cli(capsys, "promote", TASK, MODEL, v2, "--registry", str(root))
    assert code == 2 and f"refusing to promote {v2}" in err and "report.html" in err
    assert f"softprompt registry repair {TASK} {MODEL} {v2} --from RUN_FOLDER" in err
    assert json.loads((root / TASK / MODEL / "champion.json").read_text())["version"] == champion


def test_a_failed_pull_leaves_no_destination_and_pulled_files_have_normal_modes(reg: tuple[Path, str], tmp_path: Path) -> None:
    root, version = reg
    old = os.umask(0o022)
    try:
        dest = pull(LocalStore(root), TASK, MODEL, version, tmp_path / "out" / "intent")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {p.name: 0o644 for p in (root / TASK / MODEL / version).iterdir()}

    (root / TASK / MODEL / version / "report.html").write_text("damaged")
    with pytest.raises(IntegrityError, match=r"report\.html"):
        pull(LocalStore(root), TASK, MODEL, version, tmp_path / "out" / "fresh")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["intent"]  # no partial folder, no temp folder
    # An existing folder changes only once everything is verified: the good adapter is not put back
    # while the report fails.
    for name in ("adapter_model.safetensors", "report.html"):
        (dest / name).unlink()
    left = sorted(p.name for p in dest.iterdir())
    with pytest.raises(IntegrityError, match=r"report\.html"):
        pull(LocalStore(root), TASK, MODEL, version, dest)
    assert sorted(p.name for p in dest.iterdir()) == left


def test_following_the_repair_advice_repairs_the_version(reg: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, version = reg
    run = tmp_path / "run"
    rewrite(root / TASK / MODEL / version, "adapter_model.safetensors", b"forged")
    where = ["--registry", str(root)]
    code, _, err = cli(capsys, "registry", "pull", TASK, MODEL, version, "--dest", str(tmp_path / "out"), *where)
    advice = f"softprompt registry repair {TASK} {MODEL} {version} --from RUN_FOLDER"
    assert code == 2 and advice in err
    code, _, err = cli(capsys, "publish", str(run), *where)  # publish refuses, and names the same repair
    assert code == 2 and advice in err

    other = make_run(tmp_path / "other", seed="other")
    code, _, err = cli(capsys, *advice.replace("RUN_FOLDER", str(other)).split()[1:], *where)
    assert code == 2 and "can only be repaired from the run folder whose files hash to its id" in err
    code, out, _ = cli(capsys, *advice.replace("RUN_FOLDER", str(run)).split()[1:], *where)
    assert code == 0 and out.startswith(f"repaired {TASK}/{MODEL} version {version}") and "MANIFEST.json" in out
    code, out, _ = cli(capsys, "registry", "pull", TASK, MODEL, version, "--dest", str(tmp_path / "out"), *where)
    assert code == 0 and "(verified)" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
    code, out, _ = cli(capsys, *advice.replace("RUN_FOLDER", str(run)).split()[1:], *where)
    assert code == 0 and "intact; nothing to repair" in out
