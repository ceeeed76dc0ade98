"""Ray Train on a real local Ray: two DDP workers fed by Ray Data from S3 (moto), checkpoints on S3,
our metrics on Ray's Prometheus endpoint, and a worker killed mid-run that resumes to the same final
prompt as the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from safetensors.torch import load_file

from softprompt.dataset import read_split
from softprompt.modeling import load_model
from softprompt.prompts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from softprompt.ray import train as distributed
from softprompt.ray.storage import download_checkpoint

if TYPE_CHECKING:
    from conftest import TinyTask

pytestmark = pytest.mark.slow

RUN = ("train.steps=20", "train.eval_every=5", "ray.max_failures=1")


@pytest.fixture(scope="module")
def s3_run(tiny_task: TinyTask, ray_session: dict[str, str], s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted two-worker run reading its data from S3 and checkpointing to S3."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = "softprompt-ray-train"
    s3.create_bucket(Bucket=bucket)
    for split in ("train", "eval"):
        s3.upload_file(str(tiny_task.data_dir / f"{split}.parquet"), bucket, f"data/{split}.parquet")
    cfg = tiny_task.config(*RUN, f"ray.storage_path=s3://{bucket}/ray", f"s3.endpoint={s3_endpoint}")
    run_dir = tmp_path_factory.mktemp("s3-run") / "run"
    result = distributed.fit(cfg, f"s3://{bucket}/data", run_dir)
    return {"cfg": cfg, "result": result, "s3": s3, "bucket": bucket, "run_dir": run_dir}


def test_two_workers_train_from_s3_data_and_checkpoint_to_s3(s3_run: dict[str, Any], tiny_task: TinyTask, ray_session: dict[str, str]) -> None:
    cfg, result, s3, bucket = s3_run["cfg"], s3_run["result"], s3_run["s3"], s3_run["bucket"]

    assert result.metrics["step"] == cfg.train.steps
    assert result.checkpoint_uri.startswith(f"s3://{bucket}/ray/run/train/checkpoint_")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ray/run/train/")["Contents"]}
    assert {k.rsplit("/", 1)[-1] for k in keys} >= {"state.safetensors", "state.json"}
    # `checkpoints_to_keep` (2) bounds what stays in the bucket.
    assert len({k.split("/")[3] for k in keys if k.count("/") > 3 and k.split("/")[3].startswith("checkpoint_")}) <= cfg.ray.checkpoints_to_keep
    # Two ranks, each with its half of the training rows (Ray Data's equal split).
    n_train = len(read_split(tiny_task.data_dir, "train"))
    assert sorted((w["rank"], w["rows"]) for w in result.workers) == [(0, n_train // 2), (1, n_train // 2)]
    assert result.best_metric == pytest.approx(0.8)  # the label prior is learned

    adapter = distributed.export_adapter(cfg, load_model(cfg.model), result.checkpoint_uri, s3_run["run_dir"] / "train")
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in adapter.iterdir()}
    assert (adapter.parent / "train_history.json").is_file()

    # Our series reach Ray's Prometheus endpoint with the `ray_` prefix (exported every few seconds).
    wanted = ["ray_softprompt_tokens_per_second", "ray_softprompt_step_time_seconds_bucket", "ray_softprompt_train_loss", "ray_softprompt_eval_metric"]
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(ray_session["metrics_url"], timeout=5).read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert [name for name in wanted if name not in text] == []
    assert 'metric="accuracy"' in text and 'trial="train"' in text


def test_worker_killed_mid_run_resumes_to_the_same_final_prompt(s3_run: dict[str, Any], tiny_task: TinyTask, tmp_path: Path) -> None:
    from ray.util.state import list_actors

    cfg = tiny_task.config(*RUN)
    storage = tmp_path / "killed" / "ray" / "train"
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline, workers = time.monotonic() + 240, []
        # The only live training workers are this run's (the reference run has ended).
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [a.pid for a in list_actors(address=_state_api(), filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]) if a.pid]
            time.sleep(0.2)
        # Kill once the controller has registered the step-5 checkpoint (its snapshot names it),
        # not merely once the folder exists: the new worker group must resume from it.
        snapshot = storage / "checkpoint_manager_snapshot.json"
        while time.monotonic() < deadline and not (snapshot.is_file() and "checkpoint_000005" in snapshot.read_text(errors="replace")):
            time.sleep(0.05)
        os.kill(workers[-1], signal.SIGKILL)
        killed.append(workers[-1])

    workers_before = len(list_actors(address=_state_api(), filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))
    watcher = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(1) as pool:
        resumed = pool.submit(distributed.fit, cfg, tiny_task.data_dir, tmp_path / "killed").result(timeout=420)
    watcher.join(timeout=5)

    assert killed, "no worker was killed"
    assert resumed.metrics["step"] == cfg.train.steps
    # The killed run started a second worker group: four workers in all.
    assert len(list_actors(address=_state_api(), filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)) - workers_before == 4
    reference = download_checkpoint(s3_run["result"].checkpoint_uri, tmp_path / "reference", s3_run["cfg"].s3)
    ref = load_file(str(reference / "state.safetensors"))
    got = load_file(str(Path(resumed.checkpoint_uri) / "state.safetensors"))
    # The second worker group went on from a checkpoint (step 5 or later), not from step 0.
    resumed_at = json.loads((Path(resumed.checkpoint_uri) / "state.json").read_text())["resumed_at"]
    assert len(resumed_at) == 1 and 5 <= resumed_at[0] < cfg.train.steps, resumed_at
    # The final prompt, the best prompt and the optimizer state all match bit for bit.
    for key in ("prompt.embedding.weight", "best_embeds", "opt.0.exp_avg", "opt.0.exp_avg_sq"):
        assert ref[key].equal(got[key]), key


def test_fsdp_workers_train_the_ddp_prompt(s3_run: dict[str, Any], tiny_task: TinyTask, tmp_path: Path) -> None:
    """train.sharding=fsdp on the same two Ray Train workers, data and seeds as the DDP run: each
    worker holds half of the frozen model, and the prompts agree (float tolerance: the sharded
    forward gathers the same weights but reduces the gradient by hand)."""
    cfg = tiny_task.config(*RUN, "train.sharding=fsdp")
    result = distributed.fit(cfg, tiny_task.data_dir, tmp_path / "fsdp")
    assert result.metrics["step"] == cfg.train.steps and result.best_metric == pytest.approx(s3_run["result"].best_metric)
    reference = download_checkpoint(s3_run["result"].checkpoint_uri, tmp_path / "reference", s3_run["cfg"].s3)
    ref = load_file(str(reference / "state.safetensors"))
    got = load_file(str(Path(result.checkpoint_uri) / "state.safetensors"))
    for key in ("prompt.embedding.weight", "best_embeds"):
        assert got[key].allclose(ref[key], rtol=1e-4, atol=1e-5), key


def _state_api() -> str:
    """This session's dashboard: without an explicit address, the State API auto-detects the Ray
    instance and fails when other Ray instances run on the same machine."""
    import ray

    return "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]


def test_the_local_ray_asks_for_a_token_and_says_how_to_sign_in(ray_session: dict[str, str]) -> None:
    """Token authentication stays on for the local Ray the command starts; the line that names the
    dashboard says where the token comes from and never contains it."""
    import urllib.error

    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert "sign in with the token `ray get-auth-token` prints" in ray_session["started"]
    url = _state_api() + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    secret = (Path.home() / ".ray" / "auth_token").read_text().strip()
    assert secret not in ray_session["started"]
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=30) as ok:
        assert ok.status == 200


def test_the_work_after_training_on_a_worker_equals_the_drivers(s3_run: dict[str, Any], tiny_task: TinyTask, tmp_path: Path) -> None:
    """`finish.ModelHost`, an actor on a worker of the local Ray, exports the run's checkpoint from S3
    and evaluates it (what a cluster's head pod must not do): the same adapter bytes and the same
    metrics as the driver's own export and evaluation."""
    from softprompt import evaluate
    from softprompt.outcome import TrainOutcome
    from softprompt.ray.finish import ModelHost, pack

    cfg, uri = s3_run["cfg"], s3_run["result"].checkpoint_uri
    results = {}
    host = ModelHost(cfg)
    try:
        for where in ("driver", "worker"):
            train_dir = tmp_path / where / "train"
            if where == "driver":
                adapter = distributed.export_adapter(cfg, load_model(cfg.model), uri, train_dir)
            else:
                adapter = host.export(cfg, uri, train_dir)
            outcome = TrainOutcome("ray-train", train_dir, (adapter,), cfg)
            outcome.write()
            if where == "driver":
                results[where] = evaluate.run(cfg, load_model(cfg.model), tiny_task.data_dir, outcome, tmp_path / where / "artifact")
            else:
                results[where] = host.evaluate(cfg, tiny_task.data_dir, outcome, tmp_path / where / "artifact")
    finally:
        host.close()
    driver, worker = results["driver"], results["worker"]
    assert pack(tmp_path / "worker" / "train" / "adapter") == pack(tmp_path / "driver" / "train" / "adapter")
    assert worker.artifact_dir == tmp_path / "worker" / "artifact"
    assert worker.results == driver.results and worker.verdict == driver.verdict
    assert sorted(pack(worker.artifact_dir)) == sorted(pack(driver.artifact_dir))
