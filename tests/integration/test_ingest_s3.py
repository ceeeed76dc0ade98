"""Ingest from a real S3 endpoint (moto's server on loopback) via `s3.endpoint`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from softprompt.config import JobConfig, ModelConfig, config_from_dict
from softprompt.dataset import read_manifest, read_split
from softprompt.errors import DataError
from softprompt.ingest import run
from softprompt.modeling import load_tokenizer
from softprompt.testing import build_tiny_model

TASK = {
    "name": "sent",
    "labels": ["negative", "positive"],
    "verbalizer": {"negative": [" no"], "positive": [" yes"]},
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer(ModelConfig(name=str(build_tiny_model(tmp_path_factory.mktemp("tiny")))))


def cfg_for(train: str, endpoint: str, **data: Any) -> JobConfig:
    return config_from_dict({"task": TASK, "data": {"train": train, **data}, "s3": {"endpoint": endpoint}})


def test_ingest_csv_from_s3(tmp_path: Path, tok: Any, s3_endpoint: str, s3_bucket: str) -> None:
    body = "text,label\n" + "".join(f'"review {i}, with a comma",{i % 2}\n' for i in range(20))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="raw/sst/train.csv", Body=body.encode())
    client.put_object(
        Bucket=s3_bucket, Key="test.csv", Body=b"text,label\nheld out review,1\nanother one,0\n"
    )
    uri = f"s3://{s3_bucket}/raw/sst/train.csv"
    cfg = cfg_for(
        uri, s3_endpoint, test=f"s3://{s3_bucket}/test.csv", label_map={"0": "negative", "1": "positive"}
    )
    out = tmp_path / "out"

    result = run(cfg, out, tokenizer=tok)

    assert result.counts == {"train": 18, "eval": 2, "test": 2}
    assert result.rejected == 0
    sources = read_manifest(out)["sources"]
    assert [s["uri"] for s in sources] == [uri, f"s3://{s3_bucket}/test.csv"]
    assert sources[0]["rows_read"] == 20
    texts = read_split(out, "train").texts + read_split(out, "eval").texts
    assert "review 3, with a comma" in texts
    assert json.loads((out / "ingest_result.json").read_text())["fingerprint"] == result.fingerprint


def test_missing_s3_object_is_named(tmp_path: Path, tok: Any, s3_endpoint: str, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/raw/missing.csv"
    with pytest.raises(DataError, match=r"cannot read data\.train=s3://.*/raw/missing\.csv.*missing\.csv"):
        run(cfg_for(uri, s3_endpoint), tmp_path / "out", tokenizer=tok)


def test_a_config_is_read_from_s3_with_the_endpoint_from_the_environment(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softprompt.config import load_config
    from softprompt.errors import ConfigError

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="configs/tune.yaml", Body=(
        b"task:\n  name: from-s3\n  labels: [a, b]\n  verbalizer: {a: [' a'], b: [' b']}\n"
        b"data:\n  train: s3://bucket/train.csv\ntrain:\n  lr: 1e-2\n"
    ))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    cfg = load_config(f"s3://{s3_bucket}/configs/tune.yaml", ["train.steps=70"])
    assert (cfg.task.name, cfg.train.lr, cfg.train.steps) == ("from-s3", 0.01, 70)
    with pytest.raises(ConfigError) as err:
        load_config(f"s3://{s3_bucket}/configs/missing.yaml")
    assert f"cannot read config s3://{s3_bucket}/configs/missing.yaml" in str(err.value)
