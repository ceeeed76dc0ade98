"""What the KFP components run (`softprompt.kubeflow.steps`), without kfp: the validate step's
resolved config, parameter and resource overrides, metric scalars, config fetching from S3, and
the tune step's output contract."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import yaml

from softprompt.config import JobConfig, load_config, to_dict, with_values
from softprompt.errors import ConfigError
from softprompt.kubeflow import scratch, steps
from softprompt.outcome import TrainOutcome

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
        "model.name=HuggingFaceTB/SmolLM2-135M", f"data.test={DEMO / 'test.csv'}", "publish.registry=s3://bucket/registry",
        "s3.endpoint=http://minio:9000", "train.steps=50"])
    assert resolved.train.steps == 50 and resolved.evaluate.baselines == ["zero_shot"]
    assert meta == {"source": str(source), "task": "demo", "base_model": "HuggingFaceTB/SmolLM2-135M",
                    "registry": "s3://bucket/registry", "primary_metric": "accuracy"}
    assert f"ok: {source} is valid" in capsys.readouterr().out


def test_validate_names_every_unusable_data_source(tmp_path: Path) -> None:
    source = _config(tmp_path)
    with pytest.raises(steps.StepError, match=r"missing\.csv does not exist"):
        steps.validate(str(source), tmp_path / "config", train_data_uri=str(tmp_path / "missing.csv"))
    assert not (tmp_path / "config").exists()
    with pytest.raises(steps.StepError, match=r"nope\.yaml does not exist"):
        steps.validate(str(tmp_path / "nope.yaml"), tmp_path / "config")


def test_validate_reads_the_config_from_s3(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").upload_file(
        str(_config(tmp_path)), s3_bucket, "configs/nightly.yaml")  # as `aws s3 cp` would: no softprompt checksum
    steps.validate(f"s3://{s3_bucket}/configs/nightly.yaml", tmp_path / "config", s3_endpoint=s3_endpoint)
    assert load_config(tmp_path / "config").s3.endpoint == s3_endpoint


def test_parameter_overrides_keep_values_as_text() -> None:
    assert steps.parameter_overrides() == []
    assert steps.parameter_overrides(base_model="1e3", registry="null") == ['model.name="1e3"', 'publish.registry="null"']
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
    assert scratch.default_scratch("s3://softprompt-registry/registry", "softprompt-tune-abc") == \
        "s3://softprompt-registry/tmp/softprompt/softprompt-tune-abc"
    assert scratch.default_scratch(str(tmp_path / "reg"), "n").endswith("softprompt-scratch/n")


def test_unknown_launcher(tmp_path: Path) -> None:
    with pytest.raises(steps.StepError, match="launcher='k8s' is not one of local, ray-jobs, rayjob"):
        steps.tune(_config(tmp_path), tmp_path, tmp_path / "out", launcher="k8s")


def test_local_tune_leaves_the_trainers_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launcher=local: the Ray layer's sweep on this machine (faked here; the pipeline integration
    tests run it for real); the resource parameters reach its config, and its output folder (winners
    and train_result.json) is the step's output."""
    from softprompt.ray import trainers

    seen: dict[str, object] = {}

    class FakeSweep:
        def __init__(self, address: str | None = None, **_: object) -> None:
            seen["address"] = address

        def train(self, cfg: JobConfig, data: Path, run_dir: Path, models: object) -> TrainOutcome:
            seen.update(ray=cfg.ray, data=sorted(p.name for p in Path(data).iterdir()))
            adapter = run_dir / "train" / "winners" / "00" / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "adapter_config.json").write_text("{}")
            outcome = TrainOutcome("ray-tune", run_dir / "train", (adapter,), with_values(cfg, {"train.lr": 0.2}),
                                   [{"step": 4, "eval_metric": 0.5}], {"steps": 4, "best_eval_metric": 0.5,
                                                                       "tune": {"best": {"trial_id": "t1", "params": {"train.lr": 0.2}}}})
            outcome.write()
            return outcome

    monkeypatch.setattr(trainers, "RayTuneTrainer", FakeSweep)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "train.parquet").write_bytes(b"PAR1")
    out = tmp_path / "winners"
    meta = steps.tune(_config(tmp_path), dataset, out, num_workers=3, gpus_per_worker=0, cpus_per_worker=2)
    ray = seen["ray"]
    assert seen["address"] is None  # a local Ray
    assert (ray.num_workers, ray.use_gpu, ray.cpus_per_worker) == (3, False, 2.0)  # type: ignore[attr-defined]
    assert seen["data"] == ["train.parquet"]
    outcome = TrainOutcome.read(out)
    assert outcome.winners == (out / "winners" / "00" / "adapter",) and outcome.config.train.lr == 0.2
    assert meta == {"launcher": "local", "trainer": "ray-tune", "winners": 1, "best_trial": "t1", "best_params": {"train.lr": 0.2},
                    "best_eval_metric": 0.5, "steps": 4}


def test_a_config_error_names_the_config_given_not_the_steps_copy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: t, labels: [a, b], verbalizer: {a: [' a'], b: [' b']}}\ndata: {train: x.csv}\ntrain: {lr: .nan}\n")
    with pytest.raises(ConfigError) as err:
        steps.validate(str(bad), tmp_path / "out.yaml")
    assert str(bad) in str(err.value) and "softprompt-validate-" not in str(err.value), str(err.value)
