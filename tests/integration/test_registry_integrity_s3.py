"""Registry integrity on a real S3 endpoint (moto's server on loopback) and a local folder, side by side.

Both stores behave the same: a version's id is re-derived from its files, a malformed champion
pointer or history record is named and replaced by `rollback --to` / `promote --force`, `registry
list` skips a bad manifest, `promote` refuses damaged files, a failed pull leaves nothing behind,
and the repair the errors advise works. On S3 the damage is bit rot that keeps the object's
recorded checksum (so only hashing the bytes finds it). The local-only cases (predict's folder
references, file modes) are in tests/unit/test_registry_integrity.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_registry_s3 import MODEL, MODEL_KEY, make_run

from softprompt.cli import main
from softprompt.errors import IntegrityError
from softprompt.registry import cli as registry_cli
from softprompt.registry import list_versions, promote, publish, pull, resolve_artifact
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore

TASK = "intent"
BASE = f"{TASK}/{MODEL_KEY}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "registry")
    return S3Store(request.getfixturevalue("s3_bucket"), "registry", endpoint_url=request.getfixturevalue("s3_endpoint"), max_attempts=2)


def run_cli(store: ArtifactStore, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """One `softprompt` command against `store`: (exit code, stdout, stderr); never a traceback."""
    if isinstance(store, S3Store):
        where = ["--registry", f"s3://{store.bucket}/{store.prefix}", "--s3-endpoint", str(store.endpoint_url)]
    else:
        where = ["--registry", store.uri()]
    capsys.readouterr()
    code = main([*argv, *where])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def bit_rot(store: ArtifactStore, key: str, data: bytes) -> None:
    """Change a stored object's bytes but not the checksum it records (a silent corruption)."""
    if isinstance(store, LocalStore):
        Path(store.uri(key)).write_bytes(data)
        return
    import boto3

    raw = boto3.client("s3", endpoint_url=store.endpoint_url)
    full = f"{store.prefix}/{key}"
    metadata = raw.head_object(Bucket=store.bucket, Key=full)["Metadata"]
    raw.put_object(Bucket=store.bucket, Key=full, Body=data, Metadata=metadata)


def forge(store: ArtifactStore, version: str, name: str, data: bytes) -> None:
    """Rewrite a version's file and its MANIFEST.json consistently (checksums and all)."""
    key = f"{BASE}/{version}/MANIFEST.json"
    manifest = json.loads(store.get_bytes(key))
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    store.put_bytes(f"{BASE}/{version}/{name}", data)
    store.put_bytes(key, json.dumps(manifest).encode())


def test_a_forged_file_and_manifest_are_refused(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = publish(store, make_run(tmp_path / "run")).version
    promote(store, TASK, MODEL, version)
    forge(store, version, "adapter_model.safetensors", b"forged prompt")
    claim = f"claims version {version} but the files it lists hash to version"
    code, out, err = run_cli(store, capsys, "registry", "pull", TASK, MODEL, "champion", "--dest", str(tmp_path / "out"))
    assert code == 2 and "verified" not in out and claim in err and not (tmp_path / "out").exists()
    if isinstance(store, S3Store):
        uri = f"s3://{store.bucket}/registry/{BASE}/{version}"
        with pytest.raises(IntegrityError, match=claim):
            resolve_artifact(uri, tmp_path / "cache", endpoint_url=store.endpoint_url)
    else:
        with pytest.raises(IntegrityError, match=claim):
            resolve_artifact(f"{store.uri()}/{BASE}/champion", tmp_path / "cache")


@pytest.mark.parametrize("body", [b"not json {", b'{"foo": 1}'])
def test_a_malformed_pointer_is_replaced_by_rollback_to_and_promote_force(
    store: ArtifactStore, body: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = publish(store, make_run(tmp_path / "r1", accuracy=0.8)).version
    v2 = publish(store, make_run(tmp_path / "r2", accuracy=0.9)).version
    promote(store, TASK, MODEL, v1)
    store.put_bytes(f"{BASE}/champion.json", body)
    code, _, err = run_cli(store, capsys, "promote", TASK, MODEL, v2)
    assert code == 2 and f"{store.uri(f'{BASE}/champion.json')} is not a valid champion pointer" in err
    assert f"softprompt rollback {TASK} {MODEL_KEY} --to VERSION" in err

    code, out, _ = run_cli(store, capsys, "promote", TASK, MODEL, v2, "--force", "--reason", "pointer lost")
    assert code == 0 and out.startswith(f"promoted {v2}") and "unreadable" in out
    pointer = json.loads(store.get_bytes(f"{BASE}/champion.json"))
    assert (pointer["version"], pointer["forced"], pointer["previous"]) == (v2, True, v1)  # recovered from history

    store.put_bytes(f"{BASE}/champion.json", body)
    code, out, _ = run_cli(store, capsys, "rollback", TASK, MODEL, "--to", v1)
    assert code == 0 and f"from an unreadable pointer to {v1}" in out
    assert json.loads(store.get_bytes(f"{BASE}/champion.json"))["version"] == v1


def test_a_corrupt_history_record_is_named_and_rollback_to_works_past_it(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = publish(store, make_run(tmp_path / "r1", accuracy=0.8)).version
    v2 = publish(store, make_run(tmp_path / "r2", accuracy=0.9)).version
    promote(store, TASK, MODEL, v1)
    promote(store, TASK, MODEL, v2)
    (record,) = [k for k in store.list(f"{BASE}/history/") if k.endswith(f"-{v1}.json")]
    store.put_bytes(record, b"\x00garbage")
    code, _, err = run_cli(store, capsys, "rollback", TASK, MODEL)
    assert code == 2 and f"{store.uri(record)} is not a valid champion history record" in err and "--to VERSION" in err
    code, out, _ = run_cli(store, capsys, "rollback", TASK, MODEL, "--to", v1)
    assert code == 0 and f"from {v2} to {v1}" in out


def test_list_skips_a_bad_manifest_and_exits_non_zero(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = publish(store, make_run(tmp_path / "r1")).version
    bad = publish(store, make_run(tmp_path / "r2", seed="2")).version
    store.put_bytes(f"{BASE}/{bad}/MANIFEST.json", b'{"format": "softprompt.registry.version/1"}')
    with pytest.raises(IntegrityError):
        list_versions(store, TASK, MODEL)
    assert [v.version for v in list_versions(store, TASK, MODEL, on_damage=lambda e: None)] == [good]
    code, out, err = run_cli(store, capsys, "registry", "list")
    assert code == registry_cli.EXIT_DAMAGED and f"{BASE} {good}" in out and bad not in out
    assert f"warning: skipped: {store.uri(f'{BASE}/{bad}/MANIFEST.json')} is not a valid" in err


def test_promote_and_rollback_refuse_a_version_with_damaged_files(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = publish(store, make_run(tmp_path / "r1", accuracy=0.8)).version
    v2 = publish(store, make_run(tmp_path / "r2", accuracy=0.9)).version
    bit_rot(store, f"{BASE}/{v1}/adapter_model.safetensors", b"bit rot")
    code, _, err = run_cli(store, capsys, "promote", TASK, MODEL, v1)
    assert code == 2 and f"refusing to promote {v1}" in err and "adapter_model.safetensors" in err
    assert f"softprompt registry repair {TASK} {MODEL_KEY} {v1} --from RUN_FOLDER" in err
    assert store.head(f"{BASE}/champion.json") is None
    promote(store, TASK, MODEL, v2)
    code, _, err = run_cli(store, capsys, "rollback", TASK, MODEL, "--to", v1)
    assert code == 2 and f"refusing to roll back to {v1}" in err
    assert json.loads(store.get_bytes(f"{BASE}/champion.json"))["version"] == v2


def test_a_failed_pull_leaves_nothing_behind(store: ArtifactStore, tmp_path: Path) -> None:
    version = publish(store, make_run(tmp_path / "run")).version
    bit_rot(store, f"{BASE}/{version}/report.html", b"bit rot")
    with pytest.raises(IntegrityError, match=r"report\.html"):
        pull(store, TASK, MODEL, version, tmp_path / "out" / "dest")
    assert list((tmp_path / "out").iterdir()) == []


def test_following_the_repair_advice_repairs_the_version(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run")
    version = publish(store, run).version
    bit_rot(store, f"{BASE}/{version}/adapter_model.safetensors", b"bit rot")
    code, _, err = run_cli(store, capsys, "registry", "pull", TASK, MODEL, version, "--dest", str(tmp_path / "out"))
    advice = f"softprompt registry repair {TASK} {MODEL_KEY} {version} --from RUN_FOLDER"
    assert code == 2 and advice in err
    code, out, _ = run_cli(store, capsys, *advice.replace("RUN_FOLDER", str(run)).split()[1:])
    assert code == 0 and f"rewrote adapter_model.safetensors from {run}" in out
    code, out, _ = run_cli(store, capsys, "registry", "pull", TASK, MODEL, version, "--dest", str(tmp_path / "out"))
    assert code == 0 and "(verified)" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
