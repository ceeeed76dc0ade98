"""benchmarks/gpu_smoke.py: its CPU half runs anywhere, and it needs nothing the GPU machine lacks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_runs_the_cpu_half_and_says_the_gpu_half_was_skipped(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = _script().main(["--tiny-model", str(tiny_model_dir), "--no-smollm2", "--steps", "2", "--rows", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "GPU half SKIPPED" in out
    assert '"model": "tiny-random-llama"' in out and '"mismatches": []' in out
    assert "OK: every check passed" in out


def test_it_imports_without_ray_kfp_or_boto3() -> None:
    blocked = ("ray", "kfp", "boto3", "botocore", "kubernetes")
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_smoke"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
