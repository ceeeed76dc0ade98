"""What the KFP components run (`softprompt.kubeflow.steps`), without kfp: the validate step's
resolved config, parameter and resource overrides, metric scalars, config fetching from S3."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml

from softprompt.config import load_config, to_dict
from softprompt.kubeflow import remote, steps

DEMO = Path(steps.__file__).resolve().parents[1] / "demo"


def _config(tmp_path: Path, **extra: object) -> Path:
    raw = {
        "task": {"name": "demo", "labels": ["billing", "refund"], "verbalizer": {"billing": [" billing"], "refund": [" refund"]},
                 "template": "{text}\nIntent:"},
        "data": {"train": str(DEMO / "train.csv"), "label_map": {"0": "billing"}},
        "evaluate": {"baselines": ["zero_shot"]},
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_validate_writes_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _config(tmp_path)
    out = tmp_path / "out" / "config"
    meta = steps.validate(str(source), out, base_model="HuggingFaceTB/SmolLM2-135M", test_data_uri=str(DEMO / "test.csv"),
                          registry="s3://bucket/registry", s3_endpoint="http://minio:9000", overrides=["train.steps=50"])
    resolved = load_config(out)
    assert resolved == load_config(source, [
        "model.name=HuggingFaceTB/SmolLM2-135M", f"data.test={DEMO / 'test.csv'}", "publish.store=s3://bucket/registry",
        "data.s3_endpoint_url=http://minio:9000", "model.s3_endpoint_url=http://minio:9000",
        "publish.s3_endpoint_url=http://minio:9000", "train.steps=50"])
    assert resolved.train.steps == 50 and resolved.evaluate.baselines == ["zero_shot"]
    assert meta == {"source": str(source), "task": "demo", "base_model": "HuggingFaceTB/SmolLM2-135M",
                    "registry": "s3://bucket/registry", "primary_metric": "accuracy"}
    assert "+ softprompt validate -c" in capsys.readouterr().out


def test_validate_fails_with_the_cli_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = _config(tmp_path)
    with pytest.raises(steps.StepError, match=r"`softprompt validate` exited with 2"):
        steps.validate(str(source), tmp_path / "config", train_data_uri=str(tmp_path / "missing.csv"))
    assert "missing.csv does not exist" in capfd.readouterr().err  # the CLI's own message, in the step log
    with pytest.raises(steps.StepError, match="does not exist"):
        steps.validate(str(tmp_path / "nope.yaml"), tmp_path / "config")


def test_validate_reads_the_config_from_s3(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").upload_file(
        str(_config(tmp_path)), s3_bucket, "configs/nightly.yaml")  # as `aws s3 cp` would: no softprompt checksum
    steps.validate(f"s3://{s3_bucket}/configs/nightly.yaml", tmp_path / "config", s3_endpoint=s3_endpoint)
    assert load_config(tmp_path / "config").publish.s3_endpoint_url == s3_endpoint


def test_parameter_overrides_keep_values_as_text() -> None:
    assert steps.parameter_overrides() == []
    assert steps.parameter_overrides(base_model="1e3", registry="null") == ['model.name="1e3"', 'publish.store="null"']
    cfg = load_config(None, ["data.train=x.csv", "task.labels=[a, b]", "task.verbalizer={a: [' a'], b: [' b']}",
                             *steps.parameter_overrides(base_model="1e3")])
    assert cfg.model.name == "1e3"


@pytest.mark.parametrize(("args", "expected"), [
    ((0, -1.0, 0.0), []),
    ((2, 1.0, 4.0), ["ray.num_workers=2", "ray.use_gpu=true", "ray.gpus_per_worker=1.0", "ray.cpus_per_worker=4.0"]),
    ((0, 0.0, 0.0), ["ray.use_gpu=false"]),
    ((0, 0.5, 0.0), ["ray.use_gpu=true", "ray.gpus_per_worker=0.5"]),
])
def test_resource_overrides(args: tuple[int, float, float], expected: list[str]) -> None:
    assert steps.resource_overrides(*args) == expected


def test_write_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path), ["tune.search_space={train.lr: {type: choice, values: [0.03, 0.1]}}", "data.text_column=0"])
    again = load_config(steps.write_config(cfg, tmp_path / "x" / "resolved.yaml"))
    assert to_dict(again) == to_dict(cfg)


def test_metric_scalars() -> None:
    metrics = {"tuned": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.1}, "zero_shot": {"accuracy": 0.5, "macro_f1": 0.4},
               "few_shot": {"accuracy": 0.6, "macro_f1": 0.55}, "verdict": "..."}
    assert steps.metric_scalars(metrics) == {
        "tuned_accuracy": 0.9, "tuned_macro_f1": 0.8, "zero_shot_accuracy": 0.5, "zero_shot_macro_f1": 0.4,
        "few_shot_accuracy": 0.6, "few_shot_macro_f1": 0.55}
    assert steps.metric_scalars({"tuned": {"accuracy": 1.0, "macro_f1": 1.0}}) == {"tuned_accuracy": 1.0, "tuned_macro_f1": 1.0}


def test_default_scratch_is_the_registry_buckets_tmp(tmp_path: Path) -> None:
    assert remote.default_scratch("s3://softprompt-registry/registry", "softprompt-tune-abc") == \
        "s3://softprompt-registry/tmp/softprompt/softprompt-tune-abc"
    assert remote.default_scratch(str(tmp_path / "reg"), "n").endswith("softprompt-scratch/n")


def test_unknown_launcher(tmp_path: Path) -> None:
    with pytest.raises(steps.StepError, match="launcher='k8s' is not one of local, ray-jobs, rayjob"):
        steps.tune(_config(tmp_path), tmp_path, tmp_path / "out", launcher="k8s")


def test_local_tune_runs_softprompt_tune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launcher=local: `softprompt tune` with no Ray address; the resource parameters reach the
    config it reads, and the winning trial's values the config evaluate reads."""
    seen: dict[str, object] = {}

    def fake_cli(args: list[str], *, capture: bool = False) -> str:
        run_dir = Path(args[args.index("--run-dir") + 1])
        seen.update(command=list(args), ray=load_config(args[args.index("-c") + 1]).ray, data=sorted(p.name for p in (run_dir / "data").iterdir()))
        trial = run_dir / "tune" / "t1"
        (trial / "adapter").mkdir(parents=True)
        (trial / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
        (trial / "train_history.json").write_text('[{"step": 4, "eval_metric": 0.5}]')
        (run_dir / "tune" / "tune_result.json").write_text(
            json.dumps({"ensemble": [str(trial / "adapter")], "best": {"trial_id": "t1", "params": {"train.lr": 0.2}}}))
        return ""

    monkeypatch.setattr(steps, "run_cli", fake_cli)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "train.parquet").write_bytes(b"PAR1")
    out = tmp_path / "winners"
    meta = steps.tune(_config(tmp_path), dataset, out, num_workers=3, gpus_per_worker=0, cpus_per_worker=2)
    command = seen["command"]
    assert isinstance(command, list) and command[:2] == ["tune", "-c"] and "--ray-address" not in command
    ray = seen["ray"]
    assert (ray.num_workers, ray.use_gpu, ray.cpus_per_worker) == (3, False, 2.0)  # type: ignore[attr-defined]
    assert seen["data"] == ["train.parquet"]
    assert steps.ranked_adapters(out) == [out / "00" / "adapter"]
    assert meta["command"] == "tune" and meta["best_trial"] == "t1" and meta["best_eval_metric"] == 0.5
    assert load_config(out / "config.yaml").train.lr == 0.2
