"""Fixtures for the Ray integration tests: one real local Ray per test session and a tiny task.

The task is learnable in a few steps by a tiny random Llama: six random words, label `pos` for 80%
of the rows. A prompt that learns the prior scores 0.8 on eval; the label-words start scores 0.2.
That gap is what lets the ASHA test know which trial must be stopped.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from softprompt.config import JobConfig, load_config

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "light", "music", "paper", "water"]


@dataclass(frozen=True)
class TinyTask:
    """A prepared dataset, the tiny model and the overrides that describe the task."""

    root: Path
    csv_path: Path
    model_dir: Path
    data_dir: Path
    overrides: tuple[str, ...]

    def config(self, *extra: str) -> JobConfig:
        """The task's configuration plus `extra` overrides (small, fast defaults for Ray tests)."""
        return load_config(None, [*self.overrides, *extra])


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> TinyTask:
    from softprompt import ingest
    from softprompt.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-task")
    rng = random.Random(0)
    csv_path = root / "train.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(240):
            writer.writerow([" ".join(rng.choice(WORDS) for _ in range(6)), "neg" if i % 5 == 0 else "pos"])
    model_dir = build_tiny_model(root / "model", [*WORDS, "Answer: yes no"])
    overrides = (
        f"model.name={model_dir}", f"data.train={csv_path}", "data.eval_fraction=0.25",
        "task.name=tiny", "task.labels=[pos, neg]", "task.verbalizer={pos: [' yes'], neg: [' no']}",
        "task.template='{text}\\nAnswer:'", "model.device=cpu",
        "train.steps=12", "train.eval_every=4", "train.warmup_steps=1", "train.batch_size=8", "train.log_every=4",
        "evaluate.baselines=[zero_shot]", "ray.num_workers=2",
    )
    task = TinyTask(root, csv_path, model_dir, root / "data", overrides)
    ingest.run(task.config(), task.data_dir)
    return task


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """One local Ray for the whole session (5 logical CPUs: two trials of two workers side by side, each trial
    also holding a sliver of a CPU for itself), dashboard on.

    It starts after the S3 endpoint so its worker processes inherit the endpoint's credentials.
    """
    import ray

    from softprompt.config import RayConfig
    from softprompt.ray.cluster import init_ray

    started = init_ray(RayConfig(num_cpus=5, dashboard=True))
    try:
        yield {"metrics_url": f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics", "started": started}
    finally:
        ray.shutdown()
