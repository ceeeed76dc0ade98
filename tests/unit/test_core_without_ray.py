"""The core runs a whole job where Ray, kfp and kubernetes cannot be imported: `softprompt run` in a
fresh interpreter whose import system refuses those packages (the demo config on the tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, small_overrides

HIDDEN = ("ray", "kfp", "kubernetes")
RUNNER = """
import sys

class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Hidden())
from softprompt.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {hidden!r})
assert not leaked, leaked
sys.exit(code)
"""


@pytest.mark.slow
def test_softprompt_run_needs_no_ray_kfp_or_kubernetes(tiny_model_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-c", RUNNER.format(hidden=set(HIDDEN)), "run", "--no-progress", "-c", str(DEMO_CONFIG),
               *small_overrides(tiny_model_dir, tmp_path), "tune.num_samples=0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[4/4] publish" in proc.stdout
    result = json.loads((tmp_path / "test" / "publish_result.json").read_text())
    assert result["created"] is True and (tmp_path / "registry").is_dir()


def test_the_hidden_packages_really_are_hidden(tmp_path: Path) -> None:
    """The check above can fail: importing a hidden package in that interpreter is an error."""
    probe = RUNNER.format(hidden=set(HIDDEN)).replace("from softprompt.cli import main", "import ray.tune")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hidden by the test" in proc.stderr
