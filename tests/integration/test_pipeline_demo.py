"""The shipped demo, as the Kubeflow pipeline: `softprompt pipeline run --local -c configs/demo.yaml`.

The real job, not a miniature: the embedded SmolLM2-135M-Instruct, the bundled support-intent
data, the demo's Ray Tune sweep (4 trials, each a Ray Train run of 2 CPU workers on the local Ray
the tune step starts), evaluation against zero-shot and few-shot baselines, publish and the gated
promotion, every step a subprocess of kfp's SubprocessRunner. The tuned prompt must score above
both baselines; it is promoted only when significantly better than both (McNemar's exact test,
`publish.require_significance`), and the verdict line says which.

Time: the demo's target is 10 minutes on a 2-core machine, but 2-core CI machines differ: the same
pipeline took 453 s in one CI run and 722 s in another (an AMD EPYC machine, on which this
session measured 568-604 s for both this commit and 98c578d). A wall-clock limit at the target
would fail on the machine, not the code, so this test stops a run that hangs or regresses badly
(15 minutes) and prints the time and the tune step's timeline; the README records measured times
with the machine.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.outcome import TrainOutcome

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 900
"""A hang or a gross regression, not the demo's 10-minute target (see above)."""


def test_the_demo_config_runs_through_the_local_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the demo config's data paths are relative to the repository root
    registry, root = tmp_path / "registry", tmp_path / "kfp"
    t0 = time.monotonic()
    code = main(["pipeline", "run", "--local", "-c", "configs/demo.yaml", "--registry", str(registry), "--pipeline-root", str(root)])
    seconds = time.monotonic() - t0
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    timeline = "\n".join(line for line in out.splitlines() if "[tune " in line or "finished with status" in line)
    print(f"demo pipeline: {seconds:.0f}s\n{timeline}")
    assert seconds < LIMIT_S, f"the demo pipeline took {seconds:.0f}s (limit {LIMIT_S}s):\n{timeline}"

    (run_dir,) = root.iterdir()
    tuned = json.loads((run_dir / "tune" / "executor_output.json").read_text())["artifacts"]["winners"]["artifacts"][0]
    outcome = TrainOutcome.read(tuned["uri"])
    assert outcome.trainer == "ray-tune" and sum(outcome.summary["tune"]["by_status"].values()) == 4  # the demo's 4 trials
    metrics = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert metrics["tuned_accuracy"] > max(metrics["zero_shot_accuracy"], metrics["few_shot_accuracy"]), metrics
    evaluated = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())["artifacts"]["artifact"]["artifacts"][0]
    verdict = json.loads((Path(evaluated["uri"]) / "metrics.json").read_text())
    significant = verdict["beats_baselines"]
    assert significant == all(c["outcome"] == "better" for c in verdict["comparisons"].values()), verdict["comparisons"]
    assert ("beats" in verdict["verdict"]) == significant and "McNemar's exact test" in verdict["verdict"], verdict["verdict"]
    said = "beats its baselines" if significant else "does not beat every baseline significantly"
    assert re.search(rf"published version \w+ at \S+; the tuned prompt {said}", out), out[-2000:]
    assert (run_dir / "promote").exists() is significant
