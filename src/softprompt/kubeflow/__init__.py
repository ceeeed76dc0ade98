"""Kubeflow Pipelines layer: the KFP components, the pipeline, its client, and the Ray launch.

Only `components.py`, `pipeline.py`, `client.py` and `cli.py`'s handlers import kfp, and each does
so lazily or at its own top, so `softprompt --help` works where kfp is not installed. What the
component bodies run lives in `steps.py` (plain Python that calls the `softprompt` CLI), and how
the tune step starts Ray lives in `rayjob.py`; neither imports kfp.
"""
