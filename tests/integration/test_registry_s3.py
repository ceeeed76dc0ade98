"""The prompt registry against a real S3 endpoint (moto's server on loopback) and a local folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from softprompt import registry
from softprompt.errors import ConflictError, IntegrityError, StoreError
from softprompt.registry import Gate, promote, publish, pull, resolve_artifact, rollback
from softprompt.registry import cli as registry_cli
from softprompt.registry.s3 import S3Store
from softprompt.registry.store import ArtifactStore, LocalStore, NotFoundError

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_KEY = "huggingfacetb--smollm2-135m-instruct"
ACCESS = "AKIASENTINEL0000XYZ"
SECRET = "wJalrSECRETdoNotPrintMe0123456789"


def make_run(folder: Path, *, accuracy: float = 0.8, fingerprint: str = "eval-a", seed: str = "") -> Path:
    """A tiny run folder with the five required files (the safetensors bytes need not be real)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00" + hashlib.sha256(seed.encode()).digest())
    (folder / "run_manifest.json").write_text(
        json.dumps(
            {
                "task": "Intent",
                "base_model": {"name": MODEL, "weights_sha256": "ab" * 32},
                # the provenance publish requires (registry.publishing.PROVENANCE_FIELDS)
                "git": {"sha": "x", "dirty": False},
                "packages": {"softprompt": "0"},
                "config": {"task": {"name": "Intent"}},
                "dataset": {"fingerprint": "d"},
                "train": {"steps": 1},
            }
        )
    )
    metrics = {
        "primary_metric": "accuracy",
        "split": "test",
        "eval_fingerprint": fingerprint,
        "tuned": {"accuracy": accuracy, "macro_f1": accuracy - 0.05, "n": 100},
        "zero_shot": {"accuracy": 0.3},
        "few_shot": {"accuracy": 0.5},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "report.html").write_text(f"<html>{accuracy}</html>")
    return folder


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "registry")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(request.getfixturevalue("s3_bucket"), "registry", endpoint_url=endpoint, max_attempts=2)


@contextmanager
def moto_auth(endpoint: str) -> Iterator[None]:
    """Make moto's server check access keys and signatures (by default it accepts anything)."""

    def post(value: bytes) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=value,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=5).read()

    post(b"0")
    try:
        yield
    finally:
        post(b"inf")


def test_publish_and_pull(store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)  # moto accepts any key by default
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("extra files are published too")
    result = publish(store, run)
    assert result.created and (result.task, result.base_model) == ("intent", MODEL_KEY)
    assert len(result.version) == 16 and result.uri.endswith(f"intent/{MODEL_KEY}/{result.version}")
    names = sorted(p.name for p in run.iterdir())
    assert store.list(f"intent/{MODEL_KEY}/") == [
        f"intent/{MODEL_KEY}/{result.version}/{n}" for n in sorted([*names, "MANIFEST.json"])
    ]
    raw_manifest = store.get_bytes(f"intent/{MODEL_KEY}/{result.version}/MANIFEST.json")
    manifest = json.loads(raw_manifest)
    assert [f["name"] for f in manifest["files"]] == names
    assert manifest["metric"] == {"name": "accuracy", "value": 0.8, "split": "test"}
    assert manifest["eval_fingerprint"] == "eval-a" and manifest["softprompt_version"]
    assert manifest["base_model"] == {"name": MODEL, "key": MODEL_KEY, "weights_sha256": "ab" * 32}
    assert ACCESS.encode() not in raw_manifest and SECRET.encode() not in raw_manifest

    dest = pull(store, "intent", MODEL, result.version, tmp_path / "pulled")
    for name in names:
        assert (dest / name).read_bytes() == (run / name).read_bytes()
    assert json.loads((dest / "MANIFEST.json").read_text()) == manifest
    assert sorted(p.name for p in dest.iterdir()) == sorted([*names, "MANIFEST.json"])  # no temp files
    [info] = registry.list_versions(store, "intent", MODEL)
    assert (info.version, info.value, info.is_champion) == (result.version, 0.8, False)


def test_republish_is_a_no_op(store: ArtifactStore, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    first = publish(store, run)
    before = store.head(f"intent/{MODEL_KEY}/{first.version}/MANIFEST.json")
    again = publish(store, run)
    assert (again.created, again.version) == (False, first.version)
    assert "already exists" in again.message
    assert store.head(f"intent/{MODEL_KEY}/{first.version}/MANIFEST.json") == before


def test_interrupted_publish_leaves_no_version_and_rerun_completes(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run")
    real_put = store.put_bytes

    def crash_on_manifest(key: str, data: bytes, **kw: Any) -> str:
        if key.endswith("/MANIFEST.json"):
            raise RuntimeError("injected crash before the manifest")
        return real_put(key, data, **kw)

    monkeypatch.setattr(store, "put_bytes", crash_on_manifest)
    with pytest.raises(RuntimeError, match="injected"):
        publish(store, run)
    monkeypatch.undo()
    assert len(store.list("intent/")) == 5  # the files are there ...
    assert registry.list_versions(store, "intent", MODEL) == []  # ... but no version is visible
    assert registry.list_models(store) == []
    version = registry.compute_version(
        [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in run.iterdir()]
    )
    with pytest.raises(NotFoundError, match="published versions: none"):
        registry.show(store, "intent", MODEL, version)
    with pytest.raises(NotFoundError):
        pull(store, "intent", MODEL, version, tmp_path / "nothing")

    done = publish(store, run)
    assert done.created and done.version == version
    assert [v.version for v in registry.list_versions(store, "intent", MODEL)] == [version]


def test_a_differing_file_under_the_same_version_is_an_integrity_error(
    store: ArtifactStore, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run")
    version = registry.compute_version(
        [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in run.iterdir()]
    )
    store.put_bytes(f"intent/{MODEL_KEY}/{version}/report.html", b"<html>someone else's</html>")
    with pytest.raises(IntegrityError, match=r"report\.html already exists with sha256"):
        publish(store, run)


def test_promotion_gate_history_and_rollback(store: ArtifactStore, tmp_path: Path) -> None:
    v1 = publish(store, make_run(tmp_path / "r1", accuracy=0.80)).version
    v2 = publish(store, make_run(tmp_path / "r2", accuracy=0.79)).version
    v3 = publish(store, make_run(tmp_path / "r3", accuracy=0.85)).version
    v4 = publish(store, make_run(tmp_path / "r4", accuracy=0.90, fingerprint="eval-b")).version

    first = promote(store, "intent", MODEL, v1)
    assert (first.status, first.previous) == ("promoted", None)
    worse = promote(store, "intent", MODEL, v2)
    assert worse.status == "refused" and "does not beat" in worse.message
    small = promote(store, "intent", MODEL, v3, gate=Gate(min_delta=0.1))
    assert small.status == "refused" and "by more than 0.1" in small.message
    better = promote(store, "intent", MODEL, v3)
    assert (better.status, better.previous, better.champion_value) == ("promoted", v1, 0.80)
    other_eval = promote(store, "intent", MODEL, v4)
    assert other_eval.status == "refused" and "not comparable" in other_eval.message
    forced = promote(store, "intent", MODEL, v4, force=True, reason="new eval set")
    assert (forced.status, forced.forced) == ("promoted", True)
    assert promote(store, "intent", MODEL, v4).status == "unchanged"
    assert registry.show(store, "intent", MODEL).version == v4

    history = [json.loads(store.get_bytes(k)) for k in store.list(f"intent/{MODEL_KEY}/history/")]
    assert [(h["version"], h["action"], h["forced"]) for h in history] == [
        (v1, "promote", False),
        (v3, "promote", False),
        (v4, "promote", True),
    ]
    assert history[-1]["reason"] == "new eval set"

    assert rollback(store, "intent", MODEL).version == v3  # undo, step by step
    assert rollback(store, "intent", MODEL).version == v1
    with pytest.raises(StoreError, match="no previous champion"):
        rollback(store, "intent", MODEL)
    assert rollback(store, "intent", MODEL, to_version=v4, reason="back to it").status == "rolled_back"
    pointer = json.loads(store.get_bytes(f"intent/{MODEL_KEY}/champion.json"))
    assert (pointer["version"], pointer["action"], pointer["reason"]) == (v4, "rollback", "back to it")
    assert len(store.list(f"intent/{MODEL_KEY}/history/")) == 6


class _RacingStore:
    """Pauses after reading the champion until the other promoter has read it too.

    The champion write is serialized with a lock shared by both racers: moto checks If-Match and
    then writes without a lock (real S3 and LocalStore do both atomically), so without it two
    writes could interleave inside moto and both succeed there.
    """

    def __init__(self, inner: ArtifactStore, barrier: threading.Barrier, lock: threading.Lock) -> None:
        self.inner, self.barrier, self.lock, self.waited = inner, barrier, lock, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_bytes(self, key: str) -> bytes:
        data = self.inner.get_bytes(key)
        if key.endswith("champion.json") and not self.waited:
            self.waited = True
            self.barrier.wait(timeout=20)
        return data

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> str:
        if key.endswith("champion.json"):
            with self.lock:
                return self.inner.put_bytes(key, data, **kw)
        return self.inner.put_bytes(key, data, **kw)


def test_racing_promotions_have_exactly_one_winner(store: ArtifactStore, tmp_path: Path) -> None:
    v1 = publish(store, make_run(tmp_path / "r1", accuracy=0.80)).version
    v2 = publish(store, make_run(tmp_path / "r2", accuracy=0.85)).version
    v3 = publish(store, make_run(tmp_path / "r3", accuracy=0.86)).version
    promote(store, "intent", MODEL, v1)
    barrier, lock = threading.Barrier(2), threading.Lock()
    outcomes: dict[str, Any] = {}

    def race(version: str) -> None:
        try:
            outcomes[version] = promote(_RacingStore(store, barrier, lock), "intent", MODEL, version)  # type: ignore[arg-type]
        except ConflictError as e:
            outcomes[version] = e

    threads = [threading.Thread(target=race, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, o in outcomes.items() if not isinstance(o, Exception)]
    losers = [v for v, o in outcomes.items() if isinstance(o, ConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert str(outcomes[losers[0]]) == (
        f"another promotion moved champion of intent/{MODEL_KEY} from {v1} to {winners[0]} while you were "
        f"promoting {losers[0]}; re-run to compare against the new champion"
    )
    assert registry.show(store, "intent", MODEL).version == winners[0]
    assert len(store.list(f"intent/{MODEL_KEY}/history/")) == 2  # the loser left no history


def test_corrupted_object_is_detected_on_pull(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    store = S3Store(s3_bucket, "registry", endpoint_url=s3_endpoint)
    version = publish(store, make_run(tmp_path / "run")).version
    raw = boto3.client("s3", endpoint_url=s3_endpoint)
    key = f"registry/intent/{MODEL_KEY}/{version}/adapter_model.safetensors"
    stale_metadata = raw.head_object(Bucket=s3_bucket, Key=key)["Metadata"]
    raw.put_object(Bucket=s3_bucket, Key=key, Body=b"bit rot", Metadata=stale_metadata)
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors") as info:
        pull(store, "intent", MODEL, version, tmp_path / "out")
    assert stale_metadata["sha256"] in str(info.value)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

    # A consistent but different object (metadata rewritten too) is caught by MANIFEST.json.
    store.put_bytes(f"intent/{MODEL_KEY}/{version}/adapter_model.safetensors", b"replaced")
    with pytest.raises(IntegrityError, match=r"does not match MANIFEST\.json"):
        pull(store, "intent", MODEL, version, tmp_path / "out2")


def test_corrupted_local_file_is_detected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "reg")
    version = publish(store, make_run(tmp_path / "run")).version
    promote(store, "intent", MODEL, version)
    (tmp_path / "reg" / "intent" / MODEL_KEY / version / "report.html").write_text("tampered")
    with pytest.raises(IntegrityError, match=r"does not match MANIFEST\.json"):
        pull(store, "intent", MODEL, "champion", tmp_path / "out")
    with pytest.raises(IntegrityError):
        resolve_artifact(str(tmp_path / "reg" / "intent" / MODEL_KEY / "champion"), tmp_path / "cache")


def test_resolve_artifact(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    store = S3Store(s3_bucket, "team/registry", endpoint_url=s3_endpoint)
    version = publish(store, run).version
    promote(store, "intent", MODEL, version)
    uri = f"s3://{s3_bucket}/team/registry/intent/{MODEL_KEY}/champion"
    folder = resolve_artifact(uri, tmp_path / "cache", endpoint_url=s3_endpoint)
    assert (
        folder == tmp_path / "cache" / "s3" / s3_bucket / "team" / "registry" / "intent" / MODEL_KEY / version
    )
    assert (folder / "adapter_config.json").read_bytes() == (run / "adapter_config.json").read_bytes()
    assert (
        resolve_artifact(uri.replace("champion", version), tmp_path / "cache", endpoint_url=s3_endpoint)
        == folder
    )

    local = LocalStore(tmp_path / "reg")
    publish(local, run)
    promote(local, "intent", MODEL, version)
    reg_model = tmp_path / "reg" / "intent" / MODEL_KEY
    assert resolve_artifact(str(reg_model / "champion"), tmp_path / "cache") == reg_model / version
    assert resolve_artifact(f"file://{reg_model / version}", tmp_path / "cache") == reg_model / version
    assert resolve_artifact(str(run), tmp_path / "cache") == run
    with pytest.raises(StoreError, match="not found"):
        resolve_artifact(str(tmp_path / "nowhere"), tmp_path / "cache")
    with pytest.raises(StoreError, match="incomplete"):
        resolve_artifact(f"s3://{s3_bucket}/intent", tmp_path / "cache")


def test_path_traversal_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    version = publish(store, make_run(tmp_path / "run")).version
    key = f"intent/{MODEL_KEY}/{version}/MANIFEST.json"
    manifest = json.loads(store.get_bytes(key))
    manifest["files"][0]["name"] = "../../escaped.txt"
    store.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(IntegrityError, match="not a valid"):
        pull(store, "intent", MODEL, version, tmp_path / "out" / "dest")
    assert not list(tmp_path.rglob("escaped.txt"))
    with pytest.raises(StoreError, match="invalid key"):
        store.put_bytes("intent/../../escaped.txt", b"x")
    with pytest.raises(StoreError, match="not a registry version id"):
        pull(store, "intent", MODEL, "../../etc", tmp_path / "out")


def test_pull_refuses_a_symlink_that_points_outside(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "reg")
    version = publish(store, make_run(tmp_path / "run")).version
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "report.html").symlink_to(tmp_path / "victim.html")
    with pytest.raises(IntegrityError, match="outside"):
        pull(store, "intent", MODEL, version, dest)
    assert not (tmp_path / "victim.html").exists()


def test_bad_run_folders_and_names_are_rejected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "reg")
    run = make_run(tmp_path / "run")
    (run / "sub").mkdir()
    (run / "link.json").symlink_to(run / "metrics.json")
    (run / "report.html").unlink()
    with pytest.raises(StoreError, match=r"link\.json is a symlink; sub is a folder; missing report\.html"):
        publish(store, run)
    bad = make_run(tmp_path / "bad")
    provenance = json.loads((bad / "run_manifest.json").read_text())
    (bad / "run_manifest.json").write_text(
        json.dumps({**provenance, "task": "intent cls!", "base_model": {"name": "m"}})
    )
    with pytest.raises(StoreError, match="task 'intent cls!' cannot be a registry key"):
        publish(store, bad)
    with pytest.raises(StoreError, match="no champion yet"):
        registry.show(store, "intent", MODEL)


def test_store_failures_are_clear_and_fast(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run")
    missing = S3Store("no-such-registry-bucket", "r", endpoint_url=s3_endpoint, max_attempts=1)
    with pytest.raises(StoreError, match="bucket 'no-such-registry-bucket' does not exist at endpoint"):
        publish(missing, run)

    start = time.monotonic()
    offline = S3Store(s3_bucket, "r", endpoint_url="http://127.0.0.1:1", max_attempts=1, connect_timeout=1)
    with pytest.raises(StoreError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:1"):
        publish(offline, run)
    assert time.monotonic() - start < 10

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    wrong_keys = S3Store(s3_bucket, "r", endpoint_url=s3_endpoint, max_attempts=1)
    with moto_auth(s3_endpoint), pytest.raises(StoreError, match="check AWS_ACCESS_KEY_ID") as info:
        publish(wrong_keys, run)
    assert s3_bucket in str(info.value)
    assert ACCESS not in str(info.value) and SECRET not in str(info.value)


def test_cli_round_trip(store: ArtifactStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="softprompt")
    registry_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    if isinstance(store, S3Store):
        where = ["--registry", f"s3://{store.bucket}/{store.prefix}", "--s3-endpoint", str(store.endpoint_url)]
    else:
        where = ["--registry", str(store.uri())]

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args([*argv, *where])
        code = args.func(args)
        return code, capsys.readouterr().out

    code, out = run("publish", str(make_run(tmp_path / "r1")), "--json")
    v1 = json.loads(out)["version"]
    assert code == 0 and json.loads(out)["created"] is True
    code, out = run("promote", "intent", MODEL, v1)
    assert code == 0 and out.startswith(f"promoted {v1}")
    v2 = json.loads(run("publish", str(make_run(tmp_path / "r2", accuracy=0.5)), "--json")[1])["version"]
    code, out = run("promote", "intent", MODEL, v2, "--json")
    assert code == registry_cli.EXIT_NOT_PROMOTED and json.loads(out)["status"] == "refused"
    code, out = run("registry", "list")
    assert code == 0 and f"* intent/{MODEL_KEY} {v1}" in out and v2 in out
    code, out = run("registry", "show", "intent", MODEL, "--json")
    assert json.loads(out)["version"] == v1 and json.loads(out)["manifest"]["files"]
    code, out = run("registry", "pull", "intent", MODEL, "champion", "--dest", str(tmp_path / "pulled"))
    assert code == 0 and (tmp_path / "pulled" / "adapter_model.safetensors").is_file()
    code, out = run("rollback", "intent", MODEL, "--to", v2, "--reason", "test")
    assert code == 0 and f"to {v2}" in out
