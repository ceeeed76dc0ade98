"""One publish path: `softprompt run`, `softprompt publish DIR` and the pipeline's Publish step all go
through `registry.publish`, which refuses an artifact without its run manifest, its metrics or its
train summary, and publish the artifact's real train summary when it is complete."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DemoConfig
from softprompt import evaluate, job
from softprompt.cli import main
from softprompt.errors import StoreError
from softprompt.kubeflow import steps


@pytest.fixture()
def artifact(demo_cfg: DemoConfig, tmp_path: Path) -> Path:
    """A complete artifact folder from the in-process job (not published)."""
    result = job.run(demo_cfg(), tmp_path / "good", job.InProcessTrainer(), publish_artifact=False)
    return result.evaluate.artifact_dir


def _without_manifest(folder: Path) -> None:
    (folder / "run_manifest.json").unlink()


def _without_metrics(folder: Path) -> None:
    (folder / "metrics.json").unlink()


def _without_train_summary(folder: Path) -> None:
    manifest = json.loads((folder / "run_manifest.json").read_text())
    (folder / "run_manifest.json").write_text(json.dumps({**manifest, "train": {}}))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "no run manifest": (_without_manifest, "missing run_manifest.json"),
    "no metrics": (_without_metrics, "missing metrics.json"),
    "no train summary": (_without_train_summary, "lacks provenance ['train']"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_path_refuses_an_incomplete_artifact(
    damage: str, artifact: Path, demo_cfg: DemoConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    breaks, message = DAMAGE[damage]
    bad = Path(shutil.copytree(artifact, tmp_path / "bad"))
    breaks(bad)
    registry = tmp_path / "registry"
    cfg = demo_cfg(f"publish.registry={registry}")
    cfg_path = steps.write_config(cfg, tmp_path / "resolved.yaml")

    assert main(["publish", str(bad), "--registry", str(registry)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(StoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
        steps.publish(cfg_path, bad)
    # `softprompt run`: the same job, its evaluate stage leaving the damaged folder.
    real = evaluate.run

    def damaged(*args: object, **kwargs: object) -> evaluate.EvaluateResult:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        breaks(result.artifact_dir)
        return result

    monkeypatch.setattr(evaluate, "run", damaged)
    with pytest.raises(StoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
        job.run(cfg, tmp_path / "run", job.InProcessTrainer())
    assert not list(registry.rglob("MANIFEST.json")), "nothing may be published from an incomplete artifact"


def test_every_path_publishes_a_complete_artifact_with_its_train_summary(
    artifact: Path, demo_cfg: DemoConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    cfg = demo_cfg(f"publish.registry={registry}")
    published = job.run(cfg, tmp_path / "run", job.InProcessTrainer()).publish
    assert published is not None and published.created
    recorded = json.loads((Path(published.uri) / "run_manifest.json").read_text())["train"]
    assert recorded["steps"] == cfg.train.steps and recorded["workers"] == 1 and recorded["tokens_per_second"] > 0

    # The CLI and the pipeline step publish the other (identical-config) artifact the same way.
    assert main(["publish", str(artifact), "--registry", str(registry), "--json"]) == 0
    by_cli = json.loads(capsys.readouterr().out)
    by_step = steps.publish(steps.write_config(cfg, tmp_path / "resolved.yaml"), artifact)
    assert by_cli["version"] == by_step["version"] and by_step["created"] is False
    assert json.loads((Path(by_step["uri"]) / "run_manifest.json").read_text())["train"]["steps"] == cfg.train.steps
