"""How big a local Ray this command starts (pure: no Ray started)."""

from __future__ import annotations

import os

from softprompt.config import RayConfig
from softprompt.ray.cluster import local_num_cpus


def test_a_local_ray_gets_every_core_plus_one_for_the_processes_that_only_wait() -> None:
    cores = os.cpu_count() or 1
    assert local_num_cpus(RayConfig(num_workers=1)) == cores + 1
    # 2 workers x 1 CPU and a trial's sliver fit on a 2-core laptop: 3 logical CPUs.
    assert local_num_cpus(RayConfig(num_workers=2, cpus_per_worker=1.0)) >= 3
    # More workers than cores: the local Ray is sized so one run fits (oversubscribed, but it runs).
    assert local_num_cpus(RayConfig(num_workers=cores + 2, cpus_per_worker=1.0)) == cores + 3
    assert local_num_cpus(RayConfig(num_cpus=7)) == 7  # an explicit ray.num_cpus wins
