"""The GPU path before its first run: the settings that would crash or mislead a GPU job are refused
or resolved here, without a GPU.

No GPU has run these: CUDA facts (`torch.cuda.is_bf16_supported`, a cluster's GPU count) are faked
with monkeypatch, which is what each test that needs one says.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from softprompt import job, modeling
from softprompt.config import JobConfig, config_from_dict, recorded_config, to_dict
from softprompt.errors import ConfigError, ModelError
from softprompt.outcome import TrainOutcome

TASK = {"labels": ["neg", "pos"], "verbalizer": {"neg": [" no"], "pos": [" yes"]}}


def _raw(**sections: dict[str, Any]) -> dict[str, Any]:
    return {"task": TASK, "data": {"train": "x.csv"}, **sections}


def _cfg(**sections: dict[str, Any]) -> JobConfig:
    return config_from_dict(_raw(**sections))


# --- 1. fractional GPUs with several workers ---------------------------------------------------


def test_fractional_gpus_with_several_workers_are_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(ray={"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2})
    (problem,) = exc.value.problems
    for part in ("ray.gpus_per_worker=0.5", "ray.num_workers=2", "NCCL", "ray.gpus_per_worker: 1", "ray.num_workers: 1"):
        assert part in problem


@pytest.mark.parametrize("ray", [
    {"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 1},  # whole trials packed onto one GPU
    {"use_gpu": True, "gpus_per_worker": 1, "num_workers": 4},
    {"use_gpu": True, "num_workers": 4},
])
def test_whole_gpus_or_one_worker_are_fine(ray: dict[str, Any]) -> None:
    assert _cfg(ray=ray).ray.use_gpu


# --- 5a. dtype -----------------------------------------------------------------------------------


def test_float16_is_refused_for_a_job() -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(model={"dtype": "float16"})
    (problem,) = exc.value.problems
    assert "model.dtype=float16" in problem and "model.dtype=auto" in problem


def test_a_recorded_float16_config_still_predicts() -> None:
    """An artifact's recorded config is read only to predict with its prompt (`recorded_config`)."""
    raw = to_dict(_cfg())
    raw["model"]["dtype"] = "float16"
    assert recorded_config(raw).model.dtype == "float16"


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cuda_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, native_bf16: bool, expected: torch.dtype) -> None:
    """Fakes a CUDA GPU (`torch.cuda.is_bf16_supported`), as there is no GPU here: an A100 (native
    bf16) or a T4/V100, where torch's default check says yes because bf16 can be emulated. Without
    native bf16 it must be float32, not emulated bfloat16 nor float16 (no loss scaling)."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert modeling._pick_dtype("auto", torch.device("cuda")) == expected


def test_auto_dtype_on_cpu_is_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes bf16 support (`torch.cuda.is_bf16_supported`): the CPU still gets float32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert modeling._pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert modeling._pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_explicit_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes a T4 (`torch.cuda.is_bf16_supported` says yes only with emulation): an explicit
    `model.dtype=bfloat16` would run emulated, several times slower; refused with the fix."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ModelError, match=r"model.dtype=bfloat16 but Tesla T4 has no native bfloat16.*model.dtype=auto"):
        modeling._pick_dtype("bfloat16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert modeling._pick_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16


# --- 5b. torch threads of a Ray Train worker -----------------------------------------------------


@pytest.mark.parametrize(("cpus", "env", "expected"), [
    (4.0, {}, 4),
    (2.5, {}, 2),
    (0.5, {}, 1),
    (4.0, {"OMP_NUM_THREADS": "2"}, 2),  # the user's (or Ray's) setting wins
    (4.0, {"OMP_NUM_THREADS": "0"}, 4),  # not a usable value: the reservation
    (3.0, {"OMP_NUM_THREADS": "many"}, 3),
])
def test_worker_torch_threads(cpus: float, env: dict[str, str], expected: int) -> None:
    from softprompt.ray.worker import torch_threads

    assert torch_threads(cpus, env) == expected


# --- 5c. the GGUF cache: one conversion however many processes ask at once -----------------------


def _slow_build(tmp: Path, log: Path) -> None:
    with log.open("a") as f:
        f.write("build\n")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    time.sleep(0.5)  # a reader arriving now must wait, not see half a folder or start its own
    (tmp / "model.safetensors").write_bytes(b"weights")


def _convert(gguf: Path, cache: Path, log: Path, barrier: Any, results: Any) -> None:
    modeling._dequantize = lambda g, tmp: _slow_build(tmp, log)  # type: ignore[assignment]
    barrier.wait()
    out = modeling._from_gguf(gguf, cache)
    results.put((str(out), (out / "model.safetensors").read_bytes().decode()))


def _race(target: Any, *args: Any) -> list[Any]:
    """Run `target(*args, barrier, results)` in two forked processes released at once; what each put."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    return [results.get(timeout=5) for _ in procs]


def test_two_processes_converting_one_gguf_build_it_once(tmp_path: Path) -> None:
    """Two processes (forked, so they share the fake conversion) ask for a cold cache entry at once."""
    gguf, cache, log = tmp_path / "tiny.gguf", tmp_path / "cache", tmp_path / "builds.log"
    gguf.write_bytes(b"GGUF not really")
    got = _race(_convert, gguf, cache, log)
    assert got[0] == got[1] and got[0][1] == "weights"
    assert log.read_text() == "build\n"
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([Path(got[0][0]).name, Path(got[0][0]).name + ".lock"])


class _SlowStore:
    """A local folder store whose downloads are slow and logged (an S3 prefix, as far as the sync knows)."""

    def __init__(self, root: Path, log: Path) -> None:
        from softprompt.registry.store import LocalStore

        self.inner, self.log = LocalStore(root), log

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def get_file(self, key: str, dest: Path) -> Path:
        with self.log.open("a") as f:
            f.write(f"{key}\n")
        time.sleep(0.3)  # a second worker arriving now must wait, not load a half-synced folder
        return self.inner.get_file(key, dest)


def _sync(root: Path, cache: Path, log: Path, barrier: Any, results: Any) -> None:
    from softprompt.config import S3Config
    from softprompt.registry import store

    store.open_store = lambda uri, **kw: _SlowStore(root, log)  # type: ignore[assignment]
    barrier.wait()
    out = modeling._sync_s3_prefix("s3://models/tiny", cache, S3Config())
    results.put(sorted(p.name for p in out.iterdir()))


def test_two_workers_syncing_one_s3_model_download_it_once(tmp_path: Path) -> None:
    """Two processes (forked) sync one cold `s3://` model prefix into a shared cache at once."""
    root, cache, log = tmp_path / "bucket", tmp_path / "cache", tmp_path / "downloads.log"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"weights")
    assert _race(_sync, root, cache, log) == [["config.json", "model.safetensors"]] * 2
    assert sorted(log.read_text().split()) == ["config.json", "model.safetensors"]


def test_a_crashed_conversion_leaves_nothing_in_the_way(tmp_path: Path) -> None:
    out = tmp_path / "models" / "m-0123"
    stale = out.with_name(out.name + ".tmp")
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half")
    out.mkdir()  # a half-written folder: config.json without weights
    (out / "config.json").write_text("half")
    assert modeling._cached_folder(out, lambda tmp: _slow_build(tmp, tmp_path / "log")) == out
    assert (out / "model.safetensors").read_bytes() == b"weights" and not stale.exists()


# --- 4. the driver loads the model only after training; Tune's concurrency on a cold cluster -----


class _RecordingModels(job.Models):
    def __init__(self, cfg: JobConfig, events: list[str]) -> None:
        super().__init__(cfg)
        self.events = events

    def get(self) -> Any:
        self.events.append("load")
        return SimpleNamespace(model=None)


def _record_init_and_export(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Ray start-up and the winners' adapter export, recorded in `events` instead of run."""
    from softprompt.ray import trainers

    def export(cfg: JobConfig, loaded: Any, uri: str, out: Path) -> Path:
        events.append("export")
        (out / "adapter").mkdir(parents=True)
        return out / "adapter"

    monkeypatch.setattr(trainers.cluster, "init_ray", lambda *a, **k: events.append("init") or "ray")
    monkeypatch.setattr(trainers.ray_train, "export_adapter", export)


def test_ray_train_trainer_loads_the_model_after_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from softprompt.ray import trainers

    events: list[str] = []
    cfg = _cfg()
    fit = SimpleNamespace(name="run", checkpoint_uri="ckpt", summary=lambda: {"steps": 1})
    _record_init_and_export(monkeypatch, events)
    monkeypatch.setattr(trainers.ray_train, "fit", lambda *a, **k: events.append("fit") or fit)
    trainers.RayTrainTrainer(echo=lambda line: None).train(cfg, tmp_path / "data", tmp_path, _RecordingModels(cfg, events))
    assert events == ["init", "fit", "load", "export"]


def test_ray_tune_trainer_loads_the_model_after_the_sweep(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from softprompt.ray import trainers

    events: list[str] = []
    cfg = _cfg()
    trial = SimpleNamespace(checkpoint_uri="ckpt", params={}, steps=1, best_metric=0.5, workers=[])
    sweep = SimpleNamespace(table=lambda: "", winners=lambda: [trial], best=trial, summary=lambda: {})
    _record_init_and_export(monkeypatch, events)
    monkeypatch.setattr(trainers.tune, "run", lambda *a, **k: events.append("sweep") or sweep)
    trainers.RayTuneTrainer(echo=lambda line: None).train(cfg, tmp_path / "data", tmp_path, _RecordingModels(cfg, events))
    assert events == ["init", "sweep", "load", "export"]


def test_the_job_loads_the_model_only_after_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    events: list[str] = []
    cfg = _cfg()
    monkeypatch.setattr(job.ingest, "run", lambda *a, **k: SimpleNamespace(summary=lambda: "", output_dir=tmp_path / "data"))
    monkeypatch.setattr(job, "load_model", lambda *a, **k: events.append("load") or SimpleNamespace())
    monkeypatch.setattr(job.evaluate, "run", lambda *a, **k: events.append("evaluate") or SimpleNamespace(
        table=lambda: "", verdict="", artifact_dir=tmp_path / "artifact"))

    class FitOnly(job.InProcessTrainer):
        def describe(self, cfg: JobConfig) -> str:
            return "fake"

        def train(self, cfg: JobConfig, data: Any, run_dir: Path, models: job.Models) -> TrainOutcome:
            events.append("fit")  # a Ray trainer's workers take the GPUs here; the driver holds none
            return TrainOutcome("fake", run_dir / "train", (run_dir / "train" / "adapter",), cfg)

    job.run(cfg, tmp_path, FitOnly(), publish_artifact=False)
    assert events == ["fit", "load", "evaluate"]


class _RecordingHost:
    """Stands in for `finish.ModelHost` (the actor on a worker), recording what is asked of it."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def export(self, cfg: JobConfig, uri: str, folder: Path) -> Path:
        self.events.append("worker export")
        (folder / "adapter").mkdir(parents=True)
        return folder / "adapter"

    def evaluate(self, cfg: JobConfig, data: Any, outcome: Any, artifact_dir: Path) -> Any:
        self.events.append("worker evaluate")
        return "result"

    def close(self) -> None:
        self.events.append("close")


@pytest.mark.parametrize(("address", "ray_cfg", "where"), [
    ("auto", {}, "worker"),  # a joined cluster: the head pod has no GPU and reserves no CPU
    (None, {"use_gpu": True, "num_workers": 1}, "worker"),  # a local GPU belongs to the workers
    (None, {}, "driver"),  # a laptop's local Ray without GPUs: no shipping
])
def test_the_work_after_training_runs_on_a_worker_on_clusters_and_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, address: str | None, ray_cfg: dict[str, Any], where: str
) -> None:
    from softprompt.ray import trainers

    events: list[str] = []
    cfg = _cfg(ray=ray_cfg)
    fit = SimpleNamespace(name="run", checkpoint_uri="ckpt", summary=lambda: {"steps": 1})
    _record_init_and_export(monkeypatch, events)
    monkeypatch.setattr(trainers.ray_train, "fit", lambda *a, **k: events.append("fit") or fit)
    monkeypatch.setattr(trainers.finish, "ModelHost", lambda cfg: _RecordingHost(events))
    monkeypatch.setattr(trainers.evaluate, "run", lambda *a, **k: events.append("evaluate") or "result")
    trainer = trainers.RayTrainTrainer(address, echo=lambda line: None)
    outcome = trainer.train(cfg, tmp_path / "data", tmp_path, _RecordingModels(cfg, events))
    assert trainer.evaluate(cfg, _RecordingModels(cfg, events), tmp_path / "data", outcome, tmp_path / "artifact") == "result"
    if where == "worker":
        assert events == ["init", "fit", "worker export", "worker evaluate", "close"]  # the driver never loads it
    else:
        assert events == ["init", "fit", "load", "export", "load", "evaluate"]


def _gpu_sweep(**tune: Any) -> JobConfig:
    return _cfg(ray={"use_gpu": True, "num_workers": 2}, tune={"num_samples": 8, **tune})


def test_a_joined_cluster_without_gpus_yet_needs_max_concurrent_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes the cluster's resources (`ray.cluster_resources`): an autoscaling cluster at cold start."""
    import ray

    from softprompt.ray import tune

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError) as exc:
        tune.max_concurrent_trials(_gpu_sweep(), joined=True)
    assert "tune.max_concurrent_trials" in str(exc.value) and "0 GPUs" in str(exc.value)
    assert tune.max_concurrent_trials(_gpu_sweep(max_concurrent_trials=4), joined=True) == 4
    assert tune.max_concurrent_trials(_gpu_sweep(), joined=False) == 1  # a local Ray is what it is
    assert tune.max_concurrent_trials(_cfg(tune={"num_samples": 8}), joined=True) == 3  # CPU only: 8 // 2.01


def test_a_joined_cluster_with_gpus_derives_the_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes the cluster's resources (`ray.cluster_resources`): 8 GPUs, 2 per trial."""
    import ray

    from softprompt.ray import tune

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert tune.max_concurrent_trials(_gpu_sweep(), joined=True) == 4


def test_joins_cluster_follows_init_rays_address_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from softprompt.ray.trainers import joins_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not joins_cluster(None, _cfg())
    assert joins_cluster("auto", _cfg())
    assert joins_cluster(None, _cfg(ray={"address": "head:6379"}))
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert joins_cluster(None, _cfg())


def test_pickled_weights_are_refused_with_the_conversion(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model folder with only a pickled `pytorch_model.bin` (unpickling runs code) is refused."""
    import shutil

    from softprompt.config import ModelConfig

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"lm_head.weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"holds only pickled .bin weights; softprompt loads safetensors only. Convert once"):
        modeling.load_model(ModelConfig(name=str(folder), device="cpu"))
    assert modeling.load_model(ModelConfig(name=str(tiny_model_dir), device="cpu")).identity["weights_sha256"]
