"""What earlier releases wrote still works, and what they accepted fails with the new name.

- A registry written by softprompt at 98c578d (tests/data/registry-98c578d) lists, verifies, pulls
  and serves (its run manifest records config keys that have since been renamed).
- Renamed config keys and command-line flags are errors that name the new spelling (docs/migration.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from softprompt import predict, registry
from softprompt.cli import main
from softprompt.config import RENAMED, load_config, upgrade
from softprompt.errors import ConfigError
from softprompt.registry.store import LocalStore

LEGACY = Path(__file__).resolve().parents[1] / "data" / "registry-98c578d"
TASK, MODEL, VERSION = "support-intent", "model", "254902551fd5a39f"
BASE = ["data.train=x.csv", "task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}"]


@pytest.fixture()
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the 98c578d registry."""
    return Path(shutil.copytree(LEGACY, tmp_path / "registry"))


def test_a_registry_written_by_98c578d_lists_verifies_and_pulls(legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(legacy)
    (info,) = registry.list_versions(store, TASK, MODEL)
    assert (info.version, info.is_champion, info.metric) == (VERSION, True, "accuracy")
    assert registry.verify_folder(legacy / TASK / MODEL / VERSION)["version"] == VERSION
    assert main(["registry", "list", "--registry", str(legacy)]) == 0
    assert f"* {TASK}/{MODEL} {VERSION}" in capsys.readouterr().out
    assert main(["registry", "pull", TASK, MODEL, "champion", "--dest", str(tmp_path / "pulled"), "--registry", str(legacy)]) == 0
    assert {p.name for p in (tmp_path / "pulled").iterdir()} == {p.name for p in (legacy / TASK / MODEL / VERSION).iterdir()}


def test_a_registry_written_by_98c578d_serves(legacy: Path, tiny_model_dir: Path) -> None:
    manifest = json.loads((legacy / TASK / MODEL / VERSION / "run_manifest.json").read_text())
    assert "store" in manifest["config"]["publish"]  # recorded under a name that is an error to write today
    refs = predict.resolve_prompts([str(legacy / TASK / MODEL / "champion")])
    assert refs[0].name == TASK and refs[0].folder == legacy / TASK / MODEL / VERSION
    assert refs[0].cfg.publish.registry == manifest["config"]["publish"]["store"]
    table = predict.load_prompts(refs, model=str(tiny_model_dir))
    (pred,) = predict.predict_rows(table, [(TASK, "My parcel has not arrived yet.")])
    assert pred.label in refs[0].cfg.task.labels and sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-4)  # type: ignore[union-attr]


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_a_renamed_config_key_names_its_new_name(old: str, new: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, f"{old}=x"])
    assert f"{old} was renamed to {new}" in str(info.value) and "docs/migration.md" in str(info.value)


def test_upgrade_carries_recorded_values_to_the_new_keys() -> None:
    raw = {"publish": {"store": "s3://b/r", "s3_endpoint_url": "http://minio:9000", "region": "eu-west-1"},
           "data": {"s3_endpoint_url": None}, "ray": {"storage_endpoint_url": "http://other:9000"}}
    assert upgrade(raw) == {"publish": {"registry": "s3://b/r"}, "data": {}, "ray": {},
                            "s3": {"endpoint": "http://minio:9000", "region": "eu-west-1"}}


@pytest.mark.parametrize(("argv", "fix"), [
    (["publish", "x", "--store", "runs/registry"], "--store was renamed: use --registry"),
    (["registry", "list", "--registry", "r", "--endpoint-url", "http://m"], "--endpoint-url was renamed: use --s3-endpoint"),
    (["predict", "--artifact", "a", "--input", "i", "--endpoint-url", "http://m"], "--endpoint-url was renamed: use --s3-endpoint"),
    (["evaluate", "--adapter", "runs/x/train/adapter"], "--adapter was renamed: use --train"),
    (["pipeline", "submit", "-c", "c.yaml", "--override", "train.steps=5"], "--override was renamed: use trailing KEY=VALUE"),
])
def test_a_renamed_flag_names_its_new_spelling(argv: list[str], fix: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and fix in capsys.readouterr().err
