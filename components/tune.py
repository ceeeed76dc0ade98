"""Tune: Ray Tune over Ray Train workers, locally, on a Ray cluster or a KubeRay RayJob (a Model).

The component is defined in `softprompt.kubeflow.components`, inside the installed package, so
`softprompt pipeline compile` works wherever softprompt is installed; this file is its place in the
repository's layout. `python components/tune.py [OUTPUT]` writes it as a standalone component
YAML (default tune.yaml) for `kfp.components.load_component_from_file`.
"""

import sys

from softprompt.kubeflow.components import tune

__all__ = ["tune"]

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(tune, sys.argv[1] if len(sys.argv) > 1 else "tune.yaml")
