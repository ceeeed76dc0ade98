"""Fixtures for the core-engine tests: one tiny random Llama per session and small demo configs.

The tiny model's tokenizer is trained on the demo texts rendered with the demo template and label
words, so the demo's label words are single tokens (the fast scoring path); tests that need
multi-token label words pick words the tokenizer splits.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt.config import JobConfig, ModelConfig, load_config
from softprompt.modeling import LoadedModel, load_model
from softprompt.testing import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_TRAIN = REPO_ROOT / "src" / "softprompt" / "demo" / "train.csv"
DEMO_TEST = REPO_ROOT / "src" / "softprompt" / "demo" / "test.csv"

DemoConfig = Callable[..., JobConfig]

# The tiny model's matmuls are far too small to gain from a second thread, and on a busy 2-core
# machine two threads per test process contend badly (a 30-step run went from 0.4 s to 13 s).
torch.set_num_threads(1)


def tokenizer_texts() -> list[str]:
    """The demo rows rendered as the model will see them: template, text and label word."""
    cfg = load_config(DEMO_CONFIG, [f"data.train={DEMO_TRAIN}", f"data.test={DEMO_TEST}"])
    with DEMO_TRAIN.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [cfg.task.template.replace("{text}", r["text"]) + cfg.task.verbalizer[r["label"]][0] for r in rows]


def small_overrides(model_dir: Path, workdir: Path) -> list[str]:
    """Overrides that shrink the demo job to seconds on the tiny model (data paths made absolute)."""
    return [
        f"model.name={model_dir}",
        f"model.cache_dir={workdir / 'cache'}",
        "model.device=cpu",
        f"data.train={DEMO_TRAIN}",
        f"data.test={DEMO_TEST}",
        "data.max_train_rows=64",
        "data.max_eval_rows=28",
        "data.max_test_rows=28",
        "prompt.num_virtual_tokens=4",
        "tune.num_samples=0",  # the demo tunes through Ray; these tests train in-process
        "train.steps=4",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.eval_max_rows=14",
        "train.log_every=1",
        "evaluate.batch_size=16",
        f"workdir={workdir}",
        f"publish.registry={workdir / 'registry'}",
        "run_name=test",
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, width 64) whose tokenizer knows the demo vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_texts(), vocab_size=1000)


@pytest.fixture()
def tiny(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model loaded fresh (loading takes milliseconds; PEFT wrapping never leaks between tests)."""
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


@pytest.fixture()
def tiny_ctx(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model with its transformer layers redrawn at std 0.2 (the same weights every time).

    At the default init the residual stream is nearly the input embedding, so with tied embeddings
    greedy decoding repeats the last token, a wrong position or mask barely moves a score, and a
    soft prompt has almost nothing to steer. Redrawn, the output depends on the context: engine
    comparisons have teeth and a prompt can learn an easy task.
    """
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.model.layers.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return loaded


@pytest.fixture()
def demo_cfg(tiny_model_dir: Path, tmp_path: Path) -> DemoConfig:
    """`demo_cfg("train.steps=8", ...)`: configs/demo.yaml on the tiny model, a few steps, under tmp_path."""

    def make(*overrides: str) -> JobConfig:
        return load_config(DEMO_CONFIG, [*small_overrides(tiny_model_dir, tmp_path), *overrides])

    return make


@pytest.fixture(scope="session")
def demo_data(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data ingested once (small row caps) for the tiny model's tokenizer."""
    from softprompt import ingest

    work = tmp_path_factory.mktemp("demo-data")
    cfg = load_config(DEMO_CONFIG, small_overrides(tiny_model_dir, work))
    return ingest.run(cfg, work / "data").output_dir
